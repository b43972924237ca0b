package qmp_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vmpod/vmpod/qmp"
	"github.com/vmpod/vmpod/qmp/qmptest"
)

// q35Args is a paused (-S) q35 machine under TCG with three PCIe root ports,
// room for virtio-mem (maxmem) and one hot-pluggable vCPU (maxcpus).
func q35Args(qmpSocket string, extra ...string) []string {
	args := []string{
		"-M", "q35", "-accel", "tcg", "-cpu", "qemu64,+arat",
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-m", "512M,maxmem=2G", "-smp", "1,maxcpus=2",
		"-chardev", "socket,id=qmp,path=" + qmpSocket + ",server=on,wait=off",
		"-mon", "chardev=qmp,mode=control",
		"-device", "pcie-root-port,id=rp0,bus=pcie.0,chassis=1,addr=0x10",
		"-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=2,addr=0x11",
		"-device", "pcie-root-port,id=rp2,bus=pcie.0,chassis=3,addr=0x12",
		"-object", "memory-backend-ram,id=vmem0-mem,size=1G",
		"-device", "virtio-mem-pci,id=vmem0,memdev=vmem0-mem,bus=rp2,requested-size=0",
	}
	return append(args, extra...)
}

// startVM starts QEMU with args and dials its QMP socket.
func startVM(t *testing.T, qmpSocket string, args []string) (*qmptest.QEMU, *qmp.Monitor) {
	t.Helper()
	q := qmptest.Start(t, args)
	m, err := qmp.Dial(ctxTimeout(t, 10*time.Second), qmpSocket)
	if err != nil {
		t.Fatalf("%v\nQEMU output: %s", err, q.Output())
	}
	t.Cleanup(func() { m.Close() })
	return q, m
}

