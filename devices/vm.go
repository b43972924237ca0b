package devices

import (
	"fmt"
	"os"
	"strings"
	"sync"
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
	port string // root port id, for attached devices
}

// NewVM validates the machine and the cold-plugged devices and places them: on
// q35 each takes the next endpoint slot on pcie.0, on microvm the next
// virtio-mmio slot (command-line order).
func NewVM(m Machine, devs ...Device) (*VM, error) {
	if err := m.validate(); err != nil {
		return nil, err
	}
	vm := &VM{machine: m}
	if m.Type == Q35 {
		var err error
		if vm.ports, err = NewPortAllocator(m.RootPorts); err != nil {
			return nil, err
		}
	}
	if m.Type == Q35 && len(devs) > MaxEndpoints {
		return nil, fmt.Errorf("devices: %d cold-plugged devices; pcie.0 has room for %d (put the rest on root ports with HotplugAt)", len(devs), MaxEndpoints)
	}
	for i, d := range devs {
		p := Placement{Transport: m.transport()}
		if m.Type == Q35 {
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
	if memDevices > 0 && memDevices > m.MaxMemory-min(m.MaxMemory, m.Memory) {
		return &FieldError{Device: "machine", Field: "MaxMemory",
			Problem: fmt.Sprintf("%d leaves %d bytes above Memory, but memory devices need %d", m.MaxMemory, m.MaxMemory-min(m.MaxMemory, m.Memory), memDevices)}
	}
	if m.Type == Microvm && mmioSlots > MaxMicrovmDevices {
		return fmt.Errorf("devices: %d virtio devices; microvm has %d virtio-mmio slots", mmioSlots, MaxMicrovmDevices)
	}
	return nil
}

func (vm *VM) all() []placed {
	return append(append([]placed(nil), vm.cold...), vm.attached...)
}

// sharedMemory reports whether guest RAM must be a shared memfd.
func (vm *VM) sharedMemory() bool {
	if vm.machine.SharedMemory {
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
	args = vm.machine.args(shared)
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

// args renders the spec's options in dependency order. Tap fds are numbered from
// 3 after those already in files, to which the tap's files are appended.
func (s Spec) args(shared bool, files []*os.File) ([]string, []*os.File) {
	var args []string
	for _, m := range s.Memory {
		m.Shared = m.Shared || shared
		args = append(args, "-object", m.option())
	}
	for _, c := range s.Chardevs {
		args = append(args, "-chardev", c.option())
	}
	for _, f := range s.Fsdevs {
		args = append(args, "-fsdev", f.option())
	}
	for _, b := range s.Blockdevs {
		args = append(args, "-blockdev", b.option())
	}
	for _, t := range s.Taps {
		var fds []int
		for _, f := range t.Files {
			fds = append(fds, 3+len(files))
			files = append(files, f)
		}
		args = append(args, "-netdev", t.option(fds))
	}
	for _, f := range s.Frontends {
		args = append(args, "-device", f.option())
	}
	return args, files
}

// idSpace checks that ids are unique within each of QEMU's namespaces.
type idSpace map[string]map[string]string // namespace → id → owner

func newIDSpace() idSpace { return idSpace{} }

func (s idSpace) reserve(namespace string, ids ...string) {
	for _, id := range ids {
		s.claim(namespace, id, "the machine")
	}
}

func (s idSpace) claim(namespace, id, owner string) error {
	if s[namespace] == nil {
		s[namespace] = map[string]string{}
	}
	if prev, ok := s[namespace][id]; ok {
		return fmt.Errorf("devices: %s id %q of %s is already used by %s", namespace, id, owner, prev)
	}
	s[namespace][id] = owner
	return nil
}

func (s idSpace) add(owner string, spec Spec) error {
	var claims [][2]string
	for _, m := range spec.Memory {
		claims = append(claims, [2]string{"object", m.ID})
	}
	for _, c := range spec.Chardevs {
		claims = append(claims, [2]string{"chardev", c.ID})
	}
	for _, f := range spec.Fsdevs {
		claims = append(claims, [2]string{"fsdev", f.ID})
	}
	for _, b := range spec.Blockdevs {
		claims = append(claims, [2]string{"block node", b.NodeName})
	}
	for _, t := range spec.Taps {
		claims = append(claims, [2]string{"netdev", t.ID})
	}
	for _, f := range spec.Frontends {
		claims = append(claims, [2]string{"device", f.ID})
	}
	for _, c := range claims {
		if err := s.claim(c[0], c[1], fmt.Sprintf("device %q", owner)); err != nil {
			return err
		}
	}
	return nil
}

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
	Device   Frontend
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
	vm.attached = append(vm.attached, placed{dev: dev, spec: spec, port: port.ID})
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
	if len(s.Chardevs) > 0 {
		why = append(why, "a chardev")
	}
	if len(s.Fsdevs) > 0 {
		why = append(why, "a 9p fsdev, which QEMU cannot add at run time")
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
