package vmm

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/vmpod/vmpod/devices"
)

// A QEMU running as a user of its own opens a passed-through function's VFIO group device
// (/dev/vfio/<group>) by path: QEMU 7.2 takes no descriptor for it. The shim gives the
// device to the VM's uid for the VM's life, as libvirt's DAC driver does, and gives it back
// after QEMU has exited. Each grant is recorded in the state dir first, so that the sweep
// after a dead shim gives it back too: a device left to a pool uid would open to whichever
// VM leases that uid next.

// vfioGrantsRecord lists the grants in the state dir: "<device> <uid> <gid>" per line, the
// owner it had before.
const vfioGrantsRecord = "vfio-grants"

type vfioGrant struct {
	dev      string
	uid, gid int
}

// grantVFIO gives the machine's QEMU user the VFIO group device of host function a; several
// functions of one group share one grant. It refuses once the machine's teardown has
// begun (giveBackVFIO), so that a hot-plug racing a stop cannot leave a device behind.
func (m *Machine) grantVFIO(ctx context.Context, a devices.PCIAddress) error {
	if m.lease == nil {
		return nil
	}
	if err := raiseMemlock(); err != nil {
		return err
	}
	g, err := devices.Sysfs{}.IOMMUGroupOf(a)
	if err != nil {
		return err
	}
	dev := filepath.Join("/dev/vfio", strconv.Itoa(g.Number))
	m.vfioMu.Lock()
	defer m.vfioMu.Unlock()
	if m.vfioClosed {
		return fmt.Errorf("VFIO group of %s: the machine is stopping", a)
	}
	for _, gr := range m.vfioGrants {
		if gr.dev == dev {
			return nil
		}
	}
	fd, st, err := openDeviceNode(dev)
	if err != nil {
		return fmt.Errorf("VFIO group of %s: %w", a, err)
	}
	defer unix.Close(fd)
	gr := vfioGrant{dev: dev, uid: int(st.Uid), gid: int(st.Gid)}
	if m.cfg.Users.Contains(st.Uid) {
		// left by a VM whose shim died before giving it back: the device is root's
		gr.uid, gr.gid = 0, 0
	}
	if err := recordVFIOGrant(m.cfg.StateDir, gr); err != nil {
		return fmt.Errorf("VFIO group of %s: %w", a, err)
	}
	if err := unix.Fchownat(fd, "", int(m.lease.UID), int(m.lease.GID()), unix.AT_EMPTY_PATH); err != nil {
		return fmt.Errorf("VFIO group of %s: give %s to QEMU's user: %w", a, dev, err)
	}
	m.vfioGrants = append(m.vfioGrants, gr)
	log.G(ctx).Debugf("vm %s: %s (group of %s) given to uid %d", m.cfg.Name, dev, a, m.lease.UID)
	return nil
}

// giveBackVFIO gives every granted device back to its owner and refuses later grants. The
// teardown runs it after QEMU has exited.
func (m *Machine) giveBackVFIO() error {
	m.vfioMu.Lock()
	defer m.vfioMu.Unlock()
	m.vfioClosed = true
	var errs []error
	for _, gr := range m.vfioGrants {
		errs = append(errs, gr.giveBack())
	}
	m.vfioGrants = nil
	return errors.Join(errs...)
}

func (gr vfioGrant) giveBack() error {
	fd, _, err := openDeviceNode(gr.dev)
	if errors.Is(err, unix.ENOENT) {
		return nil // the device went (unbound, removed): nothing to give back
	}
	if err != nil {
		return fmt.Errorf("give back %s: %w", gr.dev, err)
	}
	defer unix.Close(fd)
	if err := unix.Fchownat(fd, "", gr.uid, gr.gid, unix.AT_EMPTY_PATH); err != nil {
		return fmt.Errorf("give back %s: %w", gr.dev, err)
	}
	return nil
}

// openDeviceNode opens the character device at path itself, not a link to elsewhere, as
// a handle to change its owner through.
func openDeviceNode(path string) (int, unix.Stat_t, error) {
	var st unix.Stat_t
	fd, err := unix.Open(path, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, st, err
	}
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return -1, st, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFCHR {
		unix.Close(fd)
		return -1, st, fmt.Errorf("%s is not a character device", path)
	}
	return fd, st, nil
}

func recordVFIOGrant(stateDir string, gr vfioGrant) error {
	f, err := os.OpenFile(filepath.Join(stateDir, vfioGrantsRecord), os.O_WRONLY|os.O_APPEND|os.O_CREATE|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(f, "%s %d %d\n", gr.dev, gr.uid, gr.gid)
	return errors.Join(err, f.Close())
}

// giveBackRecordedVFIO gives back the grants a dead shim recorded in stateDir (the sweep).
func giveBackRecordedVFIO(stateDir string) error {
	f, err := os.Open(filepath.Join(stateDir, vfioGrantsRecord))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	var errs []error
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var gr vfioGrant
		if _, err := fmt.Sscanf(sc.Text(), "%s %d %d", &gr.dev, &gr.uid, &gr.gid); err != nil || filepath.Dir(gr.dev) != "/dev/vfio" {
			errs = append(errs, fmt.Errorf("%s: bad line %q", vfioGrantsRecord, sc.Text()))
			continue
		}
		errs = append(errs, gr.giveBack())
	}
	return errors.Join(append(errs, sc.Err())...)
}
