package qmp

import (
	"context"
	"fmt"
	"slices"
	"time"
)

// MigrationStatus is QAPI MigrationStatus.
type MigrationStatus string

// The migration statuses of QEMU 7.2.
const (
	MigrationNone            MigrationStatus = "none"
	MigrationSetup           MigrationStatus = "setup"
	MigrationCancelling      MigrationStatus = "cancelling"
	MigrationCancelled       MigrationStatus = "cancelled"
	MigrationActive          MigrationStatus = "active"
	MigrationPostcopyActive  MigrationStatus = "postcopy-active"
	MigrationPostcopyPaused  MigrationStatus = "postcopy-paused"
	MigrationPostcopyRecover MigrationStatus = "postcopy-recover"
	MigrationCompleted       MigrationStatus = "completed"
	MigrationFailed          MigrationStatus = "failed"
	MigrationColo            MigrationStatus = "colo"
	MigrationPreSwitchover   MigrationStatus = "pre-switchover"
	MigrationDevice          MigrationStatus = "device"
	MigrationWaitUnplug      MigrationStatus = "wait-unplug"
)

var migrationStatuses = []MigrationStatus{
	MigrationNone, MigrationSetup, MigrationCancelling, MigrationCancelled, MigrationActive,
	MigrationPostcopyActive, MigrationPostcopyPaused, MigrationPostcopyRecover,
	MigrationCompleted, MigrationFailed, MigrationColo, MigrationPreSwitchover,
	MigrationDevice, MigrationWaitUnplug,
}

// Finished reports whether s is a final status: completed, failed or cancelled.
func (s MigrationStatus) Finished() bool {
	return s == MigrationCompleted || s == MigrationFailed || s == MigrationCancelled
}

func (s MigrationStatus) validate(field string) *ReplyError {
	if !slices.Contains(migrationStatuses, s) {
		return &ReplyError{Field: field, Problem: fmt.Sprintf("unknown migration status %q", s)}
	}
	return nil
}

// MigrationCapability names a migration capability (QAPI MigrationCapability).
type MigrationCapability string

// Migration capabilities vmpod uses; any other QEMU capability name works too.
const (
	// MigrationCapEvents makes QEMU send MIGRATION events on status changes.
	MigrationCapEvents MigrationCapability = "events"
	// MigrationCapPauseBeforeSwitchover stops in pre-switchover until
	// migrate-continue, leaving room to hand over devices.
	MigrationCapPauseBeforeSwitchover MigrationCapability = "pause-before-switchover"
	MigrationCapAutoConverge          MigrationCapability = "auto-converge"
	MigrationCapPostcopyRAM           MigrationCapability = "postcopy-ram"
	MigrationCapMultifd               MigrationCapability = "multifd"
	// MigrationCapIgnoreShared leaves shared RAM (share=on backends) out of the stream:
	// the destination maps the same contents itself (QEMU 7.2 calls it experimental).
	MigrationCapIgnoreShared MigrationCapability = "x-ignore-shared"
)

// MigrationCapabilityState turns one capability on or off.
type MigrationCapabilityState struct {
	Capability MigrationCapability `json:"capability"`
	State      bool                `json:"state"`
}

// MigrateSetCapabilities sets migration capabilities (migrate-set-capabilities).
// Both sides of a migration need the same settings.
func (m *Monitor) MigrateSetCapabilities(ctx context.Context, caps ...MigrationCapabilityState) error {
	return m.Execute(ctx, "migrate-set-capabilities", struct {
		Capabilities []MigrationCapabilityState `json:"capabilities"`
	}{caps}, nil)
}

// MigrationParameters are the tunables vmpod sets (migrate-set-parameters). Zero
// fields are left unchanged.
//
// Raise MaxBandwidth and lower DowntimeLimit together: with only a higher
// bandwidth QEMU's estimate of the final copy fits the default 300 ms limit
// earlier, so it stops the guest with much more left to send (measured: 212 ms
// downtime instead of 4 ms for a guest dirtying memory).
type MigrationParameters struct {
	MaxBandwidth  uint64        // bytes per second; QEMU's default is 128 MiB/s
	DowntimeLimit time.Duration // longest acceptable stop; millisecond resolution
}

// MigrateSetParameters sets migration parameters (migrate-set-parameters).
func (m *Monitor) MigrateSetParameters(ctx context.Context, p MigrationParameters) error {
	var args struct {
		MaxBandwidth  uint64 `json:"max-bandwidth,omitempty"`
		DowntimeLimit int64  `json:"downtime-limit,omitempty"`
	}
	args.MaxBandwidth = p.MaxBandwidth
	if p.DowntimeLimit != 0 {
		if p.DowntimeLimit < time.Millisecond {
			return fmt.Errorf("qmp: migrate-set-parameters: DowntimeLimit %v is below QEMU's 1 ms resolution", p.DowntimeLimit)
		}
		args.DowntimeLimit = p.DowntimeLimit.Milliseconds()
	}
	return m.Execute(ctx, "migrate-set-parameters", args, nil)
}

