package devices

import "os"

// VirtioFS is a vhost-user-fs device (virtio-fs) served by a virtiofsd listening
// on SocketPath; the runtime starts virtiofsd, one per VM, before QEMU. virtiofsd
// maps guest RAM, so a VM with this device backs its RAM with a shared memfd;
// on microvm it also needs modern virtio-mmio, which the Machine always selects.
type VirtioFS struct {
	DeviceID   string
	SocketPath string
	// Conn is a connection to virtiofsd the runtime made, instead of SocketPath: QEMU
	// inherits it.
	Conn *os.File
	// Tag is the name the guest mounts: mount -t virtiofs <tag> /mnt.
	Tag string
	// QueueSize is the request queue's size; 0 keeps QEMU's default (128).
	QueueSize int
}

// maxFSTag is the size of virtio-fs's tag field in the virtio spec.
const maxFSTag = 36

// ID implements Device.
func (d *VirtioFS) ID() string { return d.DeviceID }

// Spec implements Device.
func (d *VirtioFS) Spec(p Placement) (Spec, error) {
	c := newChecker("vhost-user-fs", d.DeviceID)
	c.id("DeviceID", d.DeviceID)
	Chardev{Path: d.SocketPath, Socket: d.Conn}.check(c, "SocketPath")
	c.required("Tag", d.Tag)
	c.maxLen("Tag", d.Tag, maxFSTag)
	if d.QueueSize < 0 || d.QueueSize&(d.QueueSize-1) != 0 || d.QueueSize > 1024 {
		c.fail("QueueSize", "%d is not a power of two up to 1024", d.QueueSize)
	}
	if err := c.Err(); err != nil {
		return Spec{}, err
	}
	chardev := d.DeviceID + "-sock"
	fe := Frontend{Driver: p.Transport.virtioDriver("vhost-user-fs"), ID: d.DeviceID, Bus: p.Bus, Addr: p.Addr,
		Props: []Property{StringProp("chardev", chardev), StringProp("tag", d.Tag)}}
	if d.QueueSize > 0 {
		fe.Props = append(fe.Props, UintProp("queue-size", uint64(d.QueueSize)))
	}
	return Spec{
		Chardevs:          []Chardev{{ID: chardev, Path: d.SocketPath, Socket: d.Conn}},
		Frontends:         []Frontend{fe},
		NeedsSharedMemory: true,
	}, nil
}

// Virtio9P shares a host directory over 9p (virtio-9p): no daemon and no shared
// memory, fast for large sequential reads, slow for metadata (each 9p request
// costs ~0.3 ms under TCG; see reference/guest-vm/REPORT.md).
type Virtio9P struct {
	DeviceID string
	Path     string
	// MountTag is the name the guest mounts: mount -t 9p -o trans=virtio <tag>;
	// at most 31 bytes.
	MountTag string
	// SecurityModel is how guest ownership and modes map to the host:
	// "passthrough" (the default; QEMU runs as root), "mapped-xattr",
	// "mapped-file" or "none".
	SecurityModel string
	ReadOnly      bool
	// RemapInodes gives files from different host filesystems distinct inode
	// numbers in the guest (multidevs=remap), which a rootfs spanning mounts needs.
	RemapInodes bool
}

// max9PTag is QEMU's limit for 9p mount tags.
const max9PTag = 31

// ID implements Device.
func (d *Virtio9P) ID() string { return d.DeviceID }

// Spec implements Device.
func (d *Virtio9P) Spec(p Placement) (Spec, error) {
	c := newChecker("virtio-9p", d.DeviceID)
	c.id("DeviceID", d.DeviceID)
	c.path("Path", d.Path)
	c.required("MountTag", d.MountTag)
	c.maxLen("MountTag", d.MountTag, max9PTag)
	model := orDefault(d.SecurityModel, "passthrough")
	c.oneOf("SecurityModel", model, "passthrough", "mapped-xattr", "mapped-file", "none")
	if err := c.Err(); err != nil {
		return Spec{}, err
	}
	fsdev := Fsdev{ID: d.DeviceID + "-fsdev", Path: d.Path, SecurityModel: model, ReadOnly: d.ReadOnly}
	if d.RemapInodes {
		fsdev.MultiDevs = "remap"
	}
	return Spec{
		Fsdevs: []Fsdev{fsdev},
		Frontends: []Frontend{{Driver: p.Transport.virtioDriver("virtio-9p"), ID: d.DeviceID, Bus: p.Bus, Addr: p.Addr,
			Props: []Property{StringProp("fsdev", fsdev.ID), StringProp("mount_tag", d.MountTag)}}},
	}, nil
}
