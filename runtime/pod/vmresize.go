package pod

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/vmpod/vmpod/api/vmspec"
	"github.com/vmpod/vmpod/qmp"
	"github.com/vmpod/vmpod/runtime/qga"
)

// A VM pod's vCPUs and memory follow its compute container's limits (docs/design/208):
// each whole CPU of limit added or taken away is a vCPU, each MiB of memory limit a MiB of
// guest memory, within the growth room the VM's spec leaves (cpu.maxSockets,
// maxMemoryMiB). The change of the limits since boot is what counts, not the limits
// themselves: the controller's limits equal the VM's size, but a pod written by hand may
// have any, and an update that changes no limit must change nothing.

// vmTarget is the size a VM booted from vm, whose compute container had the limits
// bootLimits then, takes when they become next.
func vmTarget(vm *vmspec.VM, bootLimits, next claim) (Size, error) {
	boot := Size{VCPUs: vm.CPU.VCPUs(), MemoryMiB: int(vm.MemoryMiB)}
	t := boot
	if next.cpuMilli != bootLimits.cpuMilli {
		if bootLimits.cpuMilli == 0 || next.cpuMilli == 0 {
			return Size{}, fmt.Errorf("linux.resources.cpu: the VM's vCPUs follow changes of the compute container's CPU limit, %s: %w",
				unlimited(bootLimits.cpuMilli), errdefs.ErrInvalidArgument)
		}
		delta := next.cpuMilli - bootLimits.cpuMilli
		if delta%1000 != 0 {
			return Size{}, fmt.Errorf("linux.resources.cpu: the CPU limit changes by %dm: a VM gains or loses whole vCPUs: %w", delta, errdefs.ErrInvalidArgument)
		}
		t.VCPUs = boot.VCPUs + int(delta/1000)
		switch per := vm.CPU.PerSocket(); {
		case t.VCPUs < boot.VCPUs:
			return Size{}, fmt.Errorf("linux.resources.cpu: %d vCPUs, fewer than the %d the VM booted with: %w", t.VCPUs, boot.VCPUs, errdefs.ErrFailedPrecondition)
		case t.VCPUs%per != 0:
			return Size{}, fmt.Errorf("linux.resources.cpu: %d vCPUs are not whole sockets of %d (cores*threads): %w", t.VCPUs, per, errdefs.ErrInvalidArgument)
		case t.VCPUs > vm.CPU.MaxVCPUs():
			return Size{}, fmt.Errorf("linux.resources.cpu: %d vCPUs, the VM can have %d (its cpu.maxSockets): %w", t.VCPUs, vm.CPU.MaxVCPUs(), errdefs.ErrFailedPrecondition)
		}
	}
	if next.memBytes != bootLimits.memBytes {
		if bootLimits.memBytes == 0 || next.memBytes == 0 {
			return Size{}, fmt.Errorf("linux.resources.memory.limit: the VM's memory follows changes of the compute container's memory limit, %s: %w",
				unlimited(bootLimits.memBytes), errdefs.ErrInvalidArgument)
		}
		const block = vmspec.GrowthBlockMiB << 20
		delta := next.memBytes - bootLimits.memBytes
		if delta%block != 0 {
			return Size{}, fmt.Errorf("linux.resources.memory.limit: the limit changes by %d bytes: a VM gains or loses whole %d MiB blocks: %w", delta, vmspec.GrowthBlockMiB, errdefs.ErrInvalidArgument)
		}
		t.MemoryMiB = boot.MemoryMiB + int(delta>>20)
		maxMiB := max(vm.MaxMemoryMiB, vm.MemoryMiB)
		switch {
		case t.MemoryMiB < boot.MemoryMiB:
			return Size{}, fmt.Errorf("linux.resources.memory.limit: %d MiB, less than the %d MiB the VM booted with: %w", t.MemoryMiB, boot.MemoryMiB, errdefs.ErrFailedPrecondition)
		case int64(t.MemoryMiB) > maxMiB:
			return Size{}, fmt.Errorf("linux.resources.memory.limit: %d MiB, the VM can have %d MiB (its maxMemoryMiB): %w", t.MemoryMiB, maxMiB, errdefs.ErrFailedPrecondition)
		}
	}
	return t, nil
}

