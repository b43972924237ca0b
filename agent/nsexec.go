package agent

import (
	"bufio"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"syscall"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// The agent starts an exec'd process itself, without `runc exec`, when the process needs
// nothing only runc can give it (docs/design/019). Under TCG a `runc exec` is two Go
// process starts in the guest (runc, then `runc init`), ~150 ms of an ExecSync; the
// agent's own fork and exec of the target costs a few.
//
// A Go program cannot join a mount namespace (its threads share one fs_struct), so the
// agent does the joining on a thread of its own: locked, unshared from the other threads'
// fs_struct, moved into the container's namespaces, given the process's umask,
// capability bounding and inheritable sets and no_new_privs — all per-thread state that
// a child inherits — and then it forks the process, which changes credentials, chdirs
// and execs as Go's ForkExec does, into the container's cgroup (CLONE_INTO_CGROUP). The
// thread is never unlocked: Go ends it when its goroutine returns, and no other
// goroutine ever runs with the container's view.
//
// The cgroup namespace is the exception: with nsdelegate (the guest mounts cgroup2 so) a
// thread inside the container's cgroup namespace may not fork into a cgroup from outside
// it. The thread stays in the guest's, and the process gets a cgroup namespace of its
// own rooted at the container's cgroup (CLONE_NEWCGROUP with CLONE_INTO_CGROUP roots it
// at the target): the view of the init's, under another namespace id.

// init keeps the main goroutine on the main thread (an init function runs on it), so
// nsExec never moves the main thread: /proc/self shows every thread the main thread's
// view (mountinfo, namespace links), and that must stay the guest's.
func init() { runtime.LockOSThread() }

// nsTypes are the namespaces an exec'd process joins, in the order it joins them. The
// mount namespace comes last: it changes the thread's root, and the others' files are
// opened before any of them is joined.
var nsTypes = []struct {
	name string
	flag int
}{
	{"ipc", unix.CLONE_NEWIPC},
	{"uts", unix.CLONE_NEWUTS},
	{"pid", unix.CLONE_NEWPID},
	{"mnt", unix.CLONE_NEWNS},
}

// nsExec is what the agent needs to start a process in a running container.
type nsExec struct {
	initPid int            // the container's init, whose namespaces the process joins
	cgroup  string         // the container's cgroup directory in the guest's cgroupfs
	process *specs.Process // the exec'd process
	stdio   [3]*os.File    // its stdin, stdout, stderr; unused with a terminal
	// terminal: the process gets a pty of the container's devpts instance as its
	// controlling terminal and stdio; master receives the agent's end
	terminal bool
	master   **os.File
}

// runcOnly says why an exec must go through `runc exec`, or "" when the agent can start
// it itself with the same result. What the agent does not reproduce:
//   - a seccomp filter (runc compiles the profile with libseccomp; the agent has no
//     compiler, and installing it on the forking thread would subject the fork itself);
//   - a user or time namespace (joining either needs a single-threaded caller);
//   - rlimits, scheduler, I/O priority and CPU affinity of the process (per-process
//     state a forking thread cannot give only its child);
//   - capabilities whose names this kernel does not know (runc's rules for them), or none
//     at all (runc then gives the container's);
//   - a process with no args (a Windows-style commandLine).
func runcOnly(c *container, p *specs.Process) string {
	if c.seccomp {
		return "the container has a seccomp profile"
	}
	if why := processNeedsRunc(p); why != "" {
		return why
	}
	for _, ns := range []string{"user", "time"} {
		same, err := sameNamespace(c.initPid(), ns)
		if err != nil {
			return fmt.Sprintf("%s namespace: %v", ns, err)
		}
		if !same {
			return "a " + ns + " namespace of its own"
		}
	}
	return ""
}

// processNeedsRunc says what of a process only runc can give it (runcOnly's list, for the
// process alone), or "": both the agent's exec and its sandbox init ask.
func processNeedsRunc(p *specs.Process) string {
	switch {
	case len(p.Args) == 0:
		return "no args (a commandLine)"
	case p.Capabilities == nil:
		return "no capabilities given (runc falls back to the container's)"
	case len(p.Rlimits) > 0:
		return "rlimits"
	case p.Scheduler != nil || p.IOPriority != nil || p.ExecCPUAffinity != nil:
		return "scheduler, I/O priority or CPU affinity"
	}
	if name := unknownCapability(p.Capabilities); name != "" {
		return "capability " + name
	}
	return ""
}

// unknownCapability is the first name in caps this agent does not know, or "".
func unknownCapability(caps *specs.LinuxCapabilities) string {
	for _, name := range slices.Concat(caps.Bounding, caps.Effective, caps.Permitted, caps.Inheritable, caps.Ambient) {
		if _, ok := capabilities[name]; !ok {
			return name
		}
	}
	return ""
}

// sameNamespace reports whether pid is in the calling thread's namespace of that type:
// the agent's, on any thread but one nsExec moved, and those run nothing else.
// (/proc/self would name the main thread's; Main keeps that one to the main goroutine, so
// a moved thread is never the main thread, whose view /proc/self shows everyone.)
func sameNamespace(pid int, ns string) (bool, error) {
	var theirs, ours unix.Stat_t
	if err := unix.Stat(fmt.Sprintf("/proc/%d/ns/%s", pid, ns), &theirs); err != nil {
		return false, err
	}
	if err := unix.Stat("/proc/thread-self/ns/"+ns, &ours); err != nil {
		return false, err
	}
	return theirs.Ino == ours.Ino && theirs.Dev == ours.Dev, nil
}

// start forks the process into the container and returns its pid (in the agent's pid
// namespace). An error before the exec names what failed as runc's would ("exec: "x":
// executable file not found in $PATH").
func (x nsExec) start() (int, error) {
	return onThreadOfItsOwn(x.forkOnThisThread)
}

// onThreadOfItsOwn runs fork on an OS thread nothing else will ever run on: fork moves
// the thread into a container's namespaces and cuts its capabilities, and Go ends a
// thread whose goroutine exits locked to it.
func onThreadOfItsOwn(fork func() (int, error)) (int, error) {
	type result struct {
		pid int
		err error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread() // never unlocked
		defer func() {
			// The agent is the guest's init: a panic here would end the guest.
			if r := recover(); r != nil {
				slog.Error("fork panicked", "panic", r, "stack", string(debug.Stack()))
				done <- result{0, fmt.Errorf("the agent panicked: %v", r)}
			}
		}()
		pid, err := fork()
		done <- result{pid, err}
	}()
	r := <-done
	return r.pid, r.err
}

func (x nsExec) forkOnThisThread() (int, error) {
	// Everything that names a guest path is opened before the mount namespace changes.
	var fds []int
	defer func() {
		for _, fd := range fds {
			_ = unix.Close(fd)
		}
	}()
	type join struct{ fd, flag int }
	var joins []join
	for _, ns := range nsTypes {
		same, err := sameNamespace(x.initPid, ns.name)
		if err != nil {
			return 0, fmt.Errorf("%s namespace of pid %d: %w", ns.name, x.initPid, err)
		}
		if same {
			continue // the container shares the guest's
		}
		fd, err := unix.Open(fmt.Sprintf("/proc/%d/ns/%s", x.initPid, ns.name), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return 0, fmt.Errorf("%s namespace of pid %d: %w", ns.name, x.initPid, err)
		}
		fds = append(fds, fd)
		joins = append(joins, join{fd, ns.flag})
	}
	var cloneFlags uintptr
	sameCgroupNS, err := sameNamespace(x.initPid, "cgroup")
	if err != nil {
		return 0, fmt.Errorf("cgroup namespace of pid %d: %w", x.initPid, err)
	}
	if !sameCgroupNS {
		cloneFlags |= unix.CLONE_NEWCGROUP
	}
	cgroupFD, err := unix.Open(x.cgroup, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("cgroup %s: %w", x.cgroup, err)
	}
	fds = append(fds, cgroupFD)

	// Read in the guest's /proc, before the thread sees the container's (whose /proc a
	// container could have mounted over).
	last, err := lastCap()
	if err != nil {
		return 0, err
	}
	// A thread may join a mount namespace only with an fs_struct of its own.
	if err := unix.Unshare(unix.CLONE_FS); err != nil {
		return 0, fmt.Errorf("unshare fs: %w", err)
	}
	for _, j := range joins {
		if err := unix.Setns(j.fd, j.flag); err != nil {
			return 0, fmt.Errorf("join namespace %#x of pid %d: %w", j.flag, x.initPid, err)
		}
	}
	// From here the thread sees the container's filesystem.
	p := x.process
	umask := 0o022 // runc's when the process names none
	if p.User.Umask != nil {
		umask = int(*p.User.Umask)
	}
	unix.Umask(umask)
	// The thread's cwd is its own since the unshare: a relative command is found from the
	// process's cwd, as runc finds it after its chdir.
	if err := unix.Chdir(p.Cwd); err != nil {
		return 0, fmt.Errorf("exec failed: unable to start container process: chdir to cwd (%q) set in config.json failed: %w", p.Cwd, err)
	}
	env := withHome(p.Env, int(p.User.UID))
	path, err := lookPath(p.Args[0], env)
	if err != nil {
		return 0, fmt.Errorf("exec failed: unable to start container process: %w", err)
	}
	ambient, err := restrictThread(p, last)
	if err != nil {
		return 0, err
	}
	groups := make([]uint32, len(p.User.AdditionalGids))
	copy(groups, p.User.AdditionalGids)
	files := []uintptr{x.stdio[0].Fd(), x.stdio[1].Fd(), x.stdio[2].Fd()}
	if x.terminal {
		master, pty, err := openPty()
		if err != nil {
			return 0, err
		}
		defer unix.Close(pty)
		files = []uintptr{uintptr(pty), uintptr(pty), uintptr(pty)}
		*x.master = master
	}
	attr := &syscall.ProcAttr{
		Dir:   p.Cwd,
		Env:   env,
		Files: files,
		Sys: &syscall.SysProcAttr{
			// runc's processes lead a session of their own.
			Setsid:      true,
			Setctty:     x.terminal,
			Ctty:        0,
			Cloneflags:  cloneFlags,
			Credential:  &syscall.Credential{Uid: p.User.UID, Gid: p.User.GID, Groups: groups},
			AmbientCaps: ambient,
			UseCgroupFD: true,
			CgroupFD:    cgroupFD,
		},
	}
	pid, err := syscall.ForkExec(path, p.Args, attr)
	if err != nil {
		if x.terminal {
			(*x.master).Close()
			*x.master = nil
		}
		return 0, fmt.Errorf("exec failed: unable to start container process: exec %s: %w", path, err)
	}
	return pid, nil
}

// openPty opens a pty pair of the devpts instance the calling thread sees at /dev/pts —
// the container's, once the thread joined its mount namespace — as runc allocates an
// exec's terminal in the container.
func openPty() (*os.File, int, error) {
	fd, err := unix.Open("/dev/pts/ptmx", unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, -1, fmt.Errorf("terminal: open the container's /dev/pts/ptmx: %w", err)
	}
	master := os.NewFile(uintptr(fd), "pty master")
	if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0); err != nil {
		master.Close()
		return nil, -1, fmt.Errorf("terminal: unlock pty: %w", err)
	}
	// TIOCGPTPEER opens the peer through the master: no path is looked up in the
	// container's /dev/pts, which the container could have changed.
	pty, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.TIOCGPTPEER, unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC)
	if errno != 0 {
		master.Close()
		return nil, -1, fmt.Errorf("terminal: open pty peer: %w", errno)
	}
	return master, int(pty), nil
}

