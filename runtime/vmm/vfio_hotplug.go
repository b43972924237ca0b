package vmm

import (
	"context"
	"errors"
	"fmt"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/vmpod/vmpod/devices"
)

// PlugVFIO hot-plugs host PCI function a (bound to vfio-pci and claimed by the caller:
// devices.Sysfs.CheckVFIO and Bind) as device id on the lowest free PCIe root port of a q35
// machine. Its BARs must fit the 64-bit window the machine booted with. On failure no
// device or root port is left.
func (m *Machine) PlugVFIO(ctx context.Context, id string, a devices.PCIAddress) error {
	if err := m.canHotplug("PCI device " + a.String()); err != nil {
		return err
	}
	m.plugMu.Lock()
	defer m.plugMu.Unlock()
	if err := m.grantVFIO(ctx, a); err != nil {
		return fmt.Errorf("vm %s: plug PCI device %s: %w", m.cfg.Name, a, err)
	}
	hp, err := m.hw.Hotplug(&devices.VFIO{DeviceID: id, Host: a})
	if err != nil {
		return fmt.Errorf("vm %s: plug PCI device %s: %w: %w", m.cfg.Name, a, err, errdefs.ErrInvalidArgument)
	}
	if err := m.addDevice(ctx, hp, "PCI device"); err != nil {
		return fmt.Errorf("vm %s: plug PCI device %s: %w", m.cfg.Name, a, errors.Join(err, m.hw.Release(id)))
	}
	log.G(ctx).Infof("vm %s: plugged PCI device %s as %s on %s", m.cfg.Name, a, id, hp.Port.ID)
	return nil
}
