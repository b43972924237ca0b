package devices

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Sysfs finds and prepares host PCI devices for VFIO through sysfs. Root is
// where sysfs is mounted; "" means /sys. Tests point it at a fake tree.
type Sysfs struct {
	Root string
	// afterWrite, if set, runs after each write: tests use it to play the
	// kernel's part (binding a driver when drivers_probe is written).
	afterWrite func(path, value string)
}

// vfioDriver is the host driver that hands devices to VFIO.
const vfioDriver = "vfio-pci"

// IOMMUGroup is the unit of isolation VFIO assigns: all its endpoints go to the
// same guest, or none does.
type IOMMUGroup struct {
	Number  int
	Devices []PCIAddress
}

func (s Sysfs) path(elem ...string) string {
	return filepath.Join(append([]string{orDefault(s.Root, "/sys")}, elem...)...)
}

func (s Sysfs) devicePath(a PCIAddress, elem ...string) string {
	return s.path(append([]string{"bus/pci/devices", a.String()}, elem...)...)
}

// IOMMUGroupOf returns the IOMMU group of the device at a and its members.
func (s Sysfs) IOMMUGroupOf(a PCIAddress) (IOMMUGroup, error) {
	link, err := os.Readlink(s.devicePath(a, "iommu_group"))
	if err != nil {
		return IOMMUGroup{}, fmt.Errorf("devices: IOMMU group of %s (is the IOMMU enabled, intel_iommu=on?): %w", a, err)
	}
	n, err := strconv.Atoi(filepath.Base(link))
	if err != nil {
		return IOMMUGroup{}, fmt.Errorf("devices: IOMMU group of %s: link %q does not end in a group number", a, link)
	}
	return s.iommuGroup(n)
}

func (s Sysfs) iommuGroup(n int) (IOMMUGroup, error) {
	entries, err := os.ReadDir(s.path("kernel/iommu_groups", strconv.Itoa(n), "devices"))
	if err != nil {
		return IOMMUGroup{}, fmt.Errorf("devices: IOMMU group %d: %w", n, err)
	}
	g := IOMMUGroup{Number: n}
	for _, e := range entries {
		a, err := ParsePCIAddress(e.Name())
		if err != nil {
			return IOMMUGroup{}, fmt.Errorf("devices: IOMMU group %d: %w", n, err)
		}
		g.Devices = append(g.Devices, a)
	}
	return g, nil
}

// Driver returns the name of the driver bound to the device, or "" if none is.
func (s Sysfs) Driver(a PCIAddress) (string, error) {
	link, err := os.Readlink(s.devicePath(a, "driver"))
	if errors.Is(err, os.ErrNotExist) {
		if _, serr := os.Stat(s.devicePath(a)); serr != nil {
			return "", fmt.Errorf("devices: no PCI device %s: %w", a, serr)
		}
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("devices: driver of %s: %w", a, err)
	}
	return filepath.Base(link), nil
}

// isBridge reports whether the device is a PCI bridge (class 0x0604), which
// stays with its host driver: VFIO does not require bridges in a group to be
// bound to it.
func (s Sysfs) isBridge(a PCIAddress) (bool, error) {
	b, err := os.ReadFile(s.devicePath(a, "class"))
	if err != nil {
		return false, fmt.Errorf("devices: class of %s: %w", a, err)
	}
	return strings.HasPrefix(strings.TrimSpace(string(b)), "0x0604"), nil
}