// restrictThread gives the calling thread the process's no_new_privs and capability
// bounding and inheritable sets, which a child it forks keeps, and returns the ambient
// capabilities the child must raise itself (SysProcAttr.AmbientCaps).
func restrictThread(p *specs.Process, lastCap int) ([]uintptr, error) {
	if p.NoNewPrivileges {
		if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
			return nil, fmt.Errorf("no_new_privs: %w", err)
		}
	}
	caps := p.Capabilities
	if caps == nil {
		return nil, nil
	}
	if err := limitThreadCapabilities(caps, lastCap); err != nil {
		return nil, err
	}
	// The kernel keeps an ambient capability only if it is permitted and inheritable;
	// Go's child adds it to both sets itself, so the spec's sets are checked here.
	ambient := make([]uintptr, 0, len(caps.Ambient))
	for _, name := range caps.Ambient {
		if slices.Contains(caps.Permitted, name) && slices.Contains(caps.Inheritable, name) && slices.Contains(caps.Bounding, name) {
			ambient = append(ambient, uintptr(capabilities[name]))
		}
	}
	return ambient, nil
}

// limitThreadCapabilities gives the thread the process's bounding and inheritable sets,
// which its child keeps through the exec. Effective and permitted are left: the child
// still needs CAP_SETUID and CAP_SETGID to become the process's user, and the exec
// computes them from bounding, inheritable and ambient as it does for `runc exec`'s
// process (root: bounding ∪ inheritable; others: ambient, plus file capabilities).
func limitThreadCapabilities(caps *specs.LinuxCapabilities, last int) error {
	keep := map[int]bool{}
	for _, name := range caps.Bounding {
		keep[capabilities[name]] = true
	}
	for c := 0; c <= last; c++ {
		if !keep[c] {
			if err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(c), 0, 0, 0); err != nil {
				return fmt.Errorf("drop capability %d from the bounding set: %w", c, err)
			}
		}
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return fmt.Errorf("capget: %w", err)
	}
	data[0].Inheritable, data[1].Inheritable = 0, 0
	for _, name := range caps.Inheritable {
		c := capabilities[name]
		data[c/32].Inheritable |= 1 << (c % 32)
	}
	if err := unix.Capset(&hdr, &data[0]); err != nil {
		return fmt.Errorf("capset inheritable: %w", err)
	}
	return nil
}

