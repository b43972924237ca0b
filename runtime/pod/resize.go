package pod

import (
	"context"
	"fmt"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/devices"
	"github.com/vmpod/vmpod/runtime/nodeconfig"
	"github.com/vmpod/vmpod/runtime/vmm"
)

// claim is what a container's limits ask of its pod's VM. Zero is no limit, which claims
// nothing: an unlimited container shares what the others leave.
type claim struct {
	cpuMilli int64 // CFS quota/period, in thousandths of a CPU
	memBytes int64
}

// claimOf is the claim of resources r, with prev for what r leaves out (a nil section of
// an update keeps its value; an explicit 0 or -1 means no limit).
func claimOf(r *specs.LinuxResources, prev claim) claim {
	if r == nil {
		return prev
	}
	c := prev
	if r.CPU != nil && (r.CPU.Quota != nil || r.CPU.Period != nil) {
		c.cpuMilli = 0
		if r.CPU.Quota != nil && r.CPU.Period != nil {
			c.cpuMilli = cpuMilli(*r.CPU.Quota, int64(*r.CPU.Period))
		}
	}
	if r.Memory != nil && r.Memory.Limit != nil {
		c.memBytes = max(*r.Memory.Limit, 0)
	}
	return c
}

// cpuMilli is a CFS quota/period in thousandths of a CPU, rounded up; 0 (no limit) unless
// both are positive.
func cpuMilli(quota, period int64) int64 {
	if quota <= 0 || period <= 0 {
		return 0
	}
	return (quota*1000 + period - 1) / period
}

// sizeForClaims is the VM size that holds the sum of claims, by the rule the boot size
// follows (sizeFor): whole vCPUs, memory plus the guest's overhead, at least the defaults.
func sizeForClaims(claims []claim, s nodeconfig.Sizing) Size {
	var cpuMilli, memBytes int64
	for _, c := range claims {
		cpuMilli += c.cpuMilli
		memBytes += c.memBytes
	}
	size := Size{VCPUs: s.DefaultVCPUs, MemoryMiB: s.DefaultMemoryMiB}
	if cpuMilli > 0 {
		size.VCPUs = max(size.VCPUs, int((cpuMilli+999)/1000))
	}
	if memBytes > 0 {
		size.MemoryMiB = max(size.MemoryMiB, int((memBytes+(1<<20)-1)>>20)+s.GuestOverheadMiB)
	}
	return size
}

// templateSize is size as a pod restored from templates gets it: the memory above the
// node's default rounded up to virtio-mem's blocks, within the node's maximum, so that it
// is a template's and a plug (vmtemplate.Store.BaseMemoryMiB).
func templateSize(size Size, s nodeconfig.Sizing) Size {
	if base := s.DefaultMemoryMiB; size.MemoryMiB > base {
		size.MemoryMiB = min(base+roundUp(size.MemoryMiB-base, memoryBlockMiB(machine.Q35)), s.MaxMemoryMiB)
	}
	return size
}

// headroom is how far a VM booted at size can grow: up to the node's maximums, on q35 by
// CPU hotplug and a virtio-mem device (whole 2 MiB blocks), on microvm, which has no
// hotplug, from vCPUs and RAM it boots with offline (whole memory blocks the guest
// probes, vmm.ProbeBlockMiB) unless the node turned that off (sizing.microvm_growth).
func headroom(t machine.Type, size Size, s nodeconfig.Sizing) Size {
	if t == machine.MicroVM && !s.MicrovmGrowth {
		return size
	}
	blockMiB := memoryBlockMiB(t)
	return Size{
		VCPUs:     max(size.VCPUs, s.MaxVCPUs),
		MemoryMiB: size.MemoryMiB + max(s.MaxMemoryMiB-size.MemoryMiB, 0)/blockMiB*blockMiB,
	}
}

