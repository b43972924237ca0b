package vmm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/devices"
	"github.com/vmpod/vmpod/internal/cleanup"
	"github.com/vmpod/vmpod/qmp"
)

const (
	// firstHotFDSet numbers the fd sets of hot-plugged disks, far above the boot disks'.
	firstHotFDSet = 1000
	// hotplugCleanupWait bounds each QMP step that undoes or finishes a hotplug. They run
	// on their own context: a caller that gave up must not leave a half-plugged disk.
	hotplugCleanupWait = 10 * time.Second
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
func (m *Machine) PlugDisk(ctx context.Context, disk devices.VirtioBlk, file *os.File) error {
	return m.PlugDiskAt(ctx, "", disk, file)
}

// PlugDiskAt is PlugDisk on the root port with id port ("": the lowest free one): a
// migration target plugs a hot-plugged disk where the source has it, for the guest's
// device state to find it there (see DevicePort).
func (m *Machine) PlugDiskAt(ctx context.Context, port string, disk devices.VirtioBlk, file *os.File) (retErr error) {
	if err := m.canHotplug("disk " + disk.DeviceID); err != nil {
		return err
	}
	m.plugMu.Lock()
	defer m.plugMu.Unlock()
	if _, dup := m.disks[disk.DeviceID]; dup {
		return fmt.Errorf("vm %s: plug disk %s: plugged already: %w", m.cfg.Name, disk.DeviceID, errdefs.ErrAlreadyExists)
	}
	fail := func(err error) error { return fmt.Errorf("vm %s: plug disk %s: %w", m.cfg.Name, disk.DeviceID, err) }
	var undo cleanup.Stack
	defer func() {
		if retErr != nil {
			if err := undo.Run(); err != nil {
				log.G(ctx).WithError(err).Warnf("vm %s: undo a failed plug of disk %s", m.cfg.Name, disk.DeviceID)
			}
		}
	}()
	m.nextFDSet++
	fdSet := firstHotFDSet + m.nextFDSet
	// every undo is registered before its step: a step whose reply never came may have
	// been done, and undoing what was not done only fails harmlessly
	undo.Add("remove fd set", func() error {
		return m.cleanupStep(ctx, func(c context.Context) error { return m.mon.RemoveFDSet(c, fdSet) })
	})
	if _, err := m.mon.AddFD(ctx, file, fdSet, disk.DeviceID); err != nil {
		return fail(err)
	}
	disk.Path = devices.FDSetPath(fdSet)
	var hp devices.Hotplug
	var err error
	if port == "" {
		hp, err = m.hw.Hotplug(&disk)
	} else {
		hp, err = m.hw.HotplugAt(port, &disk)
	}
	if err != nil {
		return fmt.Errorf("vm %s: plug disk %s: %w: %w", m.cfg.Name, disk.DeviceID, err, errdefs.ErrInvalidArgument)
	}
	undo.Add("release the root port", func() error { return m.hw.Release(disk.DeviceID) })
	undo.Add("delete the block node", func() error {
		return m.cleanupStep(ctx, func(c context.Context) error { return m.mon.BlockdevDel(c, hp.Blockdev.NodeName) })
	})
	if err := m.mon.BlockdevAdd(ctx, qmp.BlockdevOptions(*hp.Blockdev)); err != nil {
		return fail(err)
	}
	if err := m.addDevice(ctx, hp, "disk"); err != nil {
		return fail(err)
	}
	if m.disks == nil {
		m.disks = map[string]pluggedDisk{}
	}
	m.disks[disk.DeviceID] = pluggedDisk{node: hp.Blockdev.NodeName, fdSet: fdSet}
	log.G(ctx).Infof("vm %s: plugged disk %s on %s (fd set %d)", m.cfg.Name, disk.DeviceID, hp.Port.ID, fdSet)
	return nil
}

// DevicePort is the id of the root port a plugged disk or NIC (by its device id) sits on.
func (m *Machine) DevicePort(id string) (string, bool) {
	ports := m.hw.Ports()
	if ports == nil { // no hotplug (microvm)
		return "", false
	}
	p, ok := ports.PortOf(id)
	return p.ID, ok
}

// UnplugDisk takes a disk PlugDisk added out of the machine: device_del, which on q35 the
// guest must answer (it releases the device), then its block node, fd set and root port.
// ctx bounds the wait for the guest; a disk the guest still holds then stays plugged, and
// the error says so. One the guest let go of on its own (an eject) is finished here too.
func (m *Machine) UnplugDisk(ctx context.Context, id string) error {
	m.plugMu.Lock()
	defer m.plugMu.Unlock()
	d, ok := m.disks[id]
	if !ok {
		return fmt.Errorf("vm %s: unplug disk %s: not a plugged disk: %w", m.cfg.Name, id, errdefs.ErrNotFound)
	}
	if err := m.delDevice(ctx, id); err != nil {
		return fmt.Errorf("vm %s: unplug disk %s: %w", m.cfg.Name, id, err)
	}
	// the device is gone: the rest is the host's, each step tried whatever the others did
	delete(m.disks, id)
	err := errors.Join(
		m.hw.Release(id),
		m.cleanupStep(ctx, func(c context.Context) error { return m.mon.BlockdevDel(c, d.node) }),
		m.cleanupStep(ctx, func(c context.Context) error { return m.mon.RemoveFDSet(c, d.fdSet) }))
	if err != nil {
		return fmt.Errorf("vm %s: unplug disk %s: the guest let it go, but: %w", m.cfg.Name, id, err)
	}
	log.G(ctx).Infof("vm %s: unplugged disk %s", m.cfg.Name, id)
	return nil
}

// canHotplug refuses a hotplug of what on a machine that has none.
func (m *Machine) canHotplug(what string) error {
	if m.cfg.Type != machine.Q35 {
		return fmt.Errorf("vm %s: plug %s: machine %s has no hotplug: %w", m.cfg.Name, what, m.cfg.Type, errdefs.ErrNotImplemented)
	}
	if m.cfg.NoACPI {
		// measured: without ACPI the guest never sees a device plugged on a root port
		return fmt.Errorf("vm %s: plug %s: the machine has no ACPI (features.acpi), through which q35 hot-plugs: %w", m.cfg.Name, what, errdefs.ErrFailedPrecondition)
	}
	return nil
}

// addDevice adds hp's device (device_add). A device_add without a clear answer is
// settled by asking QEMU: a device that is there is the guest's, and ours to unplug.
func (m *Machine) addDevice(ctx context.Context, hp devices.Hotplug, kind string) error {
	dev := qmp.DeviceOptions{Driver: hp.Device.Driver, ID: hp.Device.ID, Bus: hp.Device.Bus}
	for _, p := range hp.Device.Props {
		dev.Props = append(dev.Props, qmp.Prop(p))
	}
	err := m.mon.DeviceAdd(ctx, dev)
	if err != nil && !m.devicePresent(ctx, hp.Device.ID) {
		return err
	} else if err != nil {
		log.G(ctx).WithError(err).Warnf("vm %s: %s %s: device_add gave no answer, but the device is there", m.cfg.Name, kind, hp.Device.ID)
	}
	return nil
}

// delDevice unplugs device id (device_del) and waits for the guest to let it go; one
// whose device_del had no clear answer counts as gone if QEMU no longer has it.
func (m *Machine) delDevice(ctx context.Context, id string) error {
	if err := m.mon.DeviceDel(ctx, id); err != nil && m.devicePresent(ctx, id) {
		return fmt.Errorf("the guest did not release it: %w", err)
	}
	return nil
}

// cleanupStep runs one QMP step of undoing or finishing a hotplug on a context of its own.
func (m *Machine) cleanupStep(ctx context.Context, step func(context.Context) error) error {
	c, cancel := context.WithTimeout(context.WithoutCancel(ctx), hotplugCleanupWait)
	defer cancel()
	return step(c)
}

// devicePresent says whether QEMU has device id (qom-list /machine/peripheral). Asked
// when a device_add or device_del gave no clear answer; true when QEMU cannot tell, so
// that nothing is released that may still be in use.
func (m *Machine) devicePresent(ctx context.Context, id string) bool {
	var props []qmp.ObjectProperty
	err := m.cleanupStep(ctx, func(c context.Context) (err error) {
		props, err = m.mon.QOMList(c, "/machine/peripheral")
		return err
	})
	if err != nil {
		return true
	}
	for _, p := range props {
		if p.Name == id {
			return true
		}
	}
	return false
}
