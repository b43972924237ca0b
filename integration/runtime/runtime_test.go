// Integration tests of package runtime: real QEMU (TCG here), the real guest kernel and
// agent, runc in the guest, a busybox rootfs shared from the host.
package runtime_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/integration/testenv"
	"github.com/vmpod/vmpod/runtime"
	"github.com/vmpod/vmpod/runtime/vmpodagent"
)

// startContainer creates and starts a busybox container running args.
func startContainer(t *testing.T, vm *vmpodagent.Guest, id string, spec *specs.Spec, stdio runtime.Stdio) *vmpodagent.Process {
	t.Helper()
	ctx := testenv.Context(t, time.Minute)
	rootfs := testenv.OverlayRootfs(t, testenv.BusyboxRootfs(t))
	p, err := vm.CreateContainer(ctx, id, rootfs, spec, stdio)
	if err != nil {
		t.Fatalf("create %s: %v", id, err)
	}
	t.Cleanup(func() {
		if err := vm.RemoveContainer(context.Background(), id, true); err != nil && !errdefs.IsNotFound(err) {
			t.Errorf("remove %s: %v", id, err)
		}
	})
	if err := vm.Agent().StartContainer(ctx, id); err != nil {
		t.Fatalf("start %s: %v", id, err)
	}
	return p
}

// run runs args to completion in a fresh container and returns its exit and output.
func run(t *testing.T, vm *vmpodagent.Guest, id string, stdin io.Reader, args ...string) (runtime.Exit, string, string) {
	t.Helper()
	var stdout, stderr testenv.Buffer
	p := startContainer(t, vm, id, testenv.Spec(args...), runtime.Stdio{Stdin: stdin, Stdout: &stdout, Stderr: &stderr})
	exit, err := testenv.WaitOutput(testenv.Context(t, time.Minute), p)
	if err != nil {
		t.Fatalf("wait %s: %v", id, err)
	}
	return exit, stdout.String(), stderr.String()
}

func TestEchoHello(t *testing.T) {
	testenv.Require(t)
	vm := testenv.StartVM(t, testenv.VMConfig(t, "echo"))
	exit, out, errOut := run(t, vm, "hello", nil, "echo", "hello")
	if exit.Status != 0 || out != "hello\n" {
		t.Fatalf("got exit %d, stdout %q, stderr %q; want 0, \"hello\\n\"", exit.Status, out, errOut)
	}
	if exit.ExitedAt.IsZero() {
		t.Error("exit time not set")
	}
}

func TestExitCodeAndStderr(t *testing.T) {
	testenv.Require(t)
	vm := testenv.StartVM(t, testenv.VMConfig(t, "exitcode"))
	exit, out, errOut := run(t, vm, "three", nil, "sh", "-c", "echo to-stderr >&2; exit 3")
	if exit.Status != 3 {
		t.Fatalf("exit %d, want 3", exit.Status)
	}
	if out != "" || errOut != "to-stderr\n" {
		t.Fatalf("stdout %q stderr %q: want only stderr", out, errOut)
	}
}

func TestStdinRoundTrip(t *testing.T) {
	testenv.Require(t)
	vm := testenv.StartVM(t, testenv.VMConfig(t, "stdin"))
	// 1 MiB: many WriteStdin/ReadStdout calls, and the agent's buffers must apply
	// back-pressure rather than lose or reorder anything.
	payload := bytes.Repeat([]byte("0123456789abcdef"), 64<<10)
	exit, out, _ := run(t, vm, "cat", bytes.NewReader(payload), "cat")
	if exit.Status != 0 {
		t.Fatalf("cat exited %d", exit.Status)
	}
	if out != string(payload) {
		t.Fatalf("round trip returned %d bytes, want %d identical", len(out), len(payload))
	}
}

func TestTerminalWithResize(t *testing.T) {
	testenv.Require(t)
	vm := testenv.StartVM(t, testenv.VMConfig(t, "tty"))
	stdinR, stdinW := io.Pipe()
	defer stdinW.Close()
	var out testenv.Buffer
	spec := testenv.Spec("sh", "-c", "stty size; read line; stty size")
	spec.Process.Terminal = true
	p := startContainer(t, vm, "tty", spec, runtime.Stdio{Stdin: stdinR, Stdout: &out, Terminal: true, Width: 80, Height: 24})
	testenv.WaitFor(t, "first size", func() bool { return strings.Contains(out.String(), "24 80") })
	if err := p.Resize(testenv.Context(t, 10*time.Second), 132, 50); err != nil {
		t.Fatalf("resize: %v", err)
	}
	if _, err := stdinW.Write([]byte("\n")); err != nil {
		t.Fatal(err)
	}
	exit, err := testenv.WaitOutput(testenv.Context(t, time.Minute), p)
	if err != nil || exit.Status != 0 {
		t.Fatalf("wait: %v, exit %d; output %q", err, exit.Status, out.String())
	}
	if !strings.Contains(out.String(), "50 132") {
		t.Fatalf("terminal output %q lacks the resized 50 132", out.String())
	}
}

