package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	runc "github.com/containerd/go-runc"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
	"github.com/vmpod/vmpod/agent/reaper"
	"github.com/vmpod/vmpod/internal/cleanup"
)

// containerState is where a container is in its life. Each operation names the states it
// accepts; any other is a FailedPrecondition error.
type containerState int

const (
	stateCreating containerState = iota // runc create in progress
	stateCreated                        // init waits for start
	stateRunning
	statePaused
	stateStopped // init exited
)

func (s containerState) String() string {
	return [...]string{"creating", "created", "running", "paused", "stopped"}[s]
}

// killWait bounds how long a forced removal waits for the init to die after SIGKILL.
const killWait = 10 * time.Second

type container struct {
	id     string
	bundle string
	cgroup string // cgroupfs directory in the guest
	runner runner
	// runc is the container's runc, for execs the agent cannot start itself; nil for a
	// container the agent created (it has no runc state)
	runc *runc.Runc
	// sandbox: the pod's sandbox container (CRI's "pause")
	sandbox bool
	// seccomp: the container has a seccomp profile, which only runc can give an exec'd
	// process (runcOnly)
	seccomp bool

	mu    sync.Mutex
	state containerState
	init  *process
	execs map[string]*process
}

// require fails unless the container is in one of the allowed states.
func (c *container) require(op string, allowed ...containerState) error {
	for _, s := range allowed {
		if c.state == s {
			return nil
		}
	}
	return fmt.Errorf("container %s is %s: cannot %s: %w", c.id, c.state, op, errdefs.ErrFailedPrecondition)
}

func (c *container) setState(s containerState) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.state = s
}

// transition moves from `from` to `to` only if the container is still in `from`; the
// init may have exited meanwhile, and stopped must win.
func (c *container) transition(from, to containerState) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.state == from {
		c.state = to
	}
}

// containers runs the pod's containers with runc inside the guest.
type containers struct {
	reaper     *reaper.Reaper
	runcBinary string
	runcRoot   string
	bundleRoot string
	cgroupRoot string // where cgroupfs is mounted
	oom        *oomWatcher
	// runcApps: runc creates every app container (KernelParamRuncApps), not the agent
	runcApps bool

	mu   sync.Mutex
	byID map[string]*container
}

func (m *containers) get(id string) (*container, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	c, ok := m.byID[id]
	if !ok {
		return nil, fmt.Errorf("container %s: %w", id, errdefs.ErrNotFound)
	}
	return c, nil
}

func (m *containers) runcFor(bundle string) *runc.Runc {
	return &runc.Runc{
		Command:   m.runcBinary,
		Root:      m.runcRoot,
		Log:       filepath.Join(bundle, "runc.log"),
		LogFormat: runc.JSON,
	}
}

