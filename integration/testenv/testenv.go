// Package testenv is the shared setup of vmpod's integration tests: the gate that skips
// them (saying why) on machines that cannot run them, the guest assets and test rootfs
// that `make test` builds, per-test state directories, and the leak check every test
// that boots a VM ends with.
package testenv

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/vmpod/vmpod/runtime"
	"github.com/vmpod/vmpod/runtime/vmm"
	"github.com/vmpod/vmpod/runtime/vmpodagent"
	"github.com/vmpod/vmpod/runtime/vmuser"
)

// Environment variables `make test` sets for the integration tests.
const (
	EnvGate    = "VMPOD_INTEGRATION" // "1" runs them
	EnvKernel  = "VMPOD_KERNEL"
	EnvInitrd  = "VMPOD_INITRD"
	EnvBusybox = "VMPOD_BUSYBOX_ROOTFS"
	// EnvQEMUNext is hack/qemu-next.sh's directory: a QEMU and a virtiofsd that can
	// migrate a virtio-fs device, which the host's cannot
	EnvQEMUNext = "VMPOD_QEMU_NEXT"
)

// Require skips the test unless integration tests were asked for and can run here.
func Require(t testing.TB) {
	t.Helper()
	if os.Getenv(EnvGate) != "1" {
		t.Skipf("integration test: set %s=1 (make test does) to boot real VMs", EnvGate)
	}
	if os.Geteuid() != 0 {
		t.Skip("integration test: needs root (mounts, taps, QEMU with virtiofsd)")
	}
}

func mustEnvFile(t testing.TB, name string) string {
	t.Helper()
	p := os.Getenv(name)
	if p == "" {
		t.Fatalf("%s is not set: run through `make test` (it builds the guest and test rootfs)", name)
	}
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return p
}

// Kernel, Initrd and BusyboxRootfs are the assets `make test` built.
func Kernel(t testing.TB) string        { return mustEnvFile(t, EnvKernel) }
func Initrd(t testing.TB) string        { return mustEnvFile(t, EnvInitrd) }
func BusyboxRootfs(t testing.TB) string { return mustEnvFile(t, EnvBusybox) }

// QEMUNext is a QEMU and a virtiofsd that migrate virtio-fs (hack/qemu-next.sh).
func QEMUNext(t testing.TB) (qemu, virtiofsd string) {
	t.Helper()
	dir := mustEnvFile(t, EnvQEMUNext)
	return filepath.Join(dir, "bin", "qemu-system-x86_64"), filepath.Join(dir, "bin", "virtiofsd")
}

