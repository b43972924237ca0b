package vmm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"syscall"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/vmpod/vmpod/devices"
	"github.com/vmpod/vmpod/internal/cleanup"
	"github.com/vmpod/vmpod/internal/phases"
	"github.com/vmpod/vmpod/qmp"
)

// Templates (docs/design/022): a machine booted once and saved into a file, which other
// machines of the same TemplateKey restore instead of booting. The state is a migration
// into a file, so what QEMU migrates is what a template carries: RAM and device state.
// What each restore needs of its own — the virtio-fs device on its virtiofsd, its NICs on
// its taps — is plugged after the restore, on root ports the state left free.

// SavedTemplate is a template machine's saved state: its guest RAM, a sparse file of the
// pages the guest had written, and the rest of its state, a migration stream without the
// RAM (x-ignore-shared). Kept apart, a restore maps a copy of the RAM and never reads the
// pages the guest never touched, which a migration stream would have QEMU zero one by
// one — allocating them all in a shared memfd (measured: 512 MiB resident for a 512 MiB
// guest, and 0.55 s).
type SavedTemplate struct {
	State, RAM *os.File
}

// ErrTemplateRefused is why a restore failed when QEMU would not take the saved template
// itself (its RAM the wrong size, the state refused or QEMU dying on it): the template is
// bad, unlike a restore that failed on what is the pod's own (a slow host, virtiofsd, a
// NIC).
var ErrTemplateRefused = errors.New("the saved template was refused")

// templateBandwidth lets a migration into a file go as fast as QEMU writes it (QEMU's
// default cap is 128 MiB/s, meant for a network).
const templateBandwidth = 1 << 40

// SaveTemplate saves a template machine being saved (Config.Template, no RestoreFrom):
// the migration of everything but its RAM into to.State, then the RAM's written pages
// into to.RAM. The machine stays stopped for good: the caller stops it.
func (m *Machine) SaveTemplate(ctx context.Context, to SavedTemplate) (qmp.MigrationInfo, error) {
	if !m.cfg.saving() || m.ram == nil {
		return qmp.MigrationInfo{}, fmt.Errorf("vm %s: save a template: not a template machine being saved (Config.Template without RestoreFrom): %w", m.cfg.Name, errdefs.ErrFailedPrecondition)
	}
	info, err := m.Migrate(ctx, to.State, MigrationOptions{MaxBandwidth: templateBandwidth, IgnoreShared: true})
	if err != nil {
		return info, fmt.Errorf("vm %s: save a template: %w", m.cfg.Name, err)
	}
	// The guest is stopped for good: its RAM is what the state's devices expect. Copied
	// by a process in the machine's cgroup, as a restore's is (startRAMCopy): the file's
	// pages are charged to whoever writes them, and they are the template's for as long
	// as it is kept.
	copier, err := m.startRAMCopy(to.RAM, m.ram)
	if err == nil {
		_, err = copier.wait()
	}
	if err != nil {
		return info, fmt.Errorf("vm %s: save a template: RAM: %w", m.cfg.Name, err)
	}
	return info, nil
}

