package vmpodagent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
)

// Client is the host's client of one guest's vmpod agent: a Go method for every agent
// operation. Errors come back as native errdefs classes (NotFound, FailedPrecondition, ...),
// so callers test them with errdefs.Is*; only the shim's RPC boundary maps them again.
type Client struct {
	vm          string
	callTimeout time.Duration

	mu       sync.RWMutex // guards the connection, which Guest.ReconnectAgent replaces
	conn     io.Closer
	rpc      agentv1.AgentService
	replaced chan struct{}   // closed when the next connection is installed
	gone     <-chan struct{} // closed when the guest is: no connection will come
}

func newClient(vm string, callTimeout time.Duration, gone <-chan struct{}) *Client {
	return &Client{vm: vm, callTimeout: callTimeout, replaced: make(chan struct{}), gone: gone}
}

// use switches the agent to a new connection and closes the old one.
func (a *Client) use(c *ttrpc.Client) { a.install(agentv1.NewAgentClient(c), c) }

func (a *Client) install(rpc agentv1.AgentService, conn io.Closer) {
	a.mu.Lock()
	old := a.conn
	a.conn, a.rpc = conn, rpc
	close(a.replaced)
	a.replaced = make(chan struct{})
	a.mu.Unlock()
	if old != nil {
		_ = old.Close()
	}
}

// client is the current connection's stub.
func (a *Client) client() agentv1.AgentService {
	a.mu.RLock()
	defer a.mu.RUnlock()
	return a.rpc
}

// resume makes a call, and makes it again on the next connection each time the one it
// used is closed under it (Guest.ReconnectAgent replaced it), until ctx ends or the guest
// is gone. For calls a repeat cannot spoil: stream reads and writes name offsets (nothing
// lost, nothing twice), a wait asks again.
func (a *Client) resume(ctx context.Context, call func(agentv1.AgentService) error) error {
	for {
		a.mu.RLock()
		rpc, replaced := a.rpc, a.replaced
		a.mu.RUnlock()
		if rpc == nil {
			return a.notConnected()
		}
		err := call(rpc)
		if !errors.Is(err, ttrpc.ErrClosed) {
			return err
		}
		select {
		case <-replaced:
		case <-ctx.Done():
			return err
		case <-a.gone:
			return err
		}
	}
}

// nativeErrors is the client side of the RPC boundary: gRPC status → errdefs class.
// ttrpc turns a reply's status into an error only after the interceptor returns, so the
// status is read from the reply here. Transport errors (ttrpc.ErrClosed, the context's)
// stay what they are: callers tell a replaced connection from a failed call by them.
func nativeErrors(ctx context.Context, req *ttrpc.Request, resp *ttrpc.Response, info *ttrpc.UnaryClientInfo, invoker ttrpc.Invoker) error {
	if err := invoker(ctx, req, resp); err != nil {
		if _, isStatus := status.FromError(err); !isStatus {
			return err
		}
		return errgrpc.ToNative(err)
	}
	if resp.Status != nil && codes.Code(resp.Status.Code) != codes.OK {
		return errgrpc.ToNative(status.ErrorProto(resp.Status))
	}
	return nil
}

// notConnected is the error of a call before the agent's first session: a guest that
// has not arrived from its migration's source yet (Await).
func (a *Client) notConnected() error {
	return fmt.Errorf("vm %s: the guest has not arrived: %w", a.vm, errdefs.ErrFailedPrecondition)
}

// call bounds a short call by the call timeout and names the VM and operation in errors.
func (a *Client) call(ctx context.Context, op string, fn func(context.Context) error) error {
	if a.client() == nil {
		return fmt.Errorf("agent %s: %w", op, a.notConnected())
	}
	callCtx, cancel := context.WithTimeout(ctx, a.callTimeout)
	defer cancel()
	if err := fn(callCtx); err != nil {
		if callCtx.Err() != nil && ctx.Err() == nil {
			// the call's own bound, not the caller's: say what that means
			return fmt.Errorf("vm %s: agent %s: no answer within %v, the guest is wedged or overloaded: %w", a.vm, op, a.callTimeout, err)
		}
		return fmt.Errorf("vm %s: agent %s: %w", a.vm, op, err)
	}
	return nil
}

// poll is call without the timeout, for long polls that wait on the guest.
func (a *Client) poll(ctx context.Context, op string, fn func(context.Context) error) error {
	if a.client() == nil {
		return fmt.Errorf("agent %s: %w", op, a.notConnected())
	}
	if err := fn(ctx); err != nil {
		return fmt.Errorf("vm %s: agent %s: %w", a.vm, op, err)
	}
	return nil
}

func (a *Client) close() error {
	a.mu.RLock()
	defer a.mu.RUnlock()
	if a.conn == nil {
		return nil
	}
	return a.conn.Close()
}

// Ping returns the agent's view of the guest.
func (a *Client) Ping(ctx context.Context) (resp *agentv1.PingResponse, err error) {
	err = a.call(ctx, "ping", func(ctx context.Context) error {
		resp, err = a.client().Ping(ctx, &agentv1.PingRequest{})
		return err
	})
	return resp, err
}

// SetupSandbox configures the guest as the pod (hostname, clock, network, DNS, sysctls).
func (a *Client) SetupSandbox(ctx context.Context, req *agentv1.SetupSandboxRequest) error {
	return a.call(ctx, "setup sandbox", func(ctx context.Context) error {
		_, err := a.client().SetupSandbox(ctx, req)
		return err
	})
}

