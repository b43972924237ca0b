package qmp_test

import (
	"errors"
	"testing"
	"time"

	"github.com/vmpod/vmpod/qmp"
	"github.com/vmpod/vmpod/qmp/qmptest"
)

func TestDeviceDelWaitsForItsOwnDeviceDeleted(t *testing.T) {
	srv := qmptest.NewServer(t)
	m := dial(t, srv)
	errc := async(func() error { return m.DeviceDel(ctxTimeout(t, 5*time.Second), "disk1") })
	c := srv.Expect("device_del")
	if string(c.Arguments) != `{"id":"disk1"}` {
		t.Errorf("device_del arguments %s", c.Arguments)
	}
	srv.Reply(c, struct{}{})
	// QEMU reports the virtio backend child first (no "device"), and other
	// devices may go away meanwhile: neither ends the wait.
	srv.Event(qmp.EventDeviceDeleted, map[string]string{"path": "/machine/peripheral/disk1/virtio-backend"})
	srv.Event(qmp.EventDeviceDeleted, map[string]string{"device": "disk2", "path": "/machine/peripheral/disk2"})
	select {
	case err := <-errc:
		t.Fatalf("DeviceDel returned before disk1 was deleted: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	srv.Event(qmp.EventDeviceDeleted, map[string]string{"device": "disk1", "path": "/machine/peripheral/disk1"})
	if err := waitErr(t, errc); err != nil {
		t.Fatal(err)
	}
}

func TestDeviceDelTimesOutWithoutGuest(t *testing.T) {
	srv := qmptest.NewServer(t)
	m := dial(t, srv)
	errc := async(func() error { return m.DeviceDel(ctxTimeout(t, 150*time.Millisecond), "nic0") })
	srv.Reply(srv.Expect("device_del"), struct{}{})
	err := waitErr(t, errc)
	if err == nil || errors.Is(err, qmp.ErrClosed) {
		t.Fatalf("DeviceDel = %v, want a timeout waiting for DEVICE_DELETED", err)
	}
}

func TestSlowSubscriberIsCutOffWithoutBlockingReplies(t *testing.T) {
	srv := qmptest.NewServer(t)
	m := dial(t, srv)
	slow := m.Subscribe(qmp.EventNamed("FLOOD"))
	defer slow.Close()
	sentinel := m.Subscribe(qmp.EventNamed("SENTINEL"))
	defer sentinel.Close()
	for range qmp.MaxQueuedEvents + 1 {
		srv.Event("FLOOD", nil)
	}
	srv.Event("SENTINEL", nil)
	// Replies still flow while the subscriber is not reading.
	errc := async(func() error { return m.Cont(ctxTimeout(t, 5*time.Second)) })
	srv.Reply(srv.Expect("cont"), struct{}{})
	if err := waitErr(t, errc); err != nil {
		t.Fatal(err)
	}
	// Dispatch is in order: once the sentinel is here, the whole flood has been
	// offered to the slow subscriber.
	if _, err := sentinel.Next(ctxTimeout(t, 5*time.Second)); err != nil {
		t.Fatal(err)
	}
	n := 0
	for {
		_, err := slow.Next(ctxTimeout(t, 5*time.Second))
		if errors.Is(err, qmp.ErrSubscriptionOverflow) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		n++
	}
	if n != qmp.MaxQueuedEvents {
		t.Errorf("got %d queued events before the overflow, want %d", n, qmp.MaxQueuedEvents)
	}
}

func TestSubscriptionCloseEndsNext(t *testing.T) {
	srv := qmptest.NewServer(t)
	m := dial(t, srv)
	sub := m.Subscribe(nil)
	errc := async(func() error { _, err := sub.Next(ctxTimeout(t, 5*time.Second)); return err })
	time.Sleep(20 * time.Millisecond)
	sub.Close()
	if err := waitErr(t, errc); !errors.Is(err, qmp.ErrSubscriptionClosed) {
		t.Fatalf("Next after Close: %v, want ErrSubscriptionClosed", err)
	}
	sub.Close() // idempotent
}

func TestQuitDeliversShutdownThenCloses(t *testing.T) {
	srv := qmptest.NewServer(t)
	m := dial(t, srv)
	sub := m.Subscribe(qmp.EventNamed(qmp.EventShutdown))
	errc := async(func() error { return m.Quit(ctxTimeout(t, 5*time.Second)) })
	c := srv.Expect("quit")
	// QEMU 7.2 sends SHUTDOWN before its reply, then hangs up.
	srv.Event(qmp.EventShutdown, map[string]any{"guest": false, "reason": "host-qmp-quit"})
	srv.Reply(c, struct{}{})
	srv.Hangup()
	if err := waitErr(t, errc); err != nil {
		t.Fatal(err)
	}
	e, err := sub.Next(ctxTimeout(t, 5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	sd, err := e.AsShutdown()
	if err != nil || sd.Guest || sd.Reason != "host-qmp-quit" {
		t.Errorf("SHUTDOWN = %+v (err %v)", sd, err)
	}
	<-m.Done()
	if _, err := sub.Next(ctxTimeout(t, time.Second)); !errors.Is(err, qmp.ErrClosed) {
		t.Errorf("Next after the close: %v, want ErrClosed", err)
	}
}

func TestQuitSucceedsWhenQEMUHangsUpBeforeAnswering(t *testing.T) {
	srv := qmptest.NewServer(t)
	m := dial(t, srv)
	errc := async(func() error { return m.Quit(ctxTimeout(t, 5*time.Second)) })
	srv.Expect("quit")
	srv.Hangup()
	if err := waitErr(t, errc); err != nil {
		t.Fatalf("Quit = %v, want nil", err)
	}
}

func TestTypedEventsDecodeStrictly(t *testing.T) {
	srv := qmptest.NewServer(t)
	m := dial(t, srv)
	sub := m.Subscribe(nil)
	defer sub.Close()
	srv.Event(qmp.EventMigration, map[string]string{"status": "completed"})
	srv.Event(qmp.EventMigration, map[string]string{"status": "teleporting"})
	srv.Event(qmp.EventMemoryDeviceSizeChange, map[string]any{"id": "vmem0", "size": 268435456, "qom-path": "/machine/peripheral/vmem0"})
	srv.Event(qmp.EventACPIDeviceOST, map[string]any{"info": map[string]any{"device": "cpu1", "slot": "1", "slot-type": "CPU", "source": 1, "status": 0}})
	srv.Event(qmp.EventACPIDeviceOST, map[string]any{"info": map[string]any{"slot": "1", "source": 1, "status": 0}})

	next := func() qmp.Event {
		e, err := sub.Next(ctxTimeout(t, 5*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		return e
	}
	if mig, err := next().AsMigration(); err != nil || mig.Status != qmp.MigrationCompleted || !mig.Status.Finished() {
		t.Errorf("MIGRATION = %+v (err %v)", mig, err)
	}
	var re *qmp.ReplyError
	if _, err := next().AsMigration(); !errors.As(err, &re) || re.Field != "data.status" {
		t.Errorf("unknown migration status: %v, want a ReplyError for data.status", err)
	}
	if mem, err := next().AsMemoryDeviceSizeChange(); err != nil || mem.ID != "vmem0" || mem.Size != 256<<20 {
		t.Errorf("MEMORY_DEVICE_SIZE_CHANGE = %+v (err %v)", mem, err)
	}
	if ost, err := next().AsACPIDeviceOST(); err != nil || ost.Info.Device != "cpu1" || ost.Info.SlotType != "CPU" {
		t.Errorf("ACPI_DEVICE_OST = %+v (err %v)", ost, err)
	}
	if _, err := next().AsACPIDeviceOST(); !errors.As(err, &re) || re.Field != "data.info.slot-type" {
		t.Errorf("ACPI_DEVICE_OST without slot-type: %v, want a ReplyError for data.info.slot-type", err)
	}
	if _, err := (qmp.Event{Name: "RESET"}).AsShutdown(); err == nil {
		t.Error("AsShutdown accepted a RESET event")
	}
}