// unlimited says which end of a change to or from no limit had none.
func unlimited(atBoot int64) string {
	if atBoot == 0 {
		return "which it did not have at boot"
	}
	return "which this update removes"
}

// settleWait bounds how long a resize waits for the guest to take or give back what
// changed: well below the CRI client's deadline (the kubelet's 2 minutes, crictl's 30 s
// here), so that the caller hears why, not only that time ran out; vcpuOnlineWait is the
// vCPUs' part of it. resizeStep is how often it looks meanwhile.
const (
	settleWait     = 20 * time.Second
	vcpuOnlineWait = 10 * time.Second
	resizeStep     = 100 * time.Millisecond
)

// resize brings the running VM to the size the compute container's limits r ask for:
// vCPUs hot-plugged (or, under KVM, unplugged) and the virtio-mem device's size set; what
// the guest leaves offline (Debian has no rule onlining hot-added CPUs or memory) comes
// online through the guest agent when it answers. An update that changes nothing is done
// at once. The size the VM ends at is recorded whatever failed: a retry (the kubelet
// retries a resize it could not finish) asks again for what is missing.
func (c *computeVM) resize(ctx context.Context, r *specs.LinuxResources) error {
	c.hotMu.Lock() // one hotplug at a time, and no pause under it
	defer c.hotMu.Unlock()
	fail := func(err error) error { return fmt.Errorf("pod %s: update container %s: %w", c.pod.id, c.id, err) }
	next := claimOf(r, c.limits)
	target, err := vmTarget(c.pod.vm, c.bootLimits, next)
	if err != nil {
		return fail(err)
	}
	if target == c.size && c.memorySettled(ctx) {
		c.limits = next
		return nil
	}
	if !c.isRunning() {
		return fail(fmt.Errorf("the VM has not been started: resize it once it runs: %w", errdefs.ErrFailedPrecondition))
	}
	if c.isPaused() {
		return fail(fmt.Errorf("%w: %w", errPaused, errdefs.ErrFailedPrecondition))
	}
	if c.isAwaiting() {
		// a vCPU plugged into a QEMU waiting for a migration's stream would have no state
		// in it, and the stream sets virtio-mem's size: the guest's shape comes from the
		// source (takeShape)
		return fail(fmt.Errorf("the VM waits for its guest from a migration: resize it once the guest has arrived: %w", errdefs.ErrFailedPrecondition))
	}
	// one budget for the guest's part of the whole update (QMP steps keep the caller's)
	settle, cancel := context.WithTimeout(ctx, settleWait)
	defer cancel()
	if target.VCPUs != c.size.VCPUs {
		if err := c.resizeVCPUs(ctx, settle, target.VCPUs); err != nil {
			return fail(err)
		}
	}
	c.limits.cpuMilli = next.cpuMilli // done: a later update that leaves CPU out keeps it
	if err := c.resizeMemory(ctx, settle, target.MemoryMiB); err != nil {
		return fail(err)
	}
	c.limits = next
	return nil
}

// agentProbeWait bounds the first question to the guest agent of a resize: without an
// answering agent the hardware change stands, and the caller must not wait for one.
const agentProbeWait = 3 * time.Second

// probeAgent asks the guest agent something with a short deadline: nil if it answers.
func probeAgent[T any](ctx context.Context, ask func(context.Context) (T, error)) (T, error) {
	pctx, cancel := context.WithTimeout(ctx, agentProbeWait)
	defer cancel()
	return ask(pctx)
}

// memorySettled says whether the guest has taken all the virtio-mem device offers and, if
// it grew, has every hot-plugged block online (a resize that timed out waiting for either
// is not done yet, though the size is the target). A guest agent that does not answer
// leaves the blocks to the guest's own policy.
func (c *computeVM) memorySettled(ctx context.Context) bool {
	plugged, err := c.machine.PluggedMemory(ctx)
	if err != nil || int(plugged>>20) != c.size.MemoryMiB-int(c.pod.vm.MemoryMiB) {
		return false
	}
	if plugged == 0 || c.bootBlocks == nil {
		return true
	}
	blocks, err := probeAgent(ctx, c.agent.MemoryBlocks)
	return err != nil || !slices.ContainsFunc(blocks, func(b qga.MemoryBlock) bool {
		return !b.Online && !c.bootBlocks[b.PhysIndex] && !c.settledBlocks[b.PhysIndex]
	})
}

