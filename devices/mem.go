package devices

// VirtioMem is a virtio-mem device: up to Size bytes of memory the guest plugs and
// unplugs in blocks as RequestedSize changes (qom-set requested-size), without
// ACPI DIMMs. It needs PCI (q35) and a Machine with MaxMemory room for Size.
type VirtioMem struct {
	DeviceID string
	// Size is how much the device can ever provide (its memory backend's size).
	Size uint64
	// RequestedSize is how much the guest should plug at boot.
	RequestedSize uint64
}

// VirtioMemBlockMiB is virtio-mem's default block size on x86-64 (the THP size); sizes
// must be multiples of it.
const VirtioMemBlockMiB = 2

const virtioMemBlock = VirtioMemBlockMiB << 20

// ID implements Device.
func (d *VirtioMem) ID() string { return d.DeviceID }

// MemdevID is the id of the device's memory backend.
func (d *VirtioMem) MemdevID() string { return d.DeviceID + "-mem" }

// Spec implements Device.
func (d *VirtioMem) Spec(p Placement) (Spec, error) {
	c := newChecker("virtio-mem", d.DeviceID)
	c.id("DeviceID", d.DeviceID)
	if d.Size == 0 || d.Size%virtioMemBlock != 0 {
		c.fail("Size", "%d is not a positive multiple of 2 MiB", d.Size)
	}
	if d.RequestedSize%virtioMemBlock != 0 || d.RequestedSize > d.Size {
		c.fail("RequestedSize", "%d is not a multiple of 2 MiB up to Size", d.RequestedSize)
	}
	if p.Transport != PCI {
		c.fail("", "needs PCI (-M q35); virtio-mem has no virtio-mmio variant")
	}
	if err := c.Err(); err != nil {
		return Spec{}, err
	}
	return Spec{
		Memory: []MemoryBackend{{ID: d.MemdevID(), Size: d.Size}},
		Frontends: []Frontend{{Driver: "virtio-mem-pci", ID: d.DeviceID, Bus: p.Bus, Addr: p.Addr,
			Props: []Property{StringProp("memdev", d.MemdevID()), UintProp("requested-size", d.RequestedSize)}}},
	}, nil
}
