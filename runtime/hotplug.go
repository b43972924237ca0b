package runtime

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/vmpod/vmpod/qmp"
)

// onlineWait bounds how long a hotplug waits for the guest to take what was added.
const onlineWait = 30 * time.Second

// AddVCPUs hot-plugs n vCPUs (q35 with MaxVCPUs headroom) and brings them online in the
// guest. It returns the guest's online CPU count.
func (vm *VM) AddVCPUs(ctx context.Context, n int) (int, error) {
	if vm.cfg.Machine != MachineQ35 {
		return 0, fmt.Errorf("vm %s: add vCPUs: machine %s has no CPU hotplug: %w", vm.cfg.Name, vm.cfg.Machine, errdefs.ErrNotImplemented)
	}
	slots, err := vm.mon.QueryHotpluggableCPUs(ctx)
	if err != nil {
		return 0, fmt.Errorf("vm %s: add vCPUs: %w", vm.cfg.Name, err)
	}
	var free []qmp.HotpluggableCPU
	plugged := 0
	for _, s := range slots {
		if s.Plugged() {
			plugged++
		} else {
			free = append(free, s)
		}
	}
	// QEMU lists slots highest first; a guest handed the topology's last slot first gets
	// a CPU whose APIC ID leaves holes below it, and (measured, Linux 6.1 under TCG) its
	// onlining then stalls. Plug in topology order, as the boot CPUs were.
	slices.SortFunc(free, func(a, b qmp.HotpluggableCPU) int { return a.Props.Compare(b.Props) })
	if n > len(free) {
		return 0, fmt.Errorf("vm %s: add %d vCPUs: only %d of max_vcpus %d free: %w", vm.cfg.Name, n, len(free), vm.cfg.MaxVCPUs, errdefs.ErrInvalidArgument)
	}
	for i := range n {
		id := fmt.Sprintf("cpu%d", plugged+i)
		if err := vm.mon.AddCPU(ctx, id, free[i]); err != nil {
			return 0, fmt.Errorf("vm %s: add vCPU %s: %w", vm.cfg.Name, id, err)
		}
	}
	want := plugged + n
	online, err := vm.awaitOnline(ctx, func(cpus uint32, _ uint64) bool { return int(cpus) >= want })
	log.G(ctx).Infof("vm %s: %d vCPUs online", vm.cfg.Name, online.cpus)
	return int(online.cpus), err
}

// ResizeMemory sets the guest's memory to totalMiB, between MemoryMiB and MaxMemoryMiB,
// by resizing the virtio-mem device, and returns the memory the guest then manages.
func (vm *VM) ResizeMemory(ctx context.Context, totalMiB int) (uint64, error) {
	if vm.cfg.Machine != MachineQ35 || vm.cfg.MaxMemoryMiB <= vm.cfg.MemoryMiB {
		return 0, fmt.Errorf("vm %s: resize memory: needs machine q35 with max_memory_mib: %w", vm.cfg.Name, errdefs.ErrNotImplemented)
	}
	if totalMiB < vm.cfg.MemoryMiB || totalMiB > vm.cfg.MaxMemoryMiB {
		return 0, fmt.Errorf("vm %s: resize memory to %d MiB: want %d-%d: %w", vm.cfg.Name, totalMiB, vm.cfg.MemoryMiB, vm.cfg.MaxMemoryMiB, errdefs.ErrInvalidArgument)
	}
	before, err := vm.agent.Ping(ctx)
	if err != nil {
		return 0, err
	}
	requested := uint64(totalMiB-vm.cfg.MemoryMiB) << 20
	if err := qmp.QOMSet(ctx, vm.mon, qmp.PeripheralPath(memoryDeviceID), "requested-size", requested); err != nil {
		return 0, fmt.Errorf("vm %s: resize memory: %w", vm.cfg.Name, err)
	}
	// The guest plugs virtio-mem blocks at its own pace; growing means waiting for them.
	delta := int64(requested) - int64(vm.pluggedMemory(ctx))
	target := int64(before.MemoryBytes) + delta
	online, err := vm.awaitOnline(ctx, func(_ uint32, mem uint64) bool {
		if delta >= 0 {
			return int64(mem) >= target-(64<<20) // the kernel keeps a little for its memmap
		}
		return int64(mem) <= target+(64<<20)
	})
	return online.mem, err
}

// pluggedMemory is what the virtio-mem device has plugged before a resize.
func (vm *VM) pluggedMemory(ctx context.Context) uint64 {
	size, err := qmp.QOMGet[uint64](ctx, vm.mon, qmp.PeripheralPath(memoryDeviceID), "size")
	if err != nil {
		return 0
	}
	return size
}

type guestSize struct {
	cpus uint32
	mem  uint64
}

// awaitOnline asks the agent to online what was added until done holds for the guest's
// CPUs and memory, or onlineWait passes.
func (vm *VM) awaitOnline(ctx context.Context, done func(cpus uint32, mem uint64) bool) (guestSize, error) {
	ctx, cancel := context.WithTimeout(ctx, onlineWait)
	defer cancel()
	var last guestSize
	for {
		resp, err := vm.agent.OnlineResources(ctx)
		if err != nil {
			return last, err
		}
		last = guestSize{resp.OnlineCpus, resp.MemoryBytes}
		if done(last.cpus, last.mem) {
			return last, nil
		}
		select {
		case <-ctx.Done():
			return last, fmt.Errorf("vm %s: guest has %d CPUs, %d MiB after %v: %w", vm.cfg.Name, last.cpus, last.mem>>20, onlineWait, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}
