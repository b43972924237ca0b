package vmm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/qmp"
)

// Live migration of a machine (issue 12, docs/design/207): the target is a second Machine
// started from the same Config (its own StateDir, taps and files) with Incoming set; it
// listens (AcceptMigration), the source sends its state there (Migrate) and the target's
// guest goes on where the source's stopped. The stream's transport is the caller's: each
// QEMU is handed its end as a descriptor (a socket pair on one host, a connection the
// shims made between nodes), since a QEMU running as a user of its own can neither bind
// nor reach a socket path on the host (docs/design/014).

// MigrationOptions tune one migration. Both sides take the capabilities, the source the
// rest. Zero values keep QEMU's defaults.
type MigrationOptions struct {
	// MaxBandwidth caps the stream, in bytes per second (QEMU's default: 128 MiB/s).
	MaxBandwidth uint64
	// DowntimeLimit is the longest the guest may be stopped for the final copy (QEMU's
	// default: 300 ms). Lower it with a higher bandwidth (qmp.MigrationParameters).
	DowntimeLimit time.Duration
	// AutoConverge throttles the guest's vCPUs when its memory is dirtied faster than the
	// stream sends it.
	AutoConverge bool
	// CompletionTimeout cancels the migration when it has not completed in this long.
	CompletionTimeout time.Duration
	// ProgressTimeout cancels it when the bytes left have not dropped for this long.
	ProgressTimeout time.Duration
	// PostCopy, at both ends, switches a migration that hits CompletionTimeout or
	// ProgressTimeout to post-copy instead of cancelling it (KubeVirt's allowPostCopy):
	// the guest stops here and runs on the target, which fetches each page not yet sent
	// when the guest touches it. It then completes however fast the guest dirties memory,
	// but can no longer be cancelled, and a stream that breaks from then on leaves the
	// guest split between the two machines (both paused): docs/design/209.
	PostCopy bool
	// IgnoreShared leaves shared RAM out of the stream (a template's, SavedTemplate).
	IgnoreShared bool
	// Progress, if set, receives each poll's state (every 100 ms).
	Progress func(qmp.MigrationInfo)
	// BeforeSwitchover, if set, runs at the source once its guest is stopped for the
	// final copy and before the devices' state is sent: what must match at the target
	// when that state arrives (a container's rootfs, whose open files virtiofsd's state
	// names by path: docs/design/211) is brought over then. Its time is the guest's
	// downtime. An error cancels the migration, and the guest runs on here — except,
	// under TCG, a guest with virtio-fs on QEMU 10, whose processes crashed after such a
	// resume: the dirty log synced from virtiofsd leaves stale translations (design 211).
	BeforeSwitchover func(context.Context) error
}

// migrationPoll is how often a migration's state is read while it runs.
const migrationPoll = 100 * time.Millisecond

// capabilities are the migration capabilities both sides set.
func (o MigrationOptions) capabilities() []qmp.MigrationCapabilityState {
	return []qmp.MigrationCapabilityState{
		{Capability: qmp.MigrationCapEvents, State: true},
		{Capability: qmp.MigrationCapAutoConverge, State: o.AutoConverge},
		{Capability: qmp.MigrationCapIgnoreShared, State: o.IgnoreShared},
		{Capability: qmp.MigrationCapPostcopyRAM, State: o.PostCopy},
	}
}

// outgoingCapabilities are a source's: capabilities, and a migration that may switch to
// post-copy, or has something to do before the switchover (BeforeSwitchover), stops
// there, its guest paused and its devices' state not sent yet, until migrate-continue.
// QEMU 7.2 accepts a cancel in any state, and one that lands once the switch has begun
// loses the guest (the target runs it from a stream that ends; the source stays stopped,
// or runs it too if told to): Migrate decides at that pause, between its polls, whether
// the switch happens.
func (o MigrationOptions) outgoingCapabilities() []qmp.MigrationCapabilityState {
	return append(o.capabilities(), qmp.MigrationCapabilityState{Capability: qmp.MigrationCapPauseBeforeSwitchover, State: o.PostCopy || o.BeforeSwitchover != nil})
}

// unprivilegedUserfaultfd is the sysctl that lets a process without CAP_SYS_PTRACE create
// a userfaultfd, which a post-copy target's QEMU 7.2 needs (it predates /dev/userfaultfd).
const unprivilegedUserfaultfd = "/proc/sys/vm/unprivileged_userfaultfd"

