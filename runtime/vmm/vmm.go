package vmm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	cgroupsv2 "github.com/containerd/cgroups/v3/cgroup2/stats"
	"github.com/containerd/log"

	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/devices"
	"github.com/vmpod/vmpod/internal/cleanup"
	"github.com/vmpod/vmpod/internal/idmap"
	"github.com/vmpod/vmpod/internal/phases"
	"github.com/vmpod/vmpod/qmp"
	"github.com/vmpod/vmpod/runtime/vmuser"
)

// helperExitWait bounds the wait for virtiofsd to leave by itself after QEMU is gone,
// and for QEMU to leave after a QMP quit.
const helperExitWait = 2 * time.Second

// Machine is one running QEMU. Every host resource Start created (processes, sockets,
// mounts, the state directory) is on its teardown stack, which Stop and Kill run exactly
// once.
type Machine struct {
	cfg  Config
	plan bootPlan
	hw   *devices.VM // the device model: argv rendered at boot, hotplugs placed later
	qemu *exec.Cmd
	mon  *qmp.Monitor
	// version is the running QEMU's, from its QMP greeting (zero if it gave none)
	version qemuVersion
	share   *sharedDir    // nil without a shared filesystem
	cgroup  *podCgroup    // nil without Config.Cgroup
	lease   *vmuser.Lease // QEMU's uid; nil: QEMU runs as root
	// owners is virtiofsd's range of ids and rootfsMap the user namespace mapping them;
	// both nil when virtiofsd runs as root
	owners    *vmuser.Lease
	rootfsMap *idmap.Map

	// virtiofsdEnded says how virtiofsd ended, or "" while it runs; nil without one
	virtiofsdEnded func() string

	vncClients atomic.Uint64 // names the connections DialVNC hands to QEMU
	// arrived: a machine started Incoming has its guest (AwaitIncoming saw it), so it may
	// send it on
	arrived atomic.Bool

	vfioMu     sync.Mutex
	vfioGrants []vfioGrant // VFIO group devices given to QEMU's user
	vfioClosed bool        // the teardown gave them back: no more grants

	plugMu    sync.Mutex             // one disk or NIC plug or unplug at a time
	disks     map[string]pluggedDisk // hot-plugged disks, by device id
	nics      map[string]string      // hot-plugged NICs' netdev ids, by device id
	ram       *os.File               // a template machine's guest RAM (makeRAM)
	ramFilled <-chan error           // the restore's copy into ram is done (makeRAM)
	nextFDSet int                    // the last hot-plugged disk's fd set, less firstHotFDSet

	exited  chan struct{} // closed when QEMU exits
	exitErr error

	endMu          sync.Mutex
	shutdownReason string        // of QEMU's last SHUTDOWN event (Ending)
	followed       chan struct{} // closed once no SHUTDOWN event can come any more

	teardown cleanup.Stack
	stopOnce sync.Once
	stopErr  error
}

