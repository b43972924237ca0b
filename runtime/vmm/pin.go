package vmm

import (
	"context"
	"fmt"

	"golang.org/x/sys/unix"
	"k8s.io/utils/cpuset"
)

// PinVCPUs runs the machine's vCPU threads on host CPUs cpus: one vCPU per CPU when the
// counts match (each vCPU gets a CPU of its own, what an exclusive cpuset is for), else
// every vCPU on the whole set. An empty set lets them run anywhere the shim may. vCPUs
// added later (hotplug) start unpinned: pin again after adding them.
func (m *Machine) PinVCPUs(ctx context.Context, cpus cpuset.CPUSet) error {
	vcpus, err := m.mon.QueryVCPUs(ctx)
	if err != nil {
		return fmt.Errorf("vm %s: pin vCPUs: %w", m.cfg.Name, err)
	}
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
	for i, v := range vcpus {
		set := whole
		if len(list) == len(vcpus) {
			set.Zero()
			set.Set(list[i])
		}
		if err := unix.SchedSetaffinity(v.ThreadID, &set); err != nil {
			return fmt.Errorf("vm %s: pin vCPU %d (thread %d) to %q: %w", m.cfg.Name, v.Index, v.ThreadID, cpus.String(), err)
		}
	}
	return nil
}
