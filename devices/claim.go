package devices

import (
	"errors"
	"fmt"
	"os"
	"path"
	"slices"
	"strings"
)

// CharDevice is a character device node as an OCI spec lists it (linux.devices): a CDI
// spec or device plugin injects /dev/vfio/<group> (or an iommufd /dev/vfio/devices/vfioN)
// for each PCI device it allocated.
type CharDevice struct {
	Path         string // in the container: for messages
	Major, Minor uint32
}

// VFIOClaim is what CheckVFIO found: the PCI functions a pod's VFIO nodes give, and
// those of them still to be bound to vfio-pci.
type VFIOClaim struct {
	Functions []PCIAddress // sorted
	toBind    []PCIAddress
	sysfs     Sysfs
}

// CheckVFIO turns the VFIO nodes a pod was given into the PCI functions its VM gets, once
// each is safe to hand over, and changes nothing (Bind does):
//   - each node is a VFIO group or device (by major:minor, not by name);
//   - every endpoint of the IOMMU group of each function is one the pod was given: VFIO
//     isolates whole groups, so a group member left on the host would share DMA with
//     the guest;
//   - each function is bound to vfio-pci, or its vendor:device is one the node's
//     allow-list lets the shim bind ("10de:2236", "10de:*") and it is no bridge.
//
// Errors name the node that brought the function in.
func (s Sysfs) CheckVFIO(nodes []CharDevice, allowBind []string) (*VFIOClaim, error) {
	c := &VFIOClaim{sysfs: s}
	from := map[PCIAddress]string{}
	for _, n := range nodes {
		fns, err := s.ResolveVFIODevice(n.Major, n.Minor)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", n.Path, err)
		}
		for _, a := range fns {
			if _, dup := from[a]; !dup {
				from[a] = n.Path
				c.Functions = append(c.Functions, a)
			}
		}
	}
	slices.SortFunc(c.Functions, func(a, b PCIAddress) int { return strings.Compare(a.String(), b.String()) })
	for _, a := range c.Functions {
		fail := func(format string, args ...any) (*VFIOClaim, error) {
			return nil, fmt.Errorf("%s: devices: %s: %s", from[a], a, fmt.Sprintf(format, args...))
		}
		g, err := s.IOMMUGroupOf(a)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", from[a], err)
		}
		for _, m := range g.Devices {
			if _, given := from[m]; given {
				continue
			}
			bridge, err := s.isBridge(m)
			if err != nil {
				return nil, err
			}
			if !bridge {
				return fail("IOMMU group %d also holds %s, which the pod was not given (VFIO assigns whole groups)", g.Number, m)
			}
		}
		driver, err := s.Driver(a)
		if err != nil {
			return nil, err
		}
		if driver == vfioDriver {
			continue
		}
		id, err := s.VendorDevice(a)
		if err != nil {
			return nil, err
		}
		bound := "no driver"
		if driver != "" {
			bound = "driver " + driver
		}
		if !allowed(id, allowBind) {
			return fail("vendor:device %s has %s, not vfio-pci, and the node's devices.vfio_bind does not let vmpod bind it", id, bound)
		}
		if bridge, err := s.isBridge(a); err != nil || bridge {
			return fail("is a bridge (%s): vmpod never binds a bridge to vfio-pci, whatever devices.vfio_bind says", bound)
		}
		c.toBind = append(c.toBind, a)
	}
	return c, nil
}

// Bind binds to vfio-pci the functions CheckVFIO found still on another driver. The
// device plugin owns a device's life on the host: vmpod never binds one back.
func (c *VFIOClaim) Bind() error {
	for _, a := range c.toBind {
		if err := c.sysfs.BindVFIO(a); err != nil {
			return fmt.Errorf("%w (devices bound so far stay with vfio-pci)", err)
		}
	}
	c.toBind = nil
	return nil
}

// VendorDevice is the function's "vendor:device" ID, as lspci -n prints it: "10de:2236".
func (s Sysfs) VendorDevice(a PCIAddress) (string, error) {
	var ids []string
	for _, f := range []string{"vendor", "device"} {
		b, err := os.ReadFile(s.devicePath(a, f))
		if err != nil {
			return "", fmt.Errorf("devices: %s of %s: %w", f, a, err)
		}
		ids = append(ids, strings.TrimPrefix(strings.TrimSpace(string(b)), "0x"))
	}
	return ids[0] + ":" + ids[1], nil
}

// allowed says whether vendor:device id matches one of the patterns ("vvvv:dddd" or
// "vvvv:*").
func allowed(id string, patterns []string) bool {
	for _, p := range patterns {
		if ok, _ := path.Match(strings.ToLower(p), id); ok {
			return true
		}
	}
	return false
}

// CheckVFIOBindPattern checks one entry of a node's devices.vfio_bind.
func CheckVFIOBindPattern(p string) error {
	vendor, device, ok := strings.Cut(p, ":")
	hex4 := func(s string) bool {
		return len(s) == 4 && strings.Trim(strings.ToLower(s), "0123456789abcdef") == ""
	}
	if !ok || !hex4(vendor) || (device != "*" && !hex4(device)) {
		return errors.New("want vendor:device in hex, e.g. 10de:2236 or 10de:*")
	}
	return nil
}

// ioresourceMem64 is IORESOURCE_MEM_64 of linux/ioport.h: a 64-bit memory BAR.
const ioresourceMem64 = 0x00100000

// BAR64Bytes is the sum of the function's 64-bit memory BARs (from its sysfs resource
// file: "start end flags" per BAR): what a 64-bit PCI window must map for it.
func (s Sysfs) BAR64Bytes(a PCIAddress) (uint64, error) {
	b, err := os.ReadFile(s.devicePath(a, "resource"))
	if err != nil {
		return 0, fmt.Errorf("devices: BARs of %s: %w", a, err)
	}
	var total uint64
	for i, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		var start, end, flags uint64
		if _, err := fmt.Sscanf(line, "0x%x 0x%x 0x%x", &start, &end, &flags); err != nil {
			return 0, fmt.Errorf("devices: BARs of %s: line %d %q: %w", a, i+1, line, err)
		}
		if i < 6 && end > start && flags&ioresourceMem64 != 0 { // BARs 0-5; then the ROM and bridge windows
			total += end - start + 1
		}
	}
	return total, nil
}

// PCIHole64For is the 64-bit PCI window that maps BARs of bars bytes with room to spare
// (twice, to a power of two), or 0 when QEMU's default (32 GiB on q35) already does.
func PCIHole64For(bars uint64) uint64 {
	const qemuDefault = 32 << 30
	if 2*bars <= qemuDefault {
		return 0
	}
	w := uint64(qemuDefault)
	for w < 2*bars {
		w <<= 1
	}
	return w
}