// resizeVCPUs hot-plugs vCPUs up to total (whole sockets, in topology order) and has the
// guest online them, or unplugs the hot-plugged ones down to total (KVM only: QEMU under
// TCG does not survive a vCPU unplug, and says so).
func (c *computeVM) resizeVCPUs(ctx, settle context.Context, total int) error {
	lg := log.G(ctx).WithField("pod", c.pod.id)
	had := c.size.VCPUs
	started := time.Now()
	if total < had {
		n, err := c.machine.UnplugVCPUs(ctx, total)
		if n > 0 {
			c.size.VCPUs = n // what is still plugged
		}
		if err != nil {
			return fmt.Errorf("linux.resources.cpu: %w", err)
		}
		lg.Infof("VM shrunk to %d vCPUs in %v", n, time.Since(started).Round(time.Millisecond))
		return nil
	}
	n, err := c.machine.PlugVCPUs(ctx, total)
	if n > had {
		c.size.VCPUs = n // plugged: the guest's now, whatever came after
		// a part of the update's budget: the memory's part must not find it spent
		vctx, cancel := context.WithTimeout(settle, vcpuOnlineWait)
		online, oerr := onlineVCPUs(vctx, c.agent, had, n)
		cancel()
		switch {
		case oerr != nil:
			lg.WithError(oerr).Warnf("%d vCPUs plugged; the guest agent did not bring them online: the guest's own policy decides", n)
		default:
			lg.Infof("VM grown to %d vCPUs in %v (%d online in the guest)", n, time.Since(started).Round(time.Millisecond), online)
		}
	}
	if err != nil {
		return fmt.Errorf("linux.resources.cpu: %w", err)
	}
	return nil
}

// vcpuAgent is what onlining hot-plugged vCPUs asks of the guest agent.
type vcpuAgent interface {
	VCPUs(context.Context) ([]qga.VCPU, error)
	OnlineVCPUs(context.Context, []int) (int, error)
}

// onlineVCPUs has the guest agent online the vCPUs numbered from had (the hot-plugged
// ones; a CPU the guest's admin took offline below them stays so) until the guest knows
// want and all of those are online, and returns how many are online. A refused onlining
// is asked again until ctx ends: the guest may list a hot-added CPU before it can bring
// it up. (CI once had a resize's vCPU part end within a second, before the 3 s agent
// probe could have run out, and the CPU offline for good: the first refusal ended it.)
func onlineVCPUs(ctx context.Context, agent vcpuAgent, had, want int) (int, error) {
	if _, err := probeAgent(ctx, agent.VCPUs); err != nil {
		return 0, err
	}
	var refused error // the guest's last refusal to bring a vCPU up
	for {
		vcpus, err := agent.VCPUs(ctx)
		if err != nil {
			return 0, err
		}
		var offline []int
		online := 0
		for _, v := range vcpus {
			switch {
			case v.Online:
				online++
			case v.LogicalID >= had:
				offline = append(offline, v.LogicalID)
			}
		}
		if len(vcpus) >= want && len(offline) == 0 {
			return online, nil
		}
		if len(offline) > 0 {
			n, err := agent.OnlineVCPUs(ctx, offline)
			if err == nil && n == len(offline) {
				continue
			}
			if err == nil { // the agent stops at the first CPU it cannot bring up, silently
				err = fmt.Errorf("%d of vCPUs %v brought online", n, offline)
			}
			// an agent that does not have the command, or cannot answer it, will not later
			if ctx.Err() != nil || qga.IsCommandNotFound(err) || errors.As(err, new(*qga.ReplyError)) {
				return online, fmt.Errorf("vCPUs %v offline: %w", offline, err)
			}
			if refused == nil {
				log.G(ctx).WithError(err).Info("growing vCPUs: the guest refused to bring them up yet; trying again")
			}
			refused = err
		}
		select {
		case <-ctx.Done():
			if refused != nil {
				return online, fmt.Errorf("vCPUs %v offline: %w", offline, refused)
			}
			return online, fmt.Errorf("the guest knows %d of %d vCPUs: %w", len(vcpus), want, ctx.Err())
		case <-time.After(resizeStep):
		}
	}
}

