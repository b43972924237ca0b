package vmm

import (
	"context"
	"fmt"
	"os"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/devices"
	"github.com/vmpod/vmpod/internal/cleanup"
	"github.com/vmpod/vmpod/qmp"
)

// pluggedDisk is a disk PlugDisk added: what UnplugDisk must take away again.
type pluggedDisk struct {
	node  string // block node
	fdSet int    // the fd set holding QEMU's copy of the image's descriptor
}

// PlugDisk hot-plugs disk, a virtio-blk over file (an image or block device the caller
// opened, inside its volume), on the lowest free PCIe root port of a q35 machine. QEMU
// gets the descriptor in an fd set of its own (add-fd) and opens /dev/fdset/<id>, never a
// path. disk.Path is ignored. On any failure what was done is undone: no fd set, block
// node, device or root port is left.
func (m *Machine) PlugDisk(ctx context.Context, disk devices.VirtioBlk, file *os.File) (retErr error) {
	if m.cfg.Type != machine.Q35 {
		return fmt.Errorf("vm %s: plug disk %s: machine %s has no hotplug: %w", m.cfg.Name, disk.DeviceID, m.cfg.Type, errdefs.ErrNotImplemented)
	}
	m.plugMu.Lock()
	defer m.plugMu.Unlock()
	if _, dup := m.disks[disk.DeviceID]; dup {
		return fmt.Errorf("vm %s: plug disk %s: plugged already: %w", m.cfg.Name, disk.DeviceID, errdefs.ErrAlreadyExists)
	}
	var undo cleanup.Stack
	defer func() {
		if retErr != nil {
			if err := undo.Run(); err != nil {
				log.G(ctx).WithError(err).Warnf("vm %s: undo a failed plug of disk %s", m.cfg.Name, disk.DeviceID)
			}
		}
	}()
	added, err := m.mon.AddFD(ctx, file, disk.DeviceID)
	if err != nil {
		return fmt.Errorf("vm %s: plug disk %s: %w", m.cfg.Name, disk.DeviceID, err)
	}
	undo.Add("remove fd set", func() error { return m.mon.RemoveFDSet(context.WithoutCancel(ctx), added.FDSetID) })
	disk.Path = devices.FDSetPath(added.FDSetID)
	hp, err := m.hw.Hotplug(&disk)
	if err != nil {
		return fmt.Errorf("vm %s: plug disk %s: %w: %w", m.cfg.Name, disk.DeviceID, err, errdefs.ErrInvalidArgument)
	}
	undo.Add("release the root port", func() error { return m.hw.Release(disk.DeviceID) })
	if err := m.mon.BlockdevAdd(ctx, qmp.BlockdevOptions(*hp.Blockdev)); err != nil {
		return fmt.Errorf("vm %s: plug disk %s: %w", m.cfg.Name, disk.DeviceID, err)
	}
	undo.Add("delete the block node", func() error { return m.mon.BlockdevDel(context.WithoutCancel(ctx), hp.Blockdev.NodeName) })
	dev := qmp.DeviceOptions{Driver: hp.Device.Driver, ID: hp.Device.ID, Bus: hp.Device.Bus}
	for _, p := range hp.Device.Props {
		dev.Props = append(dev.Props, qmp.Prop(p))
	}
	if err := m.mon.DeviceAdd(ctx, dev); err != nil {
		return fmt.Errorf("vm %s: plug disk %s: %w", m.cfg.Name, disk.DeviceID, err)
	}
	if m.disks == nil {
		m.disks = map[string]pluggedDisk{}
	}
	m.disks[disk.DeviceID] = pluggedDisk{node: hp.Blockdev.NodeName, fdSet: added.FDSetID}
	log.G(ctx).Infof("vm %s: plugged disk %s on %s (fd set %d)", m.cfg.Name, disk.DeviceID, hp.Port.ID, added.FDSetID)
	return nil
}

// UnplugDisk takes a disk PlugDisk added out of the machine: device_del, which on q35 the
// guest must answer (it releases the device; Linux takes ~5 s, pciehp's grace period),
// then its block node, fd set and root port. ctx bounds the wait for the guest; a guest
// that never lets go leaves the disk plugged, and the error says so.
func (m *Machine) UnplugDisk(ctx context.Context, id string) error {
	m.plugMu.Lock()
	defer m.plugMu.Unlock()
	d, ok := m.disks[id]
	if !ok {
		return fmt.Errorf("vm %s: unplug disk %s: not a plugged disk: %w", m.cfg.Name, id, errdefs.ErrNotFound)
	}
	if err := m.mon.DeviceDel(ctx, id); err != nil {
		return fmt.Errorf("vm %s: unplug disk %s: the guest did not release it: %w", m.cfg.Name, id, err)
	}
	// the device is gone: whatever fails below, the disk is no longer the guest's
	delete(m.disks, id)
	if err := m.hw.Release(id); err != nil {
		return fmt.Errorf("vm %s: unplug disk %s: %w", m.cfg.Name, id, err)
	}
	if err := m.mon.BlockdevDel(ctx, d.node); err != nil {
		return fmt.Errorf("vm %s: unplug disk %s: %w", m.cfg.Name, id, err)
	}
	if err := m.mon.RemoveFDSet(ctx, d.fdSet); err != nil {
		return fmt.Errorf("vm %s: unplug disk %s: %w", m.cfg.Name, id, err)
	}
	log.G(ctx).Infof("vm %s: unplugged disk %s", m.cfg.Name, id)
	return nil
}