// UpdateContainer gives container id the resources r. When the pod's limits with r no
// longer fit the VM, the VM grows first (q35: hot-added vCPUs, virtio-mem; microvm: vCPUs
// and memory blocks it booted with offline), up to its headroom;
// then the container's cgroup in the guest takes r. When they need less than the VM grew
// to, a q35 VM then gives the difference back (shrink); microvm keeps it.
// An update that asks for more than the headroom changes nothing and says which limit
// does not fit.
func (p *containerPod) UpdateContainer(ctx context.Context, id string, r *specs.LinuxResources) error {
	p.resizeMu.Lock()
	defer p.resizeMu.Unlock()
	// a guest on its way here must arrive at the size the source sends (a grown machine
	// would not match it), and one that left has no VM here to grow
	c, gid, err := p.lookup(id, "update")
	if err != nil {
		return err
	}

	p.mu.Lock()
	next := claimOf(r, c.claim)
	cpus := c.cpus
	if r != nil && r.CPU != nil && r.CPU.Cpus != "" { // an empty cpuset leaves it as it is
		set, err := hostCPUs(r)
		if err != nil {
			p.mu.Unlock()
			return fmt.Errorf("pod %s: update container %s: %w: %w", p.id, id, err, errdefs.ErrInvalidArgument)
		}
		cpus = set
	}
	before, after := []claim{c.claim}, []claim{next}
	for other, oc := range p.containers {
		if other != id {
			before, after = append(before, oc.claim), append(after, oc.claim)
		}
	}
	cur := p.size
	p.mu.Unlock()

	target, err := resizeTarget(cur, sizeForClaims(before, p.sizing), sizeForClaims(after, p.sizing), p.maxSize)
	if err != nil {
		return fmt.Errorf("pod %s: update container %s: %w (%s): %w", p.id, id, err, p.growthNote(), errdefs.ErrFailedPrecondition)
	}
	if err := p.grow(ctx, cur, target); err != nil {
		return fmt.Errorf("pod %s: update container %s: %w", p.id, id, err)
	}
	p.mu.Lock()
	c.cpus = cpus
	p.mu.Unlock()
	// vCPUs just added run anywhere until pinned.
	if err := p.pinVCPUs(ctx, target.VCPUs > cur.VCPUs); err != nil {
		return fmt.Errorf("pod %s: update container %s: linux.resources.cpu.cpus: %w", p.id, id, err)
	}
	if err := p.guest.Agent().UpdateContainer(ctx, gid, guestResources(r)); err != nil {
		return err
	}
	p.mu.Lock()
	c.claim = next
	p.mu.Unlock()
	// the lower limits are in force: what the VM grew for and no longer needs goes back
	p.shrink(ctx, target, shrinkTarget(target, sizeForClaims(after, p.sizing), p.boot, memoryBlockMiB(p.machine)))
	return nil
}

// shrinkTarget is the size a VM of size cur takes when the pod's limits need only after:
// what they need, never below boot (the vCPUs and memory it booted with cannot be
// unplugged), memory in whole blocks above boot; cur where that is no smaller.
func shrinkTarget(cur, after, boot Size, blockMiB int) Size {
	t := cur
	if v := max(after.VCPUs, boot.VCPUs); v < cur.VCPUs {
		t.VCPUs = v
	}
	if m := boot.MemoryMiB + roundUp(max(after.MemoryMiB-boot.MemoryMiB, 0), blockMiB); m < cur.MemoryMiB {
		t.MemoryMiB = m
	}
	return t
}

// shrink gives back, on q35, what the VM of size cur has beyond target: hot-plugged vCPUs
// (under KVM, and unless a container is pinned: its guest CPUs are numbered) and
// virtio-mem memory, which
// the guest empties (auto-movable onlining put it in ZONE_MOVABLE) and unplugs. It comes
// after the guest's cgroups took the lower limits, so it is best effort: a guest that
// keeps some (memory it cannot move in time, a vCPU it does not release) is logged, not
// an error of the update. The pod's size becomes the target whatever the guest did: a
// later growth asks QEMU for absolute amounts, so a size recorded too low only makes it
// ask again. Only called under resizeMu.
func (p *containerPod) shrink(ctx context.Context, cur, target Size) {
	if p.machine != machine.Q35 || target == cur {
		return // microvm grows by onlining what it booted with, and keeps it (013)
	}
	lg := log.G(ctx).WithField("pod", p.id)
	if target.VCPUs < cur.VCPUs && !p.anyPinned() {
		lg.Infof("shrinking the VM: %d -> %d vCPUs", cur.VCPUs, target.VCPUs)
		online, err := p.guest.ShrinkVCPUs(ctx, target.VCPUs)
		switch {
		case errdefs.IsNotImplemented(err):
			lg.WithError(err).Infof("the VM keeps %d vCPUs", cur.VCPUs) // its size stays
		case err != nil:
			lg.WithError(err).Warnf("the guest keeps %d vCPUs", online)
			p.setSize(func(s *Size) { s.VCPUs = target.VCPUs })
		default:
			p.setSize(func(s *Size) { s.VCPUs = target.VCPUs })
		}
	}
	if target.MemoryMiB < cur.MemoryMiB {
		lg.Infof("shrinking the VM: %d -> %d MiB", cur.MemoryMiB, target.MemoryMiB)
		guestBytes, err := p.guest.ResizeMemory(ctx, target.MemoryMiB)
		if err != nil {
			lg.WithError(err).Warnf("the guest still manages %d MiB", guestBytes>>20)
		} else {
			lg.Infof("VM shrunk to %d MiB (the guest manages %d MiB)", target.MemoryMiB, guestBytes>>20)
		}
		p.setSize(func(s *Size) { s.MemoryMiB = target.MemoryMiB })
	}
}

