package qmp

import (
	"context"
	"errors"
	"fmt"
	"slices"
)

// RunState is QEMU's run state (QAPI RunState).
type RunState string

// The run states of QEMU 7.2.
const (
	RunStateDebug         RunState = "debug"
	RunStateFinishMigrate RunState = "finish-migrate"
	RunStateGuestPanicked RunState = "guest-panicked"
	RunStateInMigrate     RunState = "inmigrate"
	RunStateInternalError RunState = "internal-error"
	RunStateIOError       RunState = "io-error"
	RunStatePaused        RunState = "paused"
	RunStatePostMigrate   RunState = "postmigrate"
	RunStatePrelaunch     RunState = "prelaunch"
	RunStateRestoreVM     RunState = "restore-vm"
	RunStateRunning       RunState = "running"
	RunStateSaveVM        RunState = "save-vm"
	RunStateShutdown      RunState = "shutdown"
	RunStateSuspended     RunState = "suspended"
	RunStateWatchdog      RunState = "watchdog"
	RunStateColo          RunState = "colo"
)

var runStates = []RunState{
	RunStateDebug, RunStateFinishMigrate, RunStateGuestPanicked, RunStateInMigrate,
	RunStateInternalError, RunStateIOError, RunStatePaused, RunStatePostMigrate,
	RunStatePrelaunch, RunStateRestoreVM, RunStateRunning, RunStateSaveVM,
	RunStateShutdown, RunStateSuspended, RunStateWatchdog, RunStateColo,
}

// Status is the reply to query-status.
type Status struct {
	Running bool     `json:"running"`
	State   RunState `json:"status"`
}

func (s *Status) validate() *ReplyError {
	if !slices.Contains(runStates, s.State) {
		return &ReplyError{Field: "status", Problem: fmt.Sprintf("unknown run state %q", s.State)}
	}
	return nil
}

// Status runs query-status.
func (m *Monitor) Status(ctx context.Context) (Status, error) {
	var s Status
	if err := m.run(ctx, "query-status", "", nil, &s); err != nil {
		return Status{}, err
	}
	return s, nil
}

// Stop pauses the vCPUs (stop).
func (m *Monitor) Stop(ctx context.Context) error { return m.Execute(ctx, "stop", nil, nil) }

// Cont resumes the vCPUs (cont), also starting a VM created with -S.
func (m *Monitor) Cont(ctx context.Context) error { return m.Execute(ctx, "cont", nil, nil) }

// SystemPowerdown presses the ACPI power button (system_powerdown). The guest
// decides whether and when to power off; watch for the SHUTDOWN event.
func (m *Monitor) SystemPowerdown(ctx context.Context) error {
	return m.Execute(ctx, "system_powerdown", nil, nil)
}

// Quit makes QEMU exit at once (quit). QEMU emits SHUTDOWN (reason
// "host-qmp-quit"), answers and closes the connection, so the monitor closes soon
// after Quit returns. QEMU closing the connection before its answer arrives counts
// as success: that is the outcome quit asks for.
func (m *Monitor) Quit(ctx context.Context) error {
	if err := m.run(ctx, "quit", "", nil, nil); err != nil && !errors.Is(err, errConnectionClosed) {
		return err
	}
	return nil
}