// create runs `runc create`: the container's init exists and waits for start.
func (m *containers) create(ctx context.Context, req *agentv1.CreateContainerRequest) (int, error) {
	id := req.ContainerId
	if err := checkID("container_id", id); err != nil {
		return 0, err
	}
	spec, err := guestSpec(id, req.OciSpec)
	if err != nil {
		return 0, fmt.Errorf("container %s: %w", id, err)
	}
	c := &container{
		id:      id,
		bundle:  filepath.Join(m.bundleRoot, id),
		cgroup:  filepath.Join(m.cgroupRoot, spec.Linux.CgroupsPath),
		seccomp: spec.Linux.Seccomp != nil,
		sandbox: spec.Annotations[criContainerType] == "sandbox",
		state:   stateCreating,
		execs:   map[string]*process{},
	}

	m.mu.Lock()
	if _, exists := m.byID[id]; exists {
		m.mu.Unlock()
		return 0, fmt.Errorf("container %s: %w", id, errdefs.ErrAlreadyExists)
	}
	m.byID[id] = c
	m.mu.Unlock()

	var undo cleanup.Stack
	defer func() {
		if err := undo.Run(); err != nil {
			slog.Warn("undo failed create", "container", id, "error", err)
		}
	}()
	undo.Add("forget container", func() error {
		m.mu.Lock()
		defer m.mu.Unlock()
		delete(m.byID, id)
		return nil
	})

	// 0711: a container in a user namespace (its root is an unprivileged guest uid) must
	// be able to traverse to its rootfs, as with containerd's bundles on a host.
	if err := os.MkdirAll(c.bundle, 0o711); err != nil {
		return 0, fmt.Errorf("container %s: bundle: %w", id, err)
	}
	undo.Add("remove bundle", func() error { return os.RemoveAll(c.bundle) })
	// The rootfs becomes a mount point of its own at <bundle>/rootfs, as containerd gives
	// runc on a host: runc changes the propagation of the mount holding the rootfs, which
	// inside a user namespace it may only do to a mount of the container's own, not to
	// the shared filesystem the directory lives on.
	rootfs := filepath.Join(c.bundle, "rootfs")
	if err := os.Mkdir(rootfs, 0o755); err != nil {
		return 0, fmt.Errorf("container %s: rootfs mount point: %w", id, err)
	}
	if err := unix.Mount(spec.Root.Path, rootfs, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return 0, fmt.Errorf("container %s: bind rootfs %s: %w", id, spec.Root.Path, err)
	}
	undo.Add("unmount rootfs", func() error { return unix.Unmount(rootfs, unix.MNT_DETACH) })
	spec.Root.Path = rootfs
	config, err := json.Marshal(spec)
	if err != nil {
		return 0, err
	}
	if err := os.WriteFile(filepath.Join(c.bundle, "config.json"), config, 0o600); err != nil {
		return 0, fmt.Errorf("container %s: write config.json: %w", id, err)
	}

	uid, gid := int(spec.Process.User.UID), int(spec.Process.User.GID)
	streams, err := newStdio(req.Stdio, uid, gid)
	if err != nil {
		return 0, fmt.Errorf("container %s: %w", id, err)
	}
	defer streams.close()

	var pid int
	by, why := "agent", m.runcCreates(spec, streams)
	switch {
	case why != "":
		by = "runc"
		pid, err = m.runcCreate(ctx, c, streams, &undo)
	case c.sandbox:
		pid, err = m.startSandbox(c, spec, rootfs, streams, &undo)
	default:
		pid, err = m.createApp(ctx, c, spec, streams, &undo)
	}
	if err != nil {
		return 0, fmt.Errorf("container %s: %w", id, err)
	}
	init := &process{containerID: id, pid: pid, exited: make(chan struct{})}
	if err := streams.attach(init); err != nil {
		return 0, fmt.Errorf("container %s: stdio: %w", id, err)
	}
	c.mu.Lock()
	c.init = init
	c.state = stateCreated
	c.mu.Unlock()
	// After the state is set: an init that already died must leave the container stopped.
	init.watchExit(m.reaper.Claim(pid), func(*process) { c.setState(stateStopped) })
	// A sandbox the agent started holds namespaces only: no OOM of it is news (and its
	// cgroup may have no memory controller yet, as runc enables them for app containers).
	if m.oom != nil && (c.runc != nil || !c.sandbox) {
		m.oom.watch(id, c.cgroup)
	}
	undo.Release()
	slog.Info("container created", "container", id, "pid", pid, "by", by, "because", why)
	return pid, nil
}

// runcCreates says why runc must create spec's container, or "" when the agent does: a
// pod's sandbox container (sandboxinit.go), an app container (appinit.go).
func (m *containers) runcCreates(spec *specs.Spec, streams *stdio) string {
	switch {
	case streams.pipes == nil:
		return "a terminal"
	case spec.Annotations[criContainerType] == "sandbox":
		return agentStartsSandbox(spec)
	case m.runcApps:
		return "the node asks runc to create app containers"
	}
	return agentCreatesApp(spec)
}

func (c *container) setRunner(r runner) runner {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.runner = r
	return r
}

// control is the container's runner, once its create got that far.
func (c *container) control() (runner, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.runner == nil {
		return nil, fmt.Errorf("container %s is %s: %w", c.id, c.state, errdefs.ErrFailedPrecondition)
	}
	return c.runner, nil
}

