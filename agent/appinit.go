package agent

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/cgroups/v3/cgroup2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/vmpod/vmpod/agent/rootfs"
)

// An app container the agent creates itself (docs/design/023). `runc create` cost 250-900
// ms of a pod start under TCG, most of it two Go start-ups (runc, then `runc init`) run
// through the translator. The agent does runc's part in its own process (the cgroup, its
// limits and device filter) and forks its own binary as the container's init: a binary
// whose code the guest has already translated, since the agent runs from the same pages.
// The init is born in the container's namespaces (a new mount, PID, cgroup namespace;
// the pod's IPC and UTS, joined by the forking thread), builds the container's root
// (agent/rootfs), takes the process's credentials and waits, as runc's init waits on its
// exec FIFO, until the start tells it to execute the process.
//
// The init talks to the agent over two pipes:
//   - control (its fd 3, agent → init): the spec, length-prefixed; later one byte, the
//     start. Closed without the byte, the init exits: the container was removed.
//   - report (its fd 4, init → agent, closed by the exec): 'R' once it is ready to start,
//     or 'E' and what failed, then nothing more.

// containerInitArg makes the agent binary a container's init.
const containerInitArg = "--container-init"

const (
	initReady  = 'R'
	initFailed = 'E'
)

// appNamespaces are the namespaces an agent-created app container may have: new ones,
// or the pod's PID, IPC and UTS namespaces to join.
var appNamespaces = map[specs.LinuxNamespaceType]struct {
	flag     uintptr
	joinable bool
}{
	specs.PIDNamespace:    {unix.CLONE_NEWPID, true},
	specs.IPCNamespace:    {unix.CLONE_NEWIPC, true},
	specs.UTSNamespace:    {unix.CLONE_NEWUTS, true},
	specs.MountNamespace:  {unix.CLONE_NEWNS, false},
	specs.CgroupNamespace: {unix.CLONE_NEWCGROUP, false},
}

// agentCreatesApp says whether the agent creates spec's container itself ("") or why runc
// must: it asks for what only runc gives (processNeedsRunc's list, a seccomp profile, a
// user or time namespace), for a mount or device rootfs.Prepare does not make, or for
// a resource limit this agent does not set.
func agentCreatesApp(spec *specs.Spec) string {
	if spec.Linux.Seccomp != nil {
		return "a seccomp profile"
	}
	if spec.Process.Terminal {
		return "a terminal"
	}
	if why := processNeedsRunc(spec.Process); why != "" {
		return why
	}
	var mountNS bool
	for _, ns := range spec.Linux.Namespaces {
		t, ok := appNamespaces[ns.Type]
		switch {
		case !ok:
			return fmt.Sprintf("a %s namespace", ns.Type)
		case ns.Path != "" && !t.joinable:
			return fmt.Sprintf("a %s namespace to join", ns.Type)
		}
		mountNS = mountNS || ns.Type == specs.MountNamespace
	}
	if !mountNS {
		return "no mount namespace"
	}
	if (spec.Hostname != "" || spec.Domainname != "") && !hasNamespace(spec, specs.UTSNamespace) {
		return "a host name without a UTS namespace"
	}
	if why := namespacedSysctls(spec); why != "" {
		return why
	}
	if why := rootfs.Unsupported(spec); why != "" {
		return why
	}
	if spec.Linux.Personality != nil || spec.Linux.IntelRdt != nil || len(spec.Linux.TimeOffsets) > 0 || spec.Linux.MemoryPolicy != nil || len(spec.Linux.NetDevices) > 0 {
		return "personality, RDT, time offsets, memory policy or network devices"
	}
	return unsupportedResources(spec.Linux.Resources)
}

// unsupportedResources names a limit that cgroup2.ToResources does not carry over.
func unsupportedResources(r *specs.LinuxResources) string {
	if r == nil {
		return ""
	}
	if m := r.Memory; m != nil && (m.Kernel != nil || m.KernelTCP != nil || m.Swappiness != nil || m.DisableOOMKiller != nil || m.UseHierarchy != nil || m.CheckBeforeUpdate != nil) {
		return "linux.resources.memory: a cgroup v1 or update-check setting"
	}
	if c := r.CPU; c != nil && (c.RealtimeRuntime != nil || c.RealtimePeriod != nil || c.Idle != nil || c.Burst != nil || c.Quota != nil && c.Period == nil) {
		return "linux.resources.cpu: realtime, idle, burst or a quota without a period"
	}
	if r.BlockIO != nil || r.Rdma != nil || r.Network != nil {
		return "linux.resources: blockIO, rdma or network"
	}
	for k := range r.Unified {
		if strings.ContainsAny(k, "/") || !strings.Contains(k, ".") {
			return "linux.resources.unified[" + k + "]"
		}
	}
	return ""
}

