package agent

import (
	"context"
	"fmt"
	"log/slog"
	"runtime/debug"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
	"golang.org/x/sys/unix"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
)

// Version is set at build time (-ldflags -X).
var Version = "dev"

// service is the ttrpc layer: each method finds the object, calls it and returns. Errors
// stay native (errdefs classes) until mapErrors turns them into gRPC status codes, once,
// for every method.
type service struct {
	containers *containers
	ports      ports
	oom        *oomWatcher
	booted     time.Time
	poweroff   func()

	// warmAfterRestore: a template's guest warms runc up once restored (KernelParamTemplate)
	warmAfterRestore bool
	warmOnce         sync.Once
}

var _ agentv1.AgentService = (*service)(nil)

// mapErrors is the RPC boundary: native errors become gRPC codes here and nowhere else.
// A panic in a call becomes that call's Internal error: the agent is the guest's init,
// and its exit would panic the guest's kernel and end the pod.
func mapErrors(ctx context.Context, unmarshal ttrpc.Unmarshaler, info *ttrpc.UnaryServerInfo, method ttrpc.Method) (_ any, err error) {
	defer func() {
		if r := recover(); r != nil {
			slog.Error("call panicked", "method", info.FullMethod, "panic", r, "stack", string(debug.Stack()))
			err = errgrpc.ToGRPC(fmt.Errorf("%s: the agent panicked: %v: %w", info.FullMethod, r, errdefs.ErrInternal))
		}
	}()
	resp, err := method(ctx, unmarshal)
	if err != nil {
		slog.Debug("call failed", "method", info.FullMethod, "error", err)
		return nil, errgrpc.ToGRPC(err)
	}
	return resp, nil
}

var empty = &agentv1.Empty{}

func (s *service) Ping(context.Context, *agentv1.PingRequest) (*agentv1.PingResponse, error) {
	var uts unix.Utsname
	_ = unix.Uname(&uts)
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts)
	cpus, mem := guestSize()
	return &agentv1.PingResponse{
		AgentVersion:  Version,
		KernelRelease: unix.ByteSliceToString(uts.Release[:]),
		UptimeNanos:   uint64(ts.Nano()),
		OnlineCpus:    cpus,
		MemoryBytes:   mem,
	}, nil
}

func (s *service) SetupSandbox(_ context.Context, req *agentv1.SetupSandboxRequest) (*agentv1.Empty, error) {
	if err := setupSandbox(req); err != nil {
		return nil, err
	}
	if len(req.Entropy) > 0 && s.warmAfterRestore { // restored: the host reseeds a restore
		s.warmOnce.Do(func() { go warmRunc(context.Background(), s.containers) })
	}
	return empty, nil
}

func (s *service) OnlineResources(_ context.Context, req *agentv1.OnlineResourcesRequest) (*agentv1.OnlineResourcesResponse, error) {
	return onlineResources(req)
}

func (s *service) Shutdown(ctx context.Context, _ *agentv1.ShutdownRequest) (*agentv1.Empty, error) {
	slog.Info("shutdown requested")
	s.containers.killAll(ctx)
	unix.Sync()
	// Power off after this reply has had a chance to leave.
	time.AfterFunc(50*time.Millisecond, s.poweroff)
	return empty, nil
}

func (s *service) CreateContainer(ctx context.Context, req *agentv1.CreateContainerRequest) (*agentv1.CreateContainerResponse, error) {
	pid, err := s.containers.create(ctx, req)
	if err != nil {
		return nil, err
	}
	return &agentv1.CreateContainerResponse{Pid: uint32(pid)}, nil
}

func (s *service) StartContainer(ctx context.Context, req *agentv1.ContainerRequest) (*agentv1.Empty, error) {
	return empty, s.containers.start(ctx, req.ContainerId)
}

func (s *service) RemoveContainer(ctx context.Context, req *agentv1.RemoveContainerRequest) (*agentv1.Empty, error) {
	return empty, s.containers.remove(ctx, req.ContainerId, req.Force)
}

func (s *service) PauseContainer(ctx context.Context, req *agentv1.ContainerRequest) (*agentv1.Empty, error) {
	return empty, s.containers.pause(ctx, req.ContainerId)
}

func (s *service) ResumeContainer(ctx context.Context, req *agentv1.ContainerRequest) (*agentv1.Empty, error) {
	return empty, s.containers.resume(ctx, req.ContainerId)
}

