package task

import (
	"fmt"
	"slices"

	tasktypes "github.com/containerd/containerd/api/types/task"
	"github.com/containerd/errdefs"
)

// state is where a process is in containerd's view of its life. Changes go through
// transition, which refuses any move the table does not list.
type state int

const (
	stateCreated state = iota // init: created in the guest, not started; exec: registered
	stateRunning
	statePaused // init only; the whole container is frozen
	stateStopped
	stateDeleted
)

func (s state) String() string {
	return [...]string{"created", "running", "paused", "stopped", "deleted"}[s]
}

// allowed moves. Stopped is reachable from everywhere alive: a process can die at any
// time (killed, OOM, the VM gone).
var transitions = map[state][]state{
	stateCreated: {stateRunning, stateStopped, stateDeleted},
	stateRunning: {statePaused, stateStopped},
	statePaused:  {stateRunning, stateStopped},
	stateStopped: {stateDeleted},
}

// next returns the state after moving from s to to, or a FailedPrecondition error that
// names the operation.
func (s state) next(to state, op string) (state, error) {
	if slices.Contains(transitions[s], to) {
		return to, nil
	}
	return s, fmt.Errorf("cannot %s a %s process: %w", op, s, errdefs.ErrFailedPrecondition)
}

func (s state) status() tasktypes.Status {
	switch s {
	case stateCreated:
		return tasktypes.Status_CREATED
	case stateRunning:
		return tasktypes.Status_RUNNING
	case statePaused:
		return tasktypes.Status_PAUSED
	case stateStopped, stateDeleted:
		return tasktypes.Status_STOPPED
	}
	return tasktypes.Status_UNKNOWN
}
