package vmpodagent

import (
	"context"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
	"github.com/vmpod/vmpod/runtime"
)

// initDrainTimeout bounds how long a container's init's output is waited for after the
// init exited: a background child that inherited stdout keeps the stream open, and what
// it writes after this is not copied (runc's shim waits as long at delete). An exec's
// output is copied until its end or Remove: containerd drains it itself
// (drain_exec_sync_io_timeout) and deletes the exec when it gives up.
const initDrainTimeout = 2 * time.Second

// stdioRequest is what the agent is asked to attach.
func stdioRequest(s runtime.Stdio) *agentv1.Stdio {
	return &agentv1.Stdio{
		Stdin:    s.Stdin != nil,
		Stdout:   s.Stdout != nil,
		Stderr:   s.Stderr != nil && !s.Terminal,
		Terminal: s.Terminal,
		Width:    s.Width,
		Height:   s.Height,
	}
}

// Process is a container's init or exec'd process in the guest, with the host ends of its
// stdio pumped through the agent.
type Process struct {
	agent       *Client
	containerID string
	execID      string
	pid         uint32

	output     sync.WaitGroup // stdout/stderr pumps
	outputDone chan struct{}  // closed when the pumps have ended
	// how far the pumps have written stdout and stderr to the host's writers
	stdoutAt, stderrAt atomic.Uint64
	stopOutput         context.CancelFunc
	drainOnce          sync.Once
	stdinDone          chan struct{}
}

// Pid is the process's pid in the guest.
func (p *Process) Pid() uint32 { return p.pid }

// ContainerID and ExecID name the process ("" exec id: the container's init).
func (p *Process) ContainerID() string { return p.containerID }
func (p *Process) ExecID() string      { return p.execID }

func (p *Process) req() *agentv1.ProcessRequest {
	return &agentv1.ProcessRequest{ContainerId: p.containerID, ExecId: p.execID}
}

func (p *Process) name() string {
	if p.execID == "" {
		return p.containerID
	}
	return p.containerID + "/" + p.execID
}

// newProcess pumps the process's output from the offsets from (zero for a process this
// side started) to the host's writers.
func newProcess(a *Client, containerID, execID string, pid uint32, stdio runtime.Stdio, from OutputOffsets) *Process {
	ctx, cancel := context.WithCancel(context.Background())
	p := &Process{agent: a, containerID: containerID, execID: execID, pid: pid, stopOutput: cancel,
		outputDone: make(chan struct{}), stdinDone: make(chan struct{})}
	p.stdoutAt.Store(from.Stdout)
	p.stderrAt.Store(from.Stderr)
	if stdio.Stdout != nil {
		p.pumpOutput(ctx, stdio.Stdout, "stdout", &p.stdoutAt, func(ctx context.Context, offset uint64) (resp *agentv1.ReadStreamResponse, err error) {
			err = a.resume(ctx, func(rpc agentv1.AgentService) error {
				resp, err = rpc.ReadStdout(ctx, &agentv1.ReadStreamRequest{ContainerId: containerID, ExecId: execID, Offset: offset})
				return err
			})
			return resp, err
		})
	}
	if stdio.Stderr != nil && !stdio.Terminal {
		p.pumpOutput(ctx, stdio.Stderr, "stderr", &p.stderrAt, func(ctx context.Context, offset uint64) (resp *agentv1.ReadStreamResponse, err error) {
			err = a.resume(ctx, func(rpc agentv1.AgentService) error {
				resp, err = rpc.ReadStderr(ctx, &agentv1.ReadStreamRequest{ContainerId: containerID, ExecId: execID, Offset: offset})
				return err
			})
			return resp, err
		})
	}
	go func() { p.output.Wait(); close(p.outputDone) }()
	if stdio.Stdin != nil {
		go p.pumpStdin(ctx, stdio.Stdin)
	} else {
		close(p.stdinDone)
	}
	return p
}

func (p *Process) pumpOutput(ctx context.Context, w io.Writer, stream string, pos *atomic.Uint64, read readAt) {
	p.output.Add(1)
	go func() {
		defer p.output.Done()
		if err := copyFromGuest(ctx, w, read, pos); err != nil && ctx.Err() == nil {
			log.L.WithError(err).Warnf("vm %s: %s %s", p.agent.vm, p.name(), stream)
		}
	}()
}

