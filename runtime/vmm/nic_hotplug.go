package vmm

import (
	"context"
	"errors"
	"fmt"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/vmpod/vmpod/devices"
	"github.com/vmpod/vmpod/internal/cleanup"
	"github.com/vmpod/vmpod/qmp"
)

// PlugNIC hot-plugs nic (a tap the caller opened in the pod's netns) as virtio-net device
// id on the lowest free PCIe root port of a q35 machine: QEMU gets the tap's descriptor
// (getfd), a tap netdev on it, and the device with nic's MAC. On any failure what was
// done is undone: no descriptor, netdev, device or root port is left.
func (m *Machine) PlugNIC(ctx context.Context, id string, nic NIC) error {
	return m.PlugNICAt(ctx, "", id, nic)
}

// PlugNICAt is PlugNIC on the root port with id port ("": the lowest free one): a
// migration target plugs a hot-plugged NIC where the source has it (see DevicePort).
func (m *Machine) PlugNICAt(ctx context.Context, port, id string, nic NIC) (retErr error) {
	if err := m.canHotplug("NIC " + id); err != nil {
		return err
	}
	if nic.Tap == nil {
		return fmt.Errorf("vm %s: plug NIC %s: no tap: %w", m.cfg.Name, id, errdefs.ErrInvalidArgument)
	}
	m.plugMu.Lock()
	defer m.plugMu.Unlock()
	if _, dup := m.nics[id]; dup {
		return fmt.Errorf("vm %s: plug NIC %s: plugged already: %w", m.cfg.Name, id, errdefs.ErrAlreadyExists)
	}
	fail := func(err error) error { return fmt.Errorf("vm %s: plug NIC %s: %w", m.cfg.Name, id, err) }
	var undo cleanup.Stack
	defer func() {
		if retErr != nil {
			if err := undo.Run(); err != nil {
				log.G(ctx).WithError(err).Warnf("vm %s: undo a failed plug of NIC %s", m.cfg.Name, id)
			}
		}
	}()
	dev := nicDevice(id, nic).(*devices.VirtioNet)
	var hp devices.Hotplug
	var err error
	if port == "" {
		hp, err = m.hw.Hotplug(dev)
	} else {
		hp, err = m.hw.HotplugAt(port, dev)
	}
	if err != nil {
		return fmt.Errorf("vm %s: plug NIC %s: %w: %w", m.cfg.Name, id, err, errdefs.ErrInvalidArgument)
	}
	undo.Add("release the root port", func() error { return m.hw.Release(id) })
	names := hp.Tap.FDNames()
	for i, f := range hp.Tap.Files {
		undo.Add("close descriptor "+names[i], func() error {
			return m.cleanupStep(ctx, func(c context.Context) error { return m.mon.CloseFD(c, names[i]) })
		})
		if err := m.mon.GetFD(ctx, names[i], f); err != nil {
			return fail(err)
		}
	}
	undo.Add("delete netdev "+hp.Tap.ID, func() error {
		return m.cleanupStep(ctx, func(c context.Context) error { return m.mon.NetdevDel(c, hp.Tap.ID) })
	})
	if err := m.mon.NetdevAddTap(ctx, qmp.TapNetdev{ID: hp.Tap.ID, FDs: names, Vhost: hp.Tap.Vhost}); err != nil {
		return fail(err)
	}
	if err := m.addDevice(ctx, hp, "NIC"); err != nil {
		return fail(err)
	}
	if m.nics == nil {
		m.nics = map[string]string{}
	}
	m.nics[id] = hp.Tap.ID
	log.G(ctx).Infof("vm %s: plugged NIC %s (MAC %s) on %s", m.cfg.Name, id, nic.MAC, hp.Port.ID)
	return nil
}

// UnplugNIC takes a NIC PlugNIC added out of the machine: device_del, which on q35 the
// guest must answer, then its netdev and root port. The tap stays the caller's.
func (m *Machine) UnplugNIC(ctx context.Context, id string) error {
	m.plugMu.Lock()
	defer m.plugMu.Unlock()
	netdev, ok := m.nics[id]
	if !ok {
		return fmt.Errorf("vm %s: unplug NIC %s: not a plugged NIC: %w", m.cfg.Name, id, errdefs.ErrNotFound)
	}
	if err := m.delDevice(ctx, id); err != nil {
		return fmt.Errorf("vm %s: unplug NIC %s: %w", m.cfg.Name, id, err)
	}
	delete(m.nics, id)
	err := errors.Join(m.hw.Release(id),
		m.cleanupStep(ctx, func(c context.Context) error { return m.mon.NetdevDel(c, netdev) }))
	if err != nil {
		return fmt.Errorf("vm %s: unplug NIC %s: the guest let it go, but: %w", m.cfg.Name, id, err)
	}
	log.G(ctx).Infof("vm %s: unplugged NIC %s", m.cfg.Name, id)
	return nil
}
