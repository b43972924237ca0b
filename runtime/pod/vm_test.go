package pod

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/api/vmspec"
	"github.com/vmpod/vmpod/runtime/nodeconfig"
)

func exitErrOf(t *testing.T, script string) error {
	t.Helper()
	err := exec.Command("sh", "-c", script).Run()
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		t.Fatalf("%q: %v", script, err)
	}
	return err
}

func TestExitOf(t *testing.T) {
	cases := []struct {
		name     string
		err      error
		killedBy syscall.Signal
		panicked bool
		status   int
		reason   string
	}{
		{"power-off", nil, 0, false, 0, "powered off"},
		{"kill asked for", nil, syscall.SIGKILL, false, 137, "without a shutdown"},
		{"panic", exitErrOf(t, "exit 1"), 0, true, 1, "GuestPanicked"},
		{"QEMU killed", exitErrOf(t, "kill -9 $$"), 0, false, 137, "QEMUCrashed"},
		{"QEMU failed", exitErrOf(t, "exit 3"), 0, false, 3, "QEMUFailed"},
	}
	for _, c := range cases {
		e := exitOf(c.err, c.killedBy, c.panicked, nil)
		if e.Status != c.status || !strings.Contains(e.Reason, c.reason) {
			t.Errorf("%s: got %d %q, want %d %q", c.name, e.Status, e.Reason, c.status, c.reason)
		}
	}
}

func TestCheckVMAgainstNode(t *testing.T) {
	cfg := nodeconfig.Default()
	vm := &vmspec.VM{CPU: vmspec.CPU{Sockets: 1, Cores: 8, Threads: 1}, MemoryMiB: 1 << 20, Machine: machine.Q35,
		Firmware: vmspec.Firmware{Type: vmspec.FirmwareUEFI, SecureBoot: true},
	}
	vm.CPU.Model = "Skylake-Server" // not in the default cpu_models
	err := checkVMAgainstNode(vm, cfg)
	for _, want := range []string{"cpu: 8 vCPUs", "memoryMiB", "cpu.model: Skylake-Server is not one of the CPU models this node allows"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("got %v, want %q named", err, want)
		}
	}
	ok := &vmspec.VM{CPU: vmspec.CPU{Sockets: 1, Cores: 1, Threads: 1}, MemoryMiB: 1024, Machine: machine.Q35}
	if err := checkVMAgainstNode(ok, cfg); err != nil {
		t.Errorf("a small VM: %v", err)
	}
	for _, model := range []string{machine.CPUHostModel, machine.CPUHostPassthrough} {
		ok.CPU.Model = model
		if err := checkVMAgainstNode(ok, cfg); err != nil {
			t.Errorf("cpu model %s on a default node: %v", model, err)
		}
	}
	// growth room counts against the node's maximums as the boot size does
	grow := &vmspec.VM{CPU: vmspec.CPU{Sockets: 1, Cores: 2, Threads: 1, MaxSockets: cfg.Sizing.MaxVCPUs}, MemoryMiB: 1024,
		MaxMemoryMiB: int64(cfg.Sizing.MaxMemoryMiB) + 2, Machine: machine.Q35}
	err = checkVMAgainstNode(grow, cfg)
	for _, want := range []string{fmt.Sprintf("cpu.maxSockets: room for %d vCPUs", 2*cfg.Sizing.MaxVCPUs), "maxMemoryMiB:"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("growth room beyond the node: %v, want %q named", err, want)
		}
	}
	tcg := cfg
	tcg.Hypervisor.Accel = machine.TCG
	if err := checkVMAgainstNode(ok, tcg); err == nil || !strings.Contains(err.Error(), "cpu.model: host-passthrough needs KVM") {
		t.Errorf("host-passthrough on a TCG node: %v", err)
	}
}

func TestStandIn(t *testing.T) {
	s := newStandIn()
	if s.Pid() != uint32(os.Getpid()) {
		t.Fatal("the stand-in's pid is not the shim's")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_ = s.Signal(ctx, syscall.SIGWINCH, false)
	if _, err := s.Wait(ctx); err == nil {
		t.Fatal("SIGWINCH ended the stand-in")
	}
	_ = s.Signal(context.Background(), syscall.SIGTERM, false)
	_ = s.Signal(context.Background(), syscall.SIGKILL, false)
	if e, err := s.Wait(context.Background()); err != nil || e.Status != 128+int(syscall.SIGTERM) {
		t.Fatalf("got %+v %v, want the first signal's status", e, err)
	}
}

func TestResolvConf(t *testing.T) {
	f := filepath.Join(t.TempDir(), "resolv.conf")
	os.WriteFile(f, []byte("search ns.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\nnameserver fd00::a\noptions ndots:5\n"), 0o644)
	servers, search := resolvConf(&specs.Spec{Mounts: []specs.Mount{{Destination: "/etc/resolv.conf", Source: f}}})
	if len(servers) != 2 || servers[0].String() != "10.96.0.10" || len(search) != 2 || search[0] != "ns.svc.cluster.local" {
		t.Fatalf("got %v %v", servers, search)
	}
}
