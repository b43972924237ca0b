package agent

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
)

func sandboxSpec() *specs.Spec {
	return &specs.Spec{
		Annotations: map[string]string{criContainerType: "sandbox"},
		Process: &specs.Process{
			Args: []string{"/bin/sleep", "300"}, Cwd: "/",
			User:            specs.User{UID: 65535, GID: 65535},
			NoNewPrivileges: true,
			Capabilities:    &specs.LinuxCapabilities{Bounding: []string{"CAP_KILL"}},
		},
		Hostname: "the-pod",
		Linux: &specs.Linux{
			Sysctl: map[string]string{"kernel.shm_rmid_forced": "1"},
			Namespaces: []specs.LinuxNamespace{{Type: specs.PIDNamespace}, {Type: specs.IPCNamespace},
				{Type: specs.UTSNamespace}, {Type: specs.MountNamespace}, {Type: specs.CgroupNamespace}},
		},
	}
}

// testCgroup makes a cgroup2 directory for one test (skips without root or cgroup2).
func testCgroup(t *testing.T, name string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipped: joining and making namespaces needs root")
	}
	root := "/sys/fs/cgroup"
	if _, err := os.Stat(filepath.Join(root, "unified", "cgroup.procs")); err == nil {
		root = filepath.Join(root, "unified")
	}
	if _, err := os.Stat(filepath.Join(root, "cgroup.controllers")); err != nil {
		t.Skipf("skipped: no cgroup2 hierarchy at %s", root)
	}
	dir := filepath.Join(root, fmt.Sprintf("vmpod-%s-%d", name, os.Getpid()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Skipf("skipped: cannot make a cgroup: %v", err)
	}
	t.Cleanup(func() { _ = unix.Rmdir(dir) })
	return dir
}

