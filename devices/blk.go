package devices

// VirtioBlk is a virtio block device over a disk image or host block device.
type VirtioBlk struct {
	DeviceID string
	Path     string // image file, or block device with BlockDevice set
	// Format is the image format: "raw" (the default) or "qcow2".
	Format string
	// BlockDevice opens Path with QEMU's host_device driver (a PVC in block mode)
	// rather than as a file.
	BlockDevice bool
	ReadOnly    bool
	// Serial is what the guest sees as the disk's serial number
	// (/dev/disk/by-id/virtio-<serial>); at most 20 bytes.
	Serial string
	// BootIndex orders the disk in the firmware's boot list (lower first);
	// 0 leaves it out.
	BootIndex int
	Direct    bool // bypass the host page cache
	Discard   bool // pass the guest's discards to the image
}

// maxBlkSerial is the size of virtio-blk's serial field (VIRTIO_BLK_ID_BYTES).
const maxBlkSerial = 20

// ID implements Device.
func (d *VirtioBlk) ID() string { return d.DeviceID }

// NodeName is the block node of the disk image.
func (d *VirtioBlk) NodeName() string { return d.DeviceID + "-drive" }

// Spec implements Device.
func (d *VirtioBlk) Spec(p Placement) (Spec, error) {
	c := newChecker("virtio-blk", d.DeviceID)
	c.id("DeviceID", d.DeviceID)
	c.nodeName("DeviceID", d.NodeName())
	c.path("Path", d.Path)
	format := orDefault(d.Format, "raw")
	c.oneOf("Format", format, "raw", "qcow2")
	c.text("Serial", d.Serial)
	c.maxLen("Serial", d.Serial, maxBlkSerial)
	if d.BootIndex < 0 {
		c.fail("BootIndex", "%d is negative", d.BootIndex)
	}
	if err := c.Err(); err != nil {
		return Spec{}, err
	}
	protocol := "file"
	if d.BlockDevice {
		protocol = "host_device"
	}
	fe := Frontend{Driver: p.Transport.virtioDriver("virtio-blk"), ID: d.DeviceID, Bus: p.Bus, Addr: p.Addr,
		Props: []Property{StringProp("drive", d.NodeName())}}
	if d.Serial != "" {
		fe.Props = append(fe.Props, StringProp("serial", d.Serial))
	}
	if d.BootIndex > 0 {
		fe.Props = append(fe.Props, IntProp("bootindex", int64(d.BootIndex)))
	}
	return Spec{
		Blockdevs: []Blockdev{{NodeName: d.NodeName(), Format: format, Protocol: protocol, Filename: d.Path,
			ReadOnly: d.ReadOnly, Direct: d.Direct, Discard: d.Discard}},
		Frontends: []Frontend{fe},
	}, nil
}

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}