// BindVFIO binds the device at a to vfio-pci: driver_override makes vfio-pci the
// only driver that may claim it, the current driver lets go, and drivers_probe
// asks the kernel to bind again. The override persists, so the host driver will
// not grab the device back until it is cleared.
func (s Sysfs) BindVFIO(a PCIAddress) error {
	driver, err := s.Driver(a)
	if err != nil {
		return err
	}
	if driver == vfioDriver {
		return nil
	}
	if _, err := os.Stat(s.path("bus/pci/drivers", vfioDriver)); err != nil {
		return fmt.Errorf("devices: binding %s to vfio-pci: the vfio-pci driver is not loaded (modprobe vfio-pci): %w", a, err)
	}
	if err := s.write(s.devicePath(a, "driver_override"), vfioDriver); err != nil {
		return fmt.Errorf("devices: binding %s to vfio-pci: %w", a, err)
	}
	if driver != "" {
		if err := s.write(s.path("bus/pci/drivers", driver, "unbind"), a.String()); err != nil {
			return fmt.Errorf("devices: unbinding %s from %s: %w", a, driver, err)
		}
	}
	if err := s.write(s.path("bus/pci/drivers_probe"), a.String()); err != nil {
		return fmt.Errorf("devices: binding %s to vfio-pci: %w", a, err)
	}
	if driver, err = s.Driver(a); err != nil {
		return err
	}
	if driver != vfioDriver {
		return fmt.Errorf("devices: binding %s to vfio-pci: driver is %q after probing", a, driver)
	}
	return nil
}

// PrepareVFIO binds every endpoint in the IOMMU group of a to vfio-pci, which VFIO
// requires before QEMU may open any of them, and returns the group. Bridges in
// the group are left alone.
func (s Sysfs) PrepareVFIO(a PCIAddress) (IOMMUGroup, error) {
	g, err := s.IOMMUGroupOf(a)
	if err != nil {
		return IOMMUGroup{}, err
	}
	for _, member := range g.Devices {
		bridge, err := s.isBridge(member)
		if err != nil {
			return IOMMUGroup{}, err
		}
		if bridge {
			continue
		}
		if err := s.BindVFIO(member); err != nil {
			return IOMMUGroup{}, fmt.Errorf("%w (IOMMU group %d)", err, g.Number)
		}
	}
	return g, nil
}

// ResolveVFIODevice maps a VFIO character device, as a CDI spec injects it into
// the OCI spec (linux.devices: type c, major, minor), to the PCI endpoints it
// gives access to:
//
//   - a group device (/dev/vfio/<group>): every endpoint of that IOMMU group;
//   - an iommufd device cdev (/dev/vfio/devices/vfioN): its one PCI function.
//
// The container path of the node may differ from the host's, so it goes by
// major:minor through /sys/dev/char, not by name.
func (s Sysfs) ResolveVFIODevice(major, minor uint32) ([]PCIAddress, error) {
	node := fmt.Sprintf("%d:%d", major, minor)
	link, err := os.Readlink(s.path("dev/char", node))
	if err != nil {
		return nil, fmt.Errorf("devices: char device %s: %w", node, err)
	}
	parts := strings.Split(filepath.ToSlash(link), "/")
	switch {
	case len(parts) >= 3 && parts[len(parts)-2] == "vfio-dev":
		// .../0000:01:00.0/vfio-dev/vfio0
		a, err := ParsePCIAddress(parts[len(parts)-3])
		if err != nil {
			return nil, fmt.Errorf("devices: char device %s (%s): %w", node, link, err)
		}
		return []PCIAddress{a}, nil
	case len(parts) >= 3 && parts[len(parts)-2] == "vfio" && parts[len(parts)-3] == "virtual":
		// .../devices/virtual/vfio/<group>
		n, err := strconv.Atoi(parts[len(parts)-1])
		if err != nil {
			return nil, fmt.Errorf("devices: char device %s (%s) is the VFIO container, not a group", node, link)
		}
		g, err := s.iommuGroup(n)
		if err != nil {
			return nil, err
		}
		var endpoints []PCIAddress
		for _, a := range g.Devices {
			bridge, err := s.isBridge(a)
			if err != nil {
				return nil, err
			}
			if !bridge {
				endpoints = append(endpoints, a)
			}
		}
		return endpoints, nil
	}
	return nil, fmt.Errorf("devices: char device %s (%s) is not a VFIO group or device", node, link)
}

// write writes value to an existing sysfs attribute (never creating a file).
func (s Sysfs) write(path, value string) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, werr := f.WriteString(value)
	cerr := f.Close()
	if werr != nil {
		return fmt.Errorf("writing %q to %s: %w", value, path, werr)
	}
	if cerr != nil {
		return cerr
	}
	if s.afterWrite != nil {
		s.afterWrite(path, value)
	}
	return nil
}