// Start starts QEMU for cfg and returns once its QMP monitor answers: the machine is up
// (the guest may still be booting, or waiting with Paused). On any failure everything it
// started is stopped and removed again, and the error names the machine and the step.
func Start(ctx context.Context, cfg Config) (_ *Machine, retErr error) {
	cfg = cfg.withDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("vm %s: invalid config: %w", cfg.Name, err)
	}
	logger := log.G(ctx).WithField("vm", cfg.Name)

	plan, err := planFor(cfg)
	if err != nil {
		return nil, fmt.Errorf("vm %s: %w", cfg.Name, err)
	}
	if plan.accel.accel == machine.TCG && cfg.Accel == machine.AccelAuto {
		logger.Warnf("accel: %s", plan.accel.reason)
	}
	if plan.accel.accel == machine.TCG && cfg.HyperV != nil {
		logger.Warn("hyperv: Hyper-V enlightenments are KVM's; under TCG the guest boots without them")
	}
	// the device model as it will be, with paths for the descriptors not yet opened: a
	// machine it cannot describe starts nothing
	if _, err := plan.hardware(nil, nil); err != nil {
		return nil, fmt.Errorf("vm %s: %w", cfg.Name, err)
	}
	m := &Machine{cfg: cfg, plan: plan, exited: make(chan struct{})}
	defer func() {
		if retErr != nil {
			if err := m.teardown.Run(); err != nil {
				logger.WithError(err).Error("cleanup after failed start left something behind")
			}
		}
	}()

	if err := os.MkdirAll(filepath.Dir(cfg.StateDir), 0o711); err != nil {
		return nil, fmt.Errorf("vm %s: state dir: %w", cfg.Name, err)
	}
	if err := os.Mkdir(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("vm %s: state dir: %w", cfg.Name, err)
	}
	owner, err := lockOwner(cfg.StateDir)
	if err != nil {
		_ = os.RemoveAll(cfg.StateDir)
		return nil, fmt.Errorf("vm %s: state dir: %w", cfg.Name, err)
	}
	// Released last, once the directory is gone: until then a sweep must not touch it.
	m.teardown.Add("release owner lock", owner.Close)
	if err := recordOwnerSockets(cfg.StateDir, cfg.OwnerSockets); err != nil {
		_ = owner.Close()
		_ = os.RemoveAll(cfg.StateDir)
		return nil, fmt.Errorf("vm %s: state dir: %w", cfg.Name, err)
	}
	m.teardown.Add("remove state dir", func() error { return removeStateDir(cfg.StateDir) })

	if cfg.Cgroup != "" {
		if m.cgroup, err = openPodCgroup(cfg.Cgroup); err != nil {
			return nil, fmt.Errorf("vm %s: %w", cfg.Name, err)
		}
		m.teardown.Add("remove cgroup", m.cgroup.remove)
	}

	logFile, err := os.OpenFile(cfg.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("vm %s: log: %w", cfg.Name, err)
	}
	defer logFile.Close() // children hold their own copies

	if cfg.Boot.Firmware.Type == FirmwareUEFI {
		if err := copyFile(cfg.Boot.Firmware.VarsTemplate, plan.paths.uefiVars); err != nil {
			return nil, fmt.Errorf("vm %s: UEFI variable store: %w", cfg.Name, err)
		}
	}
	if cfg.SharedFS != machine.NoSharedFS && !cfg.saving() {
		if m.share, err = newSharedDir(plan.paths.shared); err != nil {
			return nil, fmt.Errorf("vm %s: shared dir: %w", cfg.Name, err)
		}
		m.teardown.Add("unmount shared dir", m.share.close)
	}
	phases.Mark(ctx, "prepare")
	if cfg.runsVirtiofsd() {
		if err := m.startVirtiofsd(logFile); err != nil {
			return nil, fmt.Errorf("vm %s: virtiofsd: %w", cfg.Name, err)
		}
		phases.Mark(ctx, "virtiofsd")
	}

	if cfg.Template {
		if err := m.makeRAM(); err != nil {
			return nil, fmt.Errorf("vm %s: %w", cfg.Name, err)
		}
	}
	files, err := openHostFiles(plan, logFile)
	if err != nil {
		// virtiofsd may have refused the connection by dying
		return nil, fmt.Errorf("vm %s: %w", cfg.Name, m.virtiofsdError(err))
	}
	// closed once QEMU started (below); a failure before that closes them here
	m.teardown.Add("close QEMU's descriptors", func() error { files.close(logFile); return nil })
	if m.hw, err = plan.hardware(files, m.ram); err != nil {
		return nil, fmt.Errorf("vm %s: %w", cfg.Name, err)
	}
	if cfg.Users != nil {
		if m.lease, err = cfg.Users.Lease(cfg.StateDir); err != nil {
			return nil, fmt.Errorf("vm %s: %w", cfg.Name, err)
		}
		m.teardown.Add("release QEMU's uid", m.lease.Release)
		// before QEMU starts, so that it runs after QEMU has exited; hot-plug grants too
		m.teardown.Add("give back VFIO devices", m.giveBackVFIO)
		for _, a := range cfg.HostDevices {
			if err := m.grantVFIO(ctx, a); err != nil {
				return nil, fmt.Errorf("vm %s: %w", cfg.Name, err)
			}
		}
	}
	logger.WithField("accel", plan.accel.accel).WithField("machine", cfg.Type).Debug("starting QEMU")
	err = m.startQEMU(logFile)
	files.close(logFile) // QEMU holds its own copies now, or never will
	if err != nil {
		return nil, fmt.Errorf("vm %s: start QEMU: %w", cfg.Name, err)
	}
	phases.Mark(ctx, "qemu")
	upCtx, cancel := context.WithTimeout(ctx, cfg.UpTimeout)
	defer cancel()
	if err := m.connectQMP(upCtx); err != nil {
		return nil, fmt.Errorf("vm %s: QMP: %w%s", cfg.Name, err, m.ConsoleHint())
	}
	phases.Mark(ctx, "qmp")
	switch {
	case cfg.RestoreFrom != nil:
		if err := m.restore(ctx); err != nil {
			return nil, fmt.Errorf("vm %s: restore: %w", cfg.Name, err)
		}
	case cfg.Template && cfg.Incoming:
		if err := m.plugRestored(ctx); err != nil {
			return nil, fmt.Errorf("vm %s: %w", cfg.Name, err)
		}
	}
	return m, nil
}

