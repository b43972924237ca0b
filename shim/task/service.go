// Package task is the shim's containerd task service: the ttrpc API containerd drives,
// mapped onto one pod VM (runtime/pod). Each method looks the object up, calls it and
// returns; errors stay native (errdefs) until one interceptor maps them to gRPC codes at
// the RPC boundary.
package task

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"syscall"

	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	tasktypes "github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/protobuf"
	ptypes "github.com/containerd/containerd/v2/pkg/protobuf/types"
	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/containerd/v2/pkg/shutdown"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/vmpod/vmpod/runtime/cri"
	"github.com/vmpod/vmpod/runtime/nodeconfig"
	"github.com/vmpod/vmpod/runtime/pod"
)

var empty = &ptypes.Empty{}

// service implements containerd's task API for the containers of one pod.
type service struct {
	ctx       context.Context
	namespace string
	events    *eventQueue
	shutdown  shutdown.Service
	host      pod.Host // what the pod may ask of the node

	podMu sync.Mutex // serialises booting and stopping the VM
	pod   pod.Pod    // set by the first Create, then fixed
	podID string

	mu         sync.Mutex
	containers map[string]*container // nil value: being created
	removing   int                   // containers whose Delete has not answered yet
}

var (
	_ taskAPI.TTRPCTaskService      = (*service)(nil)
	_ shim.TTRPCServerUnaryOptioner = (*service)(nil)
)

// New is the task service of a shim process.
// containerdAddress is containerd's gRPC socket ("" without one).
func New(ctx context.Context, publisher shim.Publisher, sd shutdown.Service, containerdAddress string) (*service, error) {
	ns, err := namespaces.NamespaceRequired(ctx)
	if err != nil {
		return nil, err
	}
	s := &service{
		ctx:        ctx,
		namespace:  ns,
		events:     newEventQueue(ctx, publisher, sd),
		shutdown:   sd,
		containers: map[string]*container{},
		host:       pod.Host{Pods: cri.Containerd{Address: containerdAddress, Namespace: ns}},
	}
	sd.RegisterCallback(func(ctx context.Context) error { return s.stopPod(ctx) })
	if path := listeningSocket(shimSocketFd); path != "" {
		s.host.ShimSocket = path
		// pkg/shim removes, at exit, the socket it derives from the -id flag: the first
		// container's. This shim listens on its pod's socket, which is another name when
		// the pod's first container here was not its sandbox (a pod whose shim died gets a
		// new one from its next container). Remove the socket actually served, unless a
		// newer shim of the pod has bound that path since.
		if ours, err := os.Stat(path); err == nil {
			sd.RegisterCallback(func(context.Context) error { return removeSocket(path, ours) })
		}
	}
	return s, nil
}

// shimSocketFd is where containerd's shim manager hands the server its listening socket.
const shimSocketFd = 3

// listeningSocket is the path of the listening unix socket at fd, or "" if fd is not one.
func listeningSocket(fd int) string {
	if v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || v != 1 {
		return ""
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return ""
	}
	if u, ok := sa.(*unix.SockaddrUnix); ok && strings.HasPrefix(u.Name, "/") {
		return u.Name
	}
	return ""
}

// removeSocket removes path if it is still the socket file ours describes.
func removeSocket(path string, ours os.FileInfo) error {
	if now, err := os.Stat(path); err != nil || !os.SameFile(now, ours) {
		return nil // gone, or another shim's now
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove shim socket: %w", err)
	}
	return nil
}

func (s *service) RegisterTTRPC(server *ttrpc.Server) error {
	taskAPI.RegisterTTRPCTaskService(server, s)
	return nil
}

// UnaryServerInterceptor is the RPC boundary: native errors become gRPC codes here, once
// for every method.
func (s *service) UnaryServerInterceptor() ttrpc.UnaryServerInterceptor {
	return func(ctx context.Context, unmarshal ttrpc.Unmarshaler, info *ttrpc.UnaryServerInfo, method ttrpc.Method) (any, error) {
		resp, err := method(ctx, unmarshal)
		if err != nil {
			log.G(ctx).WithError(err).Debugf("%s failed", info.FullMethod)
			return nil, errgrpc.ToGRPC(err)
		}
		return resp, nil
	}
}

