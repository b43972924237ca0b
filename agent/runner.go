package agent

import (
	"context"
	"fmt"

	runc "github.com/containerd/go-runc"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// runner controls a created container's processes: runc, or the agent's own for the
// containers it created itself (a pod's sandbox, sandboxinit.go, docs/design/020; app
// containers, appinit.go, docs/design/023).
// Each error says what failed; the caller names the container.
type runner interface {
	// start lets the created init run the process.
	start(ctx context.Context) error
	// killAll signals every process of the container.
	killAll(ctx context.Context, sig unix.Signal) error
	// delete releases what the runner holds once the processes are gone.
	delete(ctx context.Context) error
	// freeze stops (frozen) or thaws every process of the container.
	freeze(ctx context.Context, frozen bool) error
	// update sets the container's resource limits.
	update(ctx context.Context, res *specs.LinuxResources) error
}

// runcRunner is runc's container id in the agent's runc root.
type runcRunner struct {
	id   string
	runc *runc.Runc
}

func (r runcRunner) start(ctx context.Context) error {
	return r.wrap("start", r.runc.Start(ctx, r.id))
}

func (r runcRunner) killAll(ctx context.Context, sig unix.Signal) error {
	return r.wrap("kill --all", r.runc.Kill(ctx, r.id, int(sig), &runc.KillOpts{All: true}))
}

func (r runcRunner) delete(ctx context.Context) error {
	return r.wrap("delete", r.runc.Delete(ctx, r.id, &runc.DeleteOpts{Force: true}))
}

func (r runcRunner) freeze(ctx context.Context, frozen bool) error {
	if frozen {
		return r.wrap("pause", r.runc.Pause(ctx, r.id))
	}
	return r.wrap("resume", r.runc.Resume(ctx, r.id))
}

func (r runcRunner) update(ctx context.Context, res *specs.LinuxResources) error {
	return r.wrap("update", r.runc.Update(ctx, r.id, res))
}

func (r runcRunner) wrap(op string, err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("runc %s: %w", op, runcError(r.runc.Log, err))
}
