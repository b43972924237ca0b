package devices

import "strconv"

// DiskBus is the controller a Disk hangs off, as the guest sees it.
type DiskBus string

const (
	BusVirtio DiskBus = "virtio" // virtio-blk, one PCI function per disk
	BusSCSI   DiskBus = "scsi"   // scsi-hd / scsi-cd on a VirtioSCSI controller
	BusSATA   DiskBus = "sata"   // ide-hd / ide-cd on q35's built-in AHCI controller
)

// maxSATAPorts is how many ports q35's ICH9 AHCI controller has (ide.0 .. ide.5).
const maxSATAPorts = 6

// Disk is a guest disk or cdrom on any bus over an image node. It is how a VM pod's
// disks are modelled: the image is opened by the runtime (Image.Filename is often an
// fd set, FDSetPath), and a containerDisk's guest writes go to a throwaway qcow2 overlay
// (Image) over the read-only image (Backing).
type Disk struct {
	DeviceID string
	Bus      DiskBus
	CDROM    bool
	// Image is the node the guest reads and writes; its NodeName is derived from
	// DeviceID and need not be set.
	Image Blockdev
	// Backing, if set, is a read-only base under Image (Image must be qcow2).
	Backing *Blockdev
	// Serial is the disk's serial number (/dev/disk/by-id/*-<serial>); at most 20 bytes.
	Serial string
	// BootIndex orders the disk in the firmware's boot list (lower first); 0 leaves it out.
	BootIndex int
	// Controller is the VirtioSCSI controller's DeviceID (Bus scsi).
	Controller string
	// Port is the AHCI port, 0-5 (Bus sata); each port takes one disk.
	Port int
}

// ID implements Device.
func (d *Disk) ID() string { return d.DeviceID }

// NodeName is the block node the guest device uses.
func (d *Disk) NodeName() string { return d.DeviceID + "-drive" }

func (d *Disk) backingNode() string { return d.DeviceID + "-base" }

// Spec implements Device.
func (d *Disk) Spec(p Placement) (Spec, error) {
	c := newChecker("disk", d.DeviceID)
	c.id("DeviceID", d.DeviceID)
	c.nodeName("DeviceID", d.NodeName())
	c.nodeName("DeviceID", d.backingNode())
	c.oneOf("Bus", string(d.Bus), string(BusVirtio), string(BusSCSI), string(BusSATA))
	c.path("Image.Filename", d.Image.Filename)
	c.oneOf("Image.Format", d.Image.Format, "raw", "qcow2")
	c.oneOf("Image.Protocol", d.Image.Protocol, "file", "host_device")
	c.text("Serial", d.Serial)
	c.maxLen("Serial", d.Serial, maxBlkSerial)
	if d.BootIndex < 0 {
		c.fail("BootIndex", "%d is negative", d.BootIndex)
	}
	if d.CDROM && d.Bus == BusVirtio {
		c.fail("CDROM", "QEMU has no virtio cdrom: use bus sata or scsi")
	}
	if d.CDROM && !d.Image.ReadOnly {
		c.fail("Image.ReadOnly", "a cdrom is read-only")
	}
	if d.Backing != nil {
		c.path("Backing.Filename", d.Backing.Filename)
		c.oneOf("Backing.Format", d.Backing.Format, "raw", "qcow2")
		c.oneOf("Backing.Protocol", d.Backing.Protocol, "file", "host_device")
		if d.Image.Format != "qcow2" {
			c.fail("Image.Format", "an image over a backing node must be qcow2")
		}
		if !d.Backing.ReadOnly {
			c.fail("Backing.ReadOnly", "a backing node is read-only")
		}
	}
	switch d.Bus {
	case BusSCSI:
		c.id("Controller", d.Controller)
	case BusSATA:
		if p.Transport != PCI {
			c.fail("Bus", "sata needs q35")
		}
		if d.Port < 0 || d.Port >= maxSATAPorts {
			c.fail("Port", "%d: q35's AHCI has ports 0-%d", d.Port, maxSATAPorts-1)
		}
	}
	if err := c.Err(); err != nil {
		return Spec{}, err
	}
	var s Spec
	image := d.Image
	image.NodeName = d.NodeName()
	if d.Backing != nil {
		base := *d.Backing
		base.NodeName = d.backingNode()
		s.Blockdevs = append(s.Blockdevs, base)
		image.Backing = base.NodeName
	}
	s.Blockdevs = append(s.Blockdevs, image)

	fe := Frontend{ID: d.DeviceID, Props: []Property{StringProp("drive", image.NodeName)}}
	switch d.Bus {
	case BusVirtio:
		fe.Driver, fe.Bus, fe.Addr = p.Transport.virtioDriver("virtio-blk"), p.Bus, p.Addr
	case BusSCSI:
		fe.Driver, fe.Bus = "scsi-hd", d.Controller+".0"
		if d.CDROM {
			fe.Driver = "scsi-cd"
		}
	case BusSATA:
		fe.Driver, fe.Bus = "ide-hd", "ide."+strconv.Itoa(d.Port)
		if d.CDROM {
			fe.Driver = "ide-cd"
		}
	}
	if d.Serial != "" {
		fe.Props = append(fe.Props, StringProp("serial", d.Serial))
	}
	if d.BootIndex > 0 {
		fe.Props = append(fe.Props, IntProp("bootindex", int64(d.BootIndex)))
	}
	s.Frontends = []Frontend{fe}
	return s, nil
}