// appCgroup makes the container's cgroup with every controller the guest has enabled
// below the root (runc does, so that stats and OOM events are there without a limit),
// and sets the spec's limits and device rules.
func appCgroup(mountpoint, group string, res *specs.LinuxResources) error {
	controllers, err := os.ReadFile(filepath.Join(mountpoint, "cgroup.controllers"))
	if err != nil {
		return err
	}
	var enable []string
	for c := range strings.FieldsSeq(string(controllers)) {
		enable = append(enable, "+"+c)
	}
	parent := mountpoint
	for part := range strings.SplitSeq(strings.Trim(group, "/"), "/") {
		control := filepath.Join(parent, "cgroup.subtree_control")
		if os.WriteFile(control, []byte(strings.Join(enable, " ")), 0) != nil {
			// As runc: one at a time, and a controller that will not be enabled is done
			// without (its limits then fail, naming it).
			for _, c := range enable {
				_ = os.WriteFile(control, []byte(c), 0)
			}
		}
		parent = filepath.Join(parent, part)
		if err := os.Mkdir(parent, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return err
		}
	}
	if res == nil {
		return nil
	}
	return setCgroupResources(mountpoint, group, res, true)
}

// setCgroupResources writes res to the cgroup, the device rules only at its creation
// (each write would attach one more filter; CRI's updates repeat the same rules).
func setCgroupResources(mountpoint, group string, res *specs.LinuxResources, devices bool) error {
	mgr, err := cgroup2.Load(group, cgroup2.WithMountpoint(mountpoint))
	if err != nil {
		return err
	}
	r := cgroup2.ToResources(res)
	if devices {
		r.Devices = deviceRules(res.Devices)
	}
	if err := mgr.Update(r); err != nil {
		return fmt.Errorf("linux.resources: %w", err)
	}
	for k, v := range res.Unified {
		if err := os.WriteFile(filepath.Join(mountpoint, group, k), []byte(v), 0); err != nil {
			return fmt.Errorf("linux.resources.unified[%s]: %w", k, err)
		}
	}
	return nil
}

// runcAllowedDevices are the rules runc appends to every container's: mknod of any
// device, and the default nodes (null, random, full, tty, zero, urandom), the
// container's ptys and ptmx, and /dev/net/tun. Containerd's CRI leaves them to the
// runtime (its own rules are a deny-all and the devices a pod asked for).
var runcAllowedDevices = []specs.LinuxDeviceCgroup{
	{Allow: true, Type: "c", Access: "m"}, {Allow: true, Type: "b", Access: "m"},
	device(1, 3), device(1, 8), device(1, 7), device(5, 0), device(1, 5), device(1, 9),
	{Allow: true, Type: "c", Major: new(int64(136)), Access: "rwm"}, device(5, 2), device(10, 200),
}

func device(major, minor int64) specs.LinuxDeviceCgroup {
	return specs.LinuxDeviceCgroup{Allow: true, Type: "c", Major: &major, Minor: &minor, Access: "rwm"}
}

// deviceRules is the device filter runc gives a container: the spec's rules, then
// runcAllowedDevices, with what the runtime-spec lets a rule leave out filled in as runc
// reads it (no type is every type, no major or minor number is any). What no rule
// matches is denied.
func deviceRules(rules []specs.LinuxDeviceCgroup) []specs.LinuxDeviceCgroup {
	out := make([]specs.LinuxDeviceCgroup, 0, len(rules)+len(runcAllowedDevices))
	for _, r := range slices.Concat(rules, runcAllowedDevices) {
		if r.Type == "" {
			r.Type = "a"
		}
		if r.Major == nil {
			r.Major = new(int64(-1))
		}
		if r.Minor == nil {
			r.Minor = new(int64(-1))
		}
		out = append(out, r)
	}
	return out
}