func TestSignals(t *testing.T) {
	testenv.Require(t)
	vm := testenv.StartVM(t, testenv.VMConfig(t, "signals"))
	ctx := testenv.Context(t, time.Minute)

	var out testenv.Buffer
	// The container's init ignores signals it has no handler for; this one traps TERM.
	term := startContainer(t, vm, "term", testenv.Spec("sh", "-c",
		`trap 'echo got-TERM; exit 42' TERM; echo ready; while :; do sleep 0.05; done`), runtime.Stdio{Stdout: &out})
	testenv.WaitFor(t, "trap installed", func() bool { return strings.Contains(out.String(), "ready") })
	if err := term.Signal(ctx, syscall.SIGTERM, false); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	exit, err := testenv.WaitOutput(ctx, term)
	if err != nil || exit.Status != 42 || !strings.Contains(out.String(), "got-TERM") {
		t.Fatalf("after SIGTERM: exit %d, err %v, output %q", exit.Status, err, out.String())
	}

	kill := startContainer(t, vm, "kill", testenv.Spec("sleep", "1000"), runtime.Stdio{})
	if err := kill.Signal(ctx, syscall.SIGKILL, false); err != nil {
		t.Fatalf("SIGKILL: %v", err)
	}
	if exit, err := testenv.WaitOutput(ctx, kill); err != nil || exit.Status != 128+9 {
		t.Fatalf("after SIGKILL: exit %d, err %v; want 137", exit.Status, err)
	}
	// A finished process is NotFound for signals, as containerd expects.
	if err := kill.Signal(ctx, syscall.SIGKILL, false); !errdefs.IsNotFound(err) {
		t.Fatalf("signal to exited process: %v, want NotFound", err)
	}
}

func TestExecIntoRunningContainer(t *testing.T) {
	testenv.Require(t)
	vm := testenv.StartVM(t, testenv.VMConfig(t, "exec"))
	ctx := testenv.Context(t, time.Minute)
	startContainer(t, vm, "main", testenv.Spec("sleep", "1000"), runtime.Stdio{})

	var out testenv.Buffer
	proc := testenv.Spec("sh", "-c", "echo exec-ok; cat /proc/1/cmdline").Process
	p, err := vm.Exec(ctx, "main", "probe", proc, runtime.Stdio{Stdout: &out})
	if err != nil {
		t.Fatalf("exec: %v", err)
	}
	exit, err := testenv.WaitOutput(ctx, p)
	if err != nil || exit.Status != 0 {
		t.Fatalf("exec wait: %v, exit %d", err, exit.Status)
	}
	// The exec joined the container's pid namespace: its pid 1 is the container's sleep.
	if got := out.String(); !strings.HasPrefix(got, "exec-ok\n") || !strings.Contains(got, "sleep") {
		t.Fatalf("exec output %q", got)
	}
	if err := p.Remove(ctx); err != nil {
		t.Fatalf("remove exec: %v", err)
	}
	if _, err := vm.Exec(ctx, "main", "bad id!", proc, runtime.Stdio{}); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("exec with a bad id: %v, want InvalidArgument", err)
	}
}

func TestTwoContainersInOneVM(t *testing.T) {
	testenv.Require(t)
	vm := testenv.StartVM(t, testenv.VMConfig(t, "two"))
	ctx := testenv.Context(t, time.Minute)
	var outA, outB testenv.Buffer
	a := startContainer(t, vm, "a", testenv.Spec("sh", "-c", "echo from-a > /marker; sleep 0.3; cat /marker"), runtime.Stdio{Stdout: &outA})
	b := startContainer(t, vm, "b", testenv.Spec("sh", "-c", "sleep 0.3; cat /marker 2>&1 || echo no-marker"), runtime.Stdio{Stdout: &outB})
	for _, p := range []*vmpodagent.Process{a, b} {
		if exit, err := testenv.WaitOutput(ctx, p); err != nil || exit.Status != 0 {
			t.Fatalf("%s: exit %d, %v", p.ContainerID(), exit.Status, err)
		}
	}
	// Each container has its own rootfs: a's file is not in b's.
	if outA.String() != "from-a\n" || !strings.Contains(outB.String(), "no-marker") {
		t.Fatalf("a said %q, b said %q", outA.String(), outB.String())
	}
}