// podFor returns the pod a new container belongs to, booting its VM for the first one.
func (s *service) podFor(ctx context.Context, containerID string, spec *specs.Spec, configPath string) (pod.Pod, bool, error) {
	s.podMu.Lock()
	defer s.podMu.Unlock()
	podID := pod.ID(containerID, spec)
	if s.pod != nil {
		if podID != s.podID {
			return nil, false, fmt.Errorf("container %s belongs to pod %s, this shim serves pod %s: %w", containerID, podID, s.podID, errdefs.ErrInvalidArgument)
		}
		select {
		case <-s.pod.Done():
			return nil, false, fmt.Errorf("pod %s: its VM is gone: %w", podID, errdefs.ErrFailedPrecondition)
		default:
		}
		return s.pod, false, nil
	}
	cfg, err := nodeconfig.Load(configPath)
	if err != nil {
		return nil, false, fmt.Errorf("%w: %w", err, errdefs.ErrInvalidArgument)
	}
	if cfg.Debug {
		_ = log.SetLevel("debug")
	}
	p, err := pod.Start(ctx, cfg, podID, spec, s.host)
	if err != nil {
		return nil, false, err
	}
	s.pod, s.podID = p, podID
	go s.watchPod(p)
	return p, true, nil
}

// watchPod forwards OOM kills and logs an unexpected VM death; the processes' own exit
// handlers see the VM go and publish their exits.
func (s *service) watchPod(p pod.Pod) {
	go func() {
		var after uint64
		for {
			ev, err := p.WaitOOMEvent(s.ctx, after)
			if err != nil {
				return // the VM is gone or the shim is stopping
			}
			after = ev.Seq
			s.events.send(&eventstypes.TaskOOM{ContainerID: ev.ContainerID})
		}
	}()
	<-p.Done()
	if !s.stopping() {
		log.G(s.ctx).Errorf("pod %s: the VM exited unexpectedly", p.ID())
	}
}

func (s *service) stopping() bool {
	select {
	case <-s.shutdown.Done():
		return true
	default:
		return false
	}
}

func (s *service) podGone() bool {
	s.podMu.Lock()
	p := s.pod
	s.podMu.Unlock()
	if p == nil {
		return true
	}
	select {
	case <-p.Done():
		return true
	default:
		return false
	}
}

// podEmpty reports whether the pod has no container left: its VM can stop.
func (s *service) podEmpty() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.containers) == 0
}

// idle reports whether the shim may exit: no container left and no container's Delete
// still working towards its answer. containerd asks every deleted task's shim to shut
// down, and the sandbox's Delete can be answered (and its Shutdown sent) while the last
// container's Delete is stopping the VM: exiting then would cut that answer off, and
// containerd would retry the delete against a dead shim.
func (s *service) idle() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.containers) == 0 && s.removing == 0
}

// stopPod stops the VM and releases the pod's host resources; idempotent.
func (s *service) stopPod(ctx context.Context) error {
	s.podMu.Lock()
	defer s.podMu.Unlock()
	if s.pod == nil {
		return nil
	}
	return s.pod.Stop(ctx)
}

func (s *service) get(id string) (*container, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, ok := s.containers[id]
	if !ok || c == nil {
		return nil, fmt.Errorf("container %s: %w", id, errdefs.ErrNotFound)
	}
	return c, nil
}

func (s *service) getProcess(id, execID string) (*container, *process, error) {
	c, err := s.get(id)
	if err != nil {
		return nil, nil, err
	}
	p, err := c.process(execID)
	return c, p, err
}

// configPath is the ConfigPath runtime option (runtimeoptions.v1.Options, which
// containerd uses for runtimes it has no options type for).
func configPath(options *ptypes.Any) (string, error) {
	if options == nil || options.GetValue() == nil {
		return "", nil
	}
	v, err := typeurl.UnmarshalAny(options)
	if err != nil {
		return "", fmt.Errorf("runtime options: %w: %w", err, errdefs.ErrInvalidArgument)
	}
	opts, ok := v.(*runtimeoptions.Options)
	if !ok {
		return "", fmt.Errorf("runtime options: %T, want runtimeoptions.v1.Options{ConfigPath}: %w", v, errdefs.ErrInvalidArgument)
	}
	return opts.ConfigPath, nil
}