// StateRoot is a short directory for VM state (unix socket paths are limited to 108
// bytes, too short for t.TempDir()).
func StateRoot(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("/run", "vmpod-it-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Remove(dir) })
	return dir
}

// VMConfig is a small VM of the test guest, with its state under a fresh directory.
func VMConfig(t testing.TB, name string) vmpodagent.Config {
	return vmpodagent.Config{
		Config: vmm.Config{
			Name:     name,
			StateDir: filepath.Join(StateRoot(t), "vm"),
			LogPath:  filepath.Join(t.TempDir(), name+".log"),
			Boot:     vmm.Boot{Kernel: Kernel(t), Initrd: Initrd(t)},
			Users:    QEMUUsers(),
		},
		// tests check results, not speed: a wide boot timeout absorbs a loaded CI host
		BootTimeout: 60 * time.Second,
	}
}

// StartVM boots cfg and registers its stop and the leak check with the test.
func StartVM(t testing.TB, cfg vmpodagent.Config) *vmpodagent.Guest {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	vm, err := vmpodagent.Boot(ctx, cfg)
	if err != nil {
		t.Fatalf("start VM: %v", err)
	}
	t.Cleanup(func() {
		if err := vm.Stop(context.Background()); err != nil {
			t.Errorf("stop VM: %v", err)
		}
		AssertNoLeaks(t, cfg.StateDir)
		if t.Failed() {
			if b, err := os.ReadFile(cfg.LogPath); err == nil {
				t.Logf("VM log %s:\n%s", cfg.LogPath, b)
			}
		}
	})
	return vm
}

// AssertNoLeaks fails the test if anything of a VM with this state directory survives:
// a process naming it (QEMU, virtiofsd), a mount below it, or the directory itself
// (and with it the sockets).
func AssertNoLeaks(t testing.TB, stateDir string) {
	t.Helper()
	if procs := ProcessesMentioning(stateDir); len(procs) > 0 {
		t.Errorf("leak: processes still running for %s: %s", stateDir, strings.Join(procs, "; "))
	}
	// QEMU's command line names no path (docs/design/014): it holds its uid's lease
	held, err := QEMUUsers().Held(stateDir)
	if err != nil {
		t.Errorf("leak check: %v", err)
	}
	if len(held) > 0 {
		t.Errorf("leak: QEMU uids %v, leased for %s, are still held (a QEMU or its shim lives)", held, stateDir)
	}
	if mounts := MountsUnder(stateDir); len(mounts) > 0 {
		t.Errorf("leak: mounts still below %s: %s", stateDir, strings.Join(mounts, ", "))
	}
	if _, err := os.Lstat(stateDir); err == nil {
		t.Errorf("leak: state dir %s still exists", stateDir)
	}
}

// ProcessesMentioning lists "pid: cmdline" of processes whose command line contains s.
func ProcessesMentioning(s string) []string {
	var out []string
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range dirs {
		b, err := os.ReadFile(filepath.Join(d, "cmdline"))
		if err != nil || len(b) == 0 {
			continue
		}
		cmdline := strings.ReplaceAll(strings.TrimRight(string(b), "\x00"), "\x00", " ")
		if strings.Contains(cmdline, s) {
			out = append(out, filepath.Base(d)+": "+cmdline)
		}
	}
	return out
}

// MountsUnder lists mount points at or below dir.
func MountsUnder(dir string) []string {
	return MountsWhere(func(p string) bool { return p == dir || strings.HasPrefix(p, dir+"/") })
}

// MountsWhere lists the host's mount points whose path match accepts.
func MountsWhere(match func(path string) bool) []string {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	var out []string
	for line := range strings.Lines(string(b)) {
		if f := strings.Fields(line); len(f) > 4 && match(f[4]) {
			out = append(out, f[4])
		}
	}
	return out
}

// OverlayRootfs mounts a writable overlay of lower (as containerd's overlay snapshotter
// would) and unmounts it when the test ends.
func OverlayRootfs(t testing.TB, lower string) string {
	t.Helper()
	o := NewOverlay(t, lower)
	if err := o.Mount(t); err != nil {
		t.Fatal(err)
	}
	return o.Merged
}

// Overlay is a container rootfs as containerd's overlay snapshotter lays it out: the
// image's layers (Lower), what the container writes (Upper), the mount point (Merged).
type Overlay struct {
	Lower, Upper, Work, Merged string
}

// NewOverlay makes an overlay's directories, not mounted yet.
func NewOverlay(t testing.TB, lower string) Overlay {
	t.Helper()
	dir := t.TempDir()
	o := Overlay{Lower: lower, Upper: filepath.Join(dir, "upper"), Work: filepath.Join(dir, "work"), Merged: filepath.Join(dir, "merged")}
	for _, d := range []string{o.Upper, o.Work, o.Merged} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return o
}

// Mount mounts the overlay at Merged, and unmounts it when the test ends. A helper of
// any goroutine: it returns its error.
func (o Overlay) Mount(t testing.TB) error {
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", o.Lower, o.Upper, o.Work)
	if err := unix.Mount("overlay", o.Merged, "overlay", 0, opts); err != nil {
		return fmt.Errorf("overlay rootfs: %w", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(o.Merged, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount overlay rootfs: %v", err)
		}
	})
	return nil
}

// Spec is a runtime-spec for args, close to what containerd generates for a CRI
// container: its own pid, ipc, uts and mount namespaces (the network is the pod's, which
// in the guest is the VM's own), the usual mounts, default capabilities, masked paths.
// root.path is replaced by the runtime with the shared rootfs.
func Spec(args ...string) *specs.Spec {
	caps := []string{
		"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
		"CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
		"CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
	}
	return &specs.Spec{
		Version: specs.Version,
		Root:    &specs.Root{Path: "rootfs"},
		Process: &specs.Process{
			Args: args,
			Env:  []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"},
			Cwd:  "/",
			Capabilities: &specs.LinuxCapabilities{
				Bounding: caps, Effective: caps, Permitted: caps,
			},
			Rlimits:         []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Hard: 1024, Soft: 1024}},
			NoNewPrivileges: true,
		},
		Hostname: "vmpod-test",
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc", Options: []string{"nosuid", "noexec", "nodev"}},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
			{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"}},
			{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}},
			{Destination: "/dev/mqueue", Type: "mqueue", Source: "mqueue", Options: []string{"nosuid", "noexec", "nodev"}},
			{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
			{Destination: "/sys/fs/cgroup", Type: "cgroup", Source: "cgroup", Options: []string{"nosuid", "noexec", "nodev", "relatime", "ro"}},
		},
		Linux: &specs.Linux{
			Namespaces: []specs.LinuxNamespace{
				{Type: specs.PIDNamespace}, {Type: specs.IPCNamespace},
				{Type: specs.UTSNamespace}, {Type: specs.MountNamespace},
			},
			MaskedPaths: []string{
				"/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
				"/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
			},
			ReadonlyPaths: []string{
				"/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
			},
		},
	}
}

// WaitOutput waits for a guest process to exit and its output to reach the host writers
// (Wait returns at the exit; a background child may hold the output open longer).
func WaitOutput(ctx context.Context, p *vmpodagent.Process) (runtime.Exit, error) {
	exit, err := p.Wait(ctx)
	if err != nil {
		return exit, err
	}
	select {
	case <-p.OutputDone():
		return exit, nil
	case <-ctx.Done():
		return exit, ctx.Err()
	}
}

// QEMUUsers is the uid pool the tests' machines run QEMU from: the node default's, so that
// tests and test nodes on one host never lease one uid twice.
func QEMUUsers() *vmuser.Pool {
	p := vmuser.Default()
	return &p
}

// AsUserOf runs script with /bin/sh as the user and group process pid runs as (no
// supplementary groups) and returns its exit status and output: what a process with
// those credentials — a guest that took over that QEMU — may do on the host.
func AsUserOf(t testing.TB, pid int, script string) (int, string) {
	t.Helper()
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	var uid, gid uint64
	for _, l := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(l, "Uid:"); ok {
			uid, _ = strconv.ParseUint(strings.Fields(v)[0], 10, 32)
		}
		if v, ok := strings.CutPrefix(l, "Gid:"); ok {
			gid, _ = strconv.ParseUint(strings.Fields(v)[0], 10, 32)
		}
	}
	cmd := exec.Command("/bin/sh", "-c", script)
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}}
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		return exit.ExitCode(), string(out)
	}
	if err != nil {
		t.Fatal(err)
	}
	return 0, string(out)
}
