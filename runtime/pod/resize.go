package pod

import (
	"context"
	"fmt"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/vmpod/vmpod/runtime"
	"github.com/vmpod/vmpod/runtime/nodeconfig"
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
		if r.CPU.Quota != nil && r.CPU.Period != nil && *r.CPU.Quota > 0 && *r.CPU.Period > 0 {
			c.cpuMilli = (*r.CPU.Quota*1000 + int64(*r.CPU.Period) - 1) / int64(*r.CPU.Period)
		}
	}
	if r.Memory != nil && r.Memory.Limit != nil {
		c.memBytes = max(*r.Memory.Limit, 0)
	}
	return c
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

// headroom is how far a VM booted at size can grow: on q35 up to the node's maximums
// (CPU hotplug, and a virtio-mem device whose size is a multiple of its 2 MiB block);
// microvm has no hotplug and stays at its boot size.
func headroom(machine runtime.Machine, size Size, s nodeconfig.Sizing) Size {
	if machine != runtime.MachineQ35 {
		return size
	}
	const blockMiB = 2
	return Size{
		VCPUs:     max(size.VCPUs, s.MaxVCPUs),
		MemoryMiB: size.MemoryMiB + max(s.MaxMemoryMiB-size.MemoryMiB, 0)/blockMiB*blockMiB,
	}
}

// UpdateContainer gives container id the resources r. When the pod's limits with r no
// longer fit the VM, the VM grows first (hot-added vCPUs, virtio-mem), up to its headroom;
// then the container's cgroup in the guest takes r. The VM never shrinks: memory the
// guest has used is not reliably given back, and CPUs are cheap to leave online.
// Beyond the headroom nothing changes and the error says which limit does not fit.
func (p *Pod) UpdateContainer(ctx context.Context, id string, r *specs.LinuxResources) error {
	p.resizeMu.Lock()
	defer p.resizeMu.Unlock()

	p.mu.Lock()
	c, ok := p.containers[id]
	if !ok {
		p.mu.Unlock()
		return fmt.Errorf("pod %s: container %s: %w", p.id, id, errdefs.ErrNotFound)
	}
	next := claimOf(r, c.claim)
	claims := []claim{next}
	for other, oc := range p.containers {
		if other != id {
			claims = append(claims, oc.claim)
		}
	}
	p.mu.Unlock()

	if err := p.grow(ctx, sizeForClaims(claims, p.sizing)); err != nil {
		return fmt.Errorf("pod %s: update container %s: %w", p.id, id, err)
	}
	if err := p.vm.Agent().UpdateContainer(ctx, id, r); err != nil {
		return err
	}
	p.mu.Lock()
	c.claim = next
	p.mu.Unlock()
	return nil
}

// grow brings the VM to at least want, within its headroom. Only called under resizeMu.
func (p *Pod) grow(ctx context.Context, want Size) error {
	cur := p.Size()
	if want.VCPUs <= cur.VCPUs && want.MemoryMiB <= cur.MemoryMiB {
		return nil
	}
	if want.VCPUs > p.maxSize.VCPUs {
		return fmt.Errorf("resources.cpu: the pod's CPU limits need %d vCPUs, the VM can have %d (%s): %w",
			want.VCPUs, p.maxSize.VCPUs, p.growthNote(), errdefs.ErrFailedPrecondition)
	}
	if want.MemoryMiB > p.maxSize.MemoryMiB {
		return fmt.Errorf("resources.memory.limit: the pod's memory limits need %d MiB, the VM can have %d MiB (%s): %w",
			want.MemoryMiB, p.maxSize.MemoryMiB, p.growthNote(), errdefs.ErrFailedPrecondition)
	}
	lg := log.G(ctx).WithField("pod", p.id)
	if add := want.VCPUs - cur.VCPUs; add > 0 {
		lg.Infof("growing the VM: %d -> %d vCPUs", cur.VCPUs, want.VCPUs)
		online, err := p.vm.AddVCPUs(ctx, add)
		if err != nil {
			return fmt.Errorf("resources.cpu: %w", err)
		}
		p.setSize(func(s *Size) { s.VCPUs = want.VCPUs })
		lg.Infof("VM grown to %d vCPUs (%d online in the guest)", want.VCPUs, online)
	}
	if want.MemoryMiB > cur.MemoryMiB {
		// virtio-mem plugs whole 2 MiB blocks above the boot memory
		target := want.MemoryMiB + (want.MemoryMiB-p.boot.MemoryMiB)%2
		lg.Infof("growing the VM: %d -> %d MiB", cur.MemoryMiB, target)
		guestBytes, err := p.vm.ResizeMemory(ctx, target)
		if err != nil {
			return fmt.Errorf("resources.memory.limit: %w", err)
		}
		p.setSize(func(s *Size) { s.MemoryMiB = target })
		lg.Infof("VM grown to %d MiB (the guest manages %d MiB)", target, guestBytes>>20)
	}
	return nil
}

func (p *Pod) growthNote() string {
	if p.maxSize == p.boot {
		return "machine " + string(p.machine) + " has no hotplug: a pod that resizes needs the vmpod.dev/machine: q35 annotation"
	}
	return "the node's sizing.max_vcpus / sizing.max_memory_mib"
}

func (p *Pod) setSize(f func(*Size)) {
	p.mu.Lock()
	defer p.mu.Unlock()
	f(&p.size)
}
