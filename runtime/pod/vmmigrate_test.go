package pod

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"maps"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/api/vmspec"
	"github.com/vmpod/vmpod/runtime"
	"github.com/vmpod/vmpod/runtime/vmm"
)

// The target takes exactly the source it was told to expect: a port scan and a peer with
// other credentials are dropped without ending the wait; the source's two connections are
// told apart by their role; a wait with no source ends with an error saying so.
func TestAcceptSource(t *testing.T) {
	target, source, err := vmspec.NewMigrationCredentials()
	if err != nil {
		t.Fatal(err)
	}
	_, stranger, err := vmspec.NewMigrationCredentials()
	if err != nil {
		t.Fatal(err)
	}
	serverCfg, _ := target.Config()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	type result struct {
		control, stream net.Conn
		err             error
	}
	done := make(chan result, 1)
	go func() {
		c, s, err := acceptSource(context.Background(), l, serverCfg, 20*time.Second, make(chan struct{}))
		done <- result{c, s, err}
	}()
	addr := l.Addr().String()
	// a port scan: connects, sends nothing TLS, leaves
	if scan, err := net.Dial("tcp", addr); err == nil {
		_, _ = io.WriteString(scan, "GET / HTTP/1.0\r\n\r\n")
		scan.Close()
	}
	dial := func(creds vmspec.MigrationTLS, role byte) (net.Conn, error) {
		cfg, err := creds.Config()
		if err != nil {
			t.Fatal(err)
		}
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			return nil, err
		}
		tc := tls.Client(conn, cfg)
		if err := tc.Handshake(); err != nil {
			tc.Close()
			return nil, err
		}
		if _, err := tc.Write([]byte{role}); err != nil {
			tc.Close()
			return nil, err
		}
		return tc, nil
	}
	// a peer that connects and says nothing holds up nobody (a handshake may take 10 s)
	stall, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer stall.Close()
	start := time.Now()
	// a peer with another migration's credentials: its handshake may finish on its side
	// (TLS 1.3 client), but the target drops it
	if c, err := dial(stranger, roleControl); err == nil {
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Error("the target kept a connection from a stranger")
		}
		c.Close()
	}
	ctl, err := dial(source, roleControl)
	if err != nil {
		t.Fatalf("the source's control connection: %v", err)
	}
	defer ctl.Close()
	str, err := dial(source, roleStream)
	if err != nil {
		t.Fatalf("the source's stream connection: %v", err)
	}
	defer str.Close()
	r := <-done
	if r.err != nil {
		t.Fatalf("acceptSource: %v", r.err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("the source was accepted %v after a stalling peer connected: handshakes wait for each other", d)
	}
	defer r.control.Close()
	defer r.stream.Close()
	// told apart: what the source writes on each arrives on the same one
	go func() { _, _ = io.WriteString(ctl, "c"); _, _ = io.WriteString(str, "s") }()
	for conn, want := range map[net.Conn]string{r.control: "c", r.stream: "s"} {
		b := make([]byte, 1)
		_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(conn, b); err != nil || string(b) != want {
			t.Errorf("read %q, %v; want %q", b, err, want)
		}
	}
	// the listener is closed once both came
	if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		c.Close()
		t.Error("the target still listens after its source connected")
	}

	// nobody comes
	l2, _ := net.Listen("tcp", "127.0.0.1:0")
	if _, _, err := acceptSource(context.Background(), l2, serverCfg, 300*time.Millisecond, make(chan struct{})); err == nil || !strings.Contains(err.Error(), "did not connect within 300ms") {
		t.Errorf("no source: %v", err)
	}
	// QEMU gone: the wait ends at once
	l3, _ := net.Listen("tcp", "127.0.0.1:0")
	gone := make(chan struct{})
	close(gone)
	if _, _, err := acceptSource(context.Background(), l3, serverCfg, time.Minute, gone); err == nil || !strings.Contains(err.Error(), "QEMU exited") {
		t.Errorf("QEMU gone: %v", err)
	}
}