func lastCap() (int, error) {
	b, err := os.ReadFile("/proc/sys/kernel/cap_last_cap")
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(string(b)))
}

// lookPath finds file as runc does: a name with a slash as it is, any other along the
// process's own PATH, both in the container's filesystem.
func lookPath(file string, env []string) (string, error) {
	if strings.Contains(file, "/") {
		return exec.LookPath(file)
	}
	for _, dir := range filepath.SplitList(envValue(env, "PATH")) {
		if dir == "" {
			dir = "."
		}
		// dir + "/" + file always has a slash: LookPath then checks that file and never
		// searches the agent's own PATH (filepath.Join(".", "x") would be "x").
		if path, err := exec.LookPath(dir + "/" + file); err == nil {
			return path, nil
		}
	}
	return "", &exec.Error{Name: file, Err: exec.ErrNotFound}
}

func envValue(env []string, key string) string {
	for i := len(env) - 1; i >= 0; i-- {
		if v, ok := strings.CutPrefix(env[i], key+"="); ok {
			return v
		}
	}
	return ""
}

// withHome adds HOME from the container's /etc/passwd when the process has none, "/" for
// a user it does not list — runc's rule.
func withHome(env []string, uid int) []string {
	for _, e := range env {
		if strings.HasPrefix(e, "HOME=") {
			return env
		}
	}
	home := "/"
	if h, err := passwdHome("/etc/passwd", uid); err == nil && h != "" {
		home = h
	}
	return append(env[:len(env):len(env)], "HOME="+home)
}