func (s *service) UpdateContainer(ctx context.Context, req *agentv1.UpdateContainerRequest) (*agentv1.Empty, error) {
	return empty, s.containers.update(ctx, req.ContainerId, req.Resources)
}

func (s *service) ContainerStats(_ context.Context, req *agentv1.ContainerRequest) (*agentv1.ContainerStatsResponse, error) {
	c, err := s.containers.get(req.ContainerId)
	if err != nil {
		return nil, err
	}
	return cgroupStats(c.cgroup)
}

func (s *service) ListProcesses(_ context.Context, req *agentv1.ContainerRequest) (*agentv1.ListProcessesResponse, error) {
	pids, err := s.containers.pids(req.ContainerId)
	if err != nil {
		return nil, err
	}
	return &agentv1.ListProcessesResponse{Pids: pids}, nil
}

func (s *service) ExecProcess(ctx context.Context, req *agentv1.ExecProcessRequest) (*agentv1.ExecProcessResponse, error) {
	pid, err := s.containers.exec(ctx, req)
	if err != nil {
		return nil, err
	}
	return &agentv1.ExecProcessResponse{Pid: uint32(pid)}, nil
}

func (s *service) SignalProcess(ctx context.Context, req *agentv1.SignalProcessRequest) (*agentv1.Empty, error) {
	return empty, s.containers.signal(ctx, req)
}

func (s *service) WaitProcess(ctx context.Context, req *agentv1.ProcessRequest) (*agentv1.WaitProcessResponse, error) {
	p, err := s.containers.process(req.ContainerId, req.ExecId)
	if err != nil {
		return nil, err
	}
	if err := p.wait(ctx); err != nil {
		return nil, err
	}
	return &agentv1.WaitProcessResponse{
		ExitStatus:        int32(p.exitStatus),
		ExitedAtUnixNanos: p.exitedAt.UnixNano(),
		Pid:               uint32(p.pid),
	}, nil
}

func (s *service) RemoveProcess(_ context.Context, req *agentv1.ProcessRequest) (*agentv1.Empty, error) {
	return empty, s.containers.removeProcess(req.ContainerId, req.ExecId)
}

func (s *service) ResizeTTY(_ context.Context, req *agentv1.ResizeTTYRequest) (*agentv1.Empty, error) {
	p, err := s.containers.process(req.ContainerId, req.ExecId)
	if err != nil {
		return nil, err
	}
	return empty, p.resize(req.Width, req.Height)
}

func (s *service) WriteStdin(_ context.Context, req *agentv1.WriteStdinRequest) (*agentv1.WriteStdinResponse, error) {
	p, err := s.containers.process(req.ContainerId, req.ExecId)
	if err != nil {
		return nil, err
	}
	in, err := p.input()
	if err != nil {
		return nil, err
	}
	off, err := in.Write(req.Offset, req.Data)
	return &agentv1.WriteStdinResponse{Offset: off}, err
}

func (s *service) CloseStdin(_ context.Context, req *agentv1.ProcessRequest) (*agentv1.Empty, error) {
	p, err := s.containers.process(req.ContainerId, req.ExecId)
	if err != nil {
		return nil, err
	}
	in, err := p.input()
	if err != nil {
		return nil, err
	}
	return empty, in.Close()
}

func (s *service) ReadStdout(ctx context.Context, req *agentv1.ReadStreamRequest) (*agentv1.ReadStreamResponse, error) {
	return s.read(ctx, req, false)
}

func (s *service) ReadStderr(ctx context.Context, req *agentv1.ReadStreamRequest) (*agentv1.ReadStreamResponse, error) {
	return s.read(ctx, req, true)
}

func (s *service) read(ctx context.Context, req *agentv1.ReadStreamRequest, stderr bool) (*agentv1.ReadStreamResponse, error) {
	p, err := s.containers.process(req.ContainerId, req.ExecId)
	if err != nil {
		return nil, err
	}
	out, err := p.output(stderr)
	if err != nil {
		return nil, err
	}
	start, data, eof, err := out.Read(ctx, req.Offset, int(req.MaxBytes))
	if err != nil {
		return nil, err
	}
	return &agentv1.ReadStreamResponse{Offset: start, Data: data, Eof: eof}, nil
}

func (s *service) WaitOOMEvent(ctx context.Context, req *agentv1.WaitOOMEventRequest) (*agentv1.OOMEvent, error) {
	return s.oom.wait(ctx, req.AfterSeq)
}
