package qmp

import (
	"cmp"
	"context"
	"fmt"
)

// HotpluggableCPU is one entry of query-hotpluggable-cpus: a vCPU slot that is
// either occupied (QOMPath set) or free to be filled with AddCPU.
type HotpluggableCPU struct {
	Type       string   `json:"type"` // device driver, e.g. "qemu64-x86_64-cpu"
	VCPUsCount int      `json:"vcpus-count"`
	Props      CPUProps `json:"props"`
	QOMPath    string   `json:"qom-path,omitempty"`
}

// Plugged reports whether a vCPU occupies the slot.
func (c HotpluggableCPU) Plugged() bool { return c.QOMPath != "" }

// CPUProps locate a vCPU slot in the topology. Which of them are set depends on the
// machine; nil means not applicable.
type CPUProps struct {
	NodeID   *int `json:"node-id,omitempty"`
	SocketID *int `json:"socket-id,omitempty"`
	DieID    *int `json:"die-id,omitempty"`
	CoreID   *int `json:"core-id,omitempty"`
	ThreadID *int `json:"thread-id,omitempty"`
}

// Compare orders slots by their place in the topology (node, socket, die, core, thread;
// an absent prop first), for plugging the lowest free slot first.
func (a CPUProps) Compare(b CPUProps) int {
	v := func(p *int) int {
		if p == nil {
			return -1
		}
		return *p
	}
	for _, pair := range [][2]*int{{a.NodeID, b.NodeID}, {a.SocketID, b.SocketID}, {a.DieID, b.DieID}, {a.CoreID, b.CoreID}, {a.ThreadID, b.ThreadID}} {
		if c := cmp.Compare(v(pair[0]), v(pair[1])); c != 0 {
			return c
		}
	}
	return 0
}

// Name is a device id for the vCPU of this slot, unique among the machine's slots:
// "cpu-s<socket>-c<core>-t<thread>" (with -n<node>/-d<die> where set).
func (a CPUProps) Name() string {
	name := "cpu"
	for _, part := range []struct {
		tag string
		v   *int
	}{{"n", a.NodeID}, {"s", a.SocketID}, {"d", a.DieID}, {"c", a.CoreID}, {"t", a.ThreadID}} {
		if part.v != nil {
			name += fmt.Sprintf("-%s%d", part.tag, *part.v)
		}
	}
	return name
}

// QueryHotpluggableCPUs lists the vCPU slots (query-hotpluggable-cpus). It needs a
// machine with CPU hotplug, such as q35.
func (m *Monitor) QueryHotpluggableCPUs(ctx context.Context) ([]HotpluggableCPU, error) {
	var cpus []HotpluggableCPU
	err := m.run(ctx, "query-hotpluggable-cpus", "", nil, &cpus)
	return cpus, err
}

// AddCPU plugs a vCPU with qdev id id into the free slot cpu (device_add). A Linux
// guest brings a hot-added CPU up offline; something in the guest must online it.
// The guest's ACPI_DEVICE_OST event says it has seen the CPU.
func (m *Monitor) AddCPU(ctx context.Context, id string, cpu HotpluggableCPU) error {
	if cpu.Plugged() {
		return fmt.Errorf("qmp: add cpu %s: slot is occupied by %s", id, cpu.QOMPath)
	}
	d := DeviceOptions{Driver: cpu.Type, ID: id}
	for _, p := range []struct {
		name string
		v    *int
	}{
		{"node-id", cpu.Props.NodeID}, {"socket-id", cpu.Props.SocketID}, {"die-id", cpu.Props.DieID},
		{"core-id", cpu.Props.CoreID}, {"thread-id", cpu.Props.ThreadID},
	} {
		if p.v != nil {
			d.Props = append(d.Props, IntProp(p.name, int64(*p.v)))
		}
	}
	return m.DeviceAdd(ctx, d)
}

// VCPU is one entry of query-cpus-fast: a running vCPU and the host thread that runs it.
type VCPU struct {
	Index    int    `json:"cpu-index"`
	ThreadID int    `json:"thread-id"`
	QOMPath  string `json:"qom-path"`
}

// QueryVCPUs lists the running vCPUs with their host threads (query-cpus-fast, which does
// not interrupt the vCPUs). A reply without a thread id is refused: pinning needs it.
func (m *Monitor) QueryVCPUs(ctx context.Context) ([]VCPU, error) {
	var cpus []VCPU
	if err := m.run(ctx, "query-cpus-fast", "", nil, &cpus); err != nil {
		return nil, err
	}
	for i, c := range cpus {
		if c.ThreadID <= 0 {
			return nil, fmt.Errorf("qmp: query-cpus-fast: [%d] (cpu-index %d): thread-id %d", i, c.Index, c.ThreadID)
		}
	}
	return cpus, nil
}