func TestStats(t *testing.T) {
	testenv.Require(t)
	vm := testenv.StartVM(t, testenv.VMConfig(t, "stats"))
	ctx := testenv.Context(t, time.Minute)
	var out testenv.Buffer
	startContainer(t, vm, "busy", testenv.Spec("sh", "-c",
		"dd if=/dev/zero of=/dev/null bs=64k count=2000 2>/dev/null; echo done; sleep 1000"), runtime.Stdio{Stdout: &out})
	testenv.WaitFor(t, "work done", func() bool { return strings.Contains(out.String(), "done") })
	st, err := vm.Agent().ContainerStats(ctx, "busy")
	if err != nil {
		t.Fatalf("stats: %v", err)
	}
	if st.CPU.UsageUsec == 0 || st.Memory.Usage == 0 || st.Pids.Current == 0 {
		t.Fatalf("stats look empty: cpu %+v memory usage %d pids %+v", st.CPU, st.Memory.Usage, st.Pids)
	}
	pids, err := vm.Agent().ListProcesses(ctx, "busy")
	if err != nil || len(pids) == 0 {
		t.Fatalf("list processes: %v %v", pids, err)
	}
}

func TestPauseResume(t *testing.T) {
	testenv.Require(t)
	vm := testenv.StartVM(t, testenv.VMConfig(t, "pause"))
	ctx := testenv.Context(t, time.Minute)
	var out testenv.Buffer
	startContainer(t, vm, "ticker", testenv.Spec("sh", "-c", "while :; do echo t; sleep 0.05; done"), runtime.Stdio{Stdout: &out})
	testenv.WaitFor(t, "ticks", func() bool { return strings.Count(out.String(), "t") >= 3 })
	if err := vm.Agent().PauseContainer(ctx, "ticker"); err != nil {
		t.Fatalf("pause: %v", err)
	}
	time.Sleep(300 * time.Millisecond) // let output already in flight land
	frozen := out.String()
	time.Sleep(500 * time.Millisecond)
	if out.String() != frozen {
		t.Fatal("paused container kept writing")
	}
	if err := vm.Agent().PauseContainer(ctx, "ticker"); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("pause twice: %v, want FailedPrecondition", err)
	}
	if err := vm.Agent().ResumeContainer(ctx, "ticker"); err != nil {
		t.Fatalf("resume: %v", err)
	}
	testenv.WaitFor(t, "ticks after resume", func() bool { return len(out.String()) > len(frozen) })
}

// A removed container leaves no bundle, share or process; a running one needs force.
func TestRemoveNeedsForceWhileRunning(t *testing.T) {
	testenv.Require(t)
	vm := testenv.StartVM(t, testenv.VMConfig(t, "remove"))
	ctx := testenv.Context(t, time.Minute)
	startContainer(t, vm, "sleeper", testenv.Spec("sleep", "1000"), runtime.Stdio{})
	if err := vm.RemoveContainer(ctx, "sleeper", false); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("remove running without force: %v, want FailedPrecondition", err)
	}
	if err := vm.RemoveContainer(ctx, "sleeper", true); err != nil {
		t.Fatalf("force remove: %v", err)
	}
	if _, err := vm.Agent().ContainerStats(ctx, "sleeper"); !errdefs.IsNotFound(err) {
		t.Fatalf("stats after remove: %v, want NotFound", err)
	}
}

func TestBadSpecIsRejectedNamingTheField(t *testing.T) {
	testenv.Require(t)
	vm := testenv.StartVM(t, testenv.VMConfig(t, "badspec"))
	ctx := testenv.Context(t, time.Minute)
	rootfs := testenv.OverlayRootfs(t, testenv.BusyboxRootfs(t))

	noArgs := testenv.Spec()
	_, err := vm.CreateContainer(ctx, "noargs", rootfs, noArgs, runtime.Stdio{})
	if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "process.args") {
		t.Fatalf("empty args: %v, want InvalidArgument naming process.args", err)
	}
	relCwd := testenv.Spec("true")
	relCwd.Process.Cwd = "relative"
	if _, err := vm.CreateContainer(ctx, "relcwd", rootfs, relCwd, runtime.Stdio{}); !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "process.cwd") {
		t.Fatalf("relative cwd: %v, want InvalidArgument naming process.cwd", err)
	}
	missing := testenv.Spec("/no/such/binary")
	_, err = vm.CreateContainer(ctx, "missingbin", rootfs, missing, runtime.Stdio{})
	if err == nil || !strings.Contains(err.Error(), "no/such/binary") {
		t.Fatalf("missing binary: %v, want runc's message naming it", err)
	}
	if _, err := vm.CreateContainer(ctx, "norootfs", "/no/such/rootfs", testenv.Spec("true"), runtime.Stdio{}); err == nil || !strings.Contains(err.Error(), "/no/such/rootfs") {
		t.Fatalf("missing rootfs: %v, want an error naming it", err)
	}
	// Nothing of the failed creates stays behind: the same ids work afterwards.
	exit, out, _ := run(t, vm, "noargs", nil, "echo", "reused")
	if exit.Status != 0 || out != "reused\n" {
		t.Fatalf("reusing a failed id: exit %d output %q", exit.Status, out)
	}
}