func TestSwitchoverMessages(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	go func() { _ = writeSwitchover(a, switchover{Loaded: true}) }()
	if m, err := readSwitchover(b, 5*time.Second); err != nil || !m.Loaded || m.Commit {
		t.Errorf("loaded: %+v, %v", m, err)
	}
	// silence is an error, not a hang
	if _, err := readSwitchover(b, 100*time.Millisecond); err == nil {
		t.Error("no message: no error")
	}
	go func() { _, _ = io.WriteString(a, "not json\n") }()
	if _, err := readSwitchover(b, 5*time.Second); err == nil || !strings.Contains(err.Error(), "switchover message") {
		t.Errorf("garbage: %v", err)
	}
	// a field this shim does not know (a newer peer's device kind) refuses, naming it
	go func() { _, _ = io.WriteString(a, `{"shape": {"vcpus": 1, "memoryMiB": 512, "gpus": [{}]}}`+"\n") }()
	if _, err := readSwitchover(b, 5*time.Second); err == nil || !strings.Contains(err.Error(), `unknown field "gpus"`) {
		t.Errorf("an unknown field: %v", err)
	}
	// a message too big for the reader is refused by its writer, saying so
	huge := &podShape{Containers: []shapedContainer{{Shares: make([]string, maxSwitchover/2)}}}
	if err := writeSwitchover(a, switchover{Pod: huge}); err == nil || !strings.Contains(err.Error(), "more than the") {
		t.Errorf("a message too big: %v", err)
	}
}

func TestGuestMAC(t *testing.T) {
	const uuid = "5b0e8f6c-8e1f-4a51-9c3b-2f2d7c1a0b01"
	a, b := guestMAC(uuid, "default"), guestMAC(uuid, "default")
	if a != b {
		t.Errorf("not the same from pod to pod: %s, %s", a, b)
	}
	if guestMAC(uuid, "other") == a || guestMAC("6b0e8f6c-8e1f-4a51-9c3b-2f2d7c1a0b01", "default") == a {
		t.Error("two NICs share a MAC")
	}
	mac, err := net.ParseMAC(a)
	if err != nil || len(mac) != 6 || mac[0]&1 != 0 || mac[0]&2 == 0 {
		t.Errorf("%s: want a unicast, locally administered MAC (%v)", a, err)
	}
}

// What cannot move is refused before anything starts, naming each reason.
func TestMigratable(t *testing.T) {
	vm := &vmspec.VM{CPU: vmspec.CPU{Sockets: 1, Cores: 1, Threads: 1}, MemoryMiB: 1024, Machine: machine.Q35,
		Disks:      []vmspec.Disk{{Name: "root", Volume: "root", Source: vmspec.SourceFile}},
		Interfaces: []vmspec.Interface{{Name: "default", PodInterface: "eth0", Binding: vmspec.BindingMasquerade}},
		UUID:       "5b0e8f6c-8e1f-4a51-9c3b-2f2d7c1a0b01"}
	p := &vmPod{vm: vm, netns: "/run/netns/x", address: netip.MustParseAddr("10.88.0.5")}
	c := &computeVM{pod: p, size: Size{VCPUs: 1, MemoryMiB: 1024}}
	if err := c.migratable(); err != nil {
		t.Fatalf("a VM on shared storage behind NAT: %v", err)
	}
	// resized: the target plugs the same (takeShape)
	c.size = Size{VCPUs: 2, MemoryMiB: 1536}
	if err := c.migratable(); err != nil {
		t.Fatalf("a resized VM: %v", err)
	}
	bad := *vm
	bad.UUID = ""
	bad.Disks = append([]vmspec.Disk{}, vm.Disks...)
	bad.Disks = append(bad.Disks, vmspec.Disk{Name: "cd", Source: vmspec.SourceImage}, vmspec.Disk{Name: "tmp", Source: vmspec.SourceEmpty})
	bad.Interfaces = append([]vmspec.Interface{}, vm.Interfaces...)
	bad.Interfaces = append(bad.Interfaces, vmspec.Interface{Name: "br", PodInterface: "net1", Binding: vmspec.BindingBridge})
	bad.HostDevices = []vmspec.HostDevice{{Name: "gpu"}}
	c = &computeVM{pod: &vmPod{vm: &bad}, size: Size{VCPUs: 2, MemoryMiB: 1024}}
	err := c.migratable()
	for _, want := range []string{"no network namespace", "disks[1] (cd): a containerDisk", "disks[2] (tmp): an empty disk",
		"interfaces[0] (default): the guest's MAC would change", "interfaces[1] (br): the bridge binding", "1 passed-through"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("got %v, want %q", err, want)
		}
	}
}