// resizeMemory sizes the virtio-mem device so that the VM has totalMiB in all, and waits
// (until settle ends) for the guest to take it — what it leaves offline brought online
// through the guest agent — or to give it back. A guest that does not finish in time fails
// the resize with Unavailable: the device keeps asking, the guest keeps going at its pace,
// and the retried update finds it done (or onlines what is still offline).
func (c *computeVM) resizeMemory(ctx, settle context.Context, totalMiB int) error {
	lg := log.G(ctx).WithField("pod", c.pod.id)
	started := time.Now()
	want := uint64(totalMiB-int(c.pod.vm.MemoryMiB)) << 20
	var on *blockOnliner // nil: nothing to online (none hot-plugged, or no agent)
	if want > 0 {
		// before the plug: on the first growth the onliner notes the guest's blocks as its
		// boot memory, never to be onlined, and a guest quick to add the new blocks would
		// have them noted too (the likely cause of a cluster test run in which 256 MiB
		// were plugged and the guest's MemTotal never moved)
		on = c.blockOnliner(settle)
	}
	if totalMiB != c.size.MemoryMiB {
		if _, err := c.machine.PlugMemory(ctx, totalMiB); err != nil {
			return fmt.Errorf("linux.resources.memory.limit: %w", err)
		}
		c.size.MemoryMiB = totalMiB
	}
	lastLog := time.Now()
	for {
		plugged, err := c.machine.PluggedMemory(ctx)
		if err != nil {
			return fmt.Errorf("linux.resources.memory.limit: %w", err)
		}
		if on != nil && on.onlineNew(settle) {
			continue // look again at once: the guest may have added the next block
		}
		failed := on.failedBlocks()
		if plugged == want && len(failed) == 0 {
			lg.Infof("VM memory at %d MiB in %v", totalMiB, time.Since(started).Round(time.Millisecond))
			return nil
		}
		if time.Since(lastLog) > 5*time.Second {
			lg.Infof("resizing memory: the guest has %d MiB of the %d MiB asked above its boot memory; blocks %v not online yet", plugged>>20, want>>20, failed)
			lastLog = time.Now()
		}
		select {
		case <-settle.Done():
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if plugged == want {
				return fmt.Errorf("linux.resources.memory.limit: the guest could not online memory blocks %v in %v (%s); a retry asks again: %w",
					failed, time.Since(started).Round(time.Second), on.failed[failed[0]], errdefs.ErrUnavailable)
			}
			return fmt.Errorf("linux.resources.memory.limit: the guest has %d MiB of the %d MiB asked above its boot memory after %v; the VM keeps asking: %w",
				plugged>>20, want>>20, time.Since(started).Round(time.Second), errdefs.ErrUnavailable)
		case <-time.After(resizeStep):
		}
	}
}

// blockOnliner brings the memory blocks a growth adds online through the guest agent: a
// Debian guest leaves hot-added memory offline, and the virtio-mem driver stops adding
// blocks while too many are (1 GiB).
type blockOnliner struct {
	agent interface {
		MemoryBlocks(context.Context) ([]qga.MemoryBlock, error)
		OnlineMovable(context.Context, uint64) error
		OnlineMemoryBlocks(context.Context, []uint64) (map[uint64]string, error)
	}
	lg *log.Entry
	// known are the guest's boot blocks and those this resize is done with: onlined (one
	// the guest takes offline after it came online is the guest's choice) or refused for
	// good; not asked (again)
	known map[uint64]bool
	// settled records the blocks past boot this onliner is done with, for later resizes
	// (computeVM.settledBlocks)
	settled map[uint64]bool
	// failed are the new blocks the guest could not online yet, and why: asked again,
	// every blockRetryEvery, while the resize lasts (a transient refusal must not leave a
	// block offline for good, as a first refusal once did a hot-plugged vCPU)
	failed    map[uint64]string
	lastRetry time.Time
	movable   bool // the agent can online movable (see qga.OnlineMovable)
	gone      bool // the agent stopped answering: the guest's own policy decides
}