// pumpStdin copies r to the guest process and closes its stdin when r ends: at EOF, or
// when the host closed its end (containerd's CloseIO closes the stdin FIFO under a
// blocked read). Either way the process's stdin is over.
func (p *Process) pumpStdin(ctx context.Context, r io.Reader) {
	defer close(p.stdinDone)
	err := copyToGuest(ctx, r, func(ctx context.Context, offset uint64, data []byte) (uint64, error) {
		var resp *agentv1.WriteStdinResponse
		err := p.agent.resume(ctx, func(rpc agentv1.AgentService) (err error) {
			resp, err = rpc.WriteStdin(ctx, &agentv1.WriteStdinRequest{ContainerId: p.containerID, ExecId: p.execID, Offset: offset, Data: data})
			return err
		})
		if err != nil {
			return offset, err
		}
		return resp.Offset, nil
	})
	if err != nil && (errdefs.IsNotFound(err) || ctx.Err() != nil) {
		return // the process is gone
	}
	if err := p.CloseStdin(ctx); err != nil && ctx.Err() == nil && !errdefs.IsNotFound(err) {
		log.L.WithError(err).Warnf("vm %s: %s: close stdin", p.agent.vm, p.name())
	}
}

// Wait blocks until the process exited. Its output may still be on its way: OutputDone
// says when it is over. After an init's exit, its output is waited for initDrainTimeout
// at most.
func (p *Process) Wait(ctx context.Context) (runtime.Exit, error) {
	var exit runtime.Exit
	err := p.agent.poll(ctx, "wait "+p.name(), func(ctx context.Context) error {
		return p.agent.resume(ctx, func(rpc agentv1.AgentService) error {
			resp, err := rpc.WaitProcess(ctx, p.req())
			if err == nil {
				exit = runtime.Exit{Status: int(resp.ExitStatus), ExitedAt: time.Unix(0, resp.ExitedAtUnixNanos)}
			}
			return err
		})
	})
	if err != nil {
		return runtime.Exit{}, err
	}
	if p.execID == "" {
		p.drainOnce.Do(func() { go p.boundDrain() })
	}
	return exit, nil
}

// boundDrain cuts an exited init's output off after initDrainTimeout.
func (p *Process) boundDrain() {
	select {
	case <-p.outputDone:
	case <-time.After(initDrainTimeout):
		log.L.Warnf("vm %s: %s exited but its output is still open after %v (a child holds it?): detaching", p.agent.vm, p.name(), initDrainTimeout)
		p.stopOutput()
	}
}

// OutputDone is closed once the process's output has all reached the host writers, or
// was cut off (Remove, the bounded drain of an init, a broken connection to the guest).
func (p *Process) OutputDone() <-chan struct{} { return p.outputDone }

// Signal delivers sig to the process (all: to every process of the container; init only).
func (p *Process) Signal(ctx context.Context, sig syscall.Signal, all bool) error {
	return p.agent.call(ctx, fmt.Sprintf("signal %d to %s", sig, p.name()), func(ctx context.Context) error {
		_, err := p.agent.client().SignalProcess(ctx, &agentv1.SignalProcessRequest{
			ContainerId: p.containerID, ExecId: p.execID, Signal: uint32(sig), All: all,
		})
		return err
	})
}

// Resize sets the process's terminal size.
func (p *Process) Resize(ctx context.Context, width, height uint32) error {
	return p.agent.call(ctx, "resize "+p.name(), func(ctx context.Context) error {
		_, err := p.agent.client().ResizeTTY(ctx, &agentv1.ResizeTTYRequest{
			ContainerId: p.containerID, ExecId: p.execID, Width: width, Height: height,
		})
		return err
	})
}

// CloseStdin ends the process's stdin (for a terminal: end-of-file, ^D).
func (p *Process) CloseStdin(ctx context.Context) error {
	return p.agent.call(ctx, "close stdin of "+p.name(), func(ctx context.Context) error {
		_, err := p.agent.client().CloseStdin(ctx, p.req())
		return err
	})
}

// OutputOffsets are how far a process's stdout and stderr have reached the host's
// writers: where a migration's target goes on copying them (Guest.AdoptProcess). The
// guest keeps what no reader has asked past.
type OutputOffsets struct{ Stdout, Stderr uint64 }

// HandOverOutput stops copying the process's output to this side's writers and says how
// far it got, for a migration's target to go on from there. Called once the guest has
// left (its agent answers here no more), the offsets are final: the agent drops output
// only once a read asks past it, so what this side did not write is still in the
// guest's state, at the target.
func (p *Process) HandOverOutput() OutputOffsets {
	p.stopOutput()
	<-p.outputDone
	return OutputOffsets{Stdout: p.stdoutAt.Load(), Stderr: p.stderrAt.Load()}
}

// Remove forgets an exited exec'd process in the guest and stops its pumps.
func (p *Process) Remove(ctx context.Context) error {
	p.stopOutput()
	if p.execID == "" {
		return nil // the init goes with its container
	}
	return p.agent.call(ctx, "remove "+p.name(), func(ctx context.Context) error {
		_, err := p.agent.client().RemoveProcess(ctx, p.req())
		return err
	})
}
