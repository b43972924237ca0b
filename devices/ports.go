package devices

import (
	"fmt"
	"slices"
	"strconv"
	"sync"
)

// The q35 layout of pcie.0 (see docs/design/202-pcie-slot-layout.md): slot 0 is
// the host bridge and slot 0x1f the ICH9 LPC/SATA/SMBus functions; cold-plugged
// endpoints take one slot each from firstEndpointSlot, root ports take eight
// functions per slot from firstRootPortSlot. Fixed ranges keep every address
// independent of how many devices of the other kind there are, so a migration
// target renders the same addresses as its source.
const (
	firstEndpointSlot = 0x01
	lastEndpointSlot  = 0x17
	firstRootPortSlot = 0x18
	lastRootPortSlot  = 0x1e
	portsPerSlot      = 8
)

// MaxEndpoints is how many devices a q35 VM can cold-plug on pcie.0.
const MaxEndpoints = lastEndpointSlot - firstEndpointSlot + 1

// MaxRootPorts is how many PCIe root ports a q35 VM can have.
const MaxRootPorts = (lastRootPortSlot - firstRootPortSlot + 1) * portsPerSlot

// RootPort is a pcie-root-port on pcie.0: one hot-pluggable slot.
type RootPort struct {
	ID       string // "rp0", "rp1", ...
	Slot     int    // device number on pcie.0
	Function int
	Chassis  int // unique per port: QEMU needs a distinct (chassis, slot) pair
}

func rootPort(i int) RootPort {
	return RootPort{ID: "rp" + strconv.Itoa(i), Slot: firstRootPortSlot + i/portsPerSlot, Function: i % portsPerSlot, Chassis: i + 1}
}

// frontend renders the port; multifunction is set on function 0 of a slot whose
// other functions hold ports too.
func (p RootPort) frontend(total int) Frontend {
	return Frontend{
		Driver: "pcie-root-port", ID: p.ID, Bus: "pcie.0", Addr: p.Slot, Function: p.Function,
		Multifunction: p.Function == 0 && total > (p.Slot-firstRootPortSlot)*portsPerSlot+1,
		Props:         []Property{UintProp("chassis", uint64(p.Chassis))},
	}
}

// PortAllocator hands out a q35 VM's root ports to hot-plugged devices: the
// lowest free port to each, and the port back when the device is gone. It is
// safe for concurrent use.
type PortAllocator struct {
	mu    sync.Mutex
	ports []RootPort
	owner []string // device id per port; "" when free
}

// NewPortAllocator manages n root ports, rp0 to rp<n-1>.
func NewPortAllocator(n int) (*PortAllocator, error) {
	if n < 0 || n > MaxRootPorts {
		return nil, fmt.Errorf("devices: %d root ports: must be 0..%d", n, MaxRootPorts)
	}
	a := &PortAllocator{owner: make([]string, n)}
	for i := range n {
		a.ports = append(a.ports, rootPort(i))
	}
	return a, nil
}

// Ports lists all ports.
func (a *PortAllocator) Ports() []RootPort { return slices.Clone(a.ports) }

// Allocate gives the lowest free port to deviceID.
func (a *PortAllocator) Allocate(deviceID string) (RootPort, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if p, ok := a.portOf(deviceID); ok {
		return RootPort{}, fmt.Errorf("devices: %s already has root port %s", deviceID, p.ID)
	}
	i := slices.Index(a.owner, "")
	if i < 0 {
		return RootPort{}, fmt.Errorf("devices: no free root port for %s: all %d are in use (raise Machine.RootPorts)", deviceID, len(a.ports))
	}
	a.owner[i] = deviceID
	return a.ports[i], nil
}

// Claim gives the port with id portID to deviceID: for rebuilding the layout of a
// VM whose devices already sit on known ports (a migration target).
func (a *PortAllocator) Claim(portID, deviceID string) (RootPort, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if p, ok := a.portOf(deviceID); ok {
		return RootPort{}, fmt.Errorf("devices: %s already has root port %s", deviceID, p.ID)
	}
	i := slices.IndexFunc(a.ports, func(p RootPort) bool { return p.ID == portID })
	switch {
	case i < 0:
		return RootPort{}, fmt.Errorf("devices: no root port %q (the VM has %d)", portID, len(a.ports))
	case a.owner[i] != "":
		return RootPort{}, fmt.Errorf("devices: root port %s is taken by %s", portID, a.owner[i])
	}
	a.owner[i] = deviceID
	return a.ports[i], nil
}

// Release frees the port of deviceID and returns it; ok is false if the device
// had none.
func (a *PortAllocator) Release(deviceID string) (port RootPort, ok bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	i := slices.Index(a.owner, deviceID)
	if i < 0 || deviceID == "" {
		return RootPort{}, false
	}
	a.owner[i] = ""
	return a.ports[i], true
}

// PortOf returns the port deviceID holds.
func (a *PortAllocator) PortOf(deviceID string) (RootPort, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.portOf(deviceID)
}

func (a *PortAllocator) portOf(deviceID string) (RootPort, bool) {
	i := slices.Index(a.owner, deviceID)
	if i < 0 || deviceID == "" {
		return RootPort{}, false
	}
	return a.ports[i], true
}