func TestShareFileAndReadOnly(t *testing.T) {
	testenv.Require(t)
	vm := testenv.StartVM(t, testenv.VMConfig(t, "share"))
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "hosts"), []byte("10.0.0.1 shared-host\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	guestFile, err := vm.Share(filepath.Join(dir, "hosts"), "c/hosts", true)
	if err != nil {
		t.Fatal(err)
	}
	spec := testenv.Spec("sh", "-c", "cat /etc/hosts; echo x >> /etc/hosts && echo writable || echo read-only")
	spec.Mounts = append(spec.Mounts, specs.Mount{Destination: "/etc/hosts", Type: "bind", Source: guestFile, Options: []string{"rbind", "ro"}})
	var out testenv.Buffer
	p := startContainer(t, vm, "c", spec, runtime.Stdio{Stdout: &out, Stderr: io.Discard})
	if exit, err := testenv.WaitOutput(testenv.Context(t, time.Minute), p); err != nil || exit.Status != 0 {
		t.Fatalf("exit %d err %v", exit.Status, err)
	}
	if got := out.String(); !strings.Contains(got, "shared-host") || !strings.Contains(got, "read-only") {
		t.Fatalf("output %q: want the host file, read-only", got)
	}
	if err := vm.Unshare("c/hosts"); err != nil {
		t.Fatal(err)
	}
}

func TestSharedFSVariants(t *testing.T) {
	testenv.Require(t)
	for _, fs := range []machine.SharedFS{machine.NineP, machine.VirtioFS} {
		t.Run(string(fs), func(t *testing.T) {
			cfg := testenv.VMConfig(t, "fs-"+strings.ReplaceAll(string(fs), "-", ""))
			cfg.SharedFS = fs
			if fs == machine.NineP {
				cfg.Users = nil // QEMU serves 9p itself: only as root (vmm.Config.Users)
			}
			vm := testenv.StartVM(t, cfg)
			exit, out, _ := run(t, vm, "ls", nil, "sh", "-c", "ls /bin | wc -l")
			if exit.Status != 0 || strings.TrimSpace(out) == "0" {
				t.Fatalf("over %s: exit %d, output %q", fs, exit.Status, out)
			}
		})
	}
}

func TestQ35Machine(t *testing.T) {
	testenv.Require(t)
	cfg := testenv.VMConfig(t, "q35")
	cfg.Type = machine.Q35
	vm := testenv.StartVM(t, cfg)
	exit, out, _ := run(t, vm, "hello", nil, "echo", "q35")
	if exit.Status != 0 || out != "q35\n" {
		t.Fatalf("exit %d output %q", exit.Status, out)
	}
}

