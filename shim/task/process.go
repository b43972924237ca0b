package task

import (
	"context"
	"fmt"
	"sync"
	"time"

	tasktypes "github.com/containerd/containerd/api/types/task"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/vmpod/vmpod/runtime"
	"github.com/vmpod/vmpod/runtime/pod"
)

// exitVMGone is the exit status of a process whose VM died under it, as if killed.
const exitVMGone = 128 + 9

// process is one containerd process: a container's init or an exec.
type process struct {
	containerID string
	execID      string // "" for the init
	paths       stdioPaths
	io          *hostIO
	execSpec    *specs.Process // an exec's process, from Exec until Start

	mu         sync.Mutex
	state      state
	rt         pod.Process // the pod's process, once it exists
	pid        uint32
	exitStatus uint32
	exitedAt   time.Time
	exited     chan struct{} // closed on the move to stopped
}

func newProcess(containerID, execID string, paths stdioPaths) *process {
	return &process{containerID: containerID, execID: execID, paths: paths, exited: make(chan struct{})}
}

func (p *process) String() string {
	if p.execID == "" {
		return "container " + p.containerID
	}
	return fmt.Sprintf("container %s exec %s", p.containerID, p.execID)
}

// move changes state; p.mu is held.
func (p *process) move(to state, op string) error {
	next, err := p.state.next(to, op)
	if err != nil {
		return fmt.Errorf("%s: %w", p, err)
	}
	p.state = next
	return nil
}

// setExitedLocked records the exit and wakes Wait; p.mu is held.
func (p *process) setExitedLocked(status int, at time.Time) {
	if p.state == stateStopped || p.state == stateDeleted {
		return
	}
	p.state = stateStopped
	p.exitStatus = uint32(status)
	p.exitedAt = at
	close(p.exited)
}

// awaitExit waits for the guest process to exit and its output to reach containerd.
// A VM that dies first counts as a SIGKILL.
func (p *process) awaitExit(ctx context.Context, vmDone <-chan struct{}) runtime.Exit {
	for {
		exit, err := p.rt.Wait(ctx)
		if err == nil {
			return exit
		}
		select {
		case <-vmDone:
			return runtime.Exit{Status: exitVMGone, ExitedAt: time.Now()}
		default:
		}
		if ctx.Err() != nil {
			return runtime.Exit{Status: exitVMGone, ExitedAt: time.Now()}
		}
		log.G(ctx).WithError(err).Warnf("%s: wait failed, retrying", p)
		select {
		case <-time.After(100 * time.Millisecond):
		case <-vmDone:
		}
	}
}

// createdExitWait bounds how long removing a created init waits for its exit to be
// published: a guest that never reports it must not hold up the delete.
var createdExitWait = 5 * time.Second

// awaitExited waits, at most d, for the process's exit to be recorded (and, for an init
// or a started exec, published: the exit handler does both under p.mu).
func (p *process) awaitExited(ctx context.Context, d time.Duration) {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	if err := p.wait(ctx); err != nil {
		log.G(ctx).Warnf("%s: no exit within %v of its removal; deleting without it", p, d)
	}
}

func (p *process) wait(ctx context.Context) error {
	select {
	case <-p.exited:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// alive fails with NotFound once the process has exited: containerd's "process already
// finished".
func (p *process) alive() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.state == stateStopped || p.state == stateDeleted {
		return fmt.Errorf("%s: process already finished: %w", p, errdefs.ErrNotFound)
	}
	if p.rt == nil {
		return fmt.Errorf("%s is not started: %w", p, errdefs.ErrFailedPrecondition)
	}
	return nil
}

func (p *process) stateResponse() (status tasktypes.Status, pid, exitStatus uint32, exitedAt time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.state.status(), p.pid, p.exitStatus, p.exitedAt
}