// planFor resolves what cfg leaves to the host: the accelerator and, for a microvm under
// TCG, the TSC rate the guest is told.
func planFor(cfg Config) (bootPlan, error) {
	host := readHostCPU()
	accel, err := resolveAccel(cfg.Accel, host)
	if err != nil {
		return bootPlan{}, err
	}
	plan := bootPlan{cfg: cfg, accel: accel, paths: newPaths(cfg.StateDir), host: host}
	if accel.accel == machine.TCG && cfg.Type == machine.MicroVM {
		if plan.tscKHz, err = host.tscKHz(); err != nil {
			return bootPlan{}, err
		}
	}
	if accel.accel == machine.TCG && cfg.SharedFS == machine.VirtioFS {
		// a QEMU that cannot say its version does not start either: Start says why
		if v, err := binaryQEMUVersion(cfg.QEMUPath); err == nil {
			plan.zeroPagesOnAlloc = v.atLeast(8, 1)
		}
	}
	return plan, nil
}

// virtiofsdMigrationFlags are how a virtiofsd that can migrate (virtiofsdMigrates) does
// it; each is ignored on the other side. As a source, it checks each inode's path again at
// the switchover: a path found while the guest ran may have been renamed since (a
// container's `mv` of a file it writes). As a target, an inode the source could not name
// (a file deleted while the guest still held it) fails the guest's use of that file
// rather than the whole migration; measured: a container replacing a file by rename
// five times a second failed ~1 migration in 8 with "Migration source has lost inode".
var virtiofsdMigrationFlags = []string{"--migration-confirm-paths", "--migration-on-error=guest-error"}

