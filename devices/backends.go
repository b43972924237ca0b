package devices

import (
	"fmt"
	"os"
	"strconv"
)

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
	// Backing names the node under this one (a qcow2 overlay over a read-only base),
	// overriding whatever backing file the image itself records.
	Backing string
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
	if b.Backing != "" {
		o.add("backing", b.Backing)
	}
	// the protocol node inherits read-only: an fd set's O_RDONLY fd is opened read-only
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

// IOThread is an event loop thread of QEMU's own, which a device's work runs on
// instead of the main loop.
type IOThread struct {
	ID string
}

func (t IOThread) option() string { return newOptions("iothread").add("id", t.ID).String() }

// Chardev is a character device backend: a unix socket, or a file that output is
// appended to.
type Chardev struct {
	ID   string
	Path string
	// Socket is a unix socket the runtime made, instead of Path: listening with Server,
	// else connected. QEMU inherits it, so it needs no access to where the socket lives
	// (it may run as a user of its own, docs/design/014).
	Socket *os.File
	// File makes it a log file (append=on) instead of a socket.
	File bool
	// Server makes QEMU listen on the socket (without waiting for a client)
	// instead of connecting to it.
	Server bool
}

// option renders the backend; fd is the number Socket will have in QEMU.
func (c Chardev) option(fd int) string {
	if c.File {
		return newOptions("file").add("id", c.ID).add("path", c.Path).addBool("append", true).String()
	}
	o := newOptions("socket").add("id", c.ID)
	if c.Socket != nil {
		o.add("fd", strconv.Itoa(fd))
	} else {
		o.add("path", c.Path)
	}
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

// render renders the backend, appending Socket to the files QEMU inherits.
func (c Chardev) render(files []*os.File) (string, []*os.File) {
	if c.Socket == nil {
		return c.option(0), files
	}
	return c.option(3 + len(files)), append(files, c.Socket)
}

// check reports a chardev given neither or both of Path and Socket.
func (c Chardev) check(ch *checker, field string) {
	switch {
	case c.Socket != nil && c.Path != "":
		ch.fail(field, "give a socket path or an inherited socket, not both")
	case c.Socket == nil:
		ch.path(field, c.Path)
	}
}
