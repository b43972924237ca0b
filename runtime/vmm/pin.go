package vmm

import (
	"context"
	"fmt"
	"slices"

	"golang.org/x/sys/unix"
	"k8s.io/utils/cpuset"

	"github.com/vmpod/vmpod/qmp"
)

// PinVCPUs runs the machine's vCPU threads on host CPUs cpus. The first online vCPUs are
// the ones the guest uses (a microvm's others are booted offline, OfflineGrowth); when
// their count matches the set's, each gets a CPU of its own, what an exclusive cpuset is
// for, and any offline ones the whole set; else every vCPU runs on the whole set, as do
// vCPUs that share one host thread (a q35 machine with vCPU room under TCG,
// docs/design/208). An empty set lets them run anywhere the shim may. vCPUs hot-plugged
// later start unpinned: pin again after adding them, or after onlining more.
func (m *Machine) PinVCPUs(ctx context.Context, cpus cpuset.CPUSet, online int) error {
	vcpus, err := m.mon.QueryVCPUs(ctx)
	if err != nil {
		return fmt.Errorf("vm %s: pin vCPUs: %w", m.cfg.Name, err)
	}
	slices.SortFunc(vcpus, func(a, b qmp.VCPU) int { return a.Index - b.Index })
	var whole unix.CPUSet
	if cpus.IsEmpty() {
		// The shim's own affinity is what QEMU inherited at start.
		if err := unix.SchedGetaffinity(0, &whole); err != nil {
			return fmt.Errorf("vm %s: pin vCPUs: the shim's affinity: %w", m.cfg.Name, err)
		}
	} else {
		for _, c := range cpus.UnsortedList() {
			whole.Set(c)
		}
	}
	list := cpus.List()
	threads := map[int]bool{}
	for _, v := range vcpus {
		threads[v.ThreadID] = true
	}
	onePerVCPU := len(list) == online && len(threads) == len(vcpus)
	for i, v := range vcpus {
		set := whole
		if onePerVCPU && i < online {
			set.Zero()
			set.Set(list[i])
		}
		if err := unix.SchedSetaffinity(v.ThreadID, &set); err != nil {
			return fmt.Errorf("vm %s: pin vCPU %d (thread %d) to %q: %w", m.cfg.Name, v.Index, v.ThreadID, cpus.String(), err)
		}
	}
	return nil
}