func (m *Machine) startVirtiofsd(logFile *os.File) error {
	// The shim listens and hands virtiofsd the listening socket (--fd), as libvirt does:
	// QEMU's connection then waits in the backlog however late virtiofsd gets to accept
	// it. Waiting for virtiofsd's own socket to appear raced its listen (a burst of 20
	// pods saw "connection refused" between its bind and its listen).
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: m.plan.paths.virtiofsdSock, Net: "unix"})
	if err != nil {
		return fmt.Errorf("listen for virtiofsd: %w", err)
	}
	l.SetUnlinkOnClose(false) // openHostFiles dials it by path for QEMU, after this returns
	listening, err := l.File()
	l.Close()
	if err != nil {
		return fmt.Errorf("listen for virtiofsd: %w", err)
	}
	defer listening.Close() // virtiofsd has its own copy once started
	source := m.plan.paths.shared
	attr := &syscall.SysProcAttr{}
	if m.cfg.FileOwners != nil {
		if source, err = m.leaseOwners(attr); err != nil {
			return err
		}
	}
	args := []string{"--fd=3", "-o", "source=" + source, "-o", "cache=auto", "-o", "xattr"}
	if ok, err := virtiofsdMigrates(m.cfg.VirtiofsdPath); err == nil && ok {
		args = append(args, virtiofsdMigrationFlags...)
	}
	cmd := exec.Command(m.cfg.VirtiofsdPath, args...)
	cmd.ExtraFiles = []*os.File{listening}
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// A dying shim must not leave virtiofsd behind.
	cmd.SysProcAttr = attr
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	m.cgroup.cloneInto(cmd.SysProcAttr)
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	m.teardown.Add("stop virtiofsd", func() error { return stopHelper(cmd, done) })
	if err := recordProcess(m.cfg.StateDir, virtiofsdRecord, cmd.Process.Pid); err != nil {
		log.L.WithError(err).Warnf("vm %s: record virtiofsd's pid for a sweep", m.cfg.Name)
	}
	if m.owners != nil && len(m.cfg.PodUIDs) == 0 {
		// Its namespace serves the ID-mapped mounts. Opened before QEMU starts, so before
		// any guest can reach virtiofsd and have it make another.
		ns, err := os.Open(fmt.Sprintf("/proc/%d/ns/user", cmd.Process.Pid))
		if err != nil {
			return fmt.Errorf("its user namespace: %w", err)
		}
		m.teardown.Add("close virtiofsd's user namespace", ns.Close)
		m.rootfsMap = &idmap.Map{Userns: ns, Root: m.owners.UID}
		m.share.idmap = m.rootfsMap
	}
	m.virtiofsdEnded = func() string {
		select {
		case <-done:
			return "exited: " + cmd.ProcessState.String()
		case <-time.After(100 * time.Millisecond): // a refused connection comes before the reaping
			return ""
		}
	}
	if err := m.joinCgroup(cmd.Process.Pid); err != nil {
		if errors.Is(err, syscall.ESRCH) { // died at once (see startQEMU)
			<-done
			return fmt.Errorf("exited (%s) before joining %w", cmd.ProcessState, err)
		}
		return err
	}
	return nil
}

// VirtiofsdRoot holds, for each virtiofsd running in a user namespace, a bind of its
// machine's shared directory named by its range: the path it is given. The state
// directory is root's alone (0700), and virtiofsd, no user of the host's, could not
// traverse it; this directory only lets through (0711) to what is the range root's own.
const VirtiofsdRoot = "/run/vmpod-virtiofsd"

// leaseOwners leases virtiofsd's range of ids and sets attr to start it as the root of a
// user namespace mapping the range's 64 Ki ids (or, for a pod with ids of its own, the
// range's first id as root and the pod's ids onto themselves), with no supplementary
// groups. It returns the path virtiofsd is to serve: the shared directory, made the range
// root's, seen through VirtiofsdRoot.
func (m *Machine) leaseOwners(attr *syscall.SysProcAttr) (string, error) {
	lease, err := m.cfg.FileOwners.Lease(m.cfg.StateDir)
	if err != nil {
		return "", err
	}
	m.teardown.Add("release virtiofsd's ids", lease.Release)
	m.owners = lease
	ids := []syscall.SysProcIDMap{{ContainerID: 0, HostID: int(lease.UID), Size: vmuser.OwnerRange}}
	attr.Cloneflags |= syscall.CLONE_NEWUSER
	attr.UidMappings, attr.GidMappings = ids, ids
	if len(m.cfg.PodUIDs) > 0 {
		attr.UidMappings = ownIDs(lease.UID, m.cfg.PodUIDs)
		attr.GidMappings = ownIDs(lease.UID, m.cfg.PodGIDs)
	}
	attr.GidMappingsEnableSetgroups = true // for dropping the shim's groups, below
	attr.Credential = &syscall.Credential{Uid: 0, Gid: 0, Groups: []uint32{}}
	owner := int(lease.UID)
	if err := os.Chown(m.plan.paths.shared, owner, owner); err != nil {
		return "", fmt.Errorf("give the shared directory to %d: %w", owner, err)
	}
	if err := os.MkdirAll(VirtiofsdRoot, 0o711); err != nil {
		return "", err
	}
	// named by the range (one holder at a time) and the state dir (for whoever looks)
	source := filepath.Join(VirtiofsdRoot, strconv.Itoa(owner)+"-"+filepath.Base(m.cfg.StateDir))
	// recorded first: CleanupState takes it down if this shim dies
	if err := os.WriteFile(filepath.Join(m.cfg.StateDir, virtiofsdAlias), []byte(source), 0o600); err != nil {
		return "", err
	}
	if err := os.Mkdir(source, 0o700); err != nil {
		return "", err
	}
	if err := m.share.alsoAt(source); err != nil {
		_ = os.Remove(source)
		return "", err
	}
	return source, nil
}

