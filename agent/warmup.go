package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// Warming runc up (docs/design/021). A fresh guest's first `runc create` costs ~3× a later
// one: under TCG every page of runc's code runs through the translator the first time, and
// the guest kernel's paths for namespaces, mounts and cgroups are cold too. The pod's
// sandbox no longer pays it (the agent starts it), so its first app container did. The
// agent creates and deletes a throwaway container once at boot, as SCHED_IDLE: it runs only
// in the guest's idle time — while the host plumbs the pod and containerd and the kubelet
// do their part between RunPodSandbox and the app container's create — and a real request
// preempts it at once. Translations are kept per physical page, and runc's protected
// re-exec shares its binary's page cache (an overlayfs over it, not a copy), so the real
// create runs on warm code.

const (
	warmupRoot = "/run/vmpod-warmup" // runc's state and the bundle, apart from the pod's
	warmupID   = "warmup"
	// warmupCgroup is beside cgroupParent, not in it: every name is a valid container ID.
	warmupCgroup = "/vmpod-warmup"
	// warmupBinary is the throwaway container's process: an empty file. runc looks it up
	// at create; the container is deleted before its start, so nothing ever runs it.
	warmupBinary = "/warm"
)

// warmRunc creates and deletes a throwaway container at the lowest scheduling class, so
// that the pod's first `runc create` runs warm. Best effort: a failure is logged and costs
// the pod nothing but the warm-up.
func warmRunc(ctx context.Context, m *containers) {
	start := time.Now()
	if err := warmupOnce(ctx, m); err != nil {
		slog.Warn("runc warm-up failed", "error", err, "took", time.Since(start).Round(time.Millisecond))
		return
	}
	slog.Info("runc warmed up", "took", time.Since(start).Round(time.Millisecond))
}

func warmupOnce(ctx context.Context, m *containers) error {
	bundle := filepath.Join(warmupRoot, "bundle")
	rootfs := filepath.Join(bundle, "rootfs")
	if err := os.MkdirAll(rootfs, 0o700); err != nil {
		return err
	}
	defer os.RemoveAll(warmupRoot)
	if err := os.WriteFile(filepath.Join(rootfs, warmupBinary), nil, 0o755); err != nil {
		return err
	}
	b, err := json.Marshal(warmupSpec())
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(bundle, "config.json"), b, 0o600); err != nil {
		return err
	}
	run := func(ctx context.Context, verb string, args ...string) error {
		logPath := filepath.Join(warmupRoot, verb+".log")
		global := []string{"--root", filepath.Join(warmupRoot, "state"), "--log", logPath, "--log-format", "json"}
		if err := m.runIdle(ctx, append(append(global, verb), args...)...); err != nil {
			return fmt.Errorf("runc %s: %w", verb, runcError(logPath, err))
		}
		return nil
	}
	createErr := run(ctx, "create", "--bundle", bundle, warmupID)
	// delete whatever create left, even after a failure half-way
	deleteErr := run(context.WithoutCancel(ctx), "delete", "--force", warmupID)
	if err := errors.Join(createErr, deleteErr); err != nil {
		return err
	}
	// runc removed the container's cgroup: "warmed up" says nothing was left behind
	if _, err := os.Stat(filepath.Join(cgroupRoot, warmupCgroup)); !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("cgroup %s is still there after runc delete: %v", warmupCgroup, err)
	}
	return nil
}

// idleExecArg makes the agent binary a trampoline: `vmpod-agent --exec-idle prog args...`
// sets SCHED_IDLE on itself and executes prog.
const idleExecArg = "--exec-idle"

// execIdle is the trampoline. The scheduling class is a thread's: set after runc started,
// it would reach only runc's main thread, not the threads its Go runtime has started by
// then nor whatever they fork. Set here on the one thread that calls execve (the main
// goroutine is locked to the main thread, nsexec.go), it is the only thread runc starts
// with, and everything runc starts inherits it. (Not on an agent thread either: a
// SCHED_IDLE thread holding the Go runtime's fork lock, or late to a stop-the-world, would
// hold the agent's real work up behind the idle class.)
func execIdle(argv []string) {
	if err := unix.SchedSetAttr(0, &unix.SchedAttr{Size: unix.SizeofSchedAttr, Policy: unix.SCHED_IDLE}, 0); err != nil {
		fmt.Fprintln(os.Stderr, "SCHED_IDLE:", err)
		os.Exit(126)
	}
	err := unix.Exec(argv[0], argv, os.Environ())
	fmt.Fprintln(os.Stderr, "exec", argv[0]+":", err)
	os.Exit(127)
}

// runIdle runs runc with args as SCHED_IDLE, through the agent's own trampoline.
func (m *containers) runIdle(ctx context.Context, args ...string) error {
	cmd := exec.CommandContext(ctx, "/proc/self/exe", append([]string{idleExecArg, m.runcBinary}, args...)...)
	ec, err := m.reaper.Start(cmd)
	if err != nil {
		return err
	}
	status, err := m.reaper.Wait(cmd, ec)
	if err != nil {
		return err
	}
	if status != 0 {
		return fmt.Errorf("exit status %d", status)
	}
	return nil
}

// warmupSpec is a container as CRI asks for one (its namespaces, the usual mounts, masked
// and read-only paths, a cgroup), so the warm-up goes down the paths a pod's create takes.
func warmupSpec() *specs.Spec {
	caps := []string{"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
		"CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"}
	noSuid := []string{"nosuid", "noexec", "nodev"}
	return &specs.Spec{
		Version: specs.Version,
		Process: &specs.Process{
			Args:         []string{warmupBinary},
			Cwd:          "/",
			Env:          []string{"PATH=/"},
			Capabilities: &specs.LinuxCapabilities{Bounding: caps, Effective: caps, Permitted: caps},
		},
		Root: &specs.Root{Path: "rootfs", Readonly: true},
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc", Options: noSuid},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
			{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"}},
			{Destination: "/dev/mqueue", Type: "mqueue", Source: "mqueue", Options: noSuid},
			{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: append(noSuid, "ro")},
			{Destination: "/sys/fs/cgroup", Type: "cgroup", Source: "cgroup", Options: append(noSuid, "relatime", "ro")},
			{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: append(noSuid, "mode=1777", "size=65536k")},
		},
		Linux: &specs.Linux{
			Namespaces: []specs.LinuxNamespace{{Type: specs.PIDNamespace}, {Type: specs.IPCNamespace},
				{Type: specs.UTSNamespace}, {Type: specs.MountNamespace}, {Type: specs.CgroupNamespace}},
			CgroupsPath:   warmupCgroup,
			MaskedPaths:   []string{"/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list", "/proc/sched_debug", "/sys/firmware"},
			ReadonlyPaths: []string{"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"},
		},
	}
}
