package devices

// VirtioRNG feeds the guest entropy from QEMU's built-in source (getrandom on the
// host), so early boot does not wait for the guest's entropy pool.
type VirtioRNG struct {
	DeviceID string
}

// ID implements Device.
func (d *VirtioRNG) ID() string { return d.DeviceID }

// Spec implements Device.
func (d *VirtioRNG) Spec(p Placement) (Spec, error) {
	c := newChecker("virtio-rng", d.DeviceID)
	c.id("DeviceID", d.DeviceID)
	if err := c.Err(); err != nil {
		return Spec{}, err
	}
	return Spec{Frontends: []Frontend{{Driver: p.Transport.virtioDriver("virtio-rng"), ID: d.DeviceID, Bus: p.Bus, Addr: p.Addr}}}, nil
}

// VirtioBalloon lets the host reclaim guest memory.
type VirtioBalloon struct {
	DeviceID string
	// DeflateOnOOM gives memory back to a guest that would otherwise OOM.
	DeflateOnOOM bool
	// FreePageReporting has the guest report freed pages, which QEMU discards,
	// so idle guest memory returns to the host without inflating the balloon.
	FreePageReporting bool
	// FreePageHint has the guest tell an outgoing migration which pages are free, so
	// QEMU neither reads nor sends them. QEMU serves the hints on an I/O thread of the
	// balloon's own, which the spec carries.
	FreePageHint bool
}

// ID implements Device.
func (d *VirtioBalloon) ID() string { return d.DeviceID }

// Spec implements Device.
func (d *VirtioBalloon) Spec(p Placement) (Spec, error) {
	c := newChecker("virtio-balloon", d.DeviceID)
	c.id("DeviceID", d.DeviceID)
	if err := c.Err(); err != nil {
		return Spec{}, err
	}
	fe := Frontend{Driver: p.Transport.virtioDriver("virtio-balloon"), ID: d.DeviceID, Bus: p.Bus, Addr: p.Addr}
	if d.DeflateOnOOM {
		fe.Props = append(fe.Props, BoolProp("deflate-on-oom", true))
	}
	if d.FreePageReporting {
		fe.Props = append(fe.Props, BoolProp("free-page-reporting", true))
	}
	var spec Spec
	if d.FreePageHint {
		io := IOThread{ID: d.DeviceID + "-io"}
		spec.IOThreads = append(spec.IOThreads, io)
		fe.Props = append(fe.Props, BoolProp("free-page-hint", true), StringProp("iothread", io.ID))
	}
	spec.Frontends = []Frontend{fe}
	return spec, nil
}

// Vsock is a vhost-vsock device. It needs /dev/vhost-vsock on the host, which
// vmpod's development machines lack (the agent uses virtio-serial there), so it
// is rendered only when a VM lists it.
type Vsock struct {
	DeviceID string
	// GuestCID is the guest's vsock address: 3 or more (0-2 are reserved) and
	// unique on the host.
	GuestCID uint32
}

// ID implements Device.
func (d *Vsock) ID() string { return d.DeviceID }

// Spec implements Device.
func (d *Vsock) Spec(p Placement) (Spec, error) {
	c := newChecker("vhost-vsock", d.DeviceID)
	c.id("DeviceID", d.DeviceID)
	if d.GuestCID < 3 || d.GuestCID == 0xffffffff {
		c.fail("GuestCID", "%d is reserved; use 3 to 2^32-2", d.GuestCID)
	}
	if err := c.Err(); err != nil {
		return Spec{}, err
	}
	return Spec{Frontends: []Frontend{{Driver: p.Transport.virtioDriver("vhost-vsock"), ID: d.DeviceID, Bus: p.Bus, Addr: p.Addr,
		Props: []Property{UintProp("guest-cid", uint64(d.GuestCID))}}}}, nil
}