// ownIDs maps root onto the host's id root and each of a pod's ranges onto itself.
func ownIDs(root uint32, pod []IDRange) []syscall.SysProcIDMap {
	ids := []syscall.SysProcIDMap{{ContainerID: 0, HostID: int(root), Size: 1}}
	for _, r := range pod {
		ids = append(ids, syscall.SysProcIDMap{ContainerID: int(r.First), HostID: int(r.First), Size: int(r.Count)})
	}
	return ids
}

// RootfsMap is the ID mapping a container's rootfs must be mounted through before
// ShareRootfs, nil if it is shared as it is (virtiofsd runs as root).
func (m *Machine) RootfsMap() *idmap.Map { return m.rootfsMap }

// stopHelper waits briefly for a helper that should exit on its own, then kills it.
func stopHelper(cmd *exec.Cmd, done <-chan struct{}) error {
	select {
	case <-done:
		return nil
	case <-time.After(helperExitWait):
	}
	_ = cmd.Process.Kill()
	<-done
	return nil
}

func (m *Machine) startQEMU(logFile *os.File) error {
	args, files := m.hw.Render()
	cmd := exec.Command(m.cfg.QEMUPath, args...)
	cmd.Dir = "/" // not the shim's working directory (a bundle)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.ExtraFiles = files
	// Pdeathsig: `kill -9` of the shim must not leave a QEMU running.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	m.cgroup.cloneInto(cmd.SysProcAttr)
	if m.lease != nil {
		cred, err := qemuCredential(m.lease, m.plan.accel.accel)
		if err != nil {
			return err
		}
		cmd.SysProcAttr.Credential = cred
		// SysV IPC of its own: the uid's next holder must not find what this QEMU made
		// there (its files are swept at lease, runtime/vmuser), nor may other pods see it
		cmd.SysProcAttr.Cloneflags |= syscall.CLONE_NEWIPC
		if m.cfg.Type == machine.Q35 { // may get a passed-through device
			if err := raiseMemlock(); err != nil && len(m.cfg.HostDevices) > 0 {
				return err
			}
		}
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	m.qemu = cmd
	if err := recordProcess(m.cfg.StateDir, qemuRecord, cmd.Process.Pid); err != nil {
		log.L.WithError(err).Warnf("vm %s: record QEMU's pid for a sweep", m.cfg.Name)
	}
	go func() {
		m.exitErr = cmd.Wait()
		close(m.exited)
	}()
	m.teardown.Add("stop QEMU", func() error {
		select {
		case <-m.exited:
		default:
			_ = cmd.Process.Kill()
			<-m.exited
		}
		return nil
	})
	if err := m.joinCgroup(cmd.Process.Pid); err != nil {
		if errors.Is(err, syscall.ESRCH) {
			// cgroup v1 moves QEMU after it started: one that died at once (a bad
			// binary, a refused option) is gone or a zombie by then. Its exit is the
			// error worth reporting, and Wait returns it promptly.
			<-m.exited
			return fmt.Errorf("QEMU exited (%v) before joining %w", m.exitErr, err)
		}
		return err
	}
	return nil
}

// PlaceInCgroup and AdoptIntoCgroup put a host process that belongs to the VM, started by
// the caller, in the machine's cgroup: PlaceInCgroup adjusts its attributes before it
// starts (cgroup v2 clones it there), AdoptIntoCgroup moves it after (cgroup v1).
func (m *Machine) PlaceInCgroup(attr *syscall.SysProcAttr) { m.cgroup.cloneInto(attr) }
func (m *Machine) AdoptIntoCgroup(pid int) error           { return m.joinCgroup(pid) }

// joinCgroup moves a process QEMU or a helper into the pod's cgroup, where it was not
// cloned into it (cgroup v1).
func (m *Machine) joinCgroup(pid int) error {
	if m.cgroup == nil {
		return nil
	}
	return m.cgroup.add(pid)
}

// CgroupStats are the figures of the cgroup the machine's processes run in (QEMU's CPU
// time and memory as the kernel charges them), or an error without Config.Cgroup.
func (m *Machine) CgroupStats() (*cgroupsv2.Metrics, error) {
	if m.cgroup == nil {
		return nil, fmt.Errorf("vm %s: no cgroup of its own", m.cfg.Name)
	}
	return m.cgroup.stats()
}

// CgroupPath is the cgroup (below the hierarchy's root) the machine's processes run in,
// or "" when they stay in the caller's.
func (m *Machine) CgroupPath() string {
	if m.cgroup == nil {
		return ""
	}
	return m.cgroup.path
}

// connectQMP connects the machine's QMP monitor; QEMU creates its socket at start-up.
func (m *Machine) connectQMP(ctx context.Context) error {
	dialCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-m.exited:
			cancel()
		case <-dialCtx.Done():
		}
	}()
	mon, err := qmp.Dial(dialCtx, m.plan.paths.qmpSock)
	if err != nil {
		return m.Explain(err)
	}
	m.mon = mon
	m.version, _ = parseQEMUVersion(mon.Version())
	m.teardown.Add("close QMP", func() error { _ = mon.Close(); return nil })
	m.followShutdowns(mon)
	return nil
}

