package devices

import (
	"fmt"
	"strings"
)

// Hotplug is the QMP work that adds one device to a running q35 VM, in this order:
//
//	Blockdev: blockdev-add
//	Tap:      getfd for each of Files (named by FDNames), then netdev_add
//	Memory:   object-add
//	Device:   device_add
//
// Unplugging reverses it: device_del and its DEVICE_DELETED event, then
// blockdev-del, netdev_del or object-del of the backend, then VM.Release.
type Hotplug struct {
	Port     RootPort
	Blockdev *Blockdev
	Tap      *TapNetdev
	Memory   *MemoryBackend
	// Chardev is a vhost-user device's backend: a connection to its daemon, which the
	// runtime passes (getfd) and adds (chardev-add) before the device.
	Chardev *Chardev
	Device  Frontend
}

// Hotplug places dev on the lowest free root port and returns the steps that plug
// it. If the runtime cannot carry them out, it must undo what it did and call
// Release.
func (vm *VM) Hotplug(dev Device) (Hotplug, error) {
	return vm.hotplug(dev, func(id string) (RootPort, error) { return vm.ports.Allocate(id) })
}

// HotplugAt is Hotplug on a given root port: for a migration target, whose
// devices must sit where they sit on the source, or to put a cold-plugged device
// on a root port so that it can be unplugged later. Render includes it.
func (vm *VM) HotplugAt(portID string, dev Device) (Hotplug, error) {
	return vm.hotplug(dev, func(id string) (RootPort, error) { return vm.ports.Claim(portID, id) })
}

func (vm *VM) hotplug(dev Device, takePort func(id string) (RootPort, error)) (Hotplug, error) {
	if dev.ID() == "" {
		return Hotplug{}, fmt.Errorf("devices: hotplug of a device without an id")
	}
	if vm.ports == nil {
		return Hotplug{}, fmt.Errorf("devices: hotplug of %q: %s has no hotplug; use q35", dev.ID(), vm.machine.Type)
	}
	vm.mu.Lock()
	defer vm.mu.Unlock()
	port, err := takePort(dev.ID())
	if err != nil {
		return Hotplug{}, err
	}
	hp, err := vm.place(dev, port)
	if err != nil {
		vm.ports.Release(dev.ID())
		return Hotplug{}, err
	}
	return hp, nil
}

// place records dev on port and derives its Hotplug. Called with vm.mu held.
func (vm *VM) place(dev Device, port RootPort) (Hotplug, error) {
	spec, err := dev.Spec(Placement{Transport: PCI, Bus: port.ID})
	if err != nil {
		return Hotplug{}, err
	}
	if err := hotpluggable(dev.ID(), spec); err != nil {
		return Hotplug{}, err
	}
	if spec.NeedsSharedMemory && !vm.sharedMemory() {
		return Hotplug{}, fmt.Errorf("devices: hotplug of %q: it needs shared guest RAM; start the VM with Machine.SharedMemory", dev.ID())
	}
	vm.attached = append(vm.attached, placed{dev: dev, spec: spec})
	if err := vm.check(); err != nil {
		vm.attached = vm.attached[:len(vm.attached)-1]
		return Hotplug{}, err
	}
	hp := Hotplug{Port: port, Device: spec.Frontends[0]}
	if len(spec.Blockdevs) == 1 {
		hp.Blockdev = &spec.Blockdevs[0]
	}
	if len(spec.Taps) == 1 {
		hp.Tap = &spec.Taps[0]
	}
	if len(spec.Chardevs) == 1 {
		hp.Chardev = &spec.Chardevs[0]
	}
	if len(spec.Memory) == 1 {
		m := spec.Memory[0]
		m.Shared = m.Shared || vm.sharedMemory()
		hp.Memory = &m
	}
	return hp, nil
}

// hotpluggable reports why spec cannot be hot-plugged with the steps of Hotplug.
func hotpluggable(id string, s Spec) error {
	var why []string
	switch {
	case len(s.Chardevs) > 1:
		why = append(why, "more than one chardev")
	case len(s.Chardevs) == 1 && (s.Chardevs[0].Socket == nil || s.Chardevs[0].Server || s.Chardevs[0].File):
		why = append(why, "a chardev that is not a connection the runtime made")
	}
	if len(s.Fsdevs) > 0 {
		why = append(why, "a 9p fsdev, which QEMU cannot add at run time")
	}
	if len(s.IOThreads) > 0 {
		why = append(why, "an I/O thread of its own")
	}
	if len(s.Frontends) != 1 {
		why = append(why, fmt.Sprintf("%d frontends", len(s.Frontends)))
	}
	if len(s.Blockdevs) > 1 || len(s.Taps) > 1 || len(s.Memory) > 1 {
		why = append(why, "more than one backend of a kind")
	}
	if len(why) > 0 {
		return fmt.Errorf("devices: %q cannot be hot-plugged: it has %s", id, strings.Join(why, ", "))
	}
	return nil
}

// Release forgets the hot-plugged device deviceID and frees its root port, once
// QEMU has deleted it (DEVICE_DELETED) or its hotplug was rolled back.
func (vm *VM) Release(deviceID string) error {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	for i, p := range vm.attached {
		if p.dev.ID() == deviceID {
			vm.attached = append(vm.attached[:i], vm.attached[i+1:]...)
			vm.ports.Release(deviceID)
			return nil
		}
	}
	return fmt.Errorf("devices: %q is not on a root port", deviceID)
}
