package devices

import (
	"fmt"
	"os"
)

// VirtioSerial is a virtio-serial controller with its ports. vmpod's agent channel
// is a port named "vmpod.agent" whose chardev is a unix socket QEMU listens on
// (without waiting): the shim connects once QEMU runs, and bytes it writes before
// the guest opens the port wait in QEMU's buffers.
type VirtioSerial struct {
	DeviceID string
	Ports    []SerialPort
}

// SerialPort is one virtserialport.
type SerialPort struct {
	DeviceID string
	// Name is what the guest finds in /sys/class/virtio-ports/*/name.
	Name string
	// SocketPath is the unix socket QEMU listens on for the host side, or Listener one
	// the runtime made and QEMU inherits.
	SocketPath string
	Listener   *os.File
}

// ID implements Device.
func (d *VirtioSerial) ID() string { return d.DeviceID }

// Spec implements Device.
func (d *VirtioSerial) Spec(p Placement) (Spec, error) {
	c := newChecker("virtio-serial", d.DeviceID)
	c.id("DeviceID", d.DeviceID)
	names := map[string]bool{}
	for i, port := range d.Ports {
		field := fmt.Sprintf("Ports[%d]", i)
		c.id(field+".DeviceID", port.DeviceID)
		c.required(field+".Name", port.Name)
		Chardev{Path: port.SocketPath, Socket: port.Listener}.check(c, field+".SocketPath")
		if names[port.Name] {
			c.fail(field+".Name", "%q is used by another port", port.Name)
		}
		names[port.Name] = true
	}
	if err := c.Err(); err != nil {
		return Spec{}, err
	}
	s := Spec{Frontends: []Frontend{{Driver: p.Transport.virtioDriver("virtio-serial"), ID: d.DeviceID, Bus: p.Bus, Addr: p.Addr}}}
	for _, port := range d.Ports {
		chardev := port.DeviceID + "-sock"
		s.Chardevs = append(s.Chardevs, Chardev{ID: chardev, Path: port.SocketPath, Socket: port.Listener, Server: true})
		s.Frontends = append(s.Frontends, Frontend{Driver: "virtserialport", ID: port.DeviceID, Bus: d.DeviceID + ".0",
			Props: []Property{StringProp("chardev", chardev), StringProp("name", port.Name)}})
	}
	return s, nil
}