// runcCreate has runc create the container: its init waits for start.
func (m *containers) runcCreate(ctx context.Context, c *container, streams *stdio, undo *cleanup.Stack) (int, error) {
	c.runc = m.runcFor(c.bundle)
	pidFile := filepath.Join(c.bundle, "init.pid")
	opts := &runc.CreateOpts{PidFile: pidFile, IO: streams.runcIO()}
	if streams.console != nil {
		opts.ConsoleSocket = streams.console
	}
	if err := c.runc.Create(ctx, c.id, c.bundle, opts); err != nil {
		return 0, fmt.Errorf("runc create: %w", runcError(c.runc.Log, err))
	}
	r := c.setRunner(runcRunner{id: c.id, runc: c.runc})
	undo.Add("runc delete", func() error { return r.delete(context.Background()) })
	pid, err := runc.ReadPidFile(pidFile)
	if err != nil {
		return 0, fmt.Errorf("runc pid file: %w", err)
	}
	return pid, nil
}

// startSandbox starts a pod's sandbox container without runc (sandboxinit.go).
func (m *containers) startSandbox(c *container, spec *specs.Spec, rootfs string, streams *stdio, undo *cleanup.Stack) (int, error) {
	if err := os.MkdirAll(c.cgroup, 0o755); err != nil {
		return 0, fmt.Errorf("cgroup: %w", err)
	}
	r := c.setRunner(cgroupRunner{cgroup: c.cgroup})
	undo.Add("remove cgroup", func() error { return r.delete(context.Background()) })
	pid, err := startSandboxInit(spec, rootfs, c.cgroup, streams.pipes.child)
	if err != nil {
		return 0, err
	}
	_ = streams.pipes.CloseAfterStart()
	undo.Add("kill init", func() error { return unix.Kill(pid, unix.SIGKILL) })
	return pid, nil
}

// createApp creates an app container without runc (appinit.go): its cgroup, then its
// init, which waits for the start.
func (m *containers) createApp(ctx context.Context, c *container, spec *specs.Spec, streams *stdio, undo *cleanup.Stack) (int, error) {
	if err := appCgroup(m.cgroupRoot, spec.Linux.CgroupsPath, spec.Linux.Resources); err != nil {
		_ = os.Remove(c.cgroup)
		return 0, fmt.Errorf("cgroup: %w", err)
	}
	r := &appRunner{cgroupRunner: cgroupRunner{cgroup: c.cgroup}, mountpoint: m.cgroupRoot, group: spec.Linux.CgroupsPath}
	c.setRunner(r)
	undo.Add("remove cgroup", func() error { return r.delete(context.Background()) })
	pid, control, report, err := forkContainerInit(ctx, spec, c.cgroup, streams.pipes.child)
	if pid > 0 {
		_ = streams.pipes.CloseAfterStart()
		// Reaped here when the create fails; the container's exit watch claims it otherwise.
		undo.Add("kill init", func() error {
			_ = unix.Kill(pid, unix.SIGKILL)
			<-m.reaper.Claim(pid)
			return nil
		})
	}
	if err != nil {
		return 0, err
	}
	r.setInit(control, report)
	if err := setOOMScore(pid, spec.Process.OOMScoreAdj); err != nil {
		return 0, err
	}
	return pid, nil
}

// runcError turns runc's failure into the message runc logged, which says what was wrong
// ("exec: \"nope\": executable file not found"), instead of only its exit status.
func runcError(logPath string, err error) error {
	b, rerr := os.ReadFile(logPath)
	if rerr != nil {
		return err
	}
	var last string
	for line := range strings.SplitSeq(strings.TrimSpace(string(b)), "\n") {
		var entry struct {
			Level string `json:"level"`
			Msg   string `json:"msg"`
		}
		if json.Unmarshal([]byte(line), &entry) == nil && entry.Level == "error" {
			last = entry.Msg
		}
	}
	if last == "" {
		return err
	}
	return fmt.Errorf("%s: %w", last, err)
}

func (m *containers) start(ctx context.Context, id string) error {
	c, err := m.get(id)
	if err != nil {
		return err
	}
	c.mu.Lock()
	err = c.require("start", stateCreated)
	r := c.runner
	c.mu.Unlock()
	if err != nil {
		return err
	}
	if err := r.start(ctx); err != nil {
		return fmt.Errorf("container %s: %w", id, err)
	}
	c.transition(stateCreated, stateRunning)
	slog.Info("container started", "container", id)
	return nil
}