// forkContainerInit starts the agent binary as spec's init in cgroup and hands it the
// spec; it returns once the init is ready to start (or ctx ends), with the agent's ends
// of its pipes.
func forkContainerInit(ctx context.Context, spec *specs.Spec, cgroup string, stdio [3]*os.File) (pid int, control, report *os.File, err error) {
	controlR, controlW, err := os.Pipe()
	if err != nil {
		return 0, nil, nil, err
	}
	defer controlR.Close()
	reportR, reportW, err := os.Pipe()
	if err != nil {
		controlW.Close()
		return 0, nil, nil, err
	}
	defer reportW.Close()
	started := time.Now()
	pid, err = onThreadOfItsOwn(func() (int, error) {
		return forkInitOnThisThread(spec, cgroup, append(stdio[:], controlR, reportW))
	})
	forked := time.Now()
	if err != nil {
		controlW.Close()
		reportR.Close()
		return 0, nil, nil, err
	}
	reportW.Close()
	if deadline, ok := ctx.Deadline(); ok {
		_ = reportR.SetReadDeadline(deadline)
	}
	if err := sendInitSpec(controlW, spec); err != nil {
		err = fmt.Errorf("send the spec to the container's init: %w", err)
		// The init's own report says more when it failed first.
		if msg, rerr := readInitReport(reportR); rerr != nil {
			err = rerr
		} else if msg {
			err = errors.New("the container's init reported ready before its spec")
		}
		controlW.Close()
		reportR.Close()
		return pid, nil, nil, err
	}
	if _, err := readInitReport(reportR); err != nil {
		controlW.Close()
		reportR.Close()
		return pid, nil, nil, err
	}
	slog.Debug("container init ready", "pid", pid, "fork", forked.Sub(started), "ready", time.Since(forked))
	return pid, controlW, reportR, nil
}

// readInitReport reads the init's next report: true once ready, an error with the init's
// reason when it failed, false at the end of the stream (the init executed the process).
func readInitReport(r io.Reader) (bool, error) {
	var kind [1]byte
	if _, err := io.ReadFull(r, kind[:]); err != nil {
		if errors.Is(err, io.EOF) {
			return false, nil
		}
		return false, fmt.Errorf("the container's init: %w", err)
	}
	switch kind[0] {
	case initReady:
		return true, nil
	case initFailed:
		msg, _ := io.ReadAll(io.LimitReader(r, 4096))
		return false, errors.New(string(msg))
	}
	return false, fmt.Errorf("the container's init: report %q", kind[0])
}

func sendInitSpec(w io.Writer, spec *specs.Spec) error {
	b, err := json.Marshal(spec)
	if err != nil {
		return err
	}
	msg := binary.BigEndian.AppendUint32(nil, uint32(len(b)))
	_, err = w.Write(append(msg, b...))
	return err
}

// forkInitOnThisThread joins the pod's namespaces the spec names and forks the init into
// new ones for the rest. The thread is never used again (onThreadOfItsOwn).
func forkInitOnThisThread(spec *specs.Spec, cgroup string, files []*os.File) (int, error) {
	cgroupFD, err := unix.Open(cgroup, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("cgroup %s: %w", cgroup, err)
	}
	defer unix.Close(cgroupFD)
	var clone uintptr
	for i, ns := range spec.Linux.Namespaces {
		t := appNamespaces[ns.Type]
		if ns.Path == "" {
			clone |= t.flag
			continue
		}
		fd, err := unix.Open(ns.Path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return 0, fmt.Errorf("linux.namespaces[%d].path: %w", i, err)
		}
		err = unix.Setns(fd, int(t.flag))
		unix.Close(fd)
		if err != nil {
			return 0, fmt.Errorf("linux.namespaces[%d]: join %s: %w", i, ns.Path, err)
		}
	}
	fds := make([]uintptr, len(files))
	for i, f := range files {
		fds[i] = f.Fd()
	}
	attr := &syscall.ProcAttr{
		Env:   []string{},
		Files: fds,
		Sys: &syscall.SysProcAttr{
			Setsid:      true, // runc's processes lead a session of their own
			Cloneflags:  clone,
			UseCgroupFD: true,
			CgroupFD:    cgroupFD,
		},
	}
	pid, err := syscall.ForkExec("/proc/self/exe", []string{"vmpod-agent", containerInitArg}, attr)
	if err != nil {
		return 0, fmt.Errorf("start the container's init: %w", err)
	}
	return pid, nil
}