func TestIntegrationPausedQ35(t *testing.T) {
	qmptest.RequireIntegration(t)
	dir := qmptest.TempDir(t)
	disk := filepath.Join(dir, "disk1.raw")
	if err := os.WriteFile(disk, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	netns := qmptest.NewNetns(t)
	tap := netns.OpenTap(t, "vmpodtap1")
	sock := filepath.Join(dir, "qmp.sock")
	start := time.Now()
	q, m := startVM(t, sock, q35Args(sock, "-S"))
	t.Logf("QEMU answered QMP %v after exec (QEMU %s)", time.Since(start).Round(time.Millisecond), m.Version())

	step := func(name string, f func(t *testing.T, ctx context.Context)) {
		t.Helper()
		if !t.Run(name, func(t *testing.T) { f(t, ctxTimeout(t, 10*time.Second)) }) {
			t.FailNow()
		}
	}
	step("status", func(t *testing.T, ctx context.Context) {
		s, err := m.Status(ctx)
		if err != nil || s.State != qmp.RunStatePrelaunch || s.Running {
			t.Fatalf("Status = %+v, %v; want prelaunch", s, err)
		}
	})
	step("block hotplug", func(t *testing.T, ctx context.Context) {
		if err := m.BlockdevAdd(ctx, qmp.BlockdevOptions{NodeName: "disk1-drive", Filename: disk, ReadOnly: true}); err != nil {
			t.Fatal(err)
		}
		if err := m.DeviceAdd(ctx, qmp.DeviceOptions{Driver: "virtio-blk-pci", ID: "disk1", Bus: "rp0",
			Props: []qmp.Prop{qmp.StringProp("drive", "disk1-drive"), qmp.StringProp("serial", "vmpod-disk1")}}); err != nil {
			t.Fatal(err)
		}
		blocks, err := m.QueryBlock(ctx)
		if err != nil {
			t.Fatal(err)
		}
		i := slices.IndexFunc(blocks, func(b qmp.BlockInfo) bool { return b.Inserted != nil && b.Inserted.NodeName == "disk1-drive" })
		if i < 0 || blocks[i].QDev != "/machine/peripheral/disk1/virtio-backend" || !blocks[i].Inserted.ReadOnly || blocks[i].Inserted.File != disk {
			t.Fatalf("query-block has no read-only disk1-drive attached to disk1: %+v", blocks)
		}
		requireBehindPort(t, ctx, m, "rp0", "disk1")
	})
	step("duplicate id is a CommandError", func(t *testing.T, ctx context.Context) {
		err := m.DeviceAdd(ctx, qmp.DeviceOptions{Driver: "virtio-blk-pci", ID: "disk1", Bus: "rp1",
			Props: []qmp.Prop{qmp.StringProp("drive", "disk1-drive")}})
		var ce *qmp.CommandError
		if !errors.As(err, &ce) || ce.Command != "device_add" {
			t.Fatalf("duplicate device_add: %v, want a device_add CommandError", err)
		}
		t.Logf("QEMU said: %v", err)
	})
	step("nic hotplug with tap fd", func(t *testing.T, ctx context.Context) {
		if err := m.GetFD(ctx, "nic1-fd0", tap); err != nil {
			t.Fatal(err)
		}
		if err := m.NetdevAddTap(ctx, qmp.TapNetdev{ID: "nic1-tap", FDs: []string{"nic1-fd0"}}); err != nil {
			t.Fatal(err)
		}
		if err := m.DeviceAdd(ctx, qmp.DeviceOptions{Driver: "virtio-net-pci", ID: "nic1", Bus: "rp1",
			Props: []qmp.Prop{qmp.StringProp("netdev", "nic1-tap"), qmp.StringProp("mac", "52:54:00:12:34:99")}}); err != nil {
			t.Fatal(err)
		}
		requireBehindPort(t, ctx, m, "rp1", "nic1")
	})
	step("virtio-mem requested-size", func(t *testing.T, ctx context.Context) {
		path := qmp.PeripheralPath("vmem0")
		if err := qmp.QOMSet(ctx, m, path, "requested-size", uint64(256<<20)); err != nil {
			t.Fatal(err)
		}
		got, err := qmp.QOMGet[uint64](ctx, m, path, "requested-size")
		if err != nil || got != 256<<20 {
			t.Fatalf("requested-size = %d, %v; want %d", got, err, 256<<20)
		}
	})
	step("vcpu hotplug", func(t *testing.T, ctx context.Context) {
		cpus, err := m.QueryHotpluggableCPUs(ctx)
		if err != nil {
			t.Fatal(err)
		}
		free := slices.IndexFunc(cpus, func(c qmp.HotpluggableCPU) bool { return !c.Plugged() })
		if len(cpus) != 2 || free < 0 {
			t.Fatalf("hotpluggable cpus %+v: want 2 slots, one free", cpus)
		}
		if err := m.AddCPU(ctx, "cpu1", cpus[free]); err != nil {
			t.Fatal(err)
		}
		cpus, err = m.QueryHotpluggableCPUs(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range cpus {
			if !c.Plugged() {
				t.Fatalf("after AddCPU a slot is still free: %+v", cpus)
			}
		}
	})
	step("quit", func(t *testing.T, ctx context.Context) {
		sub := m.Subscribe(qmp.EventNamed(qmp.EventShutdown))
		if err := m.Quit(ctx); err != nil {
			t.Fatal(err)
		}
		e, err := sub.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if sd, err := e.AsShutdown(); err != nil || sd.Reason != "host-qmp-quit" {
			t.Fatalf("SHUTDOWN = %+v, %v", sd, err)
		}
		select {
		case <-m.Done():
		case <-ctx.Done():
			t.Fatal("monitor still open after quit")
		}
		if err := q.WaitExit(t, 10*time.Second); err != nil {
			t.Fatalf("QEMU exit: %v\n%s", err, q.Output())
		}
		if _, err := m.Status(ctx); !errors.Is(err, qmp.ErrClosed) {
			t.Fatalf("Status after quit: %v, want ErrClosed", err)
		}
		if _, err := os.Stat(sock); !os.IsNotExist(err) {
			t.Errorf("QEMU left its QMP socket behind (stat: %v)", err)
		}
	})
}

// requireBehindPort checks that the device with qdev id dev sits behind the root
// port with id port. It asks QOM: query-pci cannot see behind a root port before
// firmware has numbered the buses, and a -S machine has run no firmware.
func requireBehindPort(t *testing.T, ctx context.Context, m *qmp.Monitor, port, dev string) {
	t.Helper()
	bus, err := qmp.QOMGet[string](ctx, m, qmp.PeripheralPath(dev), "parent_bus")
	if err != nil {
		t.Fatal(err)
	}
	if want := qmp.PeripheralPath(port) + "/" + port; bus != want {
		t.Fatalf("%s sits on %s, want %s", dev, bus, want)
	}
}

// requireInPCITree checks with query-pci that the device with qdev id dev sits
// behind the root port with id port, as the guest's firmware enumerated them.
func requireInPCITree(t *testing.T, ctx context.Context, m *qmp.Monitor, port, dev string) {
	t.Helper()
	buses, err := m.QueryPCI(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range qmp.FlattenPCI(buses) {
		if d.QDevID == port && d.Bridge != nil {
			for _, child := range d.Bridge.Devices {
				if child.QDevID == dev {
					return
				}
			}
		}
	}
	t.Fatalf("query-pci: %s is not behind %s", dev, port)
}

// TestIntegrationGuestAcknowledgesHotplug boots the guest kernel so that the
// guest's side of hotplug runs: ACPI eject (DEVICE_DELETED), vCPU _OST, and
// virtio-mem plugging.
func TestIntegrationGuestAcknowledgesHotplug(t *testing.T) {
	qmptest.RequireIntegration(t)
	kernel := qmptest.GuestKernel(t)
	initrd := qmptest.BuildInitramfs(t)
	dir := qmptest.TempDir(t)
	disk := filepath.Join(dir, "disk1.raw")
	if err := os.WriteFile(disk, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	console := filepath.Join(dir, "console.log")
	sock := filepath.Join(dir, "qmp.sock")
	start := time.Now()
	_, m := startVM(t, sock, q35Args(sock,
		"-bios", "/usr/share/qemu/qboot.rom", "-kernel", kernel, "-initrd", initrd,
		"-append", "console=ttyS0 quiet panic=-1",
		"-chardev", "file,id=console,path="+console, "-serial", "chardev:console"))
	qmptest.WaitConsole(t, console, qmptest.GuestReadyMarker, 60*time.Second)
	t.Logf("guest ready %v after exec", time.Since(start).Round(time.Millisecond))
	ctx := ctxTimeout(t, 60*time.Second)

	t.Run("device_del completes", func(t *testing.T) {
		if err := m.BlockdevAdd(ctx, qmp.BlockdevOptions{NodeName: "disk1-drive", Filename: disk}); err != nil {
			t.Fatal(err)
		}
		if err := m.DeviceAdd(ctx, qmp.DeviceOptions{Driver: "virtio-blk-pci", ID: "disk1", Bus: "rp0",
			Props: []qmp.Prop{qmp.StringProp("drive", "disk1-drive")}}); err != nil {
			t.Fatal(err)
		}
		// The guest must have enumerated the device before it can eject it.
		time.Sleep(500 * time.Millisecond)
		requireInPCITree(t, ctx, m, "rp0", "disk1")
		start := time.Now()
		if err := m.DeviceDel(ctx, "disk1"); err != nil {
			t.Fatal(err)
		}
		t.Logf("device_del → DEVICE_DELETED in %v", time.Since(start).Round(time.Millisecond))
		if err := m.BlockdevDel(ctx, "disk1-drive"); err != nil {
			t.Fatal(err)
		}
		// Deleted means deleted: the id is free again.
		if err := m.BlockdevAdd(ctx, qmp.BlockdevOptions{NodeName: "disk1-drive", Filename: disk}); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("vcpu _OST", func(t *testing.T) {
		cpus, err := m.QueryHotpluggableCPUs(ctx)
		if err != nil {
			t.Fatal(err)
		}
		free := slices.IndexFunc(cpus, func(c qmp.HotpluggableCPU) bool { return !c.Plugged() })
		if free < 0 {
			t.Fatalf("no free vCPU slot: %+v", cpus)
		}
		sub := m.Subscribe(qmp.EventNamed(qmp.EventACPIDeviceOST))
		defer sub.Close()
		start := time.Now()
		if err := m.AddCPU(ctx, "cpu1", cpus[free]); err != nil {
			t.Fatal(err)
		}
		e, err := sub.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		ost, err := e.AsACPIDeviceOST()
		if err != nil || ost.Info.SlotType != "CPU" || ost.Info.Device != "cpu1" || ost.Info.Status != 0 {
			t.Fatalf("ACPI_DEVICE_OST = %+v, %v; want CPU slot of cpu1, status 0", ost, err)
		}
		t.Logf("vCPU device_add → ACPI_DEVICE_OST in %v", time.Since(start).Round(time.Millisecond))
	})
	t.Run("virtio-mem plug", func(t *testing.T) {
		sub := m.Subscribe(qmp.MemoryDeviceSizeChangeFilter("vmem0"))
		defer sub.Close()
		start := time.Now()
		if err := qmp.QOMSet(ctx, m, qmp.PeripheralPath("vmem0"), "requested-size", uint64(256<<20)); err != nil {
			t.Fatal(err)
		}
		// QEMU throttles this event to one a second per device, so the guest's
		// progress arrives in steps.
		for {
			e, err := sub.Next(ctx)
			if err != nil {
				t.Fatal(err)
			}
			ch, err := e.AsMemoryDeviceSizeChange()
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%v: MEMORY_DEVICE_SIZE_CHANGE size %d MiB", time.Since(start).Round(time.Millisecond), ch.Size>>20)
			if ch.Size == 256<<20 {
				break
			}
		}
	})
	if err := m.Quit(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestIntegrationMigratePausedVM(t *testing.T) {
	qmptest.RequireIntegration(t)
	dir := qmptest.TempDir(t)
	srcSock, dstSock := filepath.Join(dir, "src.sock"), filepath.Join(dir, "dst.sock")
	uri := "unix:" + filepath.Join(dir, "migrate.sock")
	small := func(sock string, extra ...string) []string {
		return append([]string{"-M", "q35", "-accel", "tcg", "-nodefaults", "-no-user-config", "-display", "none",
			"-m", "128M", "-chardev", "socket,id=qmp,path=" + sock + ",server=on,wait=off", "-mon", "chardev=qmp,mode=control"}, extra...)
	}
	_, src := startVM(t, srcSock, small(srcSock, "-S"))
	_, dst := startVM(t, dstSock, small(dstSock, "-incoming", "defer"))
	ctx := ctxTimeout(t, 60*time.Second)

	events := qmp.MigrationCapabilityState{Capability: qmp.MigrationCapEvents, State: true}
	for _, m := range []*qmp.Monitor{src, dst} {
		if err := m.MigrateSetCapabilities(ctx, events); err != nil {
			t.Fatal(err)
		}
	}
	if err := src.MigrateSetParameters(ctx, qmp.MigrationParameters{MaxBandwidth: 1 << 30, DowntimeLimit: 30 * time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	if s, err := dst.Status(ctx); err != nil || s.State != qmp.RunStateInMigrate {
		t.Fatalf("destination status %+v, %v; want inmigrate", s, err)
	}
	if err := dst.MigrateIncoming(ctx, uri); err != nil {
		t.Fatal(err)
	}
	srcEvents := src.Subscribe(qmp.EventNamed(qmp.EventMigration))
	defer srcEvents.Close()
	if err := src.Migrate(ctx, uri); err != nil {
		t.Fatal(err)
	}
	var seen []string
	for {
		e, err := srcEvents.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		mig, err := e.AsMigration()
		if err != nil {
			t.Fatal(err)
		}
		seen = append(seen, string(mig.Status))
		if mig.Status.Finished() {
			break
		}
	}
	if last := seen[len(seen)-1]; last != string(qmp.MigrationCompleted) {
		t.Fatalf("source MIGRATION statuses %v, want ... completed", seen)
	}
	// QEMU sends "completed" from the migration thread; the main loop then moves
	// the source to postmigrate and fills in the final statistics.
	waitState(t, ctx, src, qmp.RunStatePostMigrate)
	// The destination takes over the source's run state: prelaunch, as -S never
	// started the source.
	waitState(t, ctx, dst, qmp.RunStatePrelaunch)
	info, err := src.QueryMigrate(ctx)
	if err != nil || info.Status != qmp.MigrationCompleted || info.RAM == nil || info.RAM.Total == 0 {
		t.Fatalf("query-migrate = %+v, %v", info, err)
	}
	t.Logf("statuses %s; total %v, downtime %v, %d bytes sent", strings.Join(seen, " → "), info.TotalTime, info.Downtime, info.RAM.Transferred)
	for _, m := range []*qmp.Monitor{src, dst} {
		if err := m.Quit(ctx); err != nil {
			t.Fatal(err)
		}
	}
}

// waitState polls query-status until m leaves the migration states, and checks
// that it ends in want.
func waitState(t *testing.T, ctx context.Context, m *qmp.Monitor, want qmp.RunState) {
	t.Helper()
	for {
		s, err := m.Status(ctx)
		if err != nil {
			t.Fatalf("waiting for %s: %v", want, err)
		}
		switch s.State {
		case qmp.RunStateInMigrate, qmp.RunStateFinishMigrate:
			time.Sleep(5 * time.Millisecond)
			continue
		case want:
			return
		}
		t.Fatalf("run state %s after migration, want %s", s.State, want)
	}
}