// CanPostCopy says why this machine cannot receive a migration switched to post-copy, or
// nil: a caller asks before it tells a source to connect.
func (m *Machine) CanPostCopy() error {
	if m.cfg.Users == nil {
		return nil // QEMU runs as root
	}
	b, err := os.ReadFile(unprivilegedUserfaultfd)
	if errors.Is(err, os.ErrNotExist) {
		return nil // a kernel before 5.2: any process may create a userfaultfd
	}
	if err != nil {
		return fmt.Errorf("vm %s: post-copy: %w", m.cfg.Name, err)
	}
	if strings.TrimSpace(string(b)) != "1" {
		return fmt.Errorf("vm %s: post-copy needs the target's QEMU, which runs as a user of its own, to handle its page faults (userfaultfd): the node allows that only with vm.unprivileged_userfaultfd = 1 (it is %s): %w",
			m.cfg.Name, strings.TrimSpace(string(b)), errdefs.ErrFailedPrecondition)
	}
	return nil
}

// ErrMigrationCancelled is returned by Migrate when the migration was cancelled (by the
// caller's context or a timeout); the source machine runs on.
var ErrMigrationCancelled = errors.New("migration cancelled")

// ErrPostCopyBroken is returned by Migrate when the stream of a migration switched to
// post-copy broke: neither machine has the whole guest.
var ErrPostCopyBroken = errors.New("post-copy migration interrupted")

// ErrPostCopyUnconfirmed is returned by Migrate when a migration switched to post-copy has
// sent every page and QEMU has not completed it for postCopyUnconfirmedAfter: the target
// may have the whole guest and run it; the source has nothing left to send and must not
// run it again. Nothing is cancelled.
var ErrPostCopyUnconfirmed = errors.New("post-copy migration unconfirmed")

// CanMigrate says why this machine's state cannot move, or nil: what Migrate would
// refuse it for before it starts, for a caller that must refuse before anything else.
func (m *Machine) CanMigrate() error { return m.canMigrate() }

// canMigrate says why this machine's state cannot move, or nil.
func (m *Machine) canMigrate() error {
	if m.cfg.runsVirtiofsd() {
		// virtiofsd's state (the files the guest has open) moves in QEMU's stream from
		// QEMU 8.2 on (vhost-user's device state transfer), if virtiofsd can give it;
		// QEMU 7.2's vhost-user-fs device blocks migration (measured: "State blocked by
		// non-migratable device '0000:00:01.0/vhost-user-fs'").
		if !m.version.atLeast(8, 2) {
			return fmt.Errorf("vm %s: a machine with virtio-fs (vhost-user-fs) cannot be migrated by QEMU %s (from 8.2 on it can): %w", m.cfg.Name, m.version, errdefs.ErrNotImplemented)
		}
		if ok, err := virtiofsdMigrates(m.cfg.VirtiofsdPath); err != nil {
			return fmt.Errorf("vm %s: a machine with virtio-fs cannot be migrated: its virtiofsd: %w", m.cfg.Name, err)
		} else if !ok {
			return fmt.Errorf("vm %s: a machine with virtio-fs cannot be migrated: virtiofsd %s cannot hand over its state (no --migration-mode): %w", m.cfg.Name, m.cfg.VirtiofsdPath, errdefs.ErrNotImplemented)
		}
	}
	if len(m.cfg.HostDevices) > 0 {
		return fmt.Errorf("vm %s: a machine with passed-through PCI devices %v cannot be migrated (VFIO devices carry no migratable state here): %w", m.cfg.Name, m.cfg.HostDevices, errdefs.ErrFailedPrecondition)
	}
	return nil
}

// migrationEvents wakes its reader on each of QEMU's MIGRATION events (the events
// capability is on at both ends), so that a migration's end is seen when it happens rather
// than at the next poll: measured, the polls alone added up to 200 ms to the downtime a
// guest sees, between the source's completion and the target's start. The polls stay, for
// what has no event (progress) and in case one is missed.
func (m *Machine) migrationEvents(ctx context.Context) (wake <-chan struct{}, stop func()) {
	sub := m.mon.Subscribe(qmp.EventNamed(qmp.EventMigration))
	ch := make(chan struct{}, 1)
	ctx, cancel := context.WithCancel(ctx)
	go func() {
		for {
			if _, err := sub.Next(ctx); err != nil {
				return
			}
			select {
			case ch <- struct{}{}:
			default:
			}
		}
	}()
	return ch, func() { cancel(); sub.Close() }
}

// migrationFD is the name under which a migration's stream is handed to QEMU (getfd).
const migrationFD = "migration"