// appRunner controls an app container the agent created: through its cgroup
// (cgroupRunner), and through its init until the start.
type appRunner struct {
	cgroupRunner
	mountpoint, group string

	mu              sync.Mutex
	control, report *os.File // nil once started or deleted
}

// start lets the init execute the process and waits for the exec (or the reason it
// failed: the report pipe closes at the exec), for as long as ctx lets it.
func (r *appRunner) start(ctx context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.control == nil {
		return errors.New("the container's init is gone")
	}
	defer r.closeInit()
	if deadline, ok := ctx.Deadline(); ok {
		_ = r.report.SetReadDeadline(deadline)
	}
	if _, err := r.control.Write([]byte{1}); err != nil {
		return fmt.Errorf("start the container's init: %w", err)
	}
	if _, err := readInitReport(r.report); err != nil {
		return fmt.Errorf("exec failed: unable to start container process: %w", err)
	}
	return nil
}

func (r *appRunner) closeInit() {
	if r.control != nil {
		r.control.Close()
		r.report.Close()
		r.control, r.report = nil, nil
	}
}

// setInit hands the runner the agent's ends of a ready init's pipes.
func (r *appRunner) setInit(control, report *os.File) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.control, r.report = control, report
}

// delete kills what is in the cgroup and removes it (cgroupRunner) — an init that was
// never started dies of SIGKILL, as runc's does — then closes the init's pipes.
func (r *appRunner) delete(ctx context.Context) error {
	err := r.cgroupRunner.delete(ctx)
	r.mu.Lock()
	r.closeInit()
	r.mu.Unlock()
	return err
}

func (r *appRunner) update(_ context.Context, res *specs.LinuxResources) error {
	if why := unsupportedResources(res); why != "" {
		return invalidf("%s: not set by this agent", why)
	}
	return setCgroupResources(r.mountpoint, r.group, res, false)
}

// containerInit is the agent binary run as a container's init (forkContainerInit). It
// never returns: it executes the container's process, or reports why not and exits.
func containerInit() {
	// Not dumpable until the exec (which resets it): a process of the pod with the same
	// uid must not reach this one's pipes or its binary, the agent's, through /proc.
	_ = unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0)
	// Nothing the Go runtime opened passes to the process.
	_ = unix.CloseRange(5, ^uint(0), unix.CLOSE_RANGE_CLOEXEC)
	report := os.NewFile(4, "report")
	control := os.NewFile(3, "control")
	err := initContainer(control, report)
	if err == nil {
		os.Exit(0) // removed before its start
	}
	_, _ = report.Write(append([]byte{initFailed}, err.Error()...))
	os.Exit(1)
}

// initContainer runs in the container's init: it returns nil when the agent closed the
// control pipe before the start, an error when anything failed, and nothing at all
// once the exec succeeded.
func initContainer(control, report *os.File) error {
	unix.CloseOnExec(3)
	unix.CloseOnExec(4)
	var size [4]byte
	if _, err := io.ReadFull(control, size[:]); err != nil {
		return fmt.Errorf("read the spec: %w", err)
	}
	raw := make([]byte, binary.BigEndian.Uint32(size[:]))
	if _, err := io.ReadFull(control, raw); err != nil {
		return fmt.Errorf("read the spec: %w", err)
	}
	var spec specs.Spec
	if err := json.Unmarshal(raw, &spec); err != nil {
		return fmt.Errorf("read the spec: %w", err)
	}
	if err := rootfs.Prepare(&spec); err != nil {
		return err
	}
	if hasNamespace(&spec, specs.UTSNamespace) {
		if spec.Hostname != "" {
			if err := unix.Sethostname([]byte(spec.Hostname)); err != nil {
				return fmt.Errorf("hostname %q: %w", spec.Hostname, err)
			}
		}
		if spec.Domainname != "" {
			if err := unix.Setdomainname([]byte(spec.Domainname)); err != nil {
				return fmt.Errorf("domainname %q: %w", spec.Domainname, err)
			}
		}
	}
	for k, v := range spec.Linux.Sysctl {
		if err := setSysctl(k, v); err != nil { // the container's /proc: its namespaces
			return fmt.Errorf("linux.sysctl[%s]: %w", k, err)
		}
	}
	if err := rootfs.Finish(&spec); err != nil {
		return err
	}
	p := spec.Process
	umask := 0o022 // runc's when the process names none
	if p.User.Umask != nil {
		umask = int(*p.User.Umask)
	}
	unix.Umask(umask)
	// As runc: a cwd root may not enter (a volume only its user can read) is entered
	// again as the user.
	cwdErr := unix.Chdir(p.Cwd)
	if cwdErr != nil && !errors.Is(cwdErr, unix.EACCES) {
		return fmt.Errorf("chdir to cwd (%q) set in config.json failed: %w", p.Cwd, cwdErr)
	}
	env := withHome(p.Env, int(p.User.UID))
	if err := becomeUser(p); err != nil {
		return err
	}
	if cwdErr != nil {
		if err := unix.Chdir(p.Cwd); err != nil {
			return fmt.Errorf("chdir to cwd (%q) set in config.json failed: %w", p.Cwd, err)
		}
	}
	// Found after the credentials change, as the user: runc's check of the executable.
	path, err := lookPath(p.Args[0], env)
	if err != nil {
		return err
	}
	if _, err := report.Write([]byte{initReady}); err != nil {
		return err
	}
	var start [1]byte
	if n, _ := control.Read(start[:]); n == 0 {
		return nil
	}
	if err := unix.Exec(path, p.Args, env); err != nil {
		return fmt.Errorf("exec %s: %w", path, err)
	}
	return nil
}