// OnlineResources brings hot-added (or booted offline) vCPUs and memory online, as much
// as req asks.
func (a *Client) OnlineResources(ctx context.Context, req *agentv1.OnlineResourcesRequest) (resp *agentv1.OnlineResourcesResponse, err error) {
	err = a.call(ctx, "online resources", func(ctx context.Context) error {
		resp, err = a.client().OnlineResources(ctx, req)
		return err
	})
	return resp, err
}

// shutdown asks the guest to power off; the reply may be lost with the VM.
func (a *Client) shutdown(ctx context.Context) error {
	return a.call(ctx, "shutdown", func(ctx context.Context) error {
		_, err := a.client().Shutdown(ctx, &agentv1.ShutdownRequest{})
		return err
	})
}

// createContainer is the raw create; Guest.CreateContainer shares the rootfs first.
func (a *Client) createContainer(ctx context.Context, id string, spec *specs.Spec, stdio *agentv1.Stdio) (pid uint32, err error) {
	raw, err := json.Marshal(spec)
	if err != nil {
		return 0, fmt.Errorf("vm %s: container %s: encode spec: %w", a.vm, id, err)
	}
	err = a.call(ctx, "create container "+id, func(ctx context.Context) error {
		resp, err := a.client().CreateContainer(ctx, &agentv1.CreateContainerRequest{ContainerId: id, OciSpec: raw, Stdio: stdio})
		if err == nil {
			pid = resp.Pid
		}
		return err
	})
	return pid, err
}

// StartContainer starts a created container's init.
func (a *Client) StartContainer(ctx context.Context, id string) error {
	return a.call(ctx, "start container "+id, func(ctx context.Context) error {
		_, err := a.client().StartContainer(ctx, &agentv1.ContainerRequest{ContainerId: id})
		return err
	})
}

func (a *Client) removeContainer(ctx context.Context, id string, force bool) error {
	return a.call(ctx, "remove container "+id, func(ctx context.Context) error {
		_, err := a.client().RemoveContainer(ctx, &agentv1.RemoveContainerRequest{ContainerId: id, Force: force})
		return err
	})
}

// PauseContainer freezes every process of the container.
func (a *Client) PauseContainer(ctx context.Context, id string) error {
	return a.call(ctx, "pause container "+id, func(ctx context.Context) error {
		_, err := a.client().PauseContainer(ctx, &agentv1.ContainerRequest{ContainerId: id})
		return err
	})
}

// ResumeContainer thaws a paused container.
func (a *Client) ResumeContainer(ctx context.Context, id string) error {
	return a.call(ctx, "resume container "+id, func(ctx context.Context) error {
		_, err := a.client().ResumeContainer(ctx, &agentv1.ContainerRequest{ContainerId: id})
		return err
	})
}

// UpdateContainer applies new cgroup limits inside the guest.
func (a *Client) UpdateContainer(ctx context.Context, id string, res *specs.LinuxResources) error {
	raw, err := json.Marshal(res)
	if err != nil {
		return fmt.Errorf("vm %s: container %s: encode resources: %w", a.vm, id, err)
	}
	return a.call(ctx, "update container "+id, func(ctx context.Context) error {
		_, err := a.client().UpdateContainer(ctx, &agentv1.UpdateContainerRequest{ContainerId: id, Resources: raw})
		return err
	})
}

// ListProcesses returns the guest pids in the container.
func (a *Client) ListProcesses(ctx context.Context, id string) (pids []uint32, err error) {
	err = a.call(ctx, "list processes "+id, func(ctx context.Context) error {
		resp, err := a.client().ListProcesses(ctx, &agentv1.ContainerRequest{ContainerId: id})
		if err == nil {
			pids = resp.Pids
		}
		return err
	})
	return pids, err
}

func (a *Client) execProcess(ctx context.Context, id, execID string, proc *specs.Process, stdio *agentv1.Stdio) (pid uint32, err error) {
	raw, err := json.Marshal(proc)
	if err != nil {
		return 0, fmt.Errorf("vm %s: container %s exec %s: encode process: %w", a.vm, id, execID, err)
	}
	err = a.call(ctx, "exec "+id+"/"+execID, func(ctx context.Context) error {
		resp, err := a.client().ExecProcess(ctx, &agentv1.ExecProcessRequest{ContainerId: id, ExecId: execID, Process: raw, Stdio: stdio})
		if err == nil {
			pid = resp.Pid
		}
		return err
	})
	return pid, err
}

// OOMEvent is one OOM kill in the guest.
type OOMEvent struct {
	Seq         uint64
	ContainerID string
	At          time.Time
}

// WaitOOMEvent blocks until an OOM kill numbered above afterSeq.
func (a *Client) WaitOOMEvent(ctx context.Context, afterSeq uint64) (ev OOMEvent, err error) {
	err = a.poll(ctx, "wait OOM event", func(ctx context.Context) error {
		resp, err := a.client().WaitOOMEvent(ctx, &agentv1.WaitOOMEventRequest{AfterSeq: afterSeq})
		if err == nil {
			ev = OOMEvent{Seq: resp.Seq, ContainerID: resp.ContainerId, At: time.Unix(0, resp.AtUnixNanos)}
		}
		return err
	})
	return ev, err
}