// OnPCI says whether the disk's frontend takes a PCI slot of its own (virtio-blk); SCSI
// and SATA disks hang off their controller.
func (d *Disk) OnPCI() bool { return d.Bus == BusVirtio }

// VirtioSCSI is a virtio-scsi controller for Disks on Bus scsi.
type VirtioSCSI struct {
	DeviceID string
}

// ID implements Device.
func (d *VirtioSCSI) ID() string { return d.DeviceID }

// Spec implements Device.
func (d *VirtioSCSI) Spec(p Placement) (Spec, error) {
	c := newChecker("virtio-scsi", d.DeviceID)
	c.id("DeviceID", d.DeviceID)
	if err := c.Err(); err != nil {
		return Spec{}, err
	}
	return Spec{Frontends: []Frontend{{Driver: p.Transport.virtioDriver("virtio-scsi"), ID: d.DeviceID, Bus: p.Bus, Addr: p.Addr}}}, nil
}

// PVPanic lets the guest kernel report a panic to QEMU (the pvpanic ISA device, which
// Linux and Windows drive); the machine's panic action decides what follows.
type PVPanic struct {
	DeviceID string
}

// ID implements Device.
func (d *PVPanic) ID() string { return d.DeviceID }

// Spec implements Device.
func (d *PVPanic) Spec(p Placement) (Spec, error) {
	c := newChecker("pvpanic", d.DeviceID)
	c.id("DeviceID", d.DeviceID)
	if p.Transport != PCI {
		c.fail("DeviceID", "pvpanic is an ISA device: it needs q35")
	}
	if err := c.Err(); err != nil {
		return Spec{}, err
	}
	return Spec{Frontends: []Frontend{{Driver: "pvpanic", ID: d.DeviceID}}}, nil
}

// VGA is a standard VGA adapter: a guest's graphical console, for VNC (Machine.VNCSocket).
type VGA struct {
	DeviceID string
}

// ID implements Device.
func (d *VGA) ID() string { return d.DeviceID }

// Spec implements Device.
func (d *VGA) Spec(p Placement) (Spec, error) {
	c := newChecker("vga", d.DeviceID)
	c.id("DeviceID", d.DeviceID)
	if p.Transport != PCI {
		c.fail("DeviceID", "VGA is a PCI device: it needs q35")
	}
	if err := c.Err(); err != nil {
		return Spec{}, err
	}
	return Spec{Frontends: []Frontend{{Driver: "VGA", ID: d.DeviceID, Bus: p.Bus, Addr: p.Addr}}}, nil
}
