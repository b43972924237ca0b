package devices

import (
	"fmt"
	"os"
	"strconv"
)

// Transport is how virtio devices attach to the machine.
type Transport int

const (
	// MMIO is virtio-mmio, the only transport of -M microvm: drivers are
	// "virtio-*-device", with no hotplug and no PCI passthrough.
	MMIO Transport = iota + 1
	// PCI is PCI Express on -M q35: drivers are "virtio-*-pci".
	PCI
)

func (t Transport) String() string {
	switch t {
	case MMIO:
		return "virtio-mmio"
	case PCI:
		return "pci"
	}
	return "transport(" + strconv.Itoa(int(t)) + ")"
}

// virtioDriver names the virtio driver for the transport: "virtio-blk" becomes
// "virtio-blk-device" or "virtio-blk-pci".
func (t Transport) virtioDriver(base string) string {
	if t == MMIO {
		return base + "-device"
	}
	return base + "-pci"
}

// Placement is where a device's (main) frontend goes.
type Placement struct {
	Transport Transport
	// Bus is the PCI bus: "pcie.0" for cold-plugged endpoints, a root port id
	// for hot-plugged ones. Empty on MMIO, where QEMU takes the next free
	// virtio-mmio slot in command-line order.
	Bus string
	// Addr is the device number on Bus (pcie.0 only); 0 leaves it to QEMU.
	Addr int
}

// Device is anything that can be plugged into the VM.
type Device interface {
	// ID is the device's qdev id, unique in the VM; its backends' ids are
	// derived from it.
	ID() string
	// Spec describes the device's backends and frontends at p.
	Spec(p Placement) (Spec, error)
}

// Spec is what a device consists of, backends first. The VM renders each part as
// its command-line option; a hot-pluggable Spec (one frontend, and no chardev or
// fsdev, which QMP cannot add here) becomes a Hotplug.
type Spec struct {
	IOThreads []IOThread      // -object iothread
	Memory    []MemoryBackend // -object memory-backend-*
	Chardevs  []Chardev       // -chardev
	Fsdevs    []Fsdev         // -fsdev
	Blockdevs []Blockdev      // -blockdev
	Taps      []TapNetdev     // -netdev tap
	Frontends []Frontend      // -device, a controller before its children
	// NeedsSharedMemory is set by vhost-user devices, whose backend process maps
	// guest RAM: the machine must then back RAM with a shared memfd.
	NeedsSharedMemory bool
}

// Frontend is a guest-visible device: -device or device_add.
type Frontend struct {
	Driver string
	ID     string
	Bus    string
	Addr   int // PCI device number on Bus; 0 = chosen by QEMU
	// Multifunction marks function 0 of a slot whose other functions are used.
	Multifunction bool
	Function      int // PCI function at Addr
	Props         []Property
}

func (f Frontend) option() string {
	o := newOptions(f.Driver).add("id", f.ID)
	if f.Bus != "" {
		o.add("bus", f.Bus)
	}
	if f.Addr != 0 {
		o.add("addr", fmt.Sprintf("0x%x.%d", f.Addr, f.Function))
	}
	if f.Multifunction {
		o.addBool("multifunction", true)
	}
	for _, p := range f.Props {
		o.add(p.Name, p.Text())
	}
	return o.String()
}

// args renders the spec's options in dependency order. Tap fds are numbered from
// 3 after those already in files, to which the tap's files are appended.
func (s Spec) args(shared bool, files []*os.File) ([]string, []*os.File) {
	var args []string
	for _, io := range s.IOThreads {
		args = append(args, "-object", io.option())
	}
	for _, m := range s.Memory {
		m.Shared = m.Shared || shared
		args = append(args, "-object", m.option())
	}
	for _, c := range s.Chardevs {
		var opt string
		opt, files = c.render(files)
		args = append(args, "-chardev", opt)
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
