package devices_test

// These tests prove rendered command lines right the only way that counts: QEMU
// 7.2 starts from them, and QMP shows every device where the VM put it. Only the
// tests import qmp; the devices package itself does not.

import (
	"bufio"
	"context"
	"errors"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/devices"
	"github.com/vmpod/vmpod/qmp"
	"github.com/vmpod/vmpod/qmp/qmptest"
)

// virtiofsdBinary is the C virtiofsd Debian 12 ships with QEMU 7.2.
const virtiofsdBinary = "/usr/lib/qemu/virtiofsd"

// fixture is a scratch directory whose paths contain commas, so that every path
// QEMU parses as an option value exercises the escaping.
type fixture struct {
	t     *testing.T
	dir   string // has a comma in its name
	share string // a directory to export (virtiofsd cannot take commas in -o source=)
	disk  string
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	base := qmptest.TempDir(t)
	f := &fixture{t: t, dir: filepath.Join(base, "vm,1"), share: filepath.Join(base, "share")}
	for _, d := range []string{f.dir, f.share} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	f.disk = filepath.Join(f.dir, "disk,0.raw")
	if err := os.WriteFile(f.disk, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *fixture) path(name string) string { return filepath.Join(f.dir, name) }

// startVirtiofsd serves f.share on a socket and returns the socket's path.
// virtiofsd exits by itself when QEMU disconnects; the test still reaps it.
func (f *fixture) startVirtiofsd() string {
	f.t.Helper()
	if _, err := os.Stat(virtiofsdBinary); err != nil {
		f.t.Fatalf("virtio-fs needs %s (Debian's qemu-system-common): %v", virtiofsdBinary, err)
	}
	sock := f.path("vfs.sock")
	cmd := exec.Command(virtiofsdBinary, "--socket-path="+sock, "-o", "source="+f.share, "-o", "cache=auto")
	if err := cmd.Start(); err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	for deadline := time.Now().Add(5 * time.Second); ; {
		if _, err := os.Stat(sock); err == nil {
			return sock
		}
		if time.Now().After(deadline) {
			f.t.Fatal("virtiofsd did not create its socket within 5s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// boot renders vm, starts QEMU and dials its monitor.
func boot(t *testing.T, vm *devices.VM) (*qmptest.QEMU, *qmp.Monitor) {
	t.Helper()
	args, files := vm.Render()
	t.Logf("qemu-system-x86_64 %s", strings.Join(args, " "))
	q := qmptest.Start(t, args, files...)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m, err := qmp.Dial(ctx, vm.Machine().QMPSocket)
	if err != nil {
		t.Fatalf("%v\nQEMU output:\n%s", err, q.Output())
	}
	t.Cleanup(func() { m.Close() })
	return q, m
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// quit stops QEMU over QMP and checks that it exits and removes its QMP socket.
func quit(t *testing.T, q *qmptest.QEMU, m *qmp.Monitor, qmpSocket string) {
	t.Helper()
	if err := m.Quit(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	if err := q.WaitExit(t, 10*time.Second); err != nil {
		t.Fatalf("QEMU exit: %v\n%s", err, q.Output())
	}
	if _, err := os.Stat(qmpSocket); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("QMP socket left behind (stat: %v)", err)
	}
}

// qom reads a property of the device with qdev id id.
func qom[T any](t *testing.T, m *qmp.Monitor, id, property string) T {
	t.Helper()
	v, err := qmp.QOMGet[T](testCtx(t), m, qmp.PeripheralPath(id), property)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func expectQOM[T comparable](t *testing.T, m *qmp.Monitor, id, property string, want T) {
	t.Helper()
	if got := qom[T](t, m, id, property); got != want {
		t.Errorf("%s.%s = %v, want %v", id, property, got, want)
	}
}

// expectBlock checks that node is open read-only (or not) on file, used by device id.
func expectBlock(t *testing.T, m *qmp.Monitor, node, file, id string, readOnly bool) {
	t.Helper()
	blocks, err := m.QueryBlock(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range blocks {
		if b.Inserted != nil && b.Inserted.NodeName == node {
			// virtio-*-pci proxies report their backend child; virtio-mmio
			// devices are themselves the virtio device and report their id.
			qdevOK := b.QDev == id || b.QDev == qmp.PeripheralPath(id)+"/virtio-backend"
			if b.Inserted.File != file || b.Inserted.ReadOnly != readOnly || !qdevOK {
				t.Errorf("block node %s: %+v %+v; want %s (read-only %v) on %s", node, b, *b.Inserted, file, readOnly, id)
			}
			return
		}
	}
	t.Errorf("query-block has no node %s: %+v", node, blocks)
}

// expectChardevs checks that each chardev exists and its backend mentions the path.
func expectChardevs(t *testing.T, m *qmp.Monitor, want map[string]string) {
	t.Helper()
	chardevs, err := m.QueryChardev(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, c := range chardevs {
		got[c.Label] = c.Filename
	}
	for label, path := range want {
		if !strings.Contains(got[label], path) {
			t.Errorf("chardev %s = %q, want one on %s", label, got[label], path)
		}
	}
}

// hotplug carries out a devices.Hotplug over QMP, the way vmpod's runtime does.
func hotplug(ctx context.Context, m *qmp.Monitor, hp devices.Hotplug) error {
	if b := hp.Blockdev; b != nil {
		if err := m.BlockdevAdd(ctx, qmp.BlockdevOptions(*b)); err != nil {
			return err
		}
	}
	if tap := hp.Tap; tap != nil {
		names := tap.FDNames()
		for i, f := range tap.Files {
			if err := m.GetFD(ctx, names[i], f); err != nil {
				return err
			}
		}
		if err := m.NetdevAddTap(ctx, qmp.TapNetdev{ID: tap.ID, FDs: names, Ifname: tap.Ifname, Queues: tap.Queues, Vhost: tap.Vhost}); err != nil {
			return err
		}
	}
	if mem := hp.Memory; mem != nil {
		if err := m.ObjectAddMemoryBackend(ctx, qmp.MemoryBackend(*mem)); err != nil {
			return err
		}
	}
	dev := qmp.DeviceOptions{Driver: hp.Device.Driver, ID: hp.Device.ID, Bus: hp.Device.Bus}
	for _, p := range hp.Device.Props {
		dev.Props = append(dev.Props, qmp.Prop(p))
	}
	return m.DeviceAdd(ctx, dev)
}

func TestIntegrationQ35RenderedArgv(t *testing.T) {
	qmptest.RequireIntegration(t)
	f := newFixture(t)
	netns := qmptest.NewNetns(t)
	tap0, tap1 := netns.OpenTap(t, "vmpodt0"), netns.OpenTap(t, "vmpodt1")
	machine := devices.Machine{
		Name: "it,q35", Type: machine.Q35, Accel: machine.TCG, VCPUs: 1, MaxVCPUs: 2,
		Memory: 256 << 20, MaxMemory: 2 << 30, QMPSocket: f.path("qmp.sock"), ConsoleLog: f.path("console,log"),
		RootPorts: 9, StartPaused: true,
	}
	vm, err := devices.NewVM(machine,
		&devices.VirtioBlk{DeviceID: "disk0", Path: f.disk, ReadOnly: true, Serial: "vmpod-root", BootIndex: 1},
		&devices.VirtioNet{DeviceID: "eth0", MAC: "52:54:00:12:34:56", TapFiles: []*os.File{tap0}},
		&devices.VirtioFS{DeviceID: "rootfs", SocketPath: f.startVirtiofsd(), Tag: "vmpod"},
		&devices.Virtio9P{DeviceID: "share", Path: f.share, MountTag: "share", RemapInodes: true},
		&devices.VirtioSerial{DeviceID: "vser0", Ports: []devices.SerialPort{{DeviceID: "agent", Name: "vmpod.agent", SocketPath: f.path("agent.sock")}}},
		&devices.VirtioRNG{DeviceID: "rng0"},
		&devices.VirtioBalloon{DeviceID: "balloon0", FreePageReporting: true, FreePageHint: true},
		&devices.VirtioMem{DeviceID: "vmem0", Size: 1 << 30, RequestedSize: 128 << 20},
	)
	if err != nil {
		t.Fatal(err)
	}
	q, m := boot(t, vm)

	t.Run("pcie.0 layout", func(t *testing.T) {
		buses, err := m.QueryPCI(testCtx(t))
		if err != nil {
			t.Fatal(err)
		}
		at := map[string][2]int{}
		for _, d := range qmp.FlattenPCI(buses) {
			if d.Bus == 0 && d.QDevID != "" {
				at[d.QDevID] = [2]int{d.Slot, d.Function}
			}
		}
		want := map[string][2]int{
			"disk0": {1, 0}, "eth0": {2, 0}, "rootfs": {3, 0}, "share": {4, 0}, "vser0": {5, 0}, "rng0": {6, 0}, "balloon0": {7, 0}, "vmem0": {8, 0},
			"rp0": {0x18, 0}, "rp7": {0x18, 7}, "rp8": {0x19, 0},
		}
		for id, w := range want {
			if got, ok := at[id]; !ok || got != w {
				t.Errorf("%s at slot/function %v (present %v), want %v", id, got, ok, w)
			}
		}
	})
	t.Run("devices and backends", func(t *testing.T) {
		expectBlock(t, m, "disk0-drive", f.disk, "disk0", true)
		expectQOM(t, m, "disk0", "serial", "vmpod-root")
		expectQOM(t, m, "disk0", "bootindex", int64(1))
		expectQOM(t, m, "eth0", "mac", "52:54:00:12:34:56")
		expectQOM(t, m, "rootfs", "tag", "vmpod")
		expectQOM(t, m, "share", "mount_tag", "share")
		expectQOM(t, m, "agent", "name", "vmpod.agent")
		expectQOM(t, m, "agent", "parent_bus", "/machine/peripheral/vser0/virtio-backend/vser0.0")
		expectQOM(t, m, "rng0", "type", "virtio-rng-pci")
		expectQOM(t, m, "balloon0", "free-page-reporting", true)
		expectQOM(t, m, "balloon0", "free-page-hint", true)
		expectQOM(t, m, "balloon0", "iothread", "/objects/balloon0-io")
		expectQOM(t, m, "vmem0", "requested-size", uint64(128<<20))
		expectChardevs(t, m, map[string]string{
			"agent-sock": f.path("agent.sock"), "rootfs-sock": "", "console": "", "qmp": f.path("qmp.sock"),
		})
		// The console chardev reports no path; the file existing proves it.
		if _, err := os.Stat(machine.ConsoleLog); err != nil {
			t.Errorf("console log: %v", err)
		}
	})
	t.Run("hotplug through root ports", func(t *testing.T) {
		ctx := testCtx(t)
		blk, err := vm.Hotplug(&devices.VirtioBlk{DeviceID: "disk1", Path: f.disk, ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		nic, err := vm.Hotplug(&devices.VirtioNet{DeviceID: "eth1", MAC: "52:54:00:12:34:57", TapFiles: []*os.File{tap1}})
		if err != nil {
			t.Fatal(err)
		}
		for _, hp := range []devices.Hotplug{blk, nic} {
			if err := hotplug(ctx, m, hp); err != nil {
				t.Fatal(err)
			}
			expectQOM(t, m, hp.Device.ID, "parent_bus", qmp.PeripheralPath(hp.Port.ID)+"/"+hp.Port.ID)
		}
		if blk.Port.ID != "rp0" || nic.Port.ID != "rp1" {
			t.Errorf("ports %s, %s; want rp0, rp1", blk.Port.ID, nic.Port.ID)
		}
		expectBlock(t, m, "disk1-drive", f.disk, "disk1", true)
	})
	quit(t, q, m, machine.QMPSocket)
}

func TestIntegrationMicrovmRenderedArgv(t *testing.T) {
	qmptest.RequireIntegration(t)
	f := newFixture(t)
	netns := qmptest.NewNetns(t)
	tap := netns.OpenTap(t, "vmpodt0")
	machine := devices.Machine{
		Name: "it-microvm", Type: machine.MicroVM, Accel: machine.TCG, VCPUs: 1, Memory: 256 << 20,
		QMPSocket: f.path("qmp.sock"), ConsoleLog: f.path("console.log"), StartPaused: true,
	}
	devs := []devices.Device{
		&devices.VirtioFS{DeviceID: "rootfs", SocketPath: f.startVirtiofsd(), Tag: "vmpod"},
		&devices.VirtioSerial{DeviceID: "vser0", Ports: []devices.SerialPort{{DeviceID: "agent", Name: "vmpod.agent", SocketPath: f.path("agent,sock")}}},
		&devices.VirtioRNG{DeviceID: "rng0"},
		&devices.VirtioBlk{DeviceID: "disk0", Path: f.disk},
		&devices.VirtioNet{DeviceID: "eth0", MAC: "52:54:00:12:34:56", TapFiles: []*os.File{tap}},
		&devices.Virtio9P{DeviceID: "share", Path: f.share, MountTag: "share"},
		&devices.VirtioBalloon{DeviceID: "balloon0", DeflateOnOOM: true},
	}
	vm, err := devices.NewVM(machine, devs...)
	if err != nil {
		t.Fatal(err)
	}
	q, m := boot(t, vm)

	props, err := m.QOMList(testCtx(t), "/machine/peripheral")
	if err != nil {
		t.Fatal(err)
	}
	types := map[string]string{}
	for _, p := range props {
		types[p.Name] = p.Type
	}
	for id, driver := range map[string]string{
		"rootfs": "vhost-user-fs-device", "vser0": "virtio-serial-device", "agent": "virtserialport", "rng0": "virtio-rng-device",
		"disk0": "virtio-blk-device", "eth0": "virtio-net-device", "share": "virtio-9p-device", "balloon0": "virtio-balloon-device",
	} {
		if got := types[id]; got != "child<"+driver+">" {
			t.Errorf("/machine/peripheral/%s is %q, want child<%s>", id, got, driver)
		}
		if id != "agent" && !strings.Contains(qom[string](t, m, id, "parent_bus"), "virtio-mmio-bus") {
			t.Errorf("%s is not on a virtio-mmio bus", id)
		}
	}
	expectQOM(t, m, "rootfs", "tag", "vmpod")
	expectQOM(t, m, "agent", "name", "vmpod.agent")
	expectQOM(t, m, "balloon0", "deflate-on-oom", true)
	expectBlock(t, m, "disk0-drive", f.disk, "disk0", false)
	expectChardevs(t, m, map[string]string{"agent-sock": f.path("agent,sock")})
	// virtio-fs needs modern virtio-mmio: its transport must not be forced legacy.
	transport := path.Dir(qom[string](t, m, "rootfs", "parent_bus"))
	if legacy, err := qmp.QOMGet[bool](testCtx(t), m, transport, "force-legacy"); err != nil || legacy {
		t.Errorf("%s force-legacy = %v, %v; want false", transport, legacy, err)
	}
	quit(t, q, m, machine.QMPSocket)
}

// hostTSCKHz is the host's TSC frequency for tsc_early_khz= (microvm under TCG
// has nothing to calibrate the TSC against). "cpu MHz" is the TSC rate on hosts
// with constant_tsc.
func hostTSCKHz(t *testing.T) int {
	t.Helper()
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "cpu MHz" {
			mhz, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err != nil {
				t.Fatalf("cpu MHz %q: %v", v, err)
			}
			return int(mhz * 1000)
		}
	}
	t.Fatal("no cpu MHz in /proc/cpuinfo")
	return 0
}

// TestIntegrationRenderedMachinesBoot boots the guest kernel from rendered argv
// on both machine types: the Machine defaults (CPU model, firmware, modern
// virtio-mmio, console) make a VM that reaches /init.
func TestIntegrationRenderedMachinesBoot(t *testing.T) {
	qmptest.RequireIntegration(t)
	kernel := qmptest.GuestKernel(t)
	initrd := qmptest.BuildInitramfs(t)
	for _, tt := range []struct {
		name    string
		machine devices.Machine
	}{
		{"microvm", devices.Machine{Type: machine.MicroVM, Append: "console=ttyS0 quiet panic=-1 pci=off tsc_early_khz=" + strconv.Itoa(hostTSCKHz(t))}},
		{"q35", devices.Machine{Type: machine.Q35, Firmware: devices.QbootFirmware, RootPorts: 4, Append: "console=ttyS0 quiet panic=-1"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t)
			mc := tt.machine
			mc.Name, mc.Accel, mc.VCPUs, mc.Memory = "boot-"+tt.name, machine.TCG, 1, 256<<20
			mc.Kernel, mc.Initrd = kernel, initrd
			mc.QMPSocket, mc.ConsoleLog = f.path("qmp.sock"), f.path("console.log")
			vm, err := devices.NewVM(mc,
				&devices.VirtioSerial{DeviceID: "vser0", Ports: []devices.SerialPort{{DeviceID: "agent", Name: "vmpod.agent", SocketPath: f.path("agent.sock")}}},
				&devices.VirtioRNG{DeviceID: "rng0"},
			)
			if err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			q, m := boot(t, vm)
			qmptest.WaitConsole(t, mc.ConsoleLog, qmptest.GuestReadyMarker, 60*time.Second)
			t.Logf("%s: guest /init ran %v after exec", tt.name, time.Since(start).Round(time.Millisecond))
			quit(t, q, m, mc.QMPSocket)
		})
	}
}

// TestIntegrationUnavailableBackends covers the devices whose host side this
// machine lacks (vhost-vsock, VFIO hardware): QEMU must get past parsing the
// rendered option and fail on the missing host resource, or start if it exists.
func TestIntegrationUnavailableBackends(t *testing.T) {
	qmptest.RequireIntegration(t)
	for _, tt := range []struct {
		dev      devices.Device
		hostPath string // its presence means the device should start
		failure  string // QEMU's complaint when it is absent
	}{
		{&devices.Vsock{DeviceID: "vsock0", GuestCID: 1234}, "/dev/vhost-vsock", "vhost-vsock: failed to open vhost device"},
		{&devices.VFIO{DeviceID: "gpu0", Host: devices.PCIAddress{Bus: 0xfe, Device: 0x1f, Function: 7}}, "/sys/bus/pci/devices/0000:fe:1f.7", "no such host device"},
	} {
		t.Run(tt.dev.ID(), func(t *testing.T) {
			if _, err := os.Stat(tt.hostPath); err == nil {
				t.Skipf("%s exists here, so this test's premise does not hold", tt.hostPath)
			}
			f := newFixture(t)
			vm, err := devices.NewVM(devices.Machine{Type: machine.Q35, Accel: machine.TCG, VCPUs: 1, Memory: 128 << 20,
				QMPSocket: f.path("qmp.sock"), StartPaused: true}, tt.dev)
			if err != nil {
				t.Fatal(err)
			}
			args, files := vm.Render()
			q := qmptest.Start(t, args, files...)
			exitErr := q.WaitExit(t, 10*time.Second)
			// This message comes from realizing the device, after QEMU parsed
			// every property of the rendered option.
			if out := q.Output(); exitErr == nil || !strings.Contains(out, tt.failure) {
				t.Fatalf("QEMU exit %v, output %q; want a failure %q", exitErr, out, tt.failure)
			}
		})
	}
}

// TestIntegrationCPUFeatures starts QEMU with a named CPU model, Hyper-V enlightenments,
// a hidden KVM signature and ACPI and SMM off, and reads each back from the machine and
// its vCPU: the rendered -cpu and -machine options mean what the Machine said. Under TCG
// QEMU keeps the hv-* properties without implementing them and refuses vpindex (and so
// what needs it); the KVM-only set is covered by the unit test of the argv.
func TestIntegrationCPUFeatures(t *testing.T) {
	qmptest.RequireIntegration(t)
	f := newFixture(t)
	mc := devices.Machine{
		Name: "cpu-features", Type: machine.Q35, Accel: machine.TCG, VCPUs: 1, Memory: 128 << 20,
		QMPSocket: f.path("qmp.sock"), StartPaused: true, CPUModel: "Nehalem", KVMHidden: true,
		NoACPI: true, NoSMM: true,
		HyperV: &machine.HyperV{Relaxed: true, VAPIC: true, Spinlocks: 8191, Runtime: true, Reset: true,
			Frequencies: true, Reenlightenment: true, EVMCS: true, VendorID: "vmpodtest"},
	}
	vm, err := devices.NewVM(mc)
	if err != nil {
		t.Fatal(err)
	}
	q, m := boot(t, vm)
	ctx := testCtx(t)
	cpus, err := m.QueryVCPUs(ctx)
	if err != nil || len(cpus) != 1 {
		t.Fatalf("query-cpus-fast: %v %+v", err, cpus)
	}
	cpu := cpus[0].QOMPath
	if typ, err := qmp.QOMGet[string](ctx, m, cpu, "type"); err != nil || typ != "Nehalem-x86_64-cpu" {
		t.Errorf("vCPU type %q (%v), want Nehalem-x86_64-cpu", typ, err)
	}
	for prop, want := range map[string]bool{
		"hv-relaxed": true, "hv-vapic": true, "hv-runtime": true, "hv-reset": true, "hv-frequencies": true,
		"hv-reenlightenment": true, "hv-evmcs": true, "kvm": false,
		"hv-synic": false, "hv-stimer": false, "hv-ipi": false, // asked for by no one
	} {
		if got, err := qmp.QOMGet[bool](ctx, m, cpu, prop); err != nil || got != want {
			t.Errorf("vCPU %s = %v (%v), want %v", prop, got, err, want)
		}
	}
	if got, err := qmp.QOMGet[uint32](ctx, m, cpu, "hv-spinlocks"); err != nil || got != 8191 {
		t.Errorf("vCPU hv-spinlocks = %d (%v), want 8191", got, err)
	}
	if got, err := qmp.QOMGet[string](ctx, m, cpu, "hv-vendor-id"); err != nil || got != "vmpodtest" {
		t.Errorf("vCPU hv-vendor-id = %q (%v), want vmpodtest", got, err)
	}
	for _, prop := range []string{"acpi", "smm"} {
		if got, err := qmp.QOMGet[string](ctx, m, "/machine", prop); err != nil || got != "off" {
			t.Errorf("machine %s = %q (%v), want off", prop, got, err)
		}
	}
	quit(t, q, m, mc.QMPSocket)
}
