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

// Blockdev is a disk image opened as a format node (NodeName) over a protocol
// node created with it. It has the shape of qmp.BlockdevOptions, so
// qmp.BlockdevOptions(b) converts it.
type Blockdev struct {
	NodeName string
	Format   string // "raw" or "qcow2"
	Protocol string // "file" or "host_device"
	Filename string
	ReadOnly bool
	Direct   bool // cache.direct=on (O_DIRECT)
	Discard  bool // discard=unmap
}

func (b Blockdev) option() string {
	o := newOptions("").add("driver", b.Format).add("node-name", b.NodeName)
	if b.ReadOnly {
		o.addBool("read-only", true)
	}
	if b.Direct {
		o.addBool("cache.direct", true)
	}
	if b.Discard {
		o.add("discard", "unmap")
	}
	return o.add("file.driver", b.Protocol).add("file.filename", b.Filename).String()
}

// TapNetdev is a tap network backend, given as open queue fds (Files, one per
// queue) or as an existing tap QEMU opens by name (Ifname).
type TapNetdev struct {
	ID     string
	Files  []*os.File
	Ifname string
	Queues int // with Ifname; 0 means 1
	Vhost  bool
}

// FDNames are the names under which a hot-plug passes Files to QEMU (getfd),
// in order; netdev_add then refers to them.
func (t TapNetdev) FDNames() []string {
	names := make([]string, len(t.Files))
	for i := range t.Files {
		names[i] = fmt.Sprintf("%s-fd%d", t.ID, i)
	}
	return names
}

// option renders the netdev; fds are the numbers Files will have in QEMU.
func (t TapNetdev) option(fds []int) string {
	o := newOptions("tap").add("id", t.ID)
	switch {
	case len(fds) == 1:
		o.add("fd", strconv.Itoa(fds[0]))
	case len(fds) > 1:
		s := ""
		for i, fd := range fds {
			if i > 0 {
				s += ":"
			}
			s += strconv.Itoa(fd)
		}
		o.add("fds", s)
	default:
		o.add("ifname", t.Ifname).add("script", "no").add("downscript", "no")
		if t.Queues > 1 {
			o.add("queues", strconv.Itoa(t.Queues))
		}
	}
	return o.addBool("vhost", t.Vhost).String()
}

// MemoryBackend is host memory for the guest, such as a virtio-mem device's. It
// has the shape of qmp.MemoryBackend, so qmp.MemoryBackend(m) converts it.
type MemoryBackend struct {
	ID     string
	Size   uint64 // bytes
	Shared bool   // memfd with share=on; the VM sets it when guest RAM is shared
}

func (m MemoryBackend) option() string {
	if m.Shared {
		return newOptions("memory-backend-memfd").add("id", m.ID).addUint("size", m.Size).addBool("share", true).String()
	}
	return newOptions("memory-backend-ram").add("id", m.ID).addUint("size", m.Size).String()
}

// Chardev is a character device backend: a unix socket, or a file that output is
// appended to.
type Chardev struct {
	ID   string
	Path string
	// File makes it a log file (append=on) instead of a socket.
	File bool
	// Server makes QEMU listen on the socket (without waiting for a client)
	// instead of connecting to it.
	Server bool
}

func (c Chardev) option() string {
	if c.File {
		return newOptions("file").add("id", c.ID).add("path", c.Path).addBool("append", true).String()
	}
	o := newOptions("socket").add("id", c.ID).add("path", c.Path)
	if c.Server {
		o.addBool("server", true).addBool("wait", false)
	}
	return o.String()
}

// Fsdev is a 9p filesystem backend exporting a host directory.
type Fsdev struct {
	ID            string
	Path          string
	SecurityModel string // "passthrough", "mapped-xattr", "mapped-file" or "none"
	ReadOnly      bool
	MultiDevs     string // "remap" gives files from different host filesystems distinct inode numbers
}

func (f Fsdev) option() string {
	o := newOptions("local").add("id", f.ID).add("path", f.Path).add("security_model", f.SecurityModel)
	if f.ReadOnly {
		o.addBool("readonly", true)
	}
	if f.MultiDevs != "" {
		o.add("multidevs", f.MultiDevs)
	}
	return o.String()
}