// A target takes the source's guest shape when its limits ask for that size from the
// source's boot limits, and then follows later resizes as the source would; otherwise it
// refuses, and the source hears why before any byte of the guest is sent.
func TestGuestShape(t *testing.T) {
	vm := &vmspec.VM{CPU: vmspec.CPU{Sockets: 1, Cores: 1, Threads: 1, MaxSockets: 2}, MemoryMiB: 1024, MaxMemoryMiB: 1536, Machine: machine.Q35}
	const gib = int64(1) << 30
	source := &computeVM{pod: &vmPod{id: "src", vm: vm}, size: Size{VCPUs: 1, MemoryMiB: 1536},
		bootLimits: claim{1000, gib}, limits: claim{1000, gib + 512<<20}, bootBlocks: map[uint64]bool{1: true, 0: true}}
	target := func(limits claim) *computeVM {
		return &computeVM{pod: &vmPod{id: "dst", vm: vm}, size: Size{VCPUs: 1, MemoryMiB: 1024}, bootLimits: limits, limits: limits}
	}
	exchange := func(dst *computeVM) (sourceErr, targetErr error) {
		a, b := net.Pipe()
		defer a.Close()
		defer b.Close()
		done := make(chan error, 1)
		go func() { done <- dst.takeShape(context.Background(), b, nil) }()
		shape, err := source.shape()
		if err != nil {
			t.Fatal(err)
		}
		sourceErr = sayShape(context.Background(), a, switchover{Shape: &shape})
		return sourceErr, <-done
	}

	// made from the resized source pod: the same limits
	dst := target(source.limits)
	if serr, terr := exchange(dst); serr != nil || terr != nil {
		t.Fatalf("a target with the source's limits now: source %v, target %v", serr, terr)
	}
	if dst.size != source.size || dst.bootLimits != source.bootLimits || !maps.Equal(dst.bootBlocks, source.bootBlocks) {
		t.Errorf("the target took size %+v, boot limits %+v, boot blocks %v; want the source's %+v, %+v, %v",
			dst.size, dst.bootLimits, dst.bootBlocks, source.size, source.bootLimits, source.bootBlocks)
	}
	// so a later resize back to the boot size is reckoned as on the source
	if got, err := vmTarget(vm, dst.bootLimits, source.bootLimits); err != nil || got != (Size{VCPUs: 1, MemoryMiB: 1024}) {
		t.Errorf("a shrink to the boot limits on the target: %+v, %v", got, err)
	}

	for _, c := range []struct {
		name   string
		limits claim
		want   string
	}{
		{"made from the pod before its resize", source.bootLimits, "give it 1 and 1024"},
		{"without limits", claim{}, "CPU limit"},
		{"asking for more than the VM's room", claim{1000, 2 * gib}, "maxMemoryMiB"},
	} {
		serr, terr := exchange(target(c.limits))
		if terr == nil || !strings.Contains(terr.Error(), c.want) {
			t.Errorf("a target %s: %v, want a refusal saying %q", c.name, terr, c.want)
		}
		if serr == nil || !strings.Contains(serr.Error(), "the target refused the guest") || !strings.Contains(serr.Error(), c.want) {
			t.Errorf("a target %s: the source heard %v, want the target's refusal", c.name, serr)
		}
	}

	// a target that never answers: a cancel ends the wait at once
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	go func() { _, _ = io.Copy(io.Discard, b) }()
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	started := time.Now()
	shape, _ := source.shape()
	if err := sayShape(ctx, a, switchover{Shape: &shape}); !errors.Is(err, vmm.ErrMigrationCancelled) || time.Since(started) > 5*time.Second {
		t.Errorf("cancelled while the target is silent: %v after %v, want a prompt cancel", err, time.Since(started))
	}
}