// handStream passes stream to QEMU for a migration and returns the URI that names it.
func (m *Machine) handStream(ctx context.Context, stream *os.File) (string, error) {
	if stream == nil {
		return "", fmt.Errorf("no migration stream: %w", errdefs.ErrInvalidArgument)
	}
	if err := m.mon.GetFD(ctx, migrationFD, stream); err != nil {
		return "", err
	}
	return "fd:" + migrationFD, nil
}

// dropStream closes the stream handStream passed if the command that was to take it failed
// before it did; once taken QEMU has no such name any more, which is no error.
func (m *Machine) dropStream(ctx context.Context) {
	if err := m.mon.CloseFD(context.WithoutCancel(ctx), migrationFD); err != nil {
		log.G(ctx).WithError(err).Debugf("vm %s: closefd %s", m.cfg.Name, migrationFD)
	}
}

// AcceptMigration makes a machine started with Config.Incoming read its state from
// stream, a connection to the source (QEMU keeps its own copy; the caller may close
// its). It returns once QEMU reads; AwaitIncoming follows the migration.
func (m *Machine) AcceptMigration(ctx context.Context, stream *os.File, opts MigrationOptions) error {
	if !m.cfg.Incoming {
		return fmt.Errorf("vm %s: accept a migration: the machine was not started to receive one (Config.Incoming): %w", m.cfg.Name, errdefs.ErrFailedPrecondition)
	}
	if err := m.canMigrate(); err != nil {
		return err
	}
	if opts.PostCopy {
		if err := m.CanPostCopy(); err != nil {
			return err
		}
	}
	if err := m.accept(ctx, stream, opts); err != nil {
		return fmt.Errorf("vm %s: %w", m.cfg.Name, err)
	}
	return nil
}

// accept makes QEMU read its incoming migration from stream.
func (m *Machine) accept(ctx context.Context, stream *os.File, opts MigrationOptions) error {
	if err := m.mon.MigrateSetCapabilities(ctx, opts.capabilities()...); err != nil {
		return fmt.Errorf("accept a migration: %w", err)
	}
	uri, err := m.handStream(ctx, stream)
	if err != nil {
		return fmt.Errorf("accept a migration: %w", err)
	}
	if err := m.mon.MigrateIncoming(ctx, uri); err != nil {
		m.dropStream(ctx)
		return fmt.Errorf("accept a migration: %w", err)
	}
	log.G(ctx).Infof("vm %s: waiting for a migration", m.cfg.Name)
	return nil
}

// AwaitIncoming waits until the migration AcceptMigration listens for has completed and
// the guest is here (from then on the machine may Migrate it on), in the run state it had on the source, except that a machine
// started Paused (QEMU's -S) keeps its vCPUs stopped until Resume. A failed incoming
// migration ends the target's QEMU. A migration the source switched to post-copy returns
// as soon as the guest's devices are here and it can run (info.Status postcopy-active),
// its memory still arriving: AwaitPostCopy then waits for the rest.
func (m *Machine) AwaitIncoming(ctx context.Context) (qmp.MigrationInfo, error) {
	info, err := m.awaitIncoming(ctx, false)
	if err != nil {
		return info, fmt.Errorf("vm %s: %w", m.cfg.Name, err)
	}
	return info, nil
}

// AwaitPostCopy waits until an incoming migration AwaitIncoming left post-copy active has
// brought the guest's last page; a broken stream is ErrPostCopyBroken.
func (m *Machine) AwaitPostCopy(ctx context.Context) (qmp.MigrationInfo, error) {
	info, err := m.awaitIncoming(ctx, true)
	if err != nil {
		return info, fmt.Errorf("vm %s: post-copy: %w", m.cfg.Name, err)
	}
	return info, nil
}