func (m *containers) exec(ctx context.Context, req *agentv1.ExecProcessRequest) (int, error) {
	c, err := m.get(req.ContainerId)
	if err != nil {
		return 0, err
	}
	if err := checkID("exec_id", req.ExecId); err != nil {
		return 0, err
	}
	spec, err := guestProcess(req.Process)
	if err != nil {
		return 0, fmt.Errorf("container %s exec %s: %w", c.id, req.ExecId, err)
	}
	c.mu.Lock()
	if err := c.require("exec", stateRunning); err != nil {
		c.mu.Unlock()
		return 0, err
	}
	if _, exists := c.execs[req.ExecId]; exists {
		c.mu.Unlock()
		return 0, fmt.Errorf("container %s exec %s: %w", c.id, req.ExecId, errdefs.ErrAlreadyExists)
	}
	// Reserve the id while runc runs; a failed exec gives it back.
	c.execs[req.ExecId] = nil
	c.mu.Unlock()

	p, err := m.runExec(ctx, c, req.ExecId, spec, req.Stdio)
	c.mu.Lock()
	defer c.mu.Unlock()
	if err != nil {
		delete(c.execs, req.ExecId)
		return 0, fmt.Errorf("container %s exec %s: %w", c.id, req.ExecId, err)
	}
	if c.execs == nil {
		// Removed meanwhile (a forced remove): the process must not outlive its container.
		_ = unix.Kill(p.pid, unix.SIGKILL)
		p.release()
		return 0, fmt.Errorf("container %s was removed during exec %s: %w", c.id, req.ExecId, errdefs.ErrNotFound)
	}
	c.execs[req.ExecId] = p
	return p.pid, nil
}

func (m *containers) runExec(ctx context.Context, c *container, execID string, spec *specs.Process, stdioReq *agentv1.Stdio) (*process, error) {
	streams, err := newStdio(stdioReq, int(spec.User.UID), int(spec.User.GID))
	if err != nil {
		return nil, err
	}
	defer streams.close()
	if c.runc == nil && c.sandbox {
		// Its init is only chrooted in the guest's mount namespace: there is no container
		// filesystem to run an exec in. CRI never execs into a sandbox.
		return nil, fmt.Errorf("the pod's sandbox container, started by the agent, takes no exec: %w", errdefs.ErrFailedPrecondition)
	}
	why := runcOnly(c, spec)
	if why == "" {
		p, err := m.startExec(c, c.cgroup, execID, spec, streams)
		if !errors.Is(err, unix.EBUSY) {
			return p, err
		}
		// EBUSY: the container enabled controllers in its own cgroup (systemd, nested
		// containers), which a process can no longer be forked into. runc's exec joins
		// the init's cgroup then, and so does the agent's.
		cgroup, cerr := m.processCgroup(c.initPid())
		if cerr != nil {
			return nil, fmt.Errorf("%w (the container's cgroup has controllers enabled below it, and the init's: %v)", err, cerr)
		}
		return m.startExec(c, cgroup, execID, spec, streams)
	}
	if c.runc == nil {
		return nil, fmt.Errorf("an exec with %s needs runc, which did not create this container: %w", why, errdefs.ErrFailedPrecondition)
	}
	slog.Debug("exec through runc", "container", c.id, "exec", execID, "because", why)
	pidFile := filepath.Join(c.bundle, "exec-"+execID+".pid")
	defer os.Remove(pidFile)
	opts := &runc.ExecOpts{PidFile: pidFile, Detach: true, IO: streams.runcIO()}
	if streams.console != nil {
		opts.ConsoleSocket = streams.console
	}
	started := time.Now()
	if err := c.runc.Exec(ctx, c.id, *spec, opts); err != nil {
		return nil, fmt.Errorf("runc exec: %w", runcError(c.runc.Log, err))
	}
	slog.Debug("runc exec", "container", c.id, "exec", execID, "took", time.Since(started))
	pid, err := runc.ReadPidFile(pidFile)
	if err != nil {
		return nil, fmt.Errorf("runc pid file: %w", err)
	}
	return m.adoptExec(c, execID, pid, streams)
}