// blockRetryEvery spaces the onliner's questions about blocks the guest refused.
const blockRetryEvery = time.Second

// blockOnliner is a resize's onliner of hot-plugged memory blocks: every block but those
// the guest booted with (noted at the first growth) that is offline; nil if the guest
// agent does not answer. Called with hotMu.
func (c *computeVM) blockOnliner(ctx context.Context) *blockOnliner {
	lg := log.G(ctx).WithField("pod", c.pod.id)
	blocks, err := probeAgent(ctx, c.agent.MemoryBlocks)
	if err != nil {
		lg.WithError(err).Warn("resizing memory: the guest agent does not answer: the guest's own policy onlines the hot-plugged memory, or not")
		return nil
	}
	if c.bootBlocks == nil { // before the first growth: all the guest has is its boot memory
		c.bootBlocks = map[uint64]bool{}
		for _, b := range blocks {
			c.bootBlocks[b.PhysIndex] = true
		}
	}
	if c.settledBlocks == nil {
		c.settledBlocks = map[uint64]bool{}
	}
	return &blockOnliner{agent: c.agent, lg: lg, known: maps.Clone(c.bootBlocks), settled: c.settledBlocks, failed: map[uint64]string{}, movable: true}
}

// onlineNew brings the guest's new offline blocks online, movable where it can, asks
// again (every blockRetryEvery) for those it could not online before, and says whether
// it found new ones (a retry alone is not a reason to look again at once).
func (o *blockOnliner) onlineNew(ctx context.Context) bool {
	if o.gone {
		return false
	}
	blocks, err := o.agent.MemoryBlocks(ctx)
	if err != nil {
		o.lg.WithError(err).Warn("growing memory: the guest agent stopped answering")
		o.gone = true
		clear(o.failed) // nobody to ask: the guest's own policy decides
		return false
	}
	retry := time.Since(o.lastRetry) >= blockRetryEvery
	offline := map[uint64]bool{}
	var ask, normal []uint64
	fresh := false
	for _, b := range blocks {
		if b.Online || o.known[b.PhysIndex] {
			continue
		}
		offline[b.PhysIndex] = true
		_, again := o.failed[b.PhysIndex]
		if !again || retry {
			ask = append(ask, b.PhysIndex)
		}
		fresh = fresh || !again
	}
	maps.DeleteFunc(o.failed, func(i uint64, _ string) bool { return !offline[i] }) // online now, or gone
	if retry && len(o.failed) > 0 {
		o.lastRetry = time.Now()
	}
	for _, i := range ask {
		if o.movable {
			err := o.agent.OnlineMovable(ctx, i)
			if err == nil {
				o.done(i)
				continue
			}
			// an agent without file access (disabled commands) never can; a block the
			// guest refuses (or onlined itself meanwhile) says nothing about the next
			o.movable = !qga.IsCommandNotFound(err)
			if _, again := o.failed[i]; !again {
				o.lg.WithError(err).Infof("memory block %d: not onlined movable; onlined in the guest's default zone, whose unmovable pages a shrink cannot return", i)
			}
		}
		normal = append(normal, i)
	}
	if len(normal) == 0 {
		return fresh
	}
	failed, err := o.agent.OnlineMemoryBlocks(ctx, normal)
	if err != nil {
		o.lg.WithError(err).Warn("growing memory: onlining through the guest agent")
		o.gone = true
		clear(o.failed)
		return fresh
	}
	for _, i := range normal {
		why, bad := failed[i]
		switch {
		case !bad:
			o.done(i)
		case qga.PermanentBlockRefusal(why):
			o.lg.Warnf("the guest cannot online memory block %d (%s): it stays offline", i, why)
			o.done(i)
		default:
			if _, again := o.failed[i]; !again {
				o.lg.Infof("the guest could not online memory block %d yet (%s); asking again while the resize lasts", i, why)
			}
			o.failed[i] = why
		}
	}
	return fresh
}

