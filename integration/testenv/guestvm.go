package testenv

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
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

// GuestVMConfig runs QEMU as root: the disk is a qcow2 overlay that names its base by
// path, which QEMU opens itself. (VM pods open every image in the shim: runtime/disks.)
//
// GuestVMConfig is a q35 machine of 1 vCPU and memMiB booting disk (GuestDisk) with
// SeaBIOS, its guest agent's port and its console in its log, its state in root/name.
func GuestVMConfig(t testing.TB, root, name, disk string, memMiB int) vmm.Config {
	return vmm.Config{
		Name:      name,
		StateDir:  filepath.Join(root, name),
		LogPath:   filepath.Join(t.TempDir(), name+".log"),
		Type:      machine.Q35,
		VCPUs:     1,
		MemoryMiB: memMiB,
		Boot:      vmm.Boot{Firmware: vmm.Firmware{Type: vmm.FirmwareBIOS}},
		Ports:     []string{qga.PortName},
		Console:   vmm.ConsoleLog,
		Devices:   []devices.Device{&devices.VirtioBlk{DeviceID: "disk0", Path: disk, Format: "qcow2", BootIndex: 1}},
		Reboot:    true,
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
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
