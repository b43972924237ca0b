package agent

import (
	"context"
	"fmt"
	"time"

	"github.com/containerd/console"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/vmpod/vmpod/agent/reaper"
	"github.com/vmpod/vmpod/agent/stream"
)

// process is a container's init or one of its exec'd processes, as the agent sees it:
// a guest pid, its stdio streams and, once reaped, its exit.
type process struct {
	containerID string
	execID      string // "" for the container's init
	pid         int

	stdin  *stream.Input  // nil unless the host asked for stdin
	stdout *stream.Output // nil unless asked for; with a terminal it carries stderr too
	stderr *stream.Output
	pty    console.Console // nil without a terminal

	exited     chan struct{} // closed once exit is set
	exitStatus int
	exitedAt   time.Time
}

func (p *process) String() string {
	if p.execID == "" {
		return fmt.Sprintf("container %s init (pid %d)", p.containerID, p.pid)
	}
	return fmt.Sprintf("container %s exec %s (pid %d)", p.containerID, p.execID, p.pid)
}

// watchExit records the exit the reaper delivers and runs onExit after it.
func (p *process) watchExit(exits <-chan reaper.Exit, onExit func(*process)) {
	go func() {
		e := <-exits
		p.exitStatus = e.Status
		p.exitedAt = e.Timestamp
		close(p.exited)
		if onExit != nil {
			onExit(p)
		}
	}()
}

func (p *process) hasExited() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// wait blocks until the process exited or ctx is done.
func (p *process) wait(ctx context.Context) error {
	select {
	case <-p.exited:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// signal delivers sig unless the process is already gone (then NotFound, as containerd
// expects for "process already finished").
func (p *process) signal(sig unix.Signal) error {
	if p.hasExited() {
		return fmt.Errorf("%s: process already finished: %w", p, errdefs.ErrNotFound)
	}
	if err := unix.Kill(p.pid, sig); err != nil {
		if err == unix.ESRCH {
			return fmt.Errorf("%s: process already finished: %w", p, errdefs.ErrNotFound)
		}
		return fmt.Errorf("%s: signal %d: %w", p, sig, err)
	}
	return nil
}

func (p *process) resize(width, height uint32) error {
	if p.pty == nil {
		return fmt.Errorf("%s has no terminal: %w", p, errdefs.ErrFailedPrecondition)
	}
	if width > 0xffff || height > 0xffff {
		return fmt.Errorf("%s: terminal size %dx%d out of range: %w", p, width, height, errdefs.ErrInvalidArgument)
	}
	return p.pty.Resize(console.WinSize{Width: uint16(width), Height: uint16(height)})
}

func (p *process) output(stderr bool) (*stream.Output, error) {
	o, name := p.stdout, "stdout"
	if stderr {
		o, name = p.stderr, "stderr"
	}
	if o == nil {
		return nil, fmt.Errorf("%s has no %s stream: %w", p, name, errdefs.ErrNotFound)
	}
	return o, nil
}

func (p *process) input() (*stream.Input, error) {
	if p.stdin == nil {
		return nil, fmt.Errorf("%s has no stdin stream: %w", p, errdefs.ErrNotFound)
	}
	return p.stdin, nil
}

// release drops the process's streams: unread output is discarded, stdin is closed.
func (p *process) release() {
	for _, o := range []*stream.Output{p.stdout, p.stderr} {
		if o != nil {
			o.CloseWithEOF()
		}
	}
	if p.stdin != nil {
		_ = p.stdin.Close()
	}
	if p.pty != nil {
		_ = p.pty.Close()
	}
}