// Migrate starts an outgoing migration to uri ("unix:/path", "tcp:host:port",
// "fd:name") and returns once it has started; follow it with QueryMigrate or
// MIGRATION events.
func (m *Monitor) Migrate(ctx context.Context, uri string) error {
	return m.run(ctx, "migrate", uri, uriArgs{uri}, nil)
}

// MigrateIncoming makes a QEMU started with "-incoming defer" listen on uri.
func (m *Monitor) MigrateIncoming(ctx context.Context, uri string) error {
	return m.run(ctx, "migrate-incoming", uri, uriArgs{uri}, nil)
}

type uriArgs struct {
	URI string `json:"uri"`
}

// MigrateCancel cancels the outgoing migration (migrate_cancel).
func (m *Monitor) MigrateCancel(ctx context.Context) error {
	return m.Execute(ctx, "migrate_cancel", nil, nil)
}

// MigrateStartPostcopy switches the outgoing migration, which must have the postcopy-ram
// capability at both ends, to post-copy: the guest stops here and runs on the target,
// which fetches the pages not yet sent as it faults on them.
func (m *Monitor) MigrateStartPostcopy(ctx context.Context) error {
	return m.Execute(ctx, "migrate-start-postcopy", nil, nil)
}

// MigrateContinue lets an outgoing migration that paused in state (pre-switchover, with
// the pause-before-switchover capability) go on: the guest is stopped, and its devices'
// state is sent next.
func (m *Monitor) MigrateContinue(ctx context.Context, state MigrationStatus) error {
	return m.Execute(ctx, "migrate-continue", map[string]any{"state": state}, nil)
}

// MigrationInfo is the reply to query-migrate. Status is MigrationNone when no
// migration has run.
type MigrationInfo struct {
	Status           MigrationStatus
	TotalTime        time.Duration // since the start; final once finished
	Downtime         time.Duration // how long the guest was stopped; set when completed
	ExpectedDowntime time.Duration // estimate while active
	SetupTime        time.Duration
	RAM              *MigrationRAM // nil before the RAM stage
	ErrorDesc        string        // why it failed
}

// Transferred is the RAM bytes sent so far (0 before the RAM stage).
func (i MigrationInfo) Transferred() uint64 {
	if i.RAM == nil {
		return 0
	}
	return i.RAM.Transferred
}

// Remaining is the RAM bytes left in this pass (0 before the RAM stage).
func (i MigrationInfo) Remaining() uint64 {
	if i.RAM == nil {
		return 0
	}
	return i.RAM.Remaining
}

// MigrationRAM is the RAM part of query-migrate.
type MigrationRAM struct {
	Transferred    uint64  `json:"transferred"` // bytes sent
	Remaining      uint64  `json:"remaining"`   // bytes left in this pass
	Total          uint64  `json:"total"`       // guest RAM
	Duplicate      uint64  `json:"duplicate"`   // zero pages sent as such
	DirtySyncCount uint64  `json:"dirty-sync-count"`
	DirtyPagesRate uint64  `json:"dirty-pages-rate"` // pages dirtied per second
	MbPS           float64 `json:"mbps"`             // throughput in Mbit/s
}

type migrationInfoReply struct {
	Status           MigrationStatus `json:"status,omitempty"`
	TotalTime        int64           `json:"total-time,omitempty"`
	Downtime         int64           `json:"downtime,omitempty"`
	ExpectedDowntime int64           `json:"expected-downtime,omitempty"`
	SetupTime        int64           `json:"setup-time,omitempty"`
	RAM              *MigrationRAM   `json:"ram,omitempty"`
	ErrorDesc        string          `json:"error-desc,omitempty"`
}

func (r *migrationInfoReply) validate() *ReplyError {
	if r.Status == "" {
		r.Status = MigrationNone
	}
	return r.Status.validate("status")
}

// QueryMigrate reports the state of the last migration (query-migrate).
func (m *Monitor) QueryMigrate(ctx context.Context) (MigrationInfo, error) {
	var r migrationInfoReply
	if err := m.run(ctx, "query-migrate", "", nil, &r); err != nil {
		return MigrationInfo{}, err
	}
	return MigrationInfo{
		Status:           r.Status,
		TotalTime:        time.Duration(r.TotalTime) * time.Millisecond,
		Downtime:         time.Duration(r.Downtime) * time.Millisecond,
		ExpectedDowntime: time.Duration(r.ExpectedDowntime) * time.Millisecond,
		SetupTime:        time.Duration(r.SetupTime) * time.Millisecond,
		RAM:              r.RAM,
		ErrorDesc:        r.ErrorDesc,
	}, nil
}