// awaitIncoming is AwaitIncoming (AwaitPostCopy with whole) with errors that do not name
// the machine.
func (m *Machine) awaitIncoming(ctx context.Context, whole bool) (qmp.MigrationInfo, error) {
	tick := time.NewTicker(migrationPoll)
	defer tick.Stop()
	changed, stop := m.migrationEvents(ctx)
	defer stop()
	queryErrors := 0
	for {
		info, err := m.queryMigrate(ctx, whole)
		if err != nil {
			// after a broken post-copy a vCPU can wait for a page while it holds QEMU's big
			// lock (seen under TCG): the monitor never answers again
			queryErrors++
			log.G(ctx).WithError(err).Warnf("vm %s: query-migrate of the incoming migration (%d in a row)", m.cfg.Name, queryErrors)
			if queryErrors >= maxQueryErrors {
				if whole {
					return info, fmt.Errorf("QEMU stopped answering (%d times in a row): %w: %w", queryErrors, ErrPostCopyBroken, err)
				}
				return info, fmt.Errorf("incoming migration: QEMU stopped answering (%d times in a row): %w", queryErrors, err)
			}
		} else {
			queryErrors = 0
			switch info.Status {
			case qmp.MigrationCompleted:
				// the guest takes the source's run state (running, or paused if it was)
				st, err := m.mon.Status(ctx)
				if err != nil {
					return info, fmt.Errorf("after the incoming migration: %w", err)
				}
				if st.State != qmp.RunStateInMigrate {
					m.arrived.Store(true)
					return info, nil
				}
			case qmp.MigrationPostcopyActive:
				// the source has stopped the guest and sent its devices: once QEMU has
				// loaded them (it leaves inmigrate) the guest can run here
				if whole {
					break
				}
				st, err := m.mon.Status(ctx)
				if err != nil {
					return info, fmt.Errorf("during the post-copy migration: %w", err)
				}
				if st.State != qmp.RunStateInMigrate {
					return info, nil
				}
			case qmp.MigrationFailed:
				if whole {
					return info, fmt.Errorf("incoming migration failed after the switch to post-copy: %w: %s", ErrPostCopyBroken, info.ErrorDesc)
				}
				return info, fmt.Errorf("incoming migration failed: %s", info.ErrorDesc)
			case qmp.MigrationPostcopyPaused:
				return info, fmt.Errorf("incoming migration: the post-copy stream broke: %w", ErrPostCopyBroken)
			}
		}
		select {
		case <-m.exited:
			return info, fmt.Errorf("incoming migration: %w", m.Explain(errors.New("QEMU exited")))
		case <-ctx.Done():
			return info, fmt.Errorf("incoming migration: %w", ctx.Err())
		case <-tick.C:
		case <-changed:
		}
	}
}