// makeRAM makes a template machine's guest RAM: a memfd the size of the machine's RAM.
// For a restore it starts filling it from the saved template's RAM, which it checks
// fits, while QEMU starts (QEMU maps the memfd but reads none of it before the
// migration's device state has arrived); restore waits for the copy (ramFilled).
func (m *Machine) makeRAM() error {
	_, memMiB := m.cfg.machineSize()
	fd, err := unix.MemfdCreate("vmpod-ram:"+m.cfg.Name, unix.MFD_CLOEXEC)
	if err != nil {
		return fmt.Errorf("guest RAM: %w", err)
	}
	m.ram = os.NewFile(uintptr(fd), "vmpod-ram")
	m.teardown.Add("close guest RAM", m.ram.Close)
	if err := m.ram.Truncate(int64(memMiB) << 20); err != nil {
		return fmt.Errorf("guest RAM: %w", err)
	}
	if m.cfg.RestoreFrom == nil {
		return nil
	}
	if st, err := m.cfg.RestoreFrom.RAM.Stat(); err != nil {
		return fmt.Errorf("template RAM: %w", err)
	} else if st.Size() != int64(memMiB)<<20 {
		return fmt.Errorf("template RAM: %d bytes, the machine has %d: %w", st.Size(), int64(memMiB)<<20, ErrTemplateRefused)
	}
	copier, err := m.startRAMCopy(m.ram, m.cfg.RestoreFrom.RAM)
	if err != nil {
		return fmt.Errorf("template RAM: %w", err)
	}
	filled := make(chan error, 1)
	go func() {
		n, err := copier.wait()
		if err == nil {
			log.L.Debugf("vm %s: %d MiB of template RAM copied", m.cfg.Name, n>>20)
		}
		filled <- err
		close(filled)
	}()
	m.ramFilled = filled
	// a failed start ends the copier before the memfd goes
	m.teardown.Add("stop the RAM copy", func() error { copier.kill(); <-filled; return nil })
	return nil
}

// ramPage is the unit copyRAM skips when it is all zero.
const ramPage = 4096

