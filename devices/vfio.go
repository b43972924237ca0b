package devices

import (
	"fmt"
	"strconv"
	"strings"
)

// PCIAddress is a host PCI function: domain:bus:device.function.
type PCIAddress struct {
	Domain   uint16
	Bus      uint8
	Device   uint8 // 0-31
	Function uint8 // 0-7
}

// ParsePCIAddress parses "0000:01:00.0", or "01:00.0" in domain 0.
func ParsePCIAddress(s string) (PCIAddress, error) {
	bad := func() (PCIAddress, error) {
		return PCIAddress{}, fmt.Errorf("devices: %q is not a PCI address (domain:bus:device.function, e.g. 0000:01:00.0)", s)
	}
	parts := strings.Split(s, ":")
	if len(parts) == 2 {
		parts = append([]string{"0000"}, parts...)
	}
	if len(parts) != 3 {
		return bad()
	}
	devFn := strings.Split(parts[2], ".")
	if len(devFn) != 2 {
		return bad()
	}
	domain, err1 := strconv.ParseUint(parts[0], 16, 16)
	bus, err2 := strconv.ParseUint(parts[1], 16, 8)
	dev, err3 := strconv.ParseUint(devFn[0], 16, 8)
	fn, err4 := strconv.ParseUint(devFn[1], 16, 8)
	if err1 != nil || err2 != nil || err3 != nil || err4 != nil || dev > 31 || fn > 7 {
		return bad()
	}
	return PCIAddress{Domain: uint16(domain), Bus: uint8(bus), Device: uint8(dev), Function: uint8(fn)}, nil
}

// String formats the address as sysfs names it: "0000:01:00.0".
func (a PCIAddress) String() string {
	return fmt.Sprintf("%04x:%02x:%02x.%x", a.Domain, a.Bus, a.Device, a.Function)
}

// VFIO passes a host PCI function through to the guest (vfio-pci). The function,
// and every other endpoint in its IOMMU group, must be bound to the vfio-pci
// driver first (Sysfs.PrepareVFIO). It needs PCI (-M q35); the device can be
// hot-plugged into a root port.
type VFIO struct {
	DeviceID string
	Host     PCIAddress
}

// ID implements Device.
func (d *VFIO) ID() string { return d.DeviceID }

// Spec implements Device.
func (d *VFIO) Spec(p Placement) (Spec, error) {
	c := newChecker("vfio-pci", d.DeviceID)
	c.id("DeviceID", d.DeviceID)
	if d.Host.Device > 31 || d.Host.Function > 7 {
		c.fail("Host", "%s is not a PCI address", d.Host)
	}
	if p.Transport != PCI {
		c.fail("", "needs PCI (-M q35); microvm has no PCI bus")
	}
	if err := c.Err(); err != nil {
		return Spec{}, err
	}
	return Spec{Frontends: []Frontend{{Driver: "vfio-pci", ID: d.DeviceID, Bus: p.Bus, Addr: p.Addr,
		Props: []Property{StringProp("host", d.Host.String())}}}}, nil
}