func passwdHome(path string, uid int) (string, error) {
	// Non-blocking, and only a regular file: the container owns this path, and a FIFO
	// there must not hold the agent's thread for ever.
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		return "", err
	}
	defer f.Close()
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
		return "", fmt.Errorf("%s: not a regular file", path)
	}
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Split(s.Text(), ":")
		if len(fields) < 6 {
			continue
		}
		if id, err := strconv.Atoi(fields[2]); err == nil && id == uid {
			return fields[5], nil
		}
	}
	if err := s.Err(); err != nil {
		return "", err
	}
	return "", errors.New("no such user")
}

// capabilities maps the runtime-spec's capability names to the kernel's numbers.
var capabilities = map[string]int{
	"CAP_CHOWN":              unix.CAP_CHOWN,
	"CAP_DAC_OVERRIDE":       unix.CAP_DAC_OVERRIDE,
	"CAP_DAC_READ_SEARCH":    unix.CAP_DAC_READ_SEARCH,
	"CAP_FOWNER":             unix.CAP_FOWNER,
	"CAP_FSETID":             unix.CAP_FSETID,
	"CAP_KILL":               unix.CAP_KILL,
	"CAP_SETGID":             unix.CAP_SETGID,
	"CAP_SETUID":             unix.CAP_SETUID,
	"CAP_SETPCAP":            unix.CAP_SETPCAP,
	"CAP_LINUX_IMMUTABLE":    unix.CAP_LINUX_IMMUTABLE,
	"CAP_NET_BIND_SERVICE":   unix.CAP_NET_BIND_SERVICE,
	"CAP_NET_BROADCAST":      unix.CAP_NET_BROADCAST,
	"CAP_NET_ADMIN":          unix.CAP_NET_ADMIN,
	"CAP_NET_RAW":            unix.CAP_NET_RAW,
	"CAP_IPC_LOCK":           unix.CAP_IPC_LOCK,
	"CAP_IPC_OWNER":          unix.CAP_IPC_OWNER,
	"CAP_SYS_MODULE":         unix.CAP_SYS_MODULE,
	"CAP_SYS_RAWIO":          unix.CAP_SYS_RAWIO,
	"CAP_SYS_CHROOT":         unix.CAP_SYS_CHROOT,
	"CAP_SYS_PTRACE":         unix.CAP_SYS_PTRACE,
	"CAP_SYS_PACCT":          unix.CAP_SYS_PACCT,
	"CAP_SYS_ADMIN":          unix.CAP_SYS_ADMIN,
	"CAP_SYS_BOOT":           unix.CAP_SYS_BOOT,
	"CAP_SYS_NICE":           unix.CAP_SYS_NICE,
	"CAP_SYS_RESOURCE":       unix.CAP_SYS_RESOURCE,
	"CAP_SYS_TIME":           unix.CAP_SYS_TIME,
	"CAP_SYS_TTY_CONFIG":     unix.CAP_SYS_TTY_CONFIG,
	"CAP_MKNOD":              unix.CAP_MKNOD,
	"CAP_LEASE":              unix.CAP_LEASE,
	"CAP_AUDIT_WRITE":        unix.CAP_AUDIT_WRITE,
	"CAP_AUDIT_CONTROL":      unix.CAP_AUDIT_CONTROL,
	"CAP_SETFCAP":            unix.CAP_SETFCAP,
	"CAP_MAC_OVERRIDE":       unix.CAP_MAC_OVERRIDE,
	"CAP_MAC_ADMIN":          unix.CAP_MAC_ADMIN,
	"CAP_SYSLOG":             unix.CAP_SYSLOG,
	"CAP_WAKE_ALARM":         unix.CAP_WAKE_ALARM,
	"CAP_BLOCK_SUSPEND":      unix.CAP_BLOCK_SUSPEND,
	"CAP_AUDIT_READ":         unix.CAP_AUDIT_READ,
	"CAP_PERFMON":            unix.CAP_PERFMON,
	"CAP_BPF":                unix.CAP_BPF,
	"CAP_CHECKPOINT_RESTORE": unix.CAP_CHECKPOINT_RESTORE,
}