// copyRAM copies src's data into dst, which it sizes like src: only the extents src has
// (SEEK_DATA), and of those only the pages that are not all zero, so that dst stays as
// sparse as it can (a guest zeroes much of what it frees). It returns the bytes written.
func copyRAM(dst, src *os.File) (int64, error) {
	st, err := src.Stat()
	if err != nil {
		return 0, err
	}
	size := st.Size()
	if err := dst.Truncate(size); err != nil {
		return 0, err
	}
	buf := make([]byte, 1<<20)
	zero := make([]byte, ramPage)
	var written int64
	for off := int64(0); off < size; {
		data, err := unix.Seek(int(src.Fd()), off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) { // no data after off
			break
		} else if err != nil {
			return written, fmt.Errorf("seek data: %w", err)
		}
		hole, err := unix.Seek(int(src.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			return written, fmt.Errorf("seek hole: %w", err)
		}
		for pos := data; pos < hole; {
			n, err := src.ReadAt(buf[:min(int64(len(buf)), hole-pos)], pos)
			if n == 0 && err != nil {
				return written, err
			}
			for i := 0; i < n; i += ramPage {
				page := buf[i:min(i+ramPage, n)]
				if bytes.Equal(page, zero[:len(page)]) {
					continue
				}
				if _, err := dst.WriteAt(page, pos+int64(i)); err != nil {
					return written, err
				}
				written += int64(len(page))
			}
			pos += int64(n)
		}
		off = hole
	}
	return written, nil
}

// restore reads the guest's state from Config.RestoreFrom into a machine started for it
// (-incoming defer, its RAM filled by makeRAM) and plugs what the state lacks. The guest
// runs when it returns.
func (m *Machine) restore(ctx context.Context) error {
	select {
	case err := <-m.ramFilled:
		if err != nil {
			return fmt.Errorf("template RAM: %w", err)
		}
	case <-ctx.Done():
		return ctx.Err()
	}
	if err := m.accept(ctx, m.cfg.RestoreFrom.State, MigrationOptions{IgnoreShared: true}); err != nil {
		return err
	}
	if _, err := m.awaitIncoming(ctx, false); err != nil {
		if ctx.Err() == nil && !m.killed() { // QEMU failed the state or died reading it
			return fmt.Errorf("%w: %w", ErrTemplateRefused, err)
		}
		return err
	}
	phases.Mark(ctx, "restore")
	return m.plugRestored(ctx)
}

// plugRestored plugs what a saved template's state lacks, in the order a restore plugs
// it, so that each device takes the same root port: the virtio-fs device and the NICs.
// A live migration's target of a restored machine plugs them before the stream comes.
func (m *Machine) plugRestored(ctx context.Context) error {
	if m.cfg.runsVirtiofsd() {
		if err := m.plugShare(ctx); err != nil {
			return err
		}
	}
	for i, nic := range m.cfg.NICs {
		if err := m.PlugNIC(ctx, nicID(i), nic); err != nil {
			return err
		}
	}
	phases.Mark(ctx, "plug")
	return nil
}

// killed says whether QEMU has exited by a signal (the OOM killer, an operator): no
// verdict on what it was doing.
func (m *Machine) killed() bool {
	select {
	case <-m.exited:
	default:
		return false
	}
	var exit *exec.ExitError
	if errors.As(m.exitErr, &exit) {
		if ws, ok := exit.Sys().(syscall.WaitStatus); ok {
			return ws.Signaled()
		}
	}
	return false
}

// virtiofsdConnFD is the name under which a restored machine's connection to its
// virtiofsd is passed to QEMU (getfd) for the virtio-fs device's chardev.
const virtiofsdConnFD = "virtiofsd"

// plugShare hot-plugs the virtio-fs device on a connection to the machine's virtiofsd,
// which accepts it from its listening socket's backlog. On failure what was done is
// undone. The guest mounts it when told (its agent: SetupSandboxRequest.share).
func (m *Machine) plugShare(ctx context.Context) (retErr error) {
	conn, err := net.Dial("unix", m.plan.paths.virtiofsdSock)
	if err != nil {
		return m.virtiofsdError(fmt.Errorf("plug virtio-fs: connect to virtiofsd: %w", err))
	}
	f, err := conn.(*net.UnixConn).File()
	conn.Close()
	if err != nil {
		return fmt.Errorf("plug virtio-fs: %w", err)
	}
	defer f.Close() // QEMU has its own copy once getfd returns
	m.plugMu.Lock()
	defer m.plugMu.Unlock()
	var undo cleanup.Stack
	defer func() {
		if retErr != nil {
			if err := undo.Run(); err != nil {
				log.G(ctx).WithError(err).Warnf("vm %s: undo a failed plug of virtio-fs", m.cfg.Name)
			}
		}
	}()
	fail := func(err error) error { return fmt.Errorf("plug virtio-fs: %w", err) }
	hp, err := m.hw.Hotplug(&devices.VirtioFS{DeviceID: shareDeviceID, Conn: f, Tag: ShareTag})
	if err != nil {
		return fail(err)
	}
	undo.Add("release the root port", func() error { return m.hw.Release(shareDeviceID) })
	if hp.Chardev == nil {
		return fail(errors.New("the device model gave virtio-fs no chardev"))
	}
	if err := m.mon.GetFD(ctx, virtiofsdConnFD, f); err != nil {
		return fail(err)
	}
	if err := m.mon.ChardevAddSocketFD(ctx, hp.Chardev.ID, virtiofsdConnFD); err != nil {
		// chardev-add takes the descriptor only when it succeeds
		_ = m.cleanupStep(ctx, func(c context.Context) error { return m.mon.CloseFD(c, virtiofsdConnFD) })
		return fail(err)
	}
	undo.Add("remove chardev "+hp.Chardev.ID, func() error {
		return m.cleanupStep(ctx, func(c context.Context) error { return m.mon.ChardevRemove(c, hp.Chardev.ID) })
	})
	if err := m.addDevice(ctx, hp, "virtio-fs"); err != nil {
		return fail(err)
	}
	log.G(ctx).Debugf("vm %s: plugged virtio-fs on %s", m.cfg.Name, hp.Port.ID)
	return nil
}

// virtiofsdError adds to err how virtiofsd ended, if it did.
func (m *Machine) virtiofsdError(err error) error {
	if m.virtiofsdEnded != nil {
		if ended := m.virtiofsdEnded(); ended != "" {
			return fmt.Errorf("%w: virtiofsd %s%s", err, ended, m.ConsoleHint())
		}
	}
	return err
}