func TestSandboxInit(t *testing.T) {
	cgroup := testCgroup(t, "sandboxinit")
	ourHost, _ := os.Hostname()
	ourShm, _ := os.ReadFile("/proc/sys/kernel/shm_rmid_forced")
	null, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()
	spec := sandboxSpec()
	if why := agentStartsSandbox(spec); why != "" {
		t.Fatalf("the agent would not start it: %s", why)
	}
	// The host's tree as the sandbox's rootfs, bound apart: the init's root must be a
	// mount of its own, as a container's is.
	root := t.TempDir()
	if err := unix.Mount("/", root, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		t.Skipf("skipped: cannot bind / for a rootfs: %v", err)
	}
	t.Cleanup(func() { _ = unix.Unmount(root, unix.MNT_DETACH) })
	if err := unix.Mount("", root, "", unix.MS_PRIVATE|unix.MS_REC, ""); err != nil {
		t.Fatal(err)
	}
	pid, err := startSandboxInit(spec, root, cgroup, [3]*os.File{null, null, null})
	if err != nil {
		t.Fatal(err)
	}
	// Its root is all it has: the tree above it is not in its mount namespace.
	if mounts, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", pid)); err != nil || strings.Contains(string(mounts), " "+root+" ") {
		t.Errorf("the init's mounts show the tree above its root (%v):\n%s", err, mounts)
	}
	// and from its root, ".." goes nowhere (from a chroot it climbs into the tree above)
	var top, up unix.Stat_t
	if unix.Stat(fmt.Sprintf("/proc/%d/root", pid), &top) != nil || unix.Stat(fmt.Sprintf("/proc/%d/root/..", pid), &up) != nil ||
		top.Dev != up.Dev || top.Ino != up.Ino {
		t.Errorf("the init's root/.. is not its root: %d:%d against %d:%d", up.Dev, up.Ino, top.Dev, top.Ino)
	}
	r := cgroupRunner{cgroup: cgroup}
	t.Cleanup(func() { _ = unix.Kill(pid, unix.SIGKILL) })

	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{fmt.Sprintf("NSpid:\t%d\t1\n", pid), "Uid:\t65535\t65535\t65535\t65535\n",
		"CapBnd:\t0000000000000020\n", "NoNewPrivs:\t1\n"} {
		if !strings.Contains(string(status), want) {
			t.Errorf("the init's status lacks %q", want)
		}
	}
	for _, ns := range []string{"uts", "ipc", "pid", "cgroup"} {
		// pid: the init's own is the new one (pid_for_children is the caller's)
		if same, err := sameNamespace(pid, ns); err != nil || same {
			t.Errorf("%s namespace: the agent's (%v)", ns, err)
		}
	}
	// Inside: the pod's host name and IPC sysctl, as a container joining them sees.
	out, err := runIn(t, pid, cgroup, "sh", "-c", "hostname; cat /proc/sys/kernel/shm_rmid_forced /proc/self/cgroup")
	if err != nil || !strings.HasPrefix(out, "the-pod\n1\n") || !strings.HasSuffix(out, "0::/\n") {
		t.Errorf("inside the sandbox: %q %v", out, err)
	}
	// Outside: the agent's own are untouched.
	if h, _ := os.Hostname(); h != ourHost {
		t.Errorf("the agent's host name became %q", h)
	}
	if b, _ := os.ReadFile("/proc/sys/kernel/shm_rmid_forced"); string(b) != string(ourShm) {
		t.Errorf("the agent's kernel.shm_rmid_forced became %q", b)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := r.freeze(ctx, true); err != nil {
		t.Fatal(err)
	}
	if err := r.freeze(ctx, false); err != nil {
		t.Fatal(err)
	}
	if err := r.update(ctx, &specs.LinuxResources{}); err == nil {
		t.Error("update of a sandbox the agent started: no error")
	}
	if err := r.killAll(ctx, unix.SIGKILL); err != nil {
		t.Fatal(err)
	}
	var ws unix.WaitStatus
	if _, err := unix.Wait4(pid, &ws, 0, nil); err != nil || ws.Signal() != unix.SIGKILL {
		t.Fatalf("init after killAll: %v %v", ws, err)
	}
	if err := r.delete(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(cgroup); !os.IsNotExist(err) {
		t.Fatalf("cgroup after delete: %v", err)
	}
}

// runIn runs args with nsExec in the namespaces of pid.
func runIn(t *testing.T, pid int, cgroup string, args ...string) (string, error) {
	t.Helper()
	status, out, err := runInContainer(t, pid, cgroup, &specs.Process{Args: args, Cwd: "/", Env: []string{"PATH=/usr/bin:/bin"}})
	if err == nil && status != 0 {
		err = fmt.Errorf("exit status %d", status)
	}
	return out, err
}

func TestAgentStartsSandbox(t *testing.T) {
	for name, edit := range map[string]func(*specs.Spec){
		"an app container": func(s *specs.Spec) { s.Annotations[criContainerType] = "container" },
		"seccomp":          func(s *specs.Spec) { s.Linux.Seccomp = &specs.LinuxSeccomp{} },
		"user namespace": func(s *specs.Spec) {
			s.Linux.Namespaces = append(s.Linux.Namespaces, specs.LinuxNamespace{Type: specs.UserNamespace})
		},
		"a namespace to join": func(s *specs.Spec) { s.Linux.Namespaces[1].Path = "/proc/7/ns/ipc" },
		"terminal":            func(s *specs.Spec) { s.Process.Terminal = true },
		"rlimits":             func(s *specs.Spec) { s.Process.Rlimits = []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE"}} },
		"relative command":    func(s *specs.Spec) { s.Process.Args = []string{"pause"} },
		"non-namespaced sysctl": func(s *specs.Spec) {
			s.Linux.Sysctl["kernel.panic"] = "1"
		},
		"unknown capability": func(s *specs.Spec) { s.Process.Capabilities.Bounding = []string{"CAP_NOPE"} },
		"no capabilities":    func(s *specs.Spec) { s.Process.Capabilities = nil },
		"root":               func(s *specs.Spec) { s.Process.User.UID = 0 },
		"ambient":            func(s *specs.Spec) { s.Process.Capabilities.Ambient = []string{"CAP_KILL"} },
		"no args":            func(s *specs.Spec) { s.Process.Args = nil },
		"host name, no UTS namespace": func(s *specs.Spec) {
			s.Linux.Namespaces = slices.DeleteFunc(s.Linux.Namespaces, func(ns specs.LinuxNamespace) bool { return ns.Type == specs.UTSNamespace })
		},
		"IPC sysctl, no IPC namespace": func(s *specs.Spec) {
			s.Linux.Namespaces = slices.DeleteFunc(s.Linux.Namespaces, func(ns specs.LinuxNamespace) bool { return ns.Type == specs.IPCNamespace })
		},
	} {
		s := sandboxSpec()
		edit(s)
		if why := agentStartsSandbox(s); why == "" {
			t.Errorf("%s: the agent would start it", name)
		}
	}
	s := sandboxSpec()
	s.Linux.Sysctl["fs.mqueue.msg_max"] = "20"
	if why := agentStartsSandbox(s); why != "" {
		t.Errorf("an mqueue sysctl: %s", why)
	}
}

// TestContainerBeingCreatedHasNoRunner: a container whose create has not got to runc or
// the agent's start yet can be signalled (shutdown, kill --all) without a runner.
func TestContainerBeingCreatedHasNoRunner(t *testing.T) {
	m := &containers{byID: map[string]*container{"x": {id: "x", state: stateCreating, execs: map[string]*process{}}}}
	err := m.signal(context.Background(), &agentv1.SignalProcessRequest{ContainerId: "x", Signal: 9, All: true})
	if !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("kill --all while creating: %v, want FailedPrecondition", err)
	}
	m.killAll(context.Background()) // must not panic
}