// adoptExec makes a started exec'd process the agent's: its stdio attached, its exit
// awaited from the reaper.
func (m *containers) adoptExec(c *container, execID string, pid int, streams *stdio) (*process, error) {
	p := &process{containerID: c.id, execID: execID, pid: pid, exited: make(chan struct{})}
	if err := streams.attach(p); err != nil {
		_ = unix.Kill(pid, unix.SIGKILL)
		return nil, fmt.Errorf("stdio: %w", err)
	}
	p.watchExit(m.reaper.Claim(pid), nil)
	return p, nil
}

// processCgroup is the cgroup directory pid is in.
func (m *containers) processCgroup(pid int) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return "", err
	}
	path, ok := strings.CutPrefix(strings.TrimSpace(string(b)), "0::")
	if !ok || strings.Contains(path, "\n") {
		return "", fmt.Errorf("/proc/%d/cgroup: %q: not one cgroup2 line", pid, b)
	}
	return filepath.Join(m.cgroupRoot, path), nil
}

// startExec starts an exec'd process without runc (nsexec.go), in cgroup.
func (m *containers) startExec(c *container, cgroup, execID string, spec *specs.Process, streams *stdio) (*process, error) {
	started := time.Now()
	initPid := c.initPid()
	x := nsExec{initPid: initPid, cgroup: cgroup, process: spec, terminal: streams.req.Terminal, master: &streams.master}
	if streams.pipes != nil {
		x.stdio = streams.pipes.child
	}
	pid, err := x.start()
	if err != nil {
		return nil, err
	}
	if streams.pipes != nil {
		_ = streams.pipes.CloseAfterStart()
	}
	// runc gives an exec'd process the container's OOM score; a fork inherits the
	// agent's. Set right after the exec: the process runs a few instructions with the
	// agent's score (0; the agent, PID 1, is never the OOM killer's choice).
	if adj, err := os.ReadFile(fmt.Sprintf("/proc/%d/oom_score_adj", initPid)); err == nil {
		if err := os.WriteFile(fmt.Sprintf("/proc/%d/oom_score_adj", pid), adj, 0); err != nil && !errors.Is(err, unix.ESRCH) {
			slog.Warn("exec: oom_score_adj not set", "container", c.id, "exec", execID, "error", err)
		}
	}
	slog.Debug("exec", "container", c.id, "exec", execID, "took", time.Since(started))
	return m.adoptExec(c, execID, pid, streams)
}

// initPid is the guest pid of the container's init (0 before it was created).
func (c *container) initPid() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.init == nil {
		return 0
	}
	return c.init.pid
}

// process finds a container's init (execID "") or exec'd process.
func (m *containers) process(id, execID string) (*process, error) {
	c, err := m.get(id)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if execID == "" {
		if c.init == nil {
			return nil, fmt.Errorf("container %s is %s: it has no process yet: %w", id, c.state, errdefs.ErrFailedPrecondition)
		}
		return c.init, nil
	}
	p, ok := c.execs[execID]
	if !ok || p == nil {
		return nil, fmt.Errorf("container %s exec %s: %w", id, execID, errdefs.ErrNotFound)
	}
	return p, nil
}

func (m *containers) removeProcess(id, execID string) error {
	if execID == "" {
		return invalidf("exec_id: empty (the init process goes with RemoveContainer)")
	}
	p, err := m.process(id, execID)
	if err != nil {
		return err
	}
	if !p.hasExited() {
		return fmt.Errorf("%s is still running: cannot remove it: %w", p, errdefs.ErrFailedPrecondition)
	}
	c, err := m.get(id)
	if err != nil {
		return err
	}
	c.mu.Lock()
	delete(c.execs, execID)
	c.mu.Unlock()
	p.release()
	return nil
}

func (m *containers) signal(ctx context.Context, req *agentv1.SignalProcessRequest) error {
	sig := unix.Signal(req.Signal)
	if req.Signal == 0 || req.Signal > 64 {
		return invalidf("signal %d: out of range", req.Signal)
	}
	if req.All {
		if req.ExecId != "" {
			return invalidf("all: only for the init process")
		}
		c, err := m.get(req.ContainerId)
		if err != nil {
			return err
		}
		r, err := c.control()
		if err != nil {
			return err
		}
		if err := r.killAll(ctx, sig); err != nil {
			return fmt.Errorf("container %s: %w", c.id, err)
		}
		return nil
	}
	p, err := m.process(req.ContainerId, req.ExecId)
	if err != nil {
		return err
	}
	return p.signal(sig)
}