// becomeUser gives the calling thread — the one that executes the process: the main
// goroutine stays on the main thread (nsexec.go) — the process's user, groups,
// capability sets and no_new_privs, in runc's order: bounding set, then the ids with
// the permitted set kept, then the other sets.
func becomeUser(p *specs.Process) error {
	last, err := lastCap()
	if err != nil {
		return err
	}
	caps := p.Capabilities
	if err := limitThreadCapabilities(caps, last); err != nil {
		return err
	}
	if err := unix.Prctl(unix.PR_SET_KEEPCAPS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("keep capabilities: %w", err)
	}
	groups := make([]int, len(p.User.AdditionalGids))
	for i, g := range p.User.AdditionalGids {
		groups[i] = int(g)
	}
	if err := unix.Setgroups(groups); err != nil {
		return fmt.Errorf("setgroups %v: %w", p.User.AdditionalGids, err)
	}
	gid, uid := int(p.User.GID), int(p.User.UID)
	if err := unix.Setresgid(gid, gid, gid); err != nil {
		return fmt.Errorf("setgid %d: %w", gid, err)
	}
	if err := unix.Setresuid(uid, uid, uid); err != nil {
		return fmt.Errorf("setuid %d: %w", uid, err)
	}
	if err := unix.Prctl(unix.PR_SET_KEEPCAPS, 0, 0, 0, 0); err != nil {
		return fmt.Errorf("keep capabilities: %w", err)
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	for _, set := range []struct {
		names []string
		field func(*unix.CapUserData) *uint32
	}{
		{caps.Effective, func(d *unix.CapUserData) *uint32 { return &d.Effective }},
		{caps.Permitted, func(d *unix.CapUserData) *uint32 { return &d.Permitted }},
		{caps.Inheritable, func(d *unix.CapUserData) *uint32 { return &d.Inheritable }},
	} {
		for _, name := range set.names {
			c := capabilities[name]
			*set.field(&data[c/32]) |= 1 << (c % 32)
		}
	}
	if err := unix.Capset(&hdr, &data[0]); err != nil {
		return fmt.Errorf("capset: %w", err)
	}
	for _, name := range caps.Ambient {
		// As runc: an ambient capability the other sets do not allow is skipped.
		_ = unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_RAISE, uintptr(capabilities[name]), 0, 0)
	}
	if p.NoNewPrivileges {
		if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
			return fmt.Errorf("no_new_privs: %w", err)
		}
	}
	return nil
}

// setOOMScore gives pid the spec's OOM score adjustment (it passes to the process at the
// exec).
func setOOMScore(pid int, adj *int) error {
	if adj == nil {
		return nil
	}
	if err := os.WriteFile(fmt.Sprintf("/proc/%d/oom_score_adj", pid), []byte(strconv.Itoa(*adj)), 0); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("process.oomScoreAdj %d: %w", *adj, err)
	}
	return nil
}