// The source's hot-plugged disks are checked as an attach to the target would be, and a
// disk lent by an attachment pod on the source's node needs one on the target's, before
// anything is plugged.
func TestShapedDisks(t *testing.T) {
	vm := &vmspec.VM{CPU: vmspec.CPU{Sockets: 1, Cores: 1, Threads: 1}, MemoryMiB: 1024, Machine: machine.Q35,
		Disks: []vmspec.Disk{{Name: "root", Volume: "root", Source: vmspec.SourceFile}}}
	c := &computeVM{pod: &vmPod{vm: vm}}
	lent := vmspec.HotplugDisk{Disk: vmspec.Disk{Name: "data", Volume: "data", Source: vmspec.SourceFile}, AttachmentPod: "source-uid"}
	own := vmspec.HotplugDisk{Disk: vmspec.Disk{Name: "logs", Volume: "logs", Source: vmspec.SourceBlock}}
	shaped := []shapedDisk{{HotplugDisk: lent, Port: "rp1"}, {HotplugDisk: own, Port: "rp0"}}

	got, err := c.shapedDisks(shaped, map[string]string{"data": "target-uid"})
	if err != nil || len(got) != 2 || got[0].AttachmentPod != "target-uid" || got[1].AttachmentPod != "" || got[1].Device != vmspec.DeviceDisk {
		t.Fatalf("disks %+v, %v; want data lent by target-uid, logs from the compute container", got, err)
	}
	if _, err := c.shapedDisks(shaped, nil); !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "accept.attachments") {
		t.Errorf("no attachment pod named for disk data: %v", err)
	}
	twice := []shapedDisk{{HotplugDisk: own, Port: "rp0"}, {HotplugDisk: own, Port: "rp1"}}
	if _, err := c.shapedDisks(twice, nil); err == nil || !strings.Contains(err.Error(), `shape.disks[1].name: disk "logs" is shape.disks[0] too`) {
		t.Errorf("one disk listed twice: %v", err)
	}
	onePort := []shapedDisk{{HotplugDisk: lent, Port: "rp0"}, {HotplugDisk: own, Port: "rp0"}}
	if _, err := c.shapedDisks(onePort, map[string]string{"data": "target-uid"}); err == nil || !strings.Contains(err.Error(), `shape.disks[1].port: root port "rp0"`) {
		t.Errorf("two disks on one root port: %v", err)
	}
	for _, bad := range []struct {
		disk shapedDisk
		want string
	}{
		{shapedDisk{HotplugDisk: vmspec.HotplugDisk{Disk: vmspec.Disk{Name: "root", Volume: "x", Source: vmspec.SourceFile}}, Port: "rp0"}, "shape.disks[0]: disk.name"},
		{shapedDisk{HotplugDisk: vmspec.HotplugDisk{Disk: vmspec.Disk{Name: "x", Volume: "root", Source: vmspec.SourceFile}}, Port: "rp0"}, "shape.disks[0]: disk.volume"},
		{shapedDisk{HotplugDisk: own}, "shape.disks[0].port"},
	} {
		if _, err := c.shapedDisks([]shapedDisk{bad.disk}, nil); err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("disk %+v: %v; want %q", bad.disk, err, bad.want)
		}
	}
}

