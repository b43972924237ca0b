package qmp_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/vmpod/vmpod/qmp"
	"github.com/vmpod/vmpod/qmp/qmptest"
)

// dial connects a Monitor to srv and closes it when the test ends.
func dial(t *testing.T, srv *qmptest.Server) *qmp.Monitor {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	m, err := qmp.Dial(ctx, srv.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// async runs f in a goroutine and returns a channel with its error.
func async(f func() error) <-chan error {
	ch := make(chan error, 1)
	go func() { ch <- f() }()
	return ch
}

func waitErr(t *testing.T, ch <-chan error) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(5 * time.Second):
		t.Fatal("call did not return within 5s")
		return nil
	}
}

func ctxTimeout(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func TestDialHandshakeAndStatus(t *testing.T) {
	srv := qmptest.NewServer(t)
	m := dial(t, srv)
	if got := m.Version(); got != "7.2.22" {
		t.Errorf("Version() = %q, want 7.2.22", got)
	}
	res := make(chan qmp.Status, 1)
	errc := async(func() error {
		s, err := m.Status(ctxTimeout(t, 5*time.Second))
		res <- s
		return err
	})
	srv.Reply(srv.Expect("query-status"), map[string]any{"running": false, "status": "prelaunch", "singlestep": false})
	if err := waitErr(t, errc); err != nil {
		t.Fatal(err)
	}
	if s := <-res; s.Running || s.State != qmp.RunStatePrelaunch {
		t.Errorf("Status() = %+v, want prelaunch, not running", s)
	}
}

func TestDialRetriesUntilSocketAppears(t *testing.T) {
	path := filepath.Join(t.TempDir(), "qmp.sock")
	type dialed struct {
		m   *qmp.Monitor
		err error
	}
	ch := make(chan dialed, 1)
	go func() {
		m, err := qmp.Dial(ctxTimeout(t, 5*time.Second), path)
		ch <- dialed{m, err}
	}()
	time.Sleep(100 * time.Millisecond) // QEMU has not created its socket yet
	qmptest.NewServer(t, qmptest.AtPath(path))
	select {
	case d := <-ch:
		if d.err != nil {
			t.Fatal(d.err)
		}
		d.m.Close()
	case <-time.After(5 * time.Second):
		t.Fatal("Dial did not connect within 5s")
	}
}

func TestDialGivesUpOnMissingSocket(t *testing.T) {
	start := time.Now()
	_, err := qmp.Dial(ctxTimeout(t, 150*time.Millisecond), filepath.Join(t.TempDir(), "absent.sock"))
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Dial error = %v, want DeadlineExceeded", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Dial took %v after a 150ms deadline", d)
	}
}

func TestDialTimesOutWithoutGreetingAndHangsUp(t *testing.T) {
	srv := qmptest.NewServer(t, qmptest.WithoutGreeting())
	start := time.Now()
	_, err := qmp.Dial(ctxTimeout(t, 200*time.Millisecond), srv.Path)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Dial error = %v, want DeadlineExceeded", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Dial took %v after a 200ms deadline", d)
	}
	// The abandoned connection must be closed, or QEMU (which serves one QMP
	// client at a time) would never serve the next Dial.
	select {
	case <-srv.Disconnected():
	case <-time.After(5 * time.Second):
		t.Fatal("Dial left its connection open after timing out")
	}
}

func TestCommandErrorKeepsCommandAndDescription(t *testing.T) {
	srv := qmptest.NewServer(t)
	m := dial(t, srv)
	errc := async(func() error {
		return m.DeviceAdd(ctxTimeout(t, 5*time.Second), qmp.DeviceOptions{Driver: "virtio-blk-pci", ID: "disk0"})
	})
	srv.ReplyError(srv.Expect("device_add"), "GenericError", "Duplicate device ID 'disk0'")
	err := waitErr(t, errc)
	var ce *qmp.CommandError
	if !errors.As(err, &ce) {
		t.Fatalf("error %v (%T) is not a *CommandError", err, err)
	}
	if ce.Command != "device_add" || ce.Desc != "Duplicate device ID 'disk0'" {
		t.Errorf("CommandError = %+v", ce)
	}
	if want := "qmp: device_add disk0: QEMU: Duplicate device ID 'disk0'"; err.Error() != want {
		t.Errorf("error text = %q, want %q", err, want)
	}
	if errors.Is(err, qmp.ErrClosed) || m.Err() != nil {
		t.Errorf("a QMP error must not close the monitor (err %v, m.Err %v)", err, m.Err())
	}
}