// Migrate sends the running machine's state over stream, a connection to the target
// (QEMU keeps its own copy; the caller may close its), and
// returns QEMU's final account of it. On success the guest runs on the target and this
// machine is stopped for good (QEMU's postmigrate state): the caller quits it. When the
// migration fails or is cancelled (ctx, CompletionTimeout, ProgressTimeout) the guest
// runs on here as before, and a cancellation's error is ErrMigrationCancelled; a
// migration that completes before its cancel takes effect is a success. With
// opts.PostCopy a timeout switches the migration to post-copy instead, after which it is
// not cancelled and a broken stream is ErrPostCopyBroken. Migrate returns
// only once QEMU has finished the migration one way or the other, or has exited, or
// cannot be asked any more (maxQueryErrors in a row, after a last cancel): then the
// outcome is unknown and the error says so.
func (m *Machine) Migrate(ctx context.Context, stream *os.File, opts MigrationOptions) (qmp.MigrationInfo, error) {
	if err := m.canMigrate(); err != nil {
		return qmp.MigrationInfo{}, err
	}
	if m.cfg.Incoming && !m.arrived.Load() {
		// a target that never received a guest has nothing to send (once it has, QEMU's
		// account is its last outgoing migration's: a cancelled one says cancelled)
		return qmp.MigrationInfo{}, fmt.Errorf("vm %s: migrate: the machine is still waiting for its own incoming migration: %w", m.cfg.Name, errdefs.ErrFailedPrecondition)
	}
	fail := func(err error) (qmp.MigrationInfo, error) {
		return qmp.MigrationInfo{}, fmt.Errorf("vm %s: migrate: %w", m.cfg.Name, err)
	}
	if err := m.mon.MigrateSetCapabilities(ctx, opts.outgoingCapabilities()...); err != nil {
		return fail(err)
	}
	if opts.MaxBandwidth != 0 || opts.DowntimeLimit != 0 {
		if err := m.mon.MigrateSetParameters(ctx, qmp.MigrationParameters{MaxBandwidth: opts.MaxBandwidth, DowntimeLimit: opts.DowntimeLimit}); err != nil {
			return fail(err)
		}
	}
	uri, err := m.handStream(ctx, stream)
	if err != nil {
		return fail(err)
	}
	changed, stop := m.migrationEvents(ctx)
	defer stop()
	start := time.Now()
	if err := m.mon.Migrate(ctx, uri); err != nil {
		m.dropStream(ctx)
		return fail(err)
	}
	log.G(ctx).Infof("vm %s: migrating", m.cfg.Name)

	var (
		lowest     uint64
		seen       bool // lowest holds a reading
		lastGain   = time.Now()
		cancelling error
		postCopy   error     // why QEMU was asked to switch to post-copy (it agreed)
		postCopyAt time.Time // when
		switched   bool      // QEMU has said it runs the migration as post-copy
		// QEMU was let go on from its pause before the switchover once post-copy was asked:
		// the pause may have been the switch (or the pre-copy's end: QEMU does not say), so
		// the guest may run on the target from here, and nothing is cancelled
		committed   bool
		continued   bool      // migrate-continue was sent for the pause before the switchover
		continuedAt time.Time // when
		queryErrors int
		lateTimes   int // polls of a completed migration whose times were not set yet
		// the last time a migration past the switch to post-copy said how it went: it has
		// no timeout, so a long one is logged rather than waited on in silence
		postCopyLogged time.Time
		// since when a post-copy has had every page sent and sent nothing more: QEMU
		// completes once the target says it has them all (its return path's last message)
		allSentAt   time.Time
		allSentSize uint64
		// lostAtPause: under TCG a guest with virtio-fs runs stale translations once
		// resumed after its migration's pause before the switchover (docs/design/211):
		// from that pause on, what would resume it here (a cancel, a failure) ends it
		// instead, and a caller's cancel no longer stops the switchover
		lostAtPause = m.plan.accel.accel == machine.TCG && m.cfg.runsVirtiofsd()
		paused      bool // lostAtPause, and the pause was reached
	)
	var cancel func(why error)
	// giveUp cancels the migration, or switches it to post-copy when the options allow:
	// either ends a migration that does not converge
	giveUp := func(why error) {
		if !opts.PostCopy {
			cancel(why)
			return
		}
		log.G(ctx).WithError(why).Warnf("vm %s: switching the migration to post-copy", m.cfg.Name)
		if err := m.mon.MigrateStartPostcopy(context.WithoutCancel(ctx)); err != nil {
			cancel(fmt.Errorf("%w; post-copy refused: %w", why, err))
			return
		}
		postCopy, postCopyAt = why, time.Now()
	}
	cancel = func(why error) {
		cancelling = why
		log.G(ctx).WithError(why).Warnf("vm %s: cancelling the migration", m.cfg.Name)
		// A refused cancel is not the end: the next polls see where QEMU went.
		if err := m.mon.MigrateCancel(context.WithoutCancel(ctx)); err != nil {
			log.G(ctx).WithError(err).Warnf("vm %s: migrate_cancel", m.cfg.Name)
		}
	}
	tick := time.NewTicker(migrationPoll)
	defer tick.Stop()
	var again <-chan time.Time // a quick second look, for times QEMU has yet to set
	// Reads of the migration's state outlive a cancelled ctx: a cancel must be seen through.
	qctx := context.WithoutCancel(ctx)
	for {
		info, err := m.queryMigrate(qctx, switched || committed)
		switch {
		case err != nil:
			select {
			case <-m.exited:
				return info, fmt.Errorf("vm %s: migrate: %w", m.cfg.Name, m.Explain(errors.New("QEMU exited")))
			default:
			}
			// QEMU holds its big lock through long dirty-bitmap syncs (TCG): a slow monitor
			// is no reason to give up on a migration that goes on without us
			queryErrors++
			log.G(ctx).WithError(err).Warnf("vm %s: query-migrate (%d in a row)", m.cfg.Name, queryErrors)
			if queryErrors >= maxQueryErrors {
				if paused {
					// a cancel would resume the guest here; the target may have it already
					return info, m.lose(ctx, fmt.Errorf("QEMU stopped answering after the pause before the switchover (%d times in a row): %w", queryErrors, err))
				}
				if postCopy != nil {
					// a cancel could break a post-copy QEMU may be carrying out: none is sent,
					// and the guest, partly on the target by now, is given up for lost
					return info, fmt.Errorf("vm %s: migrate: outcome unknown (QEMU stopped answering after the switch to post-copy was asked): %w: %w", m.cfg.Name, ErrPostCopyBroken, err)
				}
				if cancelling == nil {
					cancel(fmt.Errorf("QEMU did not report the migration's state %d times in a row: %w", queryErrors, err))
				}
				// neither success nor a cancel can be promised: the caller must look at both
				// machines before ending either
				return info, fmt.Errorf("vm %s: migrate: outcome unknown (QEMU stopped answering; a cancel was asked): %w", m.cfg.Name, err)
			}
		default:
			queryErrors = 0
			if opts.Progress != nil {
				opts.Progress(info)
			}
			if info.Status == qmp.MigrationCompleted && info.RAM == nil {
				// A machine that arrived by migration reports that incoming migration as
				// completed (QEMU fills query-migrate from both sides) until its outgoing
				// one has a state of its own: measured, a hop "done" at once. An outgoing
				// migration that completed has its RAM figures.
				info.Status = qmp.MigrationSetup
			}
			if info.Status == qmp.MigrationCompleted && info.TotalTime == 0 && lateTimes < maxLateTimes {
				// QEMU marks the migration completed a moment before it computes its total
				// time and downtime (measured: both 0 in one poll): read them once they are
				lateTimes++
				again = time.After(lateTimesPoll)
				break
			}
			switch info.Status {
			case qmp.MigrationCompleted:
				how := ""
				if postCopy != nil {
					how = fmt.Sprintf(", post-copy since %v", postCopy)
				}
				log.G(ctx).Infof("vm %s: migrated in %v (downtime %v, %d MiB sent%s)", m.cfg.Name, info.TotalTime, info.Downtime, info.Transferred()>>20, how)
				return info, nil
			case qmp.MigrationFailed:
				if paused {
					return info, m.lose(ctx, fmt.Errorf("failed after the pause before the switchover: %s", info.ErrorDesc))
				}
				if switched || committed && !m.restartedHere(qctx) {
					// (QEMU restarts the guest after a failed pre-copy's end, not after a
					// switch that began)
					return info, fmt.Errorf("vm %s: migrate: failed after the switch to post-copy (%v): %w: %s", m.cfg.Name, postCopy, ErrPostCopyBroken, info.ErrorDesc)
				}
				if err := m.resumeAfterPause(qctx, opts); err != nil {
					return info, fmt.Errorf("vm %s: migrate: failed: %s; %w", m.cfg.Name, info.ErrorDesc, err)
				}
				if cancelling != nil {
					return info, fmt.Errorf("vm %s: migrate: %w (%w): failed: %s", m.cfg.Name, ErrMigrationCancelled, cancelling, info.ErrorDesc)
				}
				if postCopy != nil {
					return info, fmt.Errorf("vm %s: migrate: failed before the switch to post-copy; the guest runs on here: %s", m.cfg.Name, info.ErrorDesc)
				}
				return info, fmt.Errorf("vm %s: migrate: failed: %s", m.cfg.Name, info.ErrorDesc)
			case qmp.MigrationCancelled:
				if cancelling == nil {
					cancelling = errors.New("cancelled in QEMU")
				}
				if paused {
					return info, m.lose(ctx, fmt.Errorf("%w after the pause before the switchover (%w)", ErrMigrationCancelled, cancelling))
				}
				if switched || committed {
					// not by vmpod: resuming the guest here could run it in two places
					return info, fmt.Errorf("vm %s: migrate: %w after the switch to post-copy (%w): %w", m.cfg.Name, ErrMigrationCancelled, cancelling, ErrPostCopyBroken)
				}
				if err := m.resumeAfterPause(qctx, opts); err != nil {
					return info, fmt.Errorf("vm %s: migrate: %w: %w; %w", m.cfg.Name, ErrMigrationCancelled, cancelling, err)
				}
				return info, fmt.Errorf("vm %s: migrate: %w: %w", m.cfg.Name, ErrMigrationCancelled, cancelling)
			}
			if cancelling == nil {
				if rem := info.Remaining(); info.RAM != nil && (!seen || rem < lowest) {
					lowest, seen, lastGain = rem, true, time.Now()
				}
				switch info.Status {
				case qmp.MigrationPostcopyActive, qmp.MigrationPostcopyPaused, qmp.MigrationPostcopyRecover:
					switched = true
				}
				switch {
				case info.Status == qmp.MigrationPreSwitchover && continued:
					// QEMU has yet to leave the pause it was let out of. A continue whose reply
					// was lost is sent again if the pause lasts (one whose pause is over is
					// refused, harmlessly)
					if time.Since(continuedAt) >= continueAgain {
						if err := m.mon.MigrateContinue(qctx, qmp.MigrationPreSwitchover); err != nil {
							log.G(ctx).WithError(err).Infof("vm %s: migrate-continue again", m.cfg.Name)
						}
						continuedAt = time.Now()
					}
				case switched || committed:
					// the guest's memory is partly on the target (or may be): there is nothing
					// to cancel back to, and the caller's cancel waits for the end like
					// everyone else
					if sent := info.Transferred(); info.RAM == nil || info.Remaining() > 0 || sent != allSentSize {
						allSentAt, allSentSize = time.Time{}, sent
					} else if allSentAt.IsZero() {
						allSentAt = time.Now()
					} else if time.Since(allSentAt) >= postCopyUnconfirmedAfter {
						// not cancelled: the target may run the guest
						return info, fmt.Errorf("vm %s: migrate: %w: every page was sent %v ago and QEMU is still %s (%d MiB sent)",
							m.cfg.Name, ErrPostCopyUnconfirmed, time.Since(allSentAt).Round(time.Second), info.Status, sent>>20)
					}
					if postCopyLogged.IsZero() {
						postCopyLogged = time.Now()
					} else if time.Since(postCopyLogged) >= postCopyLogEvery {
						postCopyLogged = time.Now()
						log.G(ctx).Warnf("vm %s: the migration is %s %v after the switch to post-copy was asked (%d MiB sent, %d MiB left): QEMU ends it once the target has every page and has said so",
							m.cfg.Name, info.Status, time.Since(postCopyAt).Round(time.Second), info.Transferred()>>20, info.Remaining()>>20)
					}
				case info.Status == qmp.MigrationPreSwitchover && ctx.Err() != nil && !lostAtPause:
					cancel(ctx.Err()) // nothing of the guest has run there: it stays here
				case info.Status == qmp.MigrationPreSwitchover:
					// the guest is stopped: go on at once, once what must match at the
					// target does
					bctx := ctx
					if lostAtPause {
						paused = true
						if ctx.Err() != nil {
							log.G(ctx).Warnf("vm %s: a cancel at the pause before the switchover would leave this guest unable to run (TCG, virtio-fs): the migration goes on", m.cfg.Name)
							bctx = context.WithoutCancel(ctx)
						}
					}
					if opts.BeforeSwitchover != nil {
						if err := opts.BeforeSwitchover(bctx); err != nil {
							if paused {
								return info, m.lose(ctx, fmt.Errorf("before the switchover: %w", err))
							}
							cancel(fmt.Errorf("before the switchover: %w", err))
							break
						}
					}
					err := m.mon.MigrateContinue(qctx, qmp.MigrationPreSwitchover)
					var refused *qmp.CommandError
					if errors.As(err, &refused) {
						if paused {
							return info, m.lose(ctx, fmt.Errorf("migrate-continue: %w", err))
						}
						cancel(fmt.Errorf("migrate-continue: %w", err)) // not done: still paused
						break
					}
					if err != nil {
						// maybe done, maybe not: taken as done, and asked again if the pause lasts
						log.G(ctx).WithError(err).Warnf("vm %s: migrate-continue", m.cfg.Name)
					}
					continued, continuedAt, committed = true, time.Now(), postCopy != nil || paused
				case ctx.Err() != nil:
					cancel(ctx.Err())
				case postCopy != nil:
					// asked, not yet switched (QEMU switches between two passes over the
					// RAM): a stream that stalls keeps it from ever doing so
					if time.Since(postCopyAt) > postCopySwitchWait {
						cancel(fmt.Errorf("%v, and QEMU has not switched to post-copy %v after it was asked", postCopy, postCopySwitchWait))
					}
				case opts.CompletionTimeout > 0 && time.Since(start) > opts.CompletionTimeout:
					giveUp(fmt.Errorf("not completed within %v", opts.CompletionTimeout))
				case opts.ProgressTimeout > 0 && time.Since(lastGain) > opts.ProgressTimeout:
					giveUp(fmt.Errorf("no progress for %v (%d MiB left)", opts.ProgressTimeout, lowest>>20))
				}
			}
			if info.Status == qmp.MigrationPostcopyPaused {
				// the stream broke after the switch: the guest's memory is split between the
				// machines, both paused; QEMU can resume it over a new stream
				// (migrate-recover), which vmpod does not do
				return info, fmt.Errorf("vm %s: migrate: the post-copy stream broke: the guest is paused, its memory split between source and target: %w", m.cfg.Name, ErrPostCopyBroken)
			}
		}
		select {
		case <-m.exited:
			return info, fmt.Errorf("vm %s: migrate: %w", m.cfg.Name, m.Explain(errors.New("QEMU exited")))
		case <-tick.C:
		case <-changed:
		case <-again:
		}
	}
}