func (m *containers) remove(ctx context.Context, id string, force bool) error {
	c, err := m.get(id)
	if err != nil {
		return err
	}
	c.mu.Lock()
	err = c.require("remove", stateCreated, stateStopped, stateRunning, statePaused)
	if err == nil && !force {
		err = c.require("remove (it is still running; use force)", stateCreated, stateStopped)
	}
	init, r := c.init, c.runner
	c.mu.Unlock()
	if err != nil {
		return err
	}
	if force && !init.hasExited() {
		_ = r.killAll(ctx, unix.SIGKILL)
		waitCtx, cancel := context.WithTimeout(ctx, killWait)
		err := init.wait(waitCtx)
		cancel()
		if err != nil {
			return fmt.Errorf("container %s: init did not die after SIGKILL: %w", id, err)
		}
	}
	if err := r.delete(ctx); err != nil {
		return fmt.Errorf("container %s: %w", id, err)
	}
	if m.oom != nil {
		m.oom.unwatch(id)
	}
	c.mu.Lock()
	init.release()
	for _, p := range c.execs {
		if p != nil {
			p.release()
		}
	}
	c.execs = nil
	c.mu.Unlock()
	m.mu.Lock()
	delete(m.byID, id)
	m.mu.Unlock()
	if err := unix.Unmount(filepath.Join(c.bundle, "rootfs"), unix.MNT_DETACH); err != nil && err != unix.EINVAL {
		return fmt.Errorf("container %s: unmount rootfs: %w", id, err)
	}
	if err := os.RemoveAll(c.bundle); err != nil {
		return fmt.Errorf("container %s: remove bundle: %w", id, err)
	}
	slog.Info("container removed", "container", id)
	return nil
}

func (m *containers) pause(ctx context.Context, id string) error {
	return m.freeze(ctx, id, true)
}

func (m *containers) resume(ctx context.Context, id string) error {
	return m.freeze(ctx, id, false)
}

func (m *containers) freeze(ctx context.Context, id string, pause bool) error {
	c, err := m.get(id)
	if err != nil {
		return err
	}
	from, to, op := stateRunning, statePaused, "pause"
	if !pause {
		from, to, op = statePaused, stateRunning, "resume"
	}
	c.mu.Lock()
	err = c.require(op, from)
	r := c.runner
	c.mu.Unlock()
	if err != nil {
		return err
	}
	if err := r.freeze(ctx, pause); err != nil {
		return fmt.Errorf("container %s: %w", id, err)
	}
	c.transition(from, to)
	return nil
}

func (m *containers) update(ctx context.Context, id string, raw []byte) error {
	c, err := m.get(id)
	if err != nil {
		return err
	}
	var res specs.LinuxResources
	if err := json.Unmarshal(raw, &res); err != nil {
		return invalidf("resources: not runtime-spec LinuxResources: %v", err)
	}
	c.mu.Lock()
	err = c.require("update", stateCreated, stateRunning, statePaused)
	r := c.runner
	c.mu.Unlock()
	if err != nil {
		return err
	}
	if err := r.update(ctx, &res); err != nil {
		return fmt.Errorf("container %s: %w", id, err)
	}
	return nil
}

// pids lists every process in the container's cgroup.
func (m *containers) pids(id string) ([]uint32, error) {
	c, err := m.get(id)
	if err != nil {
		return nil, err
	}
	pids, err := cgroupPids(c.cgroup) // none once stopped: the cgroup is gone with them
	if err != nil {
		return nil, fmt.Errorf("container %s: %w", id, err)
	}
	return pids, nil
}

// killAll is for shutdown: every container's processes get SIGKILL.
func (m *containers) killAll(ctx context.Context) {
	m.mu.Lock()
	all := make([]*container, 0, len(m.byID))
	for _, c := range m.byID {
		all = append(all, c)
	}
	m.mu.Unlock()
	for _, c := range all {
		if r, err := c.control(); err == nil {
			_ = r.killAll(ctx, unix.SIGKILL)
		}
	}
}