// done notes that block i needs nothing more, in this resize and later ones.
func (o *blockOnliner) done(i uint64) {
	o.known[i] = true
	delete(o.failed, i)
	if o.settled != nil {
		o.settled[i] = true
	}
}

// failedBlocks are the new blocks the guest could not online yet, in order; none for a
// nil onliner (nothing to online).
func (o *blockOnliner) failedBlocks() []uint64 {
	if o == nil {
		return nil
	}
	return slices.Sorted(maps.Keys(o.failed))
}

// rebootAgentWait bounds the wait for the guest agent after a guest reboot.
const rebootAgentWait = 5 * time.Minute

// followReboots brings hot-plugged memory online again after each guest reboot:
// virtio-mem plugs what it is asked for again at boot, and a guest without an onlining
// policy (Debian) leaves it offline — it would run with less memory than its pod pays for.
// (Hot-plugged vCPUs are present at boot; Linux brings them up itself.) It ends with QEMU.
func (c *computeVM) followReboots(ctx context.Context) {
	resets := c.machine.Monitor().Subscribe(qmp.EventNamed(eventReset))
	defer func() { resets.Close() }()
	for {
		_, err := resets.Next(ctx)
		if errors.Is(err, qmp.ErrSubscriptionOverflow) { // a guest rebooting in a loop
			resets.Close()
			resets = c.machine.Monitor().Subscribe(qmp.EventNamed(eventReset))
			continue
		}
		if err != nil {
			return // QEMU is gone
		}
		drainQueued(resets) // reboots while this one was handled: only the last counts
		if c.awaitAgent(ctx, rebootAgentWait) {
			c.onlineAfterReboot(ctx)
		}
	}
}

// drainQueued drops the events already queued on s.
func drainQueued(s *qmp.Subscription) {
	done, cancel := context.WithCancel(context.Background())
	cancel()
	for {
		if _, err := s.Next(done); err != nil {
			return
		}
	}
}

// rebootOnlineRounds bounds the rounds (settleWait each) that onlining after a reboot
// takes: a booting guest's virtio-mem adds at most 1 GiB offline at a time, and a slow
// guest may need more than one round; hotMu is free between them.
const rebootOnlineRounds = 6

// onlineAfterReboot has the guest take and online its hot-plugged memory again.
func (c *computeVM) onlineAfterReboot(ctx context.Context) {
	lg := log.G(ctx).WithField("pod", c.pod.id)
	for range rebootOnlineRounds {
		c.hotMu.Lock()
		if c.size.MemoryMiB <= int(c.pod.vm.MemoryMiB) || c.bootBlocks == nil || c.isPaused() {
			c.hotMu.Unlock()
			return // nothing hot-plugged, or no onlining before; a paused guest cannot
		}
		settle, cancel := context.WithTimeout(ctx, settleWait)
		err := c.resizeMemory(ctx, settle, c.size.MemoryMiB)
		cancel()
		c.hotMu.Unlock()
		if err == nil || !errdefs.IsUnavailable(err) {
			if err != nil {
				lg.WithError(err).Warn("after the guest's reboot: its hot-plugged memory")
			}
			return
		}
	}
	lg.Warn("after the guest's reboot: its hot-plugged memory is not all back yet; the next resize looks again")
}

// eventReset is QEMU's event for a machine reset: a guest reboot, with Reboot set.
const eventReset = "RESET"

// awaitAgent waits until the guest agent answers, within at most wait; false if it did
// not, or QEMU ended.
func (c *computeVM) awaitAgent(ctx context.Context, wait time.Duration) bool {
	for deadline := time.Now().Add(wait); time.Now().Before(deadline); {
		select {
		case <-c.machine.Done():
			return false
		case <-ctx.Done():
			return false
		case <-time.After(2 * time.Second):
		}
		if _, err := probeAgent(ctx, c.agent.MemoryBlocks); err == nil {
			return true
		}
	}
	return false
}