func TestRepliesAndEventsInterleave(t *testing.T) {
	srv := qmptest.NewServer(t)
	m := dial(t, srv)
	sub := m.Subscribe(qmp.EventNamed("A", "B", "C"))
	defer sub.Close()

	errc := async(func() error {
		s, err := m.Status(ctxTimeout(t, 5*time.Second))
		if err == nil && s.State != qmp.RunStateRunning {
			err = fmt.Errorf("status %q, want running", s.State)
		}
		return err
	})
	c := srv.Expect("query-status")
	srv.Event("A", nil)
	srv.Event("IGNORED", nil)
	srv.Event("B", map[string]int{"n": 2})
	srv.Reply(c, map[string]any{"running": true, "status": "running"})
	srv.Event("C", nil)
	if err := waitErr(t, errc); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"A", "B", "C"} {
		e, err := sub.Next(ctxTimeout(t, 5*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		if e.Name != want {
			t.Fatalf("event %q, want %q", e.Name, want)
		}
		if e.Time.IsZero() {
			t.Errorf("event %s has no timestamp", e.Name)
		}
	}
}

func TestEventsQueuedBeforeNextAreKept(t *testing.T) {
	srv := qmptest.NewServer(t)
	m := dial(t, srv)
	sub := m.Subscribe(qmp.EventNamed("E"))
	defer sub.Close()
	sentinel := m.Subscribe(qmp.EventNamed("SENTINEL"))
	defer sentinel.Close()

	for i := range 3 {
		srv.Event("E", map[string]int{"n": i})
	}
	srv.Event("SENTINEL", nil)
	// Events are dispatched in order, so once the sentinel is here the three
	// earlier events sit in sub's queue with nobody waiting on it.
	if _, err := sentinel.Next(ctxTimeout(t, 5*time.Second)); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		e, err := sub.Next(ctxTimeout(t, time.Second))
		if err != nil {
			t.Fatalf("event %d: %v", i, err)
		}
		var d struct {
			N int `json:"n"`
		}
		if err := e.Decode(&d); err != nil || d.N != i {
			t.Fatalf("event %d: data %s (err %v)", i, e.Data, err)
		}
	}
}

func TestTimeoutWhileQEMUIsSilentKeepsMonitorInStep(t *testing.T) {
	srv := qmptest.NewServer(t)
	m := dial(t, srv)

	start := time.Now()
	first := async(func() error { _, err := m.Status(ctxTimeout(t, 100*time.Millisecond)); return err })
	stuck := srv.Expect("query-status") // ...and QEMU does not answer
	err := waitErr(t, first)
	if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, qmp.ErrNoReply) {
		t.Fatalf("first call: %v, want DeadlineExceeded and ErrNoReply", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("first call returned after %v, want about 100ms", d)
	}

	// The owner still waits for the first reply, so this one never leaves the queue.
	err = waitErr(t, async(func() error { return m.Stop(ctxTimeout(t, 100*time.Millisecond)) }))
	if !errors.Is(err, qmp.ErrNotSent) {
		t.Fatalf("queued call: %v, want ErrNotSent", err)
	}

	// The late reply to the first command is read and dropped; the abandoned
	// stop is never sent; the next command gets its own reply.
	srv.Reply(stuck, map[string]any{"running": true, "status": "running"})
	next := async(func() error { return m.Cont(ctxTimeout(t, 5*time.Second)) })
	srv.Reply(srv.Expect("cont"), struct{}{})
	if err := waitErr(t, next); err != nil {
		t.Fatal(err)
	}
	srv.NoCommand(50 * time.Millisecond)
}

func TestConnectionDropMidCommand(t *testing.T) {
	srv := qmptest.NewServer(t)
	m := dial(t, srv)
	sub := m.Subscribe(nil)

	errc := async(func() error { _, err := m.Status(ctxTimeout(t, 5*time.Second)); return err })
	srv.Expect("query-status")
	srv.Hangup()
	if err := waitErr(t, errc); !errors.Is(err, qmp.ErrClosed) {
		t.Fatalf("pending call: %v, want ErrClosed", err)
	}
	select {
	case <-m.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("monitor not done after the connection dropped")
	}
	if !errors.Is(m.Err(), qmp.ErrClosed) {
		t.Errorf("Err() = %v, want ErrClosed", m.Err())
	}
	if err := m.Cont(ctxTimeout(t, time.Second)); !errors.Is(err, qmp.ErrClosed) {
		t.Errorf("call after drop: %v, want ErrClosed", err)
	}
	if _, err := sub.Next(ctxTimeout(t, time.Second)); !errors.Is(err, qmp.ErrClosed) {
		t.Errorf("subscription after drop: %v, want ErrClosed", err)
	}
	if _, err := m.Subscribe(nil).Next(ctxTimeout(t, time.Second)); !errors.Is(err, qmp.ErrClosed) {
		t.Errorf("subscription made after drop: %v, want ErrClosed", err)
	}
}