func (s *service) Create(ctx context.Context, r *taskAPI.CreateTaskRequest) (*taskAPI.CreateTaskResponse, error) {
	if r.Checkpoint != "" || r.ParentCheckpoint != "" {
		return nil, fmt.Errorf("restore from checkpoint: %w", errdefs.ErrNotImplemented)
	}
	cfgPath, err := configPath(r.Options)
	if err != nil {
		return nil, err
	}
	paths := stdioPaths{stdin: r.Stdin, stdout: r.Stdout, stderr: r.Stderr, terminal: r.Terminal}
	c, err := s.create(ctx, r.ID, r.Bundle, r.Rootfs, paths, cfgPath)
	if err != nil {
		return nil, err
	}
	return &taskAPI.CreateTaskResponse{Pid: c.init.pid}, nil
}

func (s *service) Start(ctx context.Context, r *taskAPI.StartRequest) (*taskAPI.StartResponse, error) {
	c, err := s.get(r.ID)
	if err != nil {
		return nil, err
	}
	pid, err := s.start(ctx, c, r.ExecID)
	if err != nil {
		return nil, err
	}
	return &taskAPI.StartResponse{Pid: pid}, nil
}

func (s *service) Delete(ctx context.Context, r *taskAPI.DeleteRequest) (*taskAPI.DeleteResponse, error) {
	c, err := s.get(r.ID)
	if err != nil {
		return nil, err
	}
	p, err := s.remove(ctx, c, r.ExecID)
	if err != nil {
		return nil, err
	}
	return &taskAPI.DeleteResponse{Pid: p.pid, ExitStatus: p.exitStatus, ExitedAt: protobuf.ToTimestamp(p.exitedAt)}, nil
}

func (s *service) Exec(ctx context.Context, r *taskAPI.ExecProcessRequest) (*ptypes.Empty, error) {
	c, err := s.get(r.ID)
	if err != nil {
		return nil, err
	}
	var spec specs.Process
	if err := json.Unmarshal(r.Spec.GetValue(), &spec); err != nil {
		return nil, fmt.Errorf("exec %s: spec: %w: %w", r.ExecID, err, errdefs.ErrInvalidArgument)
	}
	p := newProcess(c.id, r.ExecID, stdioPaths{stdin: r.Stdin, stdout: r.Stdout, stderr: r.Stderr, terminal: r.Terminal})
	p.execSpec = &spec
	c.mu.Lock()
	if _, exists := c.execs[r.ExecID]; exists || r.ExecID == "" {
		c.mu.Unlock()
		return nil, fmt.Errorf("container %s exec %q: %w", c.id, r.ExecID, errdefs.ErrAlreadyExists)
	}
	c.execs[r.ExecID] = p
	c.mu.Unlock()
	s.events.send(&eventstypes.TaskExecAdded{ContainerID: c.id, ExecID: r.ExecID})
	return empty, nil
}

func (s *service) ResizePty(ctx context.Context, r *taskAPI.ResizePtyRequest) (*ptypes.Empty, error) {
	_, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	if err := p.alive(); err != nil {
		return nil, err
	}
	return empty, p.rt.Resize(ctx, r.Width, r.Height)
}

func (s *service) State(ctx context.Context, r *taskAPI.StateRequest) (*taskAPI.StateResponse, error) {
	c, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	status, pid, exitStatus, exitedAt := p.stateResponse()
	return &taskAPI.StateResponse{
		ID:         p.containerID,
		ExecID:     p.execID,
		Bundle:     c.bundle,
		Pid:        pid,
		Status:     status,
		Stdin:      p.paths.stdin,
		Stdout:     p.paths.stdout,
		Stderr:     p.paths.stderr,
		Terminal:   p.paths.terminal,
		ExitStatus: exitStatus,
		ExitedAt:   protobuf.ToTimestamp(exitedAt),
	}, nil
}

func (s *service) Pause(ctx context.Context, r *taskAPI.PauseRequest) (*ptypes.Empty, error) {
	return empty, s.freeze(ctx, r.ID, true)
}

func (s *service) Resume(ctx context.Context, r *taskAPI.ResumeRequest) (*ptypes.Empty, error) {
	return empty, s.freeze(ctx, r.ID, false)
}