// DialPort connects to the host end of the virtio-serial port named name: a socket the
// shim listens on and QEMU accepts on. It gives up when ctx ends or QEMU exits.
func (m *Machine) DialPort(ctx context.Context, name string) (net.Conn, error) {
	i := slices.Index(m.cfg.Ports, name)
	if i < 0 {
		return nil, fmt.Errorf("vm %s: no virtio-serial port %q", m.cfg.Name, name)
	}
	return m.dial(ctx, m.plan.paths.port(i))
}

// DialVNC connects to the guest's display (Config.VNC): QEMU serves VNC to no socket of
// its own but to connections handed to it (add_client), each one end of a socket pair
// whose other end DialVNC returns. The caller authenticated its client already.
func (m *Machine) DialVNC(ctx context.Context) (net.Conn, error) {
	if !m.cfg.VNC {
		return nil, fmt.Errorf("vm %s: the machine has no display", m.cfg.Name)
	}
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("vm %s: VNC: %w", m.cfg.Name, err)
	}
	ours, theirs := os.NewFile(uintptr(fds[0]), "vnc"), os.NewFile(uintptr(fds[1]), "vnc-qemu")
	defer theirs.Close() // QEMU holds its own copy
	conn, err := net.FileConn(ours)
	ours.Close()
	if err != nil {
		return nil, fmt.Errorf("vm %s: VNC: %w", m.cfg.Name, err)
	}
	name := fmt.Sprintf("vnc-%d", m.vncClients.Add(1))
	if err := m.mon.GetFD(ctx, name, theirs); err != nil {
		conn.Close()
		return nil, fmt.Errorf("vm %s: VNC: %w", m.cfg.Name, err)
	}
	if err := m.mon.AddClient(ctx, "vnc", name, true); err != nil {
		_ = m.mon.CloseFD(context.WithoutCancel(ctx), name)
		conn.Close()
		return nil, fmt.Errorf("vm %s: VNC: %w", m.cfg.Name, err)
	}
	return conn, nil
}

// DialConsole connects to the serial console socket (Console: ConsoleSocket).
func (m *Machine) DialConsole(ctx context.Context) (net.Conn, error) {
	if m.cfg.Console != ConsoleSocket {
		return nil, fmt.Errorf("vm %s: the serial console is not a socket", m.cfg.Name)
	}
	return m.dial(ctx, m.plan.paths.console)
}