func TestAgentCallTimesOutWhenGuestStops(t *testing.T) {
	testenv.Require(t)
	cfg := testenv.VMConfig(t, "frozen")
	cfg.CallTimeout = 2 * time.Second
	cfg.StopTimeout = 2 * time.Second
	vm := testenv.StartVM(t, cfg)
	// SIGSTOP QEMU: the guest, and so the agent, stops answering.
	if err := syscall.Kill(vm.Machine().Pid(), syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err := vm.Agent().Ping(context.Background())
	if err == nil {
		t.Fatal("ping of a stopped guest succeeded")
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("ping took %v with a 2s call timeout", d)
	}
	if !strings.Contains(err.Error(), "frozen") {
		t.Errorf("error %q does not name the VM", err)
	}
	// Stop must still clean up (the graceful path times out, then QEMU is killed);
	// StartVM's cleanup checks for leaks.
}

// fakeVirtiofsd is a virtiofsd that says why it will not serve and exits.
func fakeVirtiofsd(t *testing.T) string {
	path := filepath.Join(t.TempDir(), "virtiofsd")
	if err := os.WriteFile(path, []byte("#!/bin/sh\necho 'fake virtiofsd: refusing' >&2\nexit 3\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestStartFailuresLeaveNothing(t *testing.T) {
	testenv.Require(t)
	kernel := testenv.Kernel(t)
	cases := []struct {
		name   string
		mutate func(*vmpodagent.Config)
		want   string
	}{
		{"missing kernel", func(c *vmpodagent.Config) { c.Boot.Kernel = "/no/such/vmlinux" }, "kernel"},
		{"missing qemu", func(c *vmpodagent.Config) { c.QEMUPath = "/no/such/qemu" }, "qemu"},
		{"bad machine", func(c *vmpodagent.Config) { c.Type = "pc-i440fx" }, "machine"},
		{"fewer max vCPUs than vCPUs", func(c *vmpodagent.Config) { c.VCPUs, c.MaxVCPUs = 2, 1 }, "max_vcpus"},
		// A kernel with no agent behind it: the initrd is the kernel image, so the kernel
		// finds no /init, panics, and QEMU exits (-no-reboot).
		{"guest never reaches the agent", func(c *vmpodagent.Config) { c.Boot.Initrd = kernel }, "boot"},
		// QEMU itself refuses to start.
		{"QEMU cannot start the machine", func(c *vmpodagent.Config) { c.MemoryMiB = 1 << 30 }, "QEMU exited"},
		// virtiofsd refuses at once: its own words reach the error (through the VM's log),
		// whether the shim's connection or QEMU's handshake is the first to find it gone
		{"virtiofsd exits at once", func(c *vmpodagent.Config) { c.VirtiofsdPath = fakeVirtiofsd(t) }, "fake virtiofsd: refusing"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testenv.VMConfig(t, "fail")
			cfg.BootTimeout = 20 * time.Second
			tc.mutate(&cfg)
			vm, err := vmpodagent.Boot(context.Background(), cfg)
			if err == nil {
				_ = vm.Kill()
				t.Fatal("start succeeded")
			}
			if !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "vm fail") {
				t.Fatalf("error %q: want it to name the VM and %q", err, tc.want)
			}
			testenv.AssertNoLeaks(t, cfg.StateDir)
		})
	}
}

func TestBootTimeoutKillsQEMU(t *testing.T) {
	testenv.Require(t)
	cfg := testenv.VMConfig(t, "slow")
	cfg.BootTimeout = 300 * time.Millisecond // far below a TCG boot
	start := time.Now()
	vm, err := vmpodagent.Boot(context.Background(), cfg)
	if err == nil {
		_ = vm.Kill()
		t.Fatal("start succeeded within an impossible timeout")
	}
	if !strings.Contains(err.Error(), "boot") {
		t.Fatalf("error %q does not name the boot step", err)
	}
	if d := time.Since(start); d > 15*time.Second {
		t.Fatalf("gave up after %v with a 300ms boot timeout", d)
	}
	testenv.AssertNoLeaks(t, cfg.StateDir)
}

func TestReconnectAgent(t *testing.T) {
	testenv.Require(t)
	vm := testenv.StartVM(t, testenv.VMConfig(t, "reconnect"))
	ctx := testenv.Context(t, time.Minute)
	for i := range 3 {
		if err := vm.ReconnectAgent(ctx); err != nil {
			t.Fatalf("reconnect %d: %v", i, err)
		}
		if _, err := vm.Agent().Ping(ctx); err != nil {
			t.Fatalf("ping after reconnect %d: %v", i, err)
		}
	}
	exit, out, _ := run(t, vm, "after", nil, "echo", fmt.Sprint("still-works"))
	if exit.Status != 0 || out != "still-works\n" {
		t.Fatalf("exit %d output %q", exit.Status, out)
	}

	// Streams in flight across reconnects lose nothing and repeat nothing: a container
	// writing numbered lines for a while, and one echoing its stdin back.
	ctx = testenv.Context(t, 2*time.Minute)
	var talker testenv.Buffer
	lines := startContainer(t, vm, "talker", testenv.Spec("sh", "-c", "i=0; while [ $i -lt 100 ]; do echo line$i; i=$((i+1)); sleep 0.1; done"), runtime.Stdio{Stdout: &talker})
	stdinR, stdinW := io.Pipe()
	var echoed testenv.Buffer
	echo := startContainer(t, vm, "echo", testenv.Spec("cat"), runtime.Stdio{Stdin: stdinR, Stdout: &echoed})
	for i := range 3 {
		fmt.Fprintf(stdinW, "in%d\n", i)
		testenv.WaitFor(t, "the talker's output to grow", func() bool { return strings.Count(talker.String(), "\n") > 10*(i+1) })
		if err := vm.ReconnectAgent(ctx); err != nil {
			t.Fatalf("reconnect with streams in flight %d: %v", i, err)
		}
	}
	fmt.Fprintf(stdinW, "in3\n")
	stdinW.Close()
	var want strings.Builder
	for i := range 100 {
		fmt.Fprintf(&want, "line%d\n", i)
	}
	for name, tc := range map[string]struct {
		p    *vmpodagent.Process
		out  *testenv.Buffer
		want string
	}{"talker": {lines, &talker, want.String()}, "echo": {echo, &echoed, "in0\nin1\nin2\nin3\n"}} {
		exit, err := testenv.WaitOutput(ctx, tc.p)
		if err != nil || exit.Status != 0 {
			t.Errorf("%s: exit %d, %v", name, exit.Status, err)
		}
		if got := tc.out.String(); got != tc.want {
			t.Errorf("%s across reconnects: got %q, want %q", name, got, tc.want)
		}
	}
}

// Growing a VM: on q35 by hotplug, on microvm (no hotplug) from vCPUs and memory it
// booted with offline.
func TestHotplugVCPUAndMemory(t *testing.T) {
	testenv.Require(t)
	for _, m := range []machine.Type{machine.Q35, machine.MicroVM} {
		t.Run(string(m), func(t *testing.T) { testGrowth(t, m) })
	}
}

func testGrowth(t *testing.T, m machine.Type) {
	cfg := testenv.VMConfig(t, "grow-"+string(m))
	cfg.Type = m
	// Four slots: on q35 the vCPU has to go to the lowest free one (QEMU lists the
	// highest first); a guest handed slot 3 first never finishes onlining it.
	cfg.VCPUs, cfg.MaxVCPUs = 1, 4
	cfg.MemoryMiB, cfg.MaxMemoryMiB = 512, 1024
	vm := testenv.StartVM(t, cfg)
	ctx := testenv.Context(t, 2*time.Minute)

	before, err := vm.Agent().Ping(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if before.OnlineCpus != 1 || before.MemoryBytes > 512<<20 {
		t.Fatalf("booted with %d CPUs online and %d MiB, want 1 and at most 512", before.OnlineCpus, before.MemoryBytes>>20)
	}
	cpus, err := vm.GrowVCPUs(ctx, 2)
	if err != nil || cpus != 2 {
		t.Fatalf("grow to 2 vCPUs: %d online, %v", cpus, err)
	}
	// the target is absolute: asking again changes nothing
	if cpus, err := vm.GrowVCPUs(ctx, 2); err != nil || cpus != 2 {
		t.Fatalf("grow to 2 vCPUs again: %d online, %v", cpus, err)
	}
	if _, err := vm.GrowVCPUs(ctx, 5); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("growing to 5 of max 4: %v, want InvalidArgument", err)
	}
	mem, err := vm.ResizeMemory(ctx, 768)
	if err != nil {
		t.Fatalf("grow memory: %v", err)
	}
	// the memmap of the new memory may come out of it (virtio-mem)
	if grown := int64(mem) - int64(before.MemoryBytes); grown < 250<<20 || grown > 256<<20 {
		t.Fatalf("memory grew by %d MiB, want 256", grown>>20)
	}
	// all the way to the maximum, and not past it
	if mem, err = vm.ResizeMemory(ctx, 1024); err != nil || int64(mem)-int64(before.MemoryBytes) < 506<<20 {
		t.Fatalf("grow memory to the maximum: the guest has %d MiB (booted with %d), %v", mem>>20, before.MemoryBytes>>20, err)
	}
	if _, err := vm.ResizeMemory(ctx, 1152); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("growing memory past max_memory_mib: %v, want InvalidArgument", err)
	}
	// A container sees the new CPU.
	exit, out, _ := run(t, vm, "nproc", nil, "nproc")
	if exit.Status != 0 || strings.TrimSpace(out) != "2" {
		t.Fatalf("nproc in a container: %q (exit %d), want 2", out, exit.Status)
	}
	if m != machine.Q35 {
		if _, err := vm.ShrinkVCPUs(ctx, 1); !errdefs.IsNotImplemented(err) {
			t.Errorf("shrinking a %s: %v, want NotImplemented (it keeps what it onlined)", m, err)
		}
		return
	}
	// q35 gives back the virtio-mem memory it grew by, which the guest onlined movable and
	// can empty; a hot-plugged vCPU only under KVM (QEMU 7.2 under TCG corrupts its heap
	// unplugging one: measured, docs/design/008)
	if vm.Machine().Accel() == machine.KVM {
		if cpus, err := vm.ShrinkVCPUs(ctx, 1); err != nil || cpus != 1 {
			t.Fatalf("shrink to 1 vCPU: %d online, %v", cpus, err)
		}
	} else if _, err := vm.ShrinkVCPUs(ctx, 1); !errdefs.IsNotImplemented(err) {
		t.Errorf("shrinking vCPUs under %s: %v, want NotImplemented", vm.Machine().Accel(), err)
	}
	t0 := time.Now()
	if mem, err = vm.ResizeMemory(ctx, 512); err != nil || mem > before.MemoryBytes+(64<<20) {
		t.Fatalf("shrink memory to 512 MiB: the guest has %d MiB (booted with %d), %v", mem>>20, before.MemoryBytes>>20, err)
	}
	t.Logf("512 MiB given back in %v", time.Since(t0).Round(time.Millisecond))
	// and it grows again, and QEMU stops cleanly after all that
	if mem, err = vm.ResizeMemory(ctx, 768); err != nil || int64(mem)-int64(before.MemoryBytes) < 250<<20 {
		t.Fatalf("grow memory after the shrink: the guest has %d MiB, %v", mem>>20, err)
	}
	if cpus, err := vm.GrowVCPUs(ctx, 3); err != nil || cpus != 3 {
		t.Fatalf("grow to 3 vCPUs after the shrink: %d online, %v", cpus, err)
	}
	if err := vm.RemoveContainer(ctx, "nproc", true); err != nil {
		t.Fatal(err)
	}
	if err := vm.Stop(ctx); err != nil {
		t.Errorf("stop after the shrink: %v", err)
	}
	if err := vm.Machine().ExitErr(); err != nil {
		t.Errorf("QEMU after the shrink: %v", err)
	}
}

