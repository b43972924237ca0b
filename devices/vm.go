package devices

import (
	"fmt"
	"os"
	"strconv"
	"sync"

	"github.com/vmpod/vmpod/api/machine"
)

// VM is a Machine with its devices: it places them, renders the QEMU command line
// and, on q35, assigns root ports to hot-plugged devices. A VM snapshots each
// device's Spec when the device is added; later changes to the device value do
// not show. It is safe for concurrent use.
type VM struct {
	machine Machine
	ports   *PortAllocator // nil unless q35

	mu       sync.Mutex
	cold     []placed
	attached []placed // devices on root ports, in the order they were plugged
}

type placed struct {
	dev  Device
	spec Spec
}

// NewVM validates the machine and the cold-plugged devices and places them: on
// q35 each takes the next endpoint slot on pcie.0, on microvm the next
// virtio-mmio slot (command-line order).
func NewVM(m Machine, devs ...Device) (*VM, error) {
	if err := m.validate(); err != nil {
		return nil, err
	}
	vm := &VM{machine: m}
	if m.Type == machine.Q35 {
		var err error
		if vm.ports, err = NewPortAllocator(m.RootPorts); err != nil {
			return nil, err
		}
	}
	if m.Type == machine.Q35 && len(devs) > MaxEndpoints {
		return nil, fmt.Errorf("devices: %d cold-plugged devices; pcie.0 has room for %d (put the rest on root ports with HotplugAt)", len(devs), MaxEndpoints)
	}
	for i, d := range devs {
		p := Placement{Transport: m.transport()}
		if m.Type == machine.Q35 {
			p.Bus, p.Addr = "pcie.0", firstEndpointSlot+i
		}
		s, err := d.Spec(p)
		if err != nil {
			return nil, err
		}
		vm.cold = append(vm.cold, placed{dev: d, spec: s})
	}
	if err := vm.check(); err != nil {
		return nil, err
	}
	return vm, nil
}

// Machine returns the VM's machine.
func (vm *VM) Machine() Machine { return vm.machine }

// Ports returns the root port allocator; nil unless the machine is q35.
func (vm *VM) Ports() *PortAllocator { return vm.ports }

// check validates what depends on all devices together. Called with vm.mu held
// (or before the VM is shared).
func (vm *VM) check() error {
	all := vm.all()
	ids := newIDSpace()
	ids.reserve("chardev", qmpChardevID, consoleChardevID)
	ids.reserve("block node", pflashCodeNode, pflashVarsNode)
	ids.reserve("object", ramBackendID)
	if vm.ports != nil {
		for _, p := range vm.ports.Ports() {
			ids.reserve("device", p.ID)
		}
	}
	var memDevices uint64
	mmioSlots := 0
	for _, p := range all {
		if err := ids.add(p.dev.ID(), p.spec); err != nil {
			return err
		}
		for _, m := range p.spec.Memory {
			memDevices += m.Size
		}
		for _, f := range p.spec.Frontends {
			if f.Bus == "" {
				mmioSlots++
			}
		}
	}
	m := vm.machine
	var room uint64 // address space for memory devices
	if m.MaxMemory > m.Memory {
		room = m.MaxMemory - m.Memory
	}
	if memDevices > room {
		return &FieldError{Device: "machine", Field: "MaxMemory",
			Problem: fmt.Sprintf("leaves %d bytes above Memory for memory devices, which need %d", room, memDevices)}
	}
	if m.Type == machine.MicroVM && mmioSlots > MaxMicrovmDevices {
		return fmt.Errorf("devices: %d virtio devices; microvm has %d virtio-mmio slots", mmioSlots, MaxMicrovmDevices)
	}
	return nil
}

func (vm *VM) all() []placed {
	return append(append([]placed(nil), vm.cold...), vm.attached...)
}

// sharedMemory reports whether guest RAM must be a shared memfd.
func (vm *VM) sharedMemory() bool {
	if vm.machine.SharedMemory || vm.machine.RAMFile != nil {
		return true
	}
	for _, p := range vm.all() {
		if p.spec.NeedsSharedMemory {
			return true
		}
	}
	return false
}

// Render returns QEMU's arguments and the files it must inherit: files[i] is
// fd 3+i in QEMU (exec.Cmd.ExtraFiles). Devices on root ports (hot-plugged, or
// attached with HotplugAt) are rendered on their ports, so a restarted VM or a
// migration target comes up with the same layout.
func (vm *VM) Render() (args []string, files []*os.File) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	shared := vm.sharedMemory()
	files = append(files, vm.machine.Inherit...) // first: InheritedPath numbers them so
	args, files = vm.machine.args(shared, files)
	for _, s := range vm.machine.FDSets {
		o := newOptions("").add("fd", strconv.Itoa(3+len(files))).add("set", strconv.Itoa(s.Set))
		if s.Opaque != "" {
			o.add("opaque", s.Opaque)
		}
		args = append(args, "-add-fd", o.String())
		files = append(files, s.File)
	}
	if vm.ports != nil {
		for _, p := range vm.ports.Ports() {
			args = append(args, "-device", p.frontend(vm.machine.RootPorts).option())
		}
	}
	for _, p := range vm.all() {
		var more []string
		more, files = p.spec.args(shared, files)
		args = append(args, more...)
	}
	return args, files
}
