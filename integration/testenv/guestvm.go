package testenv

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/devices"
	"github.com/vmpod/vmpod/runtime/qga"
	"github.com/vmpod/vmpod/runtime/vmm"
)

// EnvVMGuestRaw is the VM-pod test guest's disk, raw and sparse (hack/vm-guest-image.sh):
// a Debian with qemu-guest-agent, booted by the machine layer directly.
const EnvVMGuestRaw = "VMPOD_VM_GUEST_RAW"

// GuestDisk is a throwaway qcow2 overlay over the VM-pod test guest's disk; it skips the
// test when make test did not build the guest.
func GuestDisk(t testing.TB) string {
	t.Helper()
	base := os.Getenv(EnvVMGuestRaw)
	if base == "" {
		t.Skipf("needs the VM-pod test guest: %s (make test sets it: hack/vm-guest-image.sh)", EnvVMGuestRaw)
	}
	disk := filepath.Join(t.TempDir(), "overlay.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, disk).CombinedOutput(); err != nil {
		t.Fatalf("overlay: %v: %s", err, out)
	}
	return disk
}

// GuestVMConfig is a q35 machine of 1 vCPU and memMiB booting disk (GuestDisk) with
// SeaBIOS, its guest agent's port and its console in its log, its state in root/name. Its
// QEMU runs as a user of its own and gets the overlay and its base as descriptors, as a
// VM pod's (runtime/disks).
func GuestVMConfig(t testing.TB, root, name, disk string, memMiB int) vmm.Config {
	t.Helper()
	open := func(path string, flag int) *os.File {
		f, err := os.OpenFile(path, flag, 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() }) // QEMU holds its own copy
		return f
	}
	base, overlay := open(os.Getenv(EnvVMGuestRaw), os.O_RDONLY), open(disk, os.O_RDWR)
	return vmm.Config{
		Name:      name,
		StateDir:  filepath.Join(root, name),
		LogPath:   filepath.Join(t.TempDir(), name+".log"),
		Users:     QEMUUsers(),
		Type:      machine.Q35,
		VCPUs:     1,
		MemoryMiB: memMiB,
		Boot:      vmm.Boot{Firmware: vmm.Firmware{Type: vmm.FirmwareBIOS}},
		Ports:     []string{qga.PortName},
		Console:   vmm.ConsoleLog,
		Files:     []vmm.FDSetFile{{File: base, Set: 1}, {File: overlay, Set: 2}},
		Devices: []devices.Device{&devices.Disk{DeviceID: "disk0", Bus: devices.BusVirtio, BootIndex: 1,
			Image:   devices.Blockdev{Format: "qcow2", Protocol: "file", Filename: devices.FDSetPath(2)},
			Backing: &devices.Blockdev{Format: "raw", Protocol: "file", Filename: devices.FDSetPath(1), ReadOnly: true}}},
		Reboot: true,
	}
}

// GuestVM is a machine of the VM-pod test guest and a client of its guest agent.
type GuestVM struct {
	*vmm.Machine
	Agent *qga.Client
	t     testing.TB
}

// StartGuestVM starts cfg; the machine is killed when the test ends, and its log shown if
// the test failed.
func StartGuestVM(t testing.TB, ctx context.Context, cfg vmm.Config) *GuestVM {
	t.Helper()
	m, err := vmm.Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = m.Kill()
		if t.Failed() {
			t.Logf("%s log:\n%s", cfg.Name, TailFile(cfg.LogPath, 30))
		}
	})
	agent := qga.New(func(ctx context.Context) (net.Conn, error) { return m.DialPort(ctx, qga.PortName) })
	t.Cleanup(func() { agent.Close() })
	return &GuestVM{Machine: m, Agent: agent, t: t}
}

// WaitAgent waits until the guest agent answers.
func (g *GuestVM) WaitAgent(ctx context.Context, within time.Duration) {
	g.t.Helper()
	deadline := time.Now().Add(within)
	for {
		pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		err := g.Agent.Ping(pctx)
		cancel()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			g.t.Fatalf("%s: no guest agent after %v: %v", g.Name(), within, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// Sh runs script with /bin/sh in the guest, fails the test unless it exits 0, and returns
// its stdout, trimmed.
func (g *GuestVM) Sh(ctx context.Context, script string) string {
	g.t.Helper()
	rctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	st, err := g.Agent.Run(rctx, qga.ExecRequest{Path: "/bin/sh", Args: []string{"-c", script}})
	if err != nil || st.Status != 0 {
		g.t.Fatalf("%s: %q: %v (status %d, stderr %q)", g.Name(), script, err, st.Status, st.Stderr)
	}
	return strings.TrimSpace(string(st.Stdout))
}

// TailFile is the last n lines of the file at path (or why it cannot be read): a VM log
// worth showing when a test fails.
func TailFile(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	return Tail(string(b), n)
}

// Tail is the last n lines of s.
func Tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// MigrationStream is a connected pair for a migration on one host: the source's end and
// the target's (vmm.Machine.Migrate and AcceptMigration). The test's copies are closed
// when it ends; the QEMUs hold their own.
func MigrationStream(t testing.TB) (source, target *os.File) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	source, target = os.NewFile(uintptr(fds[0]), "migration-source"), os.NewFile(uintptr(fds[1]), "migration-target")
	t.Cleanup(func() { source.Close(); target.Close() })
	return source, target
}

// unprivilegedUserfaultfd lets a process without CAP_SYS_PTRACE handle its own page
// faults: the post-copy target's QEMU, a user of its own, needs it (docs/design/209).
const unprivilegedUserfaultfd = "/proc/sys/vm/unprivileged_userfaultfd"

// AllowUserfaultfd sets the host's vm.unprivileged_userfaultfd (test clusters' nodes share
// this kernel) for the rest of the test, and returns a setter for changes meanwhile; the
// value it had comes back at the test's end.
func AllowUserfaultfd(t testing.TB, allowed bool) (set func(allowed bool)) {
	t.Helper()
	old, err := os.ReadFile(unprivilegedUserfaultfd)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.WriteFile(unprivilegedUserfaultfd, old, 0o644) })
	set = func(allowed bool) {
		t.Helper()
		v := "0"
		if allowed {
			v = "1"
		}
		if err := os.WriteFile(unprivilegedUserfaultfd, []byte(v), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	set(allowed)
	return set
}
