package devices

import (
	"net"
	"os"
)

// VirtioNet is a virtio NIC on a tap. vmpod's shim creates the tap in the pod's
// network namespace and passes its queue fds (TapFiles); TapName instead lets QEMU
// open an existing tap itself.
type VirtioNet struct {
	DeviceID string
	// MAC is the guest NIC's address, e.g. the pod veth's, so traffic mirrored
	// between veth and tap needs no rewriting.
	MAC string
	// TapFiles are the tap's queue fds, one per queue pair (more than one
	// enables multiqueue). QEMU inherits them (cold plug) or receives them over
	// QMP (hot plug).
	TapFiles []*os.File
	TapName  string
	// Queues is the number of queue pairs QEMU opens on TapName; 0 means 1.
	Queues int
	// Vhost moves the data path into the kernel (vhost-net); it needs
	// /dev/vhost-net. Off, QEMU's userspace virtio-net serves the queues.
	Vhost bool
	// Model replaces virtio-net with an emulated Intel NIC, "e1000" or "e1000e", for
	// guests without virtio drivers (a Windows installer); PCI only, one queue.
	Model string
}

// ID implements Device.
func (d *VirtioNet) ID() string { return d.DeviceID }

// NetdevID is the id of the tap backend.
func (d *VirtioNet) NetdevID() string { return d.DeviceID + "-tap" }

// Spec implements Device.
func (d *VirtioNet) Spec(p Placement) (Spec, error) {
	c := newChecker("virtio-net", d.DeviceID)
	c.id("DeviceID", d.DeviceID)
	if mac, err := net.ParseMAC(d.MAC); err != nil || len(mac) != 6 {
		c.fail("MAC", "%q is not a 48-bit MAC address", d.MAC)
	} else if mac[0]&1 != 0 {
		c.fail("MAC", "%q is a multicast address", d.MAC)
	}
	switch {
	case len(d.TapFiles) > 0 && d.TapName != "":
		c.fail("TapName", "is set together with TapFiles; give one")
	case len(d.TapFiles) == 0 && d.TapName == "":
		c.fail("TapFiles", "neither TapFiles nor TapName is set")
	case d.TapName != "":
		c.text("TapName", d.TapName)
		c.maxLen("TapName", d.TapName, 15) // IFNAMSIZ less the NUL
	}
	for i, f := range d.TapFiles {
		if f == nil {
			c.fail("TapFiles", "entry %d is nil", i)
		}
	}
	if len(d.TapFiles) > 0 && d.Queues > 0 && d.Queues != len(d.TapFiles) {
		c.fail("Queues", "%d does not match the %d TapFiles (one fd per queue pair)", d.Queues, len(d.TapFiles))
	}
	if d.Queues < 0 {
		c.fail("Queues", "%d is negative", d.Queues)
	}
	if d.Model != "" {
		c.oneOf("Model", d.Model, "e1000", "e1000e")
		if p.Transport != PCI {
			c.fail("Model", "%s is a PCI NIC: it needs q35", d.Model)
		}
		if len(d.TapFiles) > 1 || d.Queues > 1 {
			c.fail("Model", "%s has one queue", d.Model)
		}
	}
	if err := c.Err(); err != nil {
		return Spec{}, err
	}
	queues := max(d.Queues, len(d.TapFiles), 1)
	driver := p.Transport.virtioDriver("virtio-net")
	if d.Model != "" {
		driver = d.Model
	}
	fe := Frontend{Driver: driver, ID: d.DeviceID, Bus: p.Bus, Addr: p.Addr,
		Props: []Property{StringProp("netdev", d.NetdevID()), StringProp("mac", d.MAC)}}
	if queues > 1 {
		fe.Props = append(fe.Props, BoolProp("mq", true))
		if p.Transport == PCI {
			// One MSI-X vector per queue in each direction, plus config and control.
			fe.Props = append(fe.Props, UintProp("vectors", uint64(2*queues+2)))
		}
	}
	tap := TapNetdev{ID: d.NetdevID(), Files: d.TapFiles, Ifname: d.TapName, Vhost: d.Vhost}
	if d.TapName != "" {
		tap.Queues = queues
	}
	return Spec{Taps: []TapNetdev{tap}, Frontends: []Frontend{fe}}, nil
}