func (m *Machine) dial(ctx context.Context, path string) (net.Conn, error) {
	var d net.Dialer
	for {
		conn, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			return conn, nil
		}
		select {
		case <-m.exited:
			return nil, m.Explain(err)
		case <-ctx.Done():
			return nil, fmt.Errorf("no connection to %s: %w", path, ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// Explain explains a failure by QEMU's death if QEMU is dead or dying: a closed socket is
// often the first sign, the exit status comes a moment later.
func (m *Machine) Explain(err error) error {
	select {
	case <-m.exited:
		return fmt.Errorf("QEMU exited (%v)%s", m.exitErr, qemuMessage(m.cfg.LogPath))
	case <-time.After(200 * time.Millisecond):
		return err
	}
}

// qemuMessage is ": " and QEMU's last message in the machine's log (an assertion that
// aborted it, say: the log mixes it with virtiofsd's and the guest's lines), or "".
func qemuMessage(path string) string {
	lines := strings.Split(logTail(path, 50), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if strings.HasPrefix(lines[i], "qemu-system-") {
			return ": " + lines[i]
		}
	}
	return ""
}

// ConsoleHint is the end of the machine's log, for boot errors.
func (m *Machine) ConsoleHint() string {
	tail := logTail(m.cfg.LogPath, 15)
	if tail == "" {
		return ""
	}
	return "\n--- last lines of " + m.cfg.LogPath + ":\n" + tail
}

func logTail(path string, lines int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	all := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return strings.Join(all, "\n")
}

// Name is the machine's name.
func (m *Machine) Name() string { return m.cfg.Name }

// Type is the machine type.
func (m *Machine) Type() machine.Type { return m.cfg.Type }

// Accel is the accelerator the machine runs on.
func (m *Machine) Accel() machine.Accel { return m.plan.accel.accel }

// Config is the machine's configuration, defaults filled in.
func (m *Machine) Config() Config { return m.cfg }

// Monitor is the machine's QMP monitor.
func (m *Machine) Monitor() *qmp.Monitor { return m.mon }

// Hardware is the machine's device model.
func (m *Machine) Hardware() *devices.VM { return m.hw }

// Done is closed when QEMU has exited, for whatever reason.
func (m *Machine) Done() <-chan struct{} { return m.exited }

// ExitErr is how QEMU exited (nil: status 0); valid once Done is closed.
func (m *Machine) ExitErr() error {
	<-m.exited
	return m.exitErr
}

// Pid is the QEMU process id.
func (m *Machine) Pid() int { return m.qemu.Process.Pid }

// Resume starts the vCPUs of a machine started Paused, or paused by Pause.
func (m *Machine) Resume(ctx context.Context) error {
	if err := m.mon.Cont(ctx); err != nil {
		return fmt.Errorf("vm %s: resume: %w", m.cfg.Name, err)
	}
	return nil
}

// Pause stops the vCPUs; the guest notices nothing but lost time.
func (m *Machine) Pause(ctx context.Context) error {
	if err := m.mon.Stop(ctx); err != nil {
		return fmt.Errorf("vm %s: pause: %w", m.cfg.Name, err)
	}
	return nil
}

// Powerdown presses the ACPI power button: the guest decides whether to power off.
func (m *Machine) Powerdown(ctx context.Context) error {
	if err := m.mon.SystemPowerdown(ctx); err != nil {
		return fmt.Errorf("vm %s: ACPI power-down: %w", m.cfg.Name, err)
	}
	return nil
}

// Stop asks the guest to power off (ask; nil presses the ACPI power button), waits up to
// StopTimeout for QEMU to exit, asks QEMU to quit if it does not, and removes everything
// Start created. Safe to call again and after QEMU died; later calls return the first
// result.
func (m *Machine) Stop(ctx context.Context, ask func(context.Context) error) error {
	if ask == nil {
		ask = m.Powerdown
	}
	m.stopOnce.Do(func() {
		select {
		case <-m.exited:
		default:
			shutdownCtx, cancel := context.WithTimeout(ctx, m.cfg.StopTimeout)
			if err := ask(shutdownCtx); err != nil {
				log.G(ctx).WithError(err).Warnf("vm %s: graceful shutdown failed, killing QEMU", m.cfg.Name)
			}
			select {
			case <-m.exited:
			case <-shutdownCtx.Done():
				log.G(ctx).Warnf("vm %s: still running %v after shutdown, asking QEMU to quit", m.cfg.Name, m.cfg.StopTimeout)
				m.Quit(ctx)
			}
			cancel()
		}
		m.stopErr = m.runTeardown()
	})
	return m.stopErr
}

// Quit asks QEMU itself to exit (QMP quit) and waits briefly for it: the guest gets no
// say. The teardown kills QEMU if even that does not work.
func (m *Machine) Quit(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, helperExitWait)
	defer cancel()
	if err := m.mon.Quit(ctx); err != nil {
		log.G(ctx).WithError(err).Warnf("vm %s: QMP quit", m.cfg.Name)
	}
	select {
	case <-m.exited:
	case <-ctx.Done():
	}
}

// KillProcess sends SIGKILL to QEMU and nothing else: the teardown stays for Stop or Kill.
// It signals through the process handle, never a bare pid that may have been reused.
func (m *Machine) KillProcess() { _ = m.qemu.Process.Kill() }

// Kill stops the machine at once (SIGKILL to QEMU) and removes everything Start created.
func (m *Machine) Kill() error {
	m.stopOnce.Do(func() { m.stopErr = m.runTeardown() })
	return m.stopErr
}

// OnTeardown adds fn to what Stop and Kill undo, before everything Start created: a guest
// layer's connections, files it keeps in the state directory.
func (m *Machine) OnTeardown(what string, fn func() error) { m.teardown.Add(what, fn) }

func (m *Machine) runTeardown() error {
	if err := m.teardown.Run(); err != nil {
		return fmt.Errorf("vm %s: teardown: %w", m.cfg.Name, err)
	}
	return nil
}

// Share bind-mounts a host directory or file into the shared directory under name and
// returns the path below the guest's mount of it.
func (m *Machine) Share(hostPath, name string, readonly bool) (string, error) {
	if m.share == nil {
		return "", fmt.Errorf("vm %s: share %s: the VM has no shared filesystem", m.cfg.Name, hostPath)
	}
	rel, err := m.share.share(hostPath, name, readonly)
	if err != nil {
		return "", fmt.Errorf("vm %s: %w", m.cfg.Name, err)
	}
	return rel, nil
}

// ShareRootfs shares a container's rootfs, mounted through RootfsMap already, as Share
// does.
func (m *Machine) ShareRootfs(hostPath, name string) (string, error) {
	if m.share == nil {
		return "", fmt.Errorf("vm %s: share %s: the VM has no shared filesystem", m.cfg.Name, hostPath)
	}
	rel, err := m.share.shareAs(hostPath, name, false, false)
	if err != nil {
		return "", fmt.Errorf("vm %s: %w", m.cfg.Name, err)
	}
	return rel, nil
}

// SharePlace is where share name sits in the shared directory (its sequence number),
// false for a name not shared: what a migration's target shares it at (ShareAt).
func (m *Machine) SharePlace(name string) (uint64, bool) {
	if m.share == nil {
		return 0, false
	}
	return m.share.place(name)
}

// ShareAt is Share (ShareRootfs, for a rootfs) at the place a migration's source had it
// (SharePlace): a migrated guest, and virtiofsd's state, know the share by that path.
func (m *Machine) ShareAt(hostPath, name string, place uint64, readonly, rootfs bool) (string, error) {
	if m.share == nil {
		return "", fmt.Errorf("vm %s: share %s: the VM has no shared filesystem", m.cfg.Name, hostPath)
	}
	if place == 0 {
		return "", fmt.Errorf("vm %s: share %q: place 0 is no place", m.cfg.Name, name)
	}
	rel, err := m.share.shareAt(hostPath, name, place, readonly, !rootfs)
	if err != nil {
		return "", fmt.Errorf("vm %s: %w", m.cfg.Name, err)
	}
	return rel, nil
}

// Unshare removes a share made by Share.
func (m *Machine) Unshare(name string) error {
	if m.share == nil {
		return nil
	}
	return m.share.unshare(name)
}

// StatePath is a path in the machine's state directory, for a guest layer's files; they
// go with the directory.
func (m *Machine) StatePath(name string) string { return filepath.Join(m.cfg.StateDir, name) }

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		_ = out.Close()
		return err
	}
	return out.Close()
}