// postCopyQueryTimeout bounds one query-migrate once post-copy is under way, in place of
// the monitor's default: a post-copy has no dirty-bitmap syncs to hold QEMU's big lock for
// long, and a monitor that stops answering then (a vCPU waiting for a page that will not
// come while it holds that lock) must be given up on in under a minute.
const postCopyQueryTimeout = 10 * time.Second

// queryMigrate reads QEMU's account of the migration, bounded by postCopyQueryTimeout in
// post-copy and by the monitor's default otherwise.
func (m *Machine) queryMigrate(ctx context.Context, postCopy bool) (qmp.MigrationInfo, error) {
	if postCopy {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, postCopyQueryTimeout)
		defer cancel()
	}
	return m.mon.QueryMigrate(ctx)
}

// continueAgain is how long a pause before the switchover may outlast the migrate-continue
// that ended it before the continue is sent again (its reply may have been lost, and a
// continue whose pause is over is refused harmlessly).
const continueAgain = 5 * time.Second

// restartedWait bounds restartedHere's wait for QEMU to leave finish-migrate.
const restartedWait = 5 * time.Second

// restartedHere says whether QEMU runs the guest here again after a failed migration that
// was let go on from its pause before the switchover: it does after a failed pre-copy's
// end, not after a switch to post-copy that began (the guest may run on the target).
func (m *Machine) restartedHere(ctx context.Context) bool {
	for deadline := time.Now().Add(restartedWait); ; {
		st, err := m.mon.Status(ctx)
		switch {
		case err != nil:
			return false
		case st.State == qmp.RunStateRunning:
			return true
		case st.State != qmp.RunStateFinishMigrate || time.Now().After(deadline):
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// resumeAfterPause runs the guest here again after a migration that may switch to
// post-copy (and so pauses before its switchover) ended without the switch: QEMU 7.2
// restarts a guest it stopped for the pre-copy's end, but not one it stopped for the
// switch to post-copy (a cancel or failure at that pause, or as the switch began, before
// anything of the device state was sent).
func (m *Machine) resumeAfterPause(ctx context.Context, opts MigrationOptions) error {
	if !opts.PostCopy {
		return nil
	}
	st, err := m.mon.Status(ctx)
	if err != nil {
		return fmt.Errorf("the guest's state here after the migration: %w", err)
	}
	if st.State != qmp.RunStatePostMigrate && st.State != qmp.RunStateFinishMigrate {
		return nil
	}
	if err := m.mon.Cont(ctx); err != nil {
		return fmt.Errorf("resume the guest here (%s): %w", st.State, err)
	}
	log.G(ctx).Infof("vm %s: the guest runs on here (stopped for a switch to post-copy that did not happen)", m.cfg.Name)
	return nil
}

// ErrGuestLost is returned by Migrate when it ended the source's guest instead of
// resuming it: under TCG, a guest with virtio-fs that reached its migration's pause before
// the switchover runs stale translations of the pages virtiofsd wrote meanwhile once it
// is resumed (docs/design/211: its processes die of SIGSEGV one after the other), so a
// migration that fails or is cancelled from that pause on ends it. On KVM it resumes.
var ErrGuestLost = errors.New("the guest was ended, not resumed")

// lose ends the machine's QEMU after a migration that cannot resume its guest (why), and
// says so.
func (m *Machine) lose(ctx context.Context, why error) error {
	log.G(ctx).WithError(why).Errorf("vm %s: the migration ended at its switchover; ending the guest rather than resuming it with stale translations (TCG, virtio-fs)", m.cfg.Name)
	m.KillProcess()
	return fmt.Errorf("vm %s: migrate: %w: %w", m.cfg.Name, why, ErrGuestLost)
}

// postCopyUnconfirmedAfter bounds a post-copy that sent every page and still does not
// complete: its source's QEMU waits for the target's last return-path message, which a
// target that closed the stream too early never sends (design 209: one stayed
// postcopy-active for 7 minutes). A variable for the tests.
var postCopyUnconfirmedAfter = time.Minute

// postCopyLogEvery spaces the log lines of a migration still under way after its switch to
// post-copy (design 209: a target that closed the stream too early once left a source in
// postcopy-active for good, without a word).
const postCopyLogEvery = 30 * time.Second

// postCopySwitchWait bounds the wait for QEMU to switch a migration to post-copy once
// asked; it is cancelled past it, as it would have been without post-copy.
const postCopySwitchWait = 30 * time.Second

// maxQueryErrors is how many query-migrate failures in a row Migrate rides out (each
// bounded by the monitor's own timeout).
const maxQueryErrors = 5

// maxLateTimes bounds the polls that wait for a completed migration's times, lateTimesPoll
// spaces them: the guest waits for the switchover meanwhile.
const (
	maxLateTimes  = 100
	lateTimesPoll = 5 * time.Millisecond
)
