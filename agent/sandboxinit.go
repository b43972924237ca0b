package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/vmpod/vmpod/agent/rootfs"
)

// A pod's sandbox container (CRI's "pause") runs no workload: its init holds the pod's
// IPC, UTS and, when the pod shares one, PID namespace for the other containers to join,
// and reaps what is orphaned in that PID namespace. Created by runc it was the slowest
// step of a pod start after the boot (~800 ms under TCG: the first runc of a fresh guest).
// The agent starts it itself (docs/design/020), as nsExec starts an exec'd process: on a
// thread of its own it unshares the UTS and IPC namespaces the spec asks for, names the
// host and sets the IPC sysctls in them, cuts its capabilities, enters a mount namespace
// whose root is the image's rootfs and nothing else (rootfs.Enter), and forks the init
// into a new PID (and cgroup) namespace, in the container's cgroup. The init gets none of
// the spec's mounts: no container ever joins the sandbox's mount namespace, and the pause
// binary touches no file after its exec.

// criContainerType is the annotation CRI puts on every container it creates; its value is
// "sandbox" on the pod's sandbox container.
const criContainerType = "io.kubernetes.cri.container-type"

// ipcUTSSysctls are the sysctls of the IPC and UTS namespaces, the only ones runc allows in
// a container that has those namespaces (besides net.*, which the agent sets for the pod).
var ipcUTSSysctls = []string{"kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem",
	"kernel.shmall", "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced",
	"kernel.hostname", "kernel.domainname"}

// sandboxNamespaces are the namespaces the agent can give a sandbox's init.
var sandboxNamespaces = []specs.LinuxNamespaceType{specs.PIDNamespace, specs.IPCNamespace,
	specs.UTSNamespace, specs.MountNamespace, specs.CgroupNamespace}

// agentStartsSandbox says whether the agent starts spec's init itself ("") or why runc
// must: it is no sandbox container, or it asks for what only runc gives (runcOnly's list:
// a seccomp profile, a user namespace, a terminal, rlimits, no capabilities), a namespace
// the agent does not make or one to join, a sysctl outside the IPC and UTS namespaces (or
// without its namespace), a relative path, or it runs as root or with ambient
// capabilities (a chroot is all that holds it).
func agentStartsSandbox(spec *specs.Spec) string {
	if spec.Annotations[criContainerType] != "sandbox" {
		return "not a pod's sandbox container"
	}
	p := spec.Process
	if spec.Linux.Seccomp != nil {
		return "a seccomp profile"
	}
	if p.Terminal {
		return "a terminal"
	}
	if why := processNeedsRunc(p); why != "" {
		return why
	}
	switch {
	case !filepath.IsAbs(p.Args[0]):
		return "a command that is not an absolute path"
	case p.User.UID == 0 || len(p.Capabilities.Ambient) > 0:
		// It gets no device filter nor masked paths, which a process that keeps
		// capabilities could use; runc gives them.
		return "a root or ambient-capable init"
	case (spec.Hostname != "" || spec.Domainname != "") && !hasNamespace(spec, specs.UTSNamespace):
		return "a host name without a UTS namespace"
	}
	for _, ns := range spec.Linux.Namespaces {
		if !slices.Contains(sandboxNamespaces, ns.Type) || ns.Path != "" {
			return fmt.Sprintf("namespace %s %s", ns.Type, ns.Path)
		}
	}
	return namespacedSysctls(spec)
}

// namespacedSysctls says which of spec's sysctls the agent cannot set in the container's
// own namespaces: one outside the IPC and UTS namespaces (the pod's net.* ones the agent
// sets for the guest, applyPodNetSysctls), or one whose namespace the container lacks
// (runc refuses it: it would be the guest's).
func namespacedSysctls(spec *specs.Spec) string {
	for k := range spec.Linux.Sysctl {
		uts := k == "kernel.hostname" || k == "kernel.domainname"
		switch {
		case !slices.Contains(ipcUTSSysctls, k) && !strings.HasPrefix(k, "fs.mqueue."):
			return "sysctl " + k
		case uts && !hasNamespace(spec, specs.UTSNamespace), !uts && !hasNamespace(spec, specs.IPCNamespace):
			return "sysctl " + k + " without its namespace"
		}
	}
	return ""
}

func hasNamespace(spec *specs.Spec, t specs.LinuxNamespaceType) bool {
	return slices.ContainsFunc(spec.Linux.Namespaces, func(ns specs.LinuxNamespace) bool { return ns.Type == t })
}

// startSandboxInit starts spec's init in rootfs and the cgroup directory cgroup (which
// exists) and returns its pid. agentStartsSandbox must have accepted spec.
func startSandboxInit(spec *specs.Spec, root, cgroup string, stdio [3]*os.File) (int, error) {
	pid, err := onThreadOfItsOwn(func() (int, error) { return forkSandboxInit(spec, root, cgroup, stdio) })
	if err != nil {
		return 0, err
	}
	if err := setOOMScore(pid, spec.Process.OOMScoreAdj); err != nil {
		_ = unix.Kill(pid, unix.SIGKILL)
		return 0, err
	}
	return pid, nil
}