func TestCloseFailsPendingCallsAndReturns(t *testing.T) {
	srv := qmptest.NewServer(t)
	m := dial(t, srv)
	errc := async(func() error { _, err := m.Status(context.Background()); return err })
	srv.Expect("query-status")
	closed := async(m.Close)
	if err := waitErr(t, errc); !errors.Is(err, qmp.ErrClosed) {
		t.Fatalf("pending call: %v, want ErrClosed", err)
	}
	if err := waitErr(t, closed); err != nil {
		t.Fatal(err)
	}
	select {
	case <-srv.Disconnected():
	case <-time.After(5 * time.Second):
		t.Fatal("Close left the connection open")
	}
}

func TestMalformedRepliesNameTheField(t *testing.T) {
	srv := qmptest.NewServer(t)
	m := dial(t, srv)
	tests := []struct {
		name      string
		call      func(context.Context) error
		reply     string // the line QEMU sends, %s = the command id
		wantField string
	}{
		{"missing field", statusCall(m), `{"return": {"running": true}, "id": %s}`, "return.status"},
		{"ill-typed field", statusCall(m), `{"return": {"running": "yes", "status": "running"}, "id": %s}`, "return.running"},
		{"unknown enum", statusCall(m), `{"return": {"running": true, "status": "flying"}, "id": %s}`, "return.status"},
		{"no return member", statusCall(m), `{"id": %s}`, "return"},
		{"nested missing field", func(ctx context.Context) error { _, err := m.QueryHotpluggableCPUs(ctx); return err },
			`{"return": [{"type": "qemu64-x86_64-cpu", "vcpus-count": 1, "props": {}}, {"type": "x", "vcpus-count": 1}], "id": %s}`, "return[1].props"},
		{"nested ill-typed field", func(ctx context.Context) error { _, err := m.QueryHotpluggableCPUs(ctx); return err },
			`{"return": [{"type": "qemu64-x86_64-cpu", "vcpus-count": 1, "props": {"socket-id": "zero"}}], "id": %s}`, "return.props.socket-id"},
		{"unknown migration status", func(ctx context.Context) error { _, err := m.QueryMigrate(ctx); return err },
			`{"return": {"status": "teleporting"}, "id": %s}`, "return.status"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			errc := async(func() error { return tt.call(ctxTimeout(t, 5*time.Second)) })
			c := srv.Next()
			srv.WriteLine(fmt.Sprintf(tt.reply, c.ID))
			err := waitErr(t, errc)
			var re *qmp.ReplyError
			if !errors.As(err, &re) {
				t.Fatalf("error %v (%T), want *ReplyError", err, err)
			}
			if re.Field != tt.wantField {
				t.Errorf("ReplyError.Field = %q, want %q (%v)", re.Field, tt.wantField, err)
			}
		})
	}
	if m.Err() != nil {
		t.Errorf("malformed replies closed the monitor: %v", m.Err())
	}
}

func statusCall(m *qmp.Monitor) func(context.Context) error {
	return func(ctx context.Context) error { _, err := m.Status(ctx); return err }
}

func TestNonJSONLineIsSkipped(t *testing.T) {
	srv := qmptest.NewServer(t)
	m := dial(t, srv)
	errc := async(func() error { _, err := m.Status(ctxTimeout(t, 5*time.Second)); return err })
	c := srv.Expect("query-status")
	srv.WriteLine(`this is not JSON`)
	srv.Reply(c, map[string]any{"running": true, "status": "running"})
	if err := waitErr(t, errc); err != nil {
		t.Fatal(err)
	}
}

func TestForeignReplyIDClosesMonitor(t *testing.T) {
	srv := qmptest.NewServer(t)
	m := dial(t, srv)
	errc := async(func() error { _, err := m.Status(ctxTimeout(t, 5*time.Second)); return err })
	srv.Expect("query-status")
	srv.WriteLine(`{"return": {"running": true, "status": "running"}, "id": "someone-else"}`)
	if err := waitErr(t, errc); !errors.Is(err, qmp.ErrClosed) {
		t.Fatalf("error %v, want ErrClosed", err)
	}
	<-m.Done()
}

func TestConcurrentCallsGetTheirOwnReplies(t *testing.T) {
	srv := qmptest.NewServer(t)
	m := dial(t, srv)
	const n = 50
	go func() {
		for c := range srv.Commands() {
			srv.Event("NOISE", nil)
			srv.Reply(c, json.RawMessage(c.Arguments))
		}
	}()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			var got struct {
				N int `json:"n"`
			}
			if err := m.Execute(ctxTimeout(t, 5*time.Second), "echo", map[string]int{"n": i}, &got); err != nil {
				errs <- err
			} else if got.N != i {
				errs <- fmt.Errorf("call %d got reply %d", i, got.N)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}