// The source's hot-plugged NICs are a peer's input: each names its pod interface, a
// unicast MAC and a root port, none of them twice.
func TestShapedNICs(t *testing.T) {
	good := []shapedNIC{{Interface: "net1", MAC: "02:00:00:00:00:01", Port: "rp2"}, {Interface: "net2", MAC: "02:00:00:00:00:02", Port: "rp3"}}
	if err := checkShapedNICs(good); err != nil {
		t.Fatalf("%+v: %v", good, err)
	}
	for _, bad := range []struct {
		nics []shapedNIC
		want string
	}{
		{[]shapedNIC{{MAC: "02:00:00:00:00:01", Port: "rp2"}}, "shape.nics[0].interface: missing"},
		{[]shapedNIC{{Interface: "net1", MAC: "not-a-mac", Port: "rp2"}}, `shape.nics[0].mac: "not-a-mac"`},
		{[]shapedNIC{{Interface: "net1", MAC: "03:00:00:00:00:01", Port: "rp2"}}, "no unicast Ethernet address"},
		{[]shapedNIC{{Interface: "net1", MAC: "00:00:00:00:00:00", Port: "rp2"}}, "no unicast Ethernet address"},
		{[]shapedNIC{{Interface: "net1", MAC: "00:00:00:00:fe:80:00:00:00:00:00:00:02:00:5e:10:00:00:00:01", Port: "rp2"}}, "shape.nics[0].mac"},
		{[]shapedNIC{{Interface: "net1", MAC: "02:00:00:00:00:01"}}, "shape.nics[0].port: the source names no root port for pod interface net1"},
		{[]shapedNIC{good[0], {Interface: "net1", MAC: "02:00:00:00:00:02", Port: "rp3"}}, `shape.nics[1].interface: "net1" is shape.nics[0]'s too`},
		{[]shapedNIC{good[0], {Interface: "net2", MAC: "02:00:00:00:00:01", Port: "rp3"}}, `shape.nics[1].mac: "02:00:00:00:00:01" is shape.nics[0]'s too`},
		{[]shapedNIC{good[0], {Interface: "net2", MAC: "02:00:00:00:00:02", Port: "rp2"}}, `shape.nics[1].port: "rp2" is shape.nics[0]'s too`},
	} {
		if err := checkShapedNICs(bad.nics); err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("%+v: %v; want %q", bad.nics, err, bad.want)
		}
	}
	// a target pod without a network refuses a guest with hot-plugged NICs before plugging
	// anything
	vm := &vmspec.VM{CPU: vmspec.CPU{Sockets: 1, Cores: 1, Threads: 1}, MemoryMiB: 1024, Machine: machine.Q35}
	c := &computeVM{pod: &vmPod{vm: vm}}
	if err := c.matchShape(context.Background(), guestShape{VCPUs: 1, MemoryMiB: 1024, NICs: good}, nil); !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "no network to plug them into") {
		t.Errorf("a guest with NICs, a target without a network: %v", err)
	}
}

// An attach or detach that arrives while the guest migrates here or away, or after it
// left, is refused at once instead of waiting for the migration (which holds hotMu) and then
// acting on a QEMU without the guest.
func TestDeviceChangesWhileMigrating(t *testing.T) {
	vm := &vmspec.VM{CPU: vmspec.CPU{Sockets: 1, Cores: 1, Threads: 1}, MemoryMiB: 1024, Machine: machine.Q35,
		Disks: []vmspec.Disk{{Name: "root", Volume: "root", Source: vmspec.SourceFile}}}
	c := &computeVM{pod: &vmPod{vm: vm}, migrating: &outgoing{done: make(chan struct{})}}
	c.hotMu.Lock() // the migration's
	defer c.hotMu.Unlock()
	change := func(want string) {
		t.Helper()
		done := make(chan error, 2)
		go func() {
			_, err := c.attachDisk(context.Background(), `{"name": "data", "volume": "data", "source": "file"}`)
			done <- err
		}()
		go func() {
			_, err := c.detachDisk(context.Background(), "data")
			done <- err
		}()
		for range 2 {
			select {
			case err := <-done:
				if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), want) {
					t.Errorf("%v; want a refusal saying %q", err, want)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("the device change waited for the migration")
			}
		}
	}
	change("the guest is migrating")
	c.mu.Lock()
	c.awaiting = true // a target whose guest is on its way
	c.mu.Unlock()
	change("the guest has not arrived from its migration source")
	c.mu.Lock()
	c.awaiting = false
	c.mu.Unlock()
	c.mu.Lock()
	c.migrating, c.decided = nil, &runtime.Exit{Reason: vmspec.MigratedReason + ": the guest moved to 10.0.0.2:49152"}
	c.mu.Unlock()
	change("the guest has left this pod (Migrated: the guest moved to 10.0.0.2:49152)")
}

// The shims' connections give a silent peer up after peerSilence: a deleted target pod's
// network can vanish before its shim resets the connection.
func TestAbandonUnanswered(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	conn, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := abandonUnanswered(conn); err != nil {
		t.Fatal(err)
	}
	raw, _ := conn.(*net.TCPConn).SyscallConn()
	var got int
	var gerr error
	_ = raw.Control(func(fd uintptr) { got, gerr = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT) })
	if gerr != nil || got != int(peerSilence.Milliseconds()) {
		t.Errorf("TCP_USER_TIMEOUT %d ms (%v), want %d", got, gerr, peerSilence.Milliseconds())
	}
	a, b := net.Pipe() // not TCP: nothing to set, no error
	defer a.Close()
	defer b.Close()
	if err := abandonUnanswered(a); err != nil {
		t.Errorf("a pipe: %v", err)
	}
}