func forkSandboxInit(spec *specs.Spec, root, cgroup string, stdio [3]*os.File) (int, error) {
	cgroupFD, err := unix.Open(cgroup, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("cgroup %s: %w", cgroup, err)
	}
	defer unix.Close(cgroupFD)
	var unshare int
	if hasNamespace(spec, specs.UTSNamespace) {
		unshare |= unix.CLONE_NEWUTS
	}
	if hasNamespace(spec, specs.IPCNamespace) {
		unshare |= unix.CLONE_NEWIPC
	}
	if unshare != 0 {
		if err := unix.Unshare(unshare); err != nil {
			return 0, fmt.Errorf("unshare UTS/IPC: %w", err)
		}
	}
	// From here the thread's host name and IPC sysctls are the pod's.
	if spec.Hostname != "" {
		if unshare&unix.CLONE_NEWUTS == 0 {
			return 0, invalidf("hostname: set without a UTS namespace")
		}
		if err := unix.Sethostname([]byte(spec.Hostname)); err != nil {
			return 0, fmt.Errorf("hostname %q: %w", spec.Hostname, err)
		}
	}
	if spec.Domainname != "" {
		if err := unix.Setdomainname([]byte(spec.Domainname)); err != nil {
			return 0, fmt.Errorf("domainname %q: %w", spec.Domainname, err)
		}
	}
	for k, v := range spec.Linux.Sysctl {
		// /proc/sys resolves these for the writing thread's namespaces.
		if err := setSysctl(k, v); err != nil {
			return 0, fmt.Errorf("linux.sysctl[%s]: %w", k, err)
		}
	}
	p := spec.Process
	last, err := lastCap() // read in the guest's /proc, which the next step leaves
	if err != nil {
		return 0, err
	}
	// The thread's own mount namespace with the rootfs as its whole tree (design 020
	// first chrooted the init, which left the guest's root reachable through
	// /proc/<pid>/root/.. to a process of the pod with the same uid).
	if err := unix.Unshare(unix.CLONE_FS | unix.CLONE_NEWNS); err != nil {
		return 0, fmt.Errorf("unshare mount namespace: %w", err)
	}
	if err := rootfs.Enter(root); err != nil {
		return 0, err
	}
	ambient, err := restrictThread(p, last)
	if err != nil {
		return 0, err
	}
	var clone uintptr
	if hasNamespace(spec, specs.PIDNamespace) {
		clone |= unix.CLONE_NEWPID
	}
	if hasNamespace(spec, specs.CgroupNamespace) {
		clone |= unix.CLONE_NEWCGROUP // rooted at the cgroup it is forked into
	}
	attr := &syscall.ProcAttr{
		Dir:   p.Cwd,
		Env:   p.Env,
		Files: []uintptr{stdio[0].Fd(), stdio[1].Fd(), stdio[2].Fd()},
		Sys: &syscall.SysProcAttr{
			Setsid:      true,
			Credential:  &syscall.Credential{Uid: p.User.UID, Gid: p.User.GID, Groups: slices.Clone(p.User.AdditionalGids)},
			AmbientCaps: ambient,
			Cloneflags:  clone,
			UseCgroupFD: true,
			CgroupFD:    cgroupFD,
		},
	}
	pid, err := syscall.ForkExec(p.Args[0], p.Args, attr)
	if err != nil {
		return 0, fmt.Errorf("exec failed: unable to start container process: exec %s: %w", p.Args[0], err)
	}
	return pid, nil
}

// cgroupRunner controls a container the agent created through its cgroup, as runc
// would: the sandbox's as it is, an app container's inside appRunner.
type cgroupRunner struct {
	cgroup string
}

// start does nothing: the init runs from its creation (pause only waits for signals, and
// CRI starts the sandbox right after creating it).
func (cgroupRunner) start(context.Context) error { return nil }

func (r cgroupRunner) killAll(_ context.Context, sig unix.Signal) error {
	pids, err := cgroupPids(r.cgroup)
	if err != nil {
		return err
	}
	for _, pid := range pids {
		if err := unix.Kill(int(pid), sig); err != nil && !errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("signal %d to pid %d: %w", sig, pid, err)
		}
	}
	return nil
}

// delete kills what is left (as runc delete --force does) and removes the cgroup once the
// kernel has emptied it (after the last process was reaped).
func (r cgroupRunner) delete(context.Context) error {
	if err := os.WriteFile(filepath.Join(r.cgroup, "cgroup.kill"), []byte("1"), 0); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("cgroup.kill: %w", err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for {
		err := unix.Rmdir(r.cgroup)
		if err == nil || errors.Is(err, unix.ENOENT) {
			return nil
		}
		if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
			return fmt.Errorf("remove cgroup %s: %w", r.cgroup, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (r cgroupRunner) freeze(ctx context.Context, frozen bool) error {
	var want uint64
	if frozen {
		want = 1
	}
	if err := os.WriteFile(filepath.Join(r.cgroup, "cgroup.freeze"), []byte(strconv.FormatUint(want, 10)), 0); err != nil {
		return fmt.Errorf("cgroup.freeze: %w", err)
	}
	for {
		if keyed(r.cgroup, "cgroup.events")["frozen"] == want {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("cgroup %s: not frozen %d: %w", r.cgroup, want, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func (cgroupRunner) update(context.Context, *specs.LinuxResources) error {
	return fmt.Errorf("the pod's sandbox container runs no workload: its limits are the pod's, set on the host: %w", errdefs.ErrFailedPrecondition)
}
