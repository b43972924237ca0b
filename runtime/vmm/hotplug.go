package vmm

import (
	"context"
	"fmt"
	"path"
	"slices"
	"strings"
	"time"

	"github.com/containerd/errdefs"

	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/qmp"
)

// PlugVCPUs hot-plugs vCPUs (q35 with MaxVCPUs headroom) until the machine has total,
// and returns how many it then has. Bringing them online is the guest's business.
func (m *Machine) PlugVCPUs(ctx context.Context, total int) (int, error) {
	if m.cfg.Type != machine.Q35 { // microvm grows by onlining instead (OfflineGrowth, 013)
		return 0, fmt.Errorf("vm %s: add vCPUs: machine %s has no CPU hotplug: %w", m.cfg.Name, m.cfg.Type, errdefs.ErrNotImplemented)
	}
	if total > m.cfg.MaxVCPUs {
		return 0, fmt.Errorf("vm %s: %d vCPUs: max_vcpus is %d: %w", m.cfg.Name, total, m.cfg.MaxVCPUs, errdefs.ErrInvalidArgument)
	}
	slots, err := m.mon.QueryHotpluggableCPUs(ctx)
	if err != nil {
		return 0, fmt.Errorf("vm %s: add vCPUs: %w", m.cfg.Name, err)
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
	n := max(total-plugged, 0)
	if n > len(free) {
		return plugged, fmt.Errorf("vm %s: %d vCPUs: only %d of max_vcpus %d free: %w", m.cfg.Name, total, len(free), m.cfg.MaxVCPUs, errdefs.ErrInvalidArgument)
	}
	for i := range n {
		// named by its slot: an id that no other vCPU, earlier or later, can have
		id := free[i].Props.Name()
		if err := m.mon.AddCPU(ctx, id, free[i]); err != nil {
			return plugged + i, fmt.Errorf("vm %s: add vCPU %s: %w", m.cfg.Name, id, err)
		}
	}
	return plugged + n, nil
}

// UnplugVCPUs takes hot-plugged vCPUs out again (q35), the last in the topology first,
// until the machine has total, and returns how many it then has. Only vCPUs PlugVCPUs
// added can go: the boot vCPUs stay, so the machine never has fewer than it booted with.
// The guest offlines each vCPU before it lets QEMU remove it (ACPI eject); one it keeps
// (the guest refused, or did not answer in time) stays, and the error says so.
func (m *Machine) UnplugVCPUs(ctx context.Context, total int) (int, error) {
	if m.cfg.Type != machine.Q35 {
		return 0, fmt.Errorf("vm %s: remove vCPUs: machine %s has no CPU hotplug: %w", m.cfg.Name, m.cfg.Type, errdefs.ErrNotImplemented)
	}
	if m.Accel() != machine.KVM {
		// measured: QEMU 7.2 under TCG frees the slot, sends no DEVICE_DELETED, and its
		// heap is corrupt afterwards (malloc aborts at the next device_add or at exit)
		return 0, fmt.Errorf("vm %s: remove vCPUs: QEMU under %s does not survive a vCPU unplug: %w", m.cfg.Name, m.Accel(), errdefs.ErrNotImplemented)
	}
	slots, err := m.mon.QueryHotpluggableCPUs(ctx)
	if err != nil {
		return 0, fmt.Errorf("vm %s: remove vCPUs: %w", m.cfg.Name, err)
	}
	var hot []qmp.HotpluggableCPU
	plugged := 0
	for _, s := range slots {
		if !s.Plugged() {
			continue
		}
		plugged++
		if strings.HasPrefix(s.QOMPath, qmp.PeripheralPath("")) { // device_add'ed: ours to take
			hot = append(hot, s)
		}
	}
	slices.SortFunc(hot, func(a, b qmp.HotpluggableCPU) int { return b.Props.Compare(a.Props) })
	for _, s := range hot {
		if plugged <= total {
			break
		}
		id := path.Base(s.QOMPath)
		uctx, cancel := context.WithTimeout(ctx, vcpuUnplugWait)
		err := m.unplugVCPU(uctx, id, s.QOMPath)
		cancel()
		if err != nil {
			return plugged, fmt.Errorf("vm %s: remove vCPU %s: %w", m.cfg.Name, id, err)
		}
		plugged--
	}
	return plugged, nil
}

// vcpuUnplugWait bounds the wait for the guest to release one vCPU.
const vcpuUnplugWait = 30 * time.Second

// unplugVCPU asks for vCPU id's removal and waits until its slot is free: QEMU sends no
// DEVICE_DELETED for a vCPU the guest ejected (measured, QEMU 7.2 under TCG), so the slot
// is what tells.
func (m *Machine) unplugVCPU(ctx context.Context, id, qomPath string) error {
	if err := m.mon.RequestDeviceDel(ctx, id); err != nil {
		return err
	}
	for {
		slots, err := m.mon.QueryHotpluggableCPUs(ctx)
		if err != nil {
			return err
		}
		if !slices.ContainsFunc(slots, func(s qmp.HotpluggableCPU) bool { return s.QOMPath == qomPath }) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("the guest did not release it: %w", ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// PlugMemory sets the memory above MemoryMiB the virtio-mem device offers the guest, so
// that the machine has totalMiB in all, and returns the change in plugged bytes it asks
// the guest for (negative: to give back). The guest plugs and unplugs blocks at its own
// pace.
func (m *Machine) PlugMemory(ctx context.Context, totalMiB int) (int64, error) {
	if m.cfg.Type != machine.Q35 || m.cfg.MaxMemoryMiB <= m.cfg.MemoryMiB { // microvm: OfflineGrowth
		return 0, fmt.Errorf("vm %s: resize memory: needs machine q35 with max_memory_mib: %w", m.cfg.Name, errdefs.ErrNotImplemented)
	}
	if totalMiB < m.cfg.MemoryMiB || totalMiB > m.cfg.MaxMemoryMiB {
		return 0, fmt.Errorf("vm %s: resize memory to %d MiB: want %d-%d: %w", m.cfg.Name, totalMiB, m.cfg.MemoryMiB, m.cfg.MaxMemoryMiB, errdefs.ErrInvalidArgument)
	}
	requested := uint64(totalMiB-m.cfg.MemoryMiB) << 20
	before, _ := m.PluggedMemory(ctx) // unknown: the change is reckoned from none
	if err := qmp.QOMSet(ctx, m.mon, qmp.PeripheralPath(memoryDeviceID), "requested-size", requested); err != nil {
		return 0, fmt.Errorf("vm %s: resize memory: %w", m.cfg.Name, err)
	}
	return int64(requested) - int64(before), nil
}

// PluggedMemory is the memory above MemoryMiB the guest has taken from the virtio-mem
// device: it catches up with PlugMemory's request at the guest's pace, in either
// direction.
func (m *Machine) PluggedMemory(ctx context.Context) (uint64, error) {
	if m.cfg.Type != machine.Q35 || m.cfg.MaxMemoryMiB <= m.cfg.MemoryMiB {
		return 0, nil
	}
	size, err := qmp.QOMGet[uint64](ctx, m.mon, qmp.PeripheralPath(memoryDeviceID), "size")
	if err != nil {
		return 0, fmt.Errorf("vm %s: plugged memory: %w", m.cfg.Name, err)
	}
	return size, nil
}