// anyPinned says whether a container has a cpuset: its guest CPUs are numbered, and
// taking vCPUs away would renumber them under it.
func (p *containerPod) anyPinned() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.containers {
		if !c.cpus.IsEmpty() {
			return true
		}
	}
	return false
}

// resizeTarget is the size a VM of size cur, at most maxSize, takes for an update that
// moves the pod's needs from before to after. It never shrinks. Beyond maxSize it
// refuses, unless the update asks for no more than the pod asked before: a pod whose
// limits exceeded the node's maximum at boot (the node capped its VM) may still lower
// or reshuffle its limits.
func resizeTarget(cur, before, after, maxSize Size) (Size, error) {
	target := Size{VCPUs: max(cur.VCPUs, after.VCPUs), MemoryMiB: max(cur.MemoryMiB, after.MemoryMiB)}
	if target.VCPUs > maxSize.VCPUs {
		if after.VCPUs > before.VCPUs {
			return Size{}, fmt.Errorf("resources.cpu: the pod's CPU limits need %d vCPUs, the VM can have %d", after.VCPUs, maxSize.VCPUs)
		}
		target.VCPUs = max(cur.VCPUs, maxSize.VCPUs)
	}
	if target.MemoryMiB > maxSize.MemoryMiB {
		if after.MemoryMiB > before.MemoryMiB {
			return Size{}, fmt.Errorf("resources.memory.limit: the pod's memory limits need %d MiB, the VM can have %d MiB", after.MemoryMiB, maxSize.MemoryMiB)
		}
		target.MemoryMiB = max(cur.MemoryMiB, maxSize.MemoryMiB)
	}
	return target, nil
}

// grow brings the VM from cur to target (hotplug on q35, onlining on microvm). vCPUs that
// came online before a failure count in the pod's size: they are the guest's now. Only
// called under resizeMu.
func (p *containerPod) grow(ctx context.Context, cur, target Size) error {
	lg := log.G(ctx).WithField("pod", p.id)
	if target.VCPUs > cur.VCPUs {
		lg.Infof("growing the VM: %d -> %d vCPUs", cur.VCPUs, target.VCPUs)
		online, err := p.guest.GrowVCPUs(ctx, target.VCPUs)
		if err != nil {
			if online > cur.VCPUs {
				p.setSize(func(s *Size) { s.VCPUs = min(online, target.VCPUs) })
			}
			return fmt.Errorf("resources.cpu: %w", err)
		}
		p.setSize(func(s *Size) { s.VCPUs = target.VCPUs })
		lg.Infof("VM grown to %d vCPUs (%d online in the guest)", target.VCPUs, online)
	}
	if target.MemoryMiB > cur.MemoryMiB {
		// memory grows in whole blocks above the boot memory (see headroom)
		mib := min(roundUp(target.MemoryMiB-p.boot.MemoryMiB, memoryBlockMiB(p.machine))+p.boot.MemoryMiB, p.maxSize.MemoryMiB)
		lg.Infof("growing the VM: %d -> %d MiB", cur.MemoryMiB, mib)
		guestBytes, err := p.guest.ResizeMemory(ctx, mib)
		if err != nil {
			return fmt.Errorf("resources.memory.limit: %w", err)
		}
		p.setSize(func(s *Size) { s.MemoryMiB = mib })
		lg.Infof("VM grown to %d MiB (the guest manages %d MiB)", mib, guestBytes>>20)
	}
	return nil
}

func (p *containerPod) growthNote() string {
	if p.machine == machine.MicroVM && !p.sizing.MicrovmGrowth {
		return "the node's sizing.microvm_growth is off"
	}
	return "the node's sizing.max_vcpus / sizing.max_memory_mib"
}

// memoryBlockMiB is the unit in which a VM of machine t grows its memory.
func memoryBlockMiB(t machine.Type) int {
	if t == machine.MicroVM {
		return vmm.ProbeBlockMiB
	}
	return devices.VirtioMemBlockMiB
}

func roundUp(n, unit int) int { return (n + unit - 1) / unit * unit }

func (p *containerPod) setSize(f func(*Size)) {
	p.mu.Lock()
	defer p.mu.Unlock()
	f(&p.size)
}