func TestOOMKillIsReported(t *testing.T) {
	testenv.Require(t)
	vm := testenv.StartVM(t, testenv.VMConfig(t, "oom"))
	ctx := testenv.Context(t, 2*time.Minute)
	limit := int64(32 << 20)
	spec := testenv.Spec("sh", "-c", `x=$(head -c 200000000 /dev/zero | tr '\0' a); echo survived`)
	spec.Linux.Resources = &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &limit}}
	events := make(chan vmpodagent.OOMEvent, 1)
	go func() {
		if ev, err := vm.Agent().WaitOOMEvent(ctx, 0); err == nil {
			events <- ev
		}
	}()
	var out testenv.Buffer
	p := startContainer(t, vm, "hog", spec, runtime.Stdio{Stdout: &out})
	exit, err := testenv.WaitOutput(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	if exit.Status != 128+9 || strings.Contains(out.String(), "survived") {
		t.Fatalf("memory hog exited %d with %q, want 137 (OOM-killed)", exit.Status, out.String())
	}
	select {
	case ev := <-events:
		if ev.ContainerID != "hog" || ev.Seq == 0 {
			t.Fatalf("OOM event %+v", ev)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no OOM event for an OOM-killed container")
	}
	st, err := vm.Agent().ContainerStats(ctx, "hog")
	if err != nil || st.GetMemoryEvents().GetOomKill() == 0 {
		t.Fatalf("stats after the OOM kill: %v, oom_kill %d", err, st.GetMemoryEvents().GetOomKill())
	}
}

// cgroupFile is a file of the cgroup at path (below the root) in the hierarchy that
// accounts memory: cgroup v1's memory controller, or v2's unified tree.
func cgroupFile(path, v1name, v2name string) string {
	if _, err := os.Stat("/sys/fs/cgroup/memory"); err == nil {
		return filepath.Join("/sys/fs/cgroup/memory", path, v1name)
	}
	return filepath.Join("/sys/fs/cgroup", path, v2name)
}

// QEMU and virtiofsd run in the pod's cgroup, whose memory use then includes the VM's.
func TestCgroup(t *testing.T) {
	testenv.Require(t)
	parent := fmt.Sprintf("/vmpod-it-%d", time.Now().UnixNano())
	cfg := testenv.VMConfig(t, "cgroup")
	cfg.Cgroup = parent + "/pod"
	t.Cleanup(func() {
		for _, root := range []string{"/sys/fs/cgroup"} {
			dirs, _ := filepath.Glob(filepath.Join(root, "*", parent))
			dirs = append(dirs, filepath.Join(root, parent))
			for _, d := range dirs {
				_ = os.Remove(d)
			}
		}
	})
	vm := testenv.StartVM(t, cfg)
	procs, err := os.ReadFile(cgroupFile(cfg.Cgroup, "cgroup.procs", "cgroup.procs"))
	if err != nil {
		t.Fatal(err)
	}
	qemu := vm.Machine().Pid()
	// QEMU's own memory: anonymous and shared-memory (guest RAM) pages. Its file pages
	// (binary, libraries) are charged to whoever first read them, another QEMU perhaps.
	var rssKiB int
	status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", qemu))
	// QEMU runs under its seccomp sandbox (-sandbox): mode 2, a filter
	if !strings.Contains(string(status), "\nSeccomp:\t2\n") {
		t.Errorf("QEMU has no seccomp filter:\n%s", status)
	}
	for _, field := range []string{"RssAnon", "RssShmem"} {
		kib, err := testenv.StatusKiB(qemu, field)
		if err != nil {
			t.Fatal(err)
		}
		rssKiB += int(kib)
	}
	pids := strings.Fields(string(procs))
	if !slices.Contains(pids, fmt.Sprint(qemu)) || len(pids) < 2 {
		t.Fatalf("cgroup %s holds %v; want QEMU (%d) and virtiofsd", cfg.Cgroup, pids, qemu)
	}
	usage, err := os.ReadFile(cgroupFile(cfg.Cgroup, "memory.usage_in_bytes", "memory.current"))
	if err != nil {
		t.Fatal(err)
	}
	var bytes int
	fmt.Sscan(string(usage), &bytes)
	t.Logf("cgroup memory %d MiB, QEMU anonymous+shmem RSS %d MiB", bytes>>20, rssKiB>>10)
	if bytes < rssKiB*1024 {
		t.Fatalf("the cgroup accounts %d bytes, less than QEMU's own memory (%d KiB): QEMU's memory is charged elsewhere", bytes, rssKiB)
	}
	st, err := vm.Machine().CgroupStats()
	if err != nil || st.GetMemory().GetUsage() < uint64(rssKiB)*1024 || st.GetCPU().GetUsageUsec() == 0 {
		t.Fatalf("cgroup stats %+v, %v: want QEMU's memory and CPU time", st, err)
	}
	if err := vm.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(cgroupFile(cfg.Cgroup, "", "")); !os.IsNotExist(err) {
		t.Fatalf("the cgroup is still there after the VM stopped: %v", err)
	}
}

// The agent warms runc up at boot with a throwaway container (docs/design/021) when runc
// creates the app containers (KernelParamRuncApps; the agent does by default, design
// 023): it succeeds in the real guest, cleans up (the agent says warmed only once runc
// deleted it), and the kernel parameter turns it off.
func TestRuncWarmup(t *testing.T) {
	testenv.Require(t)
	for _, warm := range []bool{true, false} {
		t.Run(fmt.Sprint("warm=", warm), func(t *testing.T) {
			cfg := testenv.VMConfig(t, "warmup")
			cfg.Boot.KernelParams = append(cfg.Boot.KernelParams, agentv1.KernelParamRuncApps)
			if !warm {
				cfg.Boot.KernelParams = append(cfg.Boot.KernelParams, agentv1.KernelParamNoWarmup)
			}
			vm := testenv.StartVM(t, cfg)
			if warm {
				testenv.WaitForWithin(t, time.Minute, "the agent to warm runc up", func() bool {
					b, _ := os.ReadFile(cfg.LogPath)
					if i := bytes.Index(b, []byte("runc warm-up failed")); i >= 0 {
						t.Fatalf("the warm-up failed: %s", b[i:])
					}
					return bytes.Contains(b, []byte("runc warmed up"))
				})
				b, _ := os.ReadFile(cfg.LogPath)
				i := bytes.Index(b, []byte("runc warmed up"))
				line, _, _ := bytes.Cut(b[i:], []byte("\n"))
				t.Logf("guest: %s", line)
			}
			// a container starts as usual, after the warm-up or without one
			if exit, out, _ := run(t, vm, "after", nil, "echo", "ok"); exit.Status != 0 || out != "ok\n" {
				t.Fatalf("a container after the warm-up: exit %d, %q", exit.Status, out)
			}
			b, _ := os.ReadFile(cfg.LogPath)
			if got := bytes.Contains(b, []byte("runc warm")); got != warm {
				t.Errorf("warm-up in the guest's log: %v, want %v", got, warm)
			}
		})
	}
}