func (s *service) freeze(ctx context.Context, id string, pause bool) error {
	c, err := s.get(id)
	if err != nil {
		return err
	}
	p := c.init
	p.mu.Lock()
	defer p.mu.Unlock()
	if pause {
		if _, err := p.state.next(statePaused, "pause"); err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		if err := s.pod.PauseContainer(ctx, id); err != nil {
			return err
		}
		s.events.send(&eventstypes.TaskPaused{ContainerID: id})
		return p.move(statePaused, "pause")
	}
	if p.state != statePaused {
		return fmt.Errorf("%s is %s: cannot resume: %w", p, p.state, errdefs.ErrFailedPrecondition)
	}
	if err := s.pod.ResumeContainer(ctx, id); err != nil {
		return err
	}
	s.events.send(&eventstypes.TaskResumed{ContainerID: id})
	return p.move(stateRunning, "resume")
}

func (s *service) Kill(ctx context.Context, r *taskAPI.KillRequest) (*ptypes.Empty, error) {
	_, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	if err := p.alive(); err != nil {
		return nil, err
	}
	if s.podGone() {
		return nil, fmt.Errorf("%s: the pod's VM is gone: process already finished: %w", p, errdefs.ErrNotFound)
	}
	return empty, p.rt.Signal(ctx, syscall.Signal(r.Signal), r.All)
}

func (s *service) Pids(ctx context.Context, r *taskAPI.PidsRequest) (*taskAPI.PidsResponse, error) {
	if _, err := s.get(r.ID); err != nil {
		return nil, err
	}
	pids, err := s.pod.ContainerPids(ctx, r.ID)
	if err != nil {
		return nil, err
	}
	resp := &taskAPI.PidsResponse{}
	for _, pid := range pids {
		resp.Processes = append(resp.Processes, &tasktypes.ProcessInfo{Pid: pid})
	}
	return resp, nil
}

func (s *service) CloseIO(ctx context.Context, r *taskAPI.CloseIORequest) (*ptypes.Empty, error) {
	_, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	if !r.Stdin || p.io == nil {
		return empty, nil
	}
	// Closing the FIFO ends the stdin pump, which closes the guest process's stdin.
	p.io.closeStdin()
	return empty, nil
}

func (s *service) Checkpoint(ctx context.Context, r *taskAPI.CheckpointTaskRequest) (*ptypes.Empty, error) {
	return nil, fmt.Errorf("checkpoint of a VM pod's container: %w", errdefs.ErrNotImplemented)
}

func (s *service) Update(ctx context.Context, r *taskAPI.UpdateTaskRequest) (*ptypes.Empty, error) {
	if _, err := s.get(r.ID); err != nil {
		return nil, err
	}
	var res specs.LinuxResources
	if err := json.Unmarshal(r.Resources.GetValue(), &res); err != nil {
		return nil, fmt.Errorf("update %s: resources: %w: %w", r.ID, err, errdefs.ErrInvalidArgument)
	}
	// The VM grows first when the pod's limits outgrow it, then the guest's cgroup
	// takes the limits.
	return empty, s.pod.UpdateContainer(ctx, r.ID, &res)
}

func (s *service) Wait(ctx context.Context, r *taskAPI.WaitRequest) (*taskAPI.WaitResponse, error) {
	_, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	if err := p.wait(ctx); err != nil {
		return nil, err
	}
	_, _, exitStatus, exitedAt := p.stateResponse()
	return &taskAPI.WaitResponse{ExitStatus: exitStatus, ExitedAt: protobuf.ToTimestamp(exitedAt)}, nil
}

func (s *service) Stats(ctx context.Context, r *taskAPI.StatsRequest) (*taskAPI.StatsResponse, error) {
	if _, err := s.get(r.ID); err != nil {
		return nil, err
	}
	st, err := s.pod.ContainerStats(ctx, r.ID)
	if err != nil {
		return nil, err
	}
	data, err := typeurl.MarshalAny(st)
	if err != nil {
		return nil, err
	}
	return &taskAPI.StatsResponse{Stats: typeurl.MarshalProto(data)}, nil
}

func (s *service) Connect(ctx context.Context, r *taskAPI.ConnectRequest) (*taskAPI.ConnectResponse, error) {
	var pid uint32
	if c, err := s.get(r.ID); err == nil {
		pid = c.init.pid
	}
	return &taskAPI.ConnectResponse{ShimPid: uint32(os.Getpid()), TaskPid: pid}, nil
}

func (s *service) Shutdown(ctx context.Context, r *taskAPI.ShutdownRequest) (*ptypes.Empty, error) {
	if !s.idle() {
		return empty, nil // still serving containers; the last Delete's Shutdown ends it
	}
	s.shutdown.Shutdown()
	return empty, nil
}
