package vmm

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/devices"
	"github.com/vmpod/vmpod/runtime/vmuser"
)

// QEMU opens nothing on the host by path (docs/design/014): it may run as a user of its
// own that can reach none of the node's paths, the state directory included. The shim
// makes and opens everything and QEMU inherits descriptors: sockets the shim listens on
// (QMP, console, virtio-serial ports), its connection to virtiofsd, the firmware's
// pflash images and the console log in fd sets, and the kernel, initrd and firmware it
// loads by name as /proc/self/fd/<n> (a reopen that checks the file's own permissions,
// which are world-readable, not its directories'). Disks already came as fd sets.

// The machine's own fd sets: between the caller's (Config.Files) and hot-plugged disks'.
const (
	machineFDSets   = 900
	consoleLogFDSet = machineFDSets
	uefiCodeFDSet   = machineFDSets + 1
	uefiVarsFDSet   = machineFDSets + 2
	// stateFDSet holds a copy of the QMP listener that QEMU never uses: its description
	// names the state dir on QEMU's command line, which nothing else does for every VM, so
	// that ps, an operator and a path-based leak check see whose QEMU it is.
	stateFDSet = machineFDSets + 3
)

// hostFiles are the descriptors QEMU inherits for what its command line names. The
// shim's copies are closed once QEMU has started (close): a listening socket QEMU alone
// holds refuses connections once QEMU is gone, instead of queueing them forever.
type hostFiles struct {
	qmp, console *os.File   // listening
	ports        []*os.File // listening, one per Config.Ports
	virtiofsd    *os.File   // connected
	inherit      []*os.File // devices.Machine.Inherit
	kernel       string     // what QEMU opens: InheritedPath of inherit[i]
	initrd       string
	firmware     string
	fdSets       []devices.FDSet
	uefiCode     string // fd set paths
	uefiVars     string
	consoleLog   string
}

func (h *hostFiles) all() []*os.File {
	files := append([]*os.File{h.qmp, h.console, h.virtiofsd}, h.ports...)
	files = append(files, h.inherit...)
	for _, s := range h.fdSets {
		files = append(files, s.File)
	}
	return files
}

// close closes the shim's copies; logFile, which the caller owns, stays open.
func (h *hostFiles) close(logFile *os.File) {
	for _, f := range h.all() {
		if f != nil && f != logFile {
			_ = f.Close()
		}
	}
}

// openHostFiles makes the sockets and opens the files of plan for QEMU. virtiofsd, if the
// machine has one, must be listening already. On failure nothing stays open.
func openHostFiles(plan bootPlan, logFile *os.File) (_ *hostFiles, retErr error) {
	c, p := plan.cfg, plan.paths
	h := &hostFiles{}
	defer func() {
		if retErr != nil {
			h.close(logFile)
		}
	}()
	var err error
	if h.qmp, err = listenUnix(p.qmpSock); err != nil {
		return nil, err
	}
	fd, err := unix.FcntlInt(h.qmp.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", p.qmpSock, err)
	}
	h.fdSets = append(h.fdSets, devices.FDSet{File: os.NewFile(uintptr(fd), p.qmpSock), Set: stateFDSet, Opaque: p.qmpSock})
	if c.Console == ConsoleSocket {
		if h.console, err = listenUnix(p.console); err != nil {
			return nil, err
		}
	}
	for i := range c.Ports {
		l, err := listenUnix(p.port(i))
		if err != nil {
			return nil, err
		}
		h.ports = append(h.ports, l)
	}
	if c.SharedFS == machine.VirtioFS && !c.Template { // a template's is plugged later
		conn, err := net.Dial("unix", p.virtiofsdSock)
		if err != nil {
			return nil, fmt.Errorf("connect to virtiofsd: %w", err)
		}
		h.virtiofsd, err = conn.(*net.UnixConn).File()
		conn.Close()
		if err != nil {
			return nil, fmt.Errorf("connect to virtiofsd: %w", err)
		}
	}
	load := func(what, path string) (string, error) {
		f, err := os.Open(path)
		if err != nil {
			return "", fmt.Errorf("%s: %w", what, err)
		}
		// QEMU reopens it as itself: it must be world-readable (a distribution's are)
		if st, err := f.Stat(); err != nil || (c.Users != nil && st.Mode().Perm()&0o004 == 0) {
			f.Close()
			if err == nil {
				err = fmt.Errorf("mode %v is not world-readable, and QEMU runs as a user of its own", st.Mode().Perm())
			}
			return "", fmt.Errorf("%s %s: %w", what, path, err)
		}
		h.inherit = append(h.inherit, f)
		return devices.InheritedPath(len(h.inherit) - 1), nil
	}
	if c.Boot.Kernel != "" {
		if h.kernel, err = load("kernel", c.Boot.Kernel); err != nil {
			return nil, err
		}
		if c.Boot.Initrd != "" {
			if h.initrd, err = load("initrd", c.Boot.Initrd); err != nil {
				return nil, err
			}
		}
		if c.Type == machine.Q35 {
			if h.firmware, err = load("firmware", devices.QbootFirmware); err != nil {
				return nil, err
			}
		}
	}
	fdSet := func(what, path string, flag, set int) (string, error) {
		f, err := os.OpenFile(path, flag, 0)
		if err != nil {
			return "", fmt.Errorf("%s: %w", what, err)
		}
		h.fdSets = append(h.fdSets, devices.FDSet{File: f, Set: set, Opaque: path})
		return devices.FDSetPath(set), nil
	}
	if c.Boot.Kernel == "" && c.Boot.Firmware.Type == FirmwareUEFI {
		if h.uefiCode, err = fdSet("UEFI code", c.Boot.Firmware.Code, os.O_RDONLY, uefiCodeFDSet); err != nil {
			return nil, err
		}
		if h.uefiVars, err = fdSet("UEFI variable store", p.uefiVars, os.O_RDWR, uefiVarsFDSet); err != nil {
			return nil, err
		}
	}
	if c.Console == ConsoleLog {
		// QEMU appends the console to its own stderr's file, opened write-only (fd sets
		// hand out a descriptor by access mode)
		h.fdSets = append(h.fdSets, devices.FDSet{File: logFile, Set: consoleLogFDSet, Opaque: c.LogPath})
		h.consoleLog = devices.FDSetPath(consoleLogFDSet)
	}
	return h, nil
}

// listenUnix listens on a new unix socket at path and returns the listening descriptor.
func listenUnix(path string) (*os.File, error) {
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, err
	}
	l.SetUnlinkOnClose(false) // the path goes with the state dir; QEMU keeps listening
	f, err := l.File()
	l.Close()
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	return f, nil
}

// qemuCredential is the user QEMU runs as with lease: the lease's uid and group, and the
// group that opens /dev/kvm under KVM. Root's capabilities go with the uid change.
func qemuCredential(lease *vmuser.Lease, accel machine.Accel) (*syscall.Credential, error) {
	cred := &syscall.Credential{Uid: lease.UID, Gid: lease.GID(), Groups: []uint32{}}
	if accel == machine.KVM {
		gid, err := kvmGroup("/dev/kvm")
		if err != nil {
			return nil, err
		}
		if gid >= 0 {
			cred.Groups = append(cred.Groups, uint32(gid))
		}
	}
	return cred, nil
}

// kvmGroup is the group through which an unprivileged QEMU opens the KVM device at path:
// -1 if anyone may, an error if only its owner may, or only its group and that group is
// root's (membership of gid 0 would open every group-root file on the host to QEMU, the
// containerd socket among them).
func kvmGroup(path string) (int, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("kvm: %w", err)
	}
	switch {
	case st.Mode&0o006 == 0o006:
		return -1, nil
	case st.Mode&0o060 == 0o060 && st.Gid != 0:
		return int(st.Gid), nil
	}
	return 0, fmt.Errorf("kvm: %s (mode %04o, uid %d, gid %d) opens for its owner (or root's group) only, and QEMU runs as a user of its own: make it 0660 with a group (udev's rule gives group kvm), or run QEMU as root (node config isolation.qemu_user = \"root\")", path, st.Mode&0o7777, st.Uid, st.Gid)
}

// raiseMemlock lets an unprivileged QEMU pin guest RAM, which a passed-through device
// (VFIO) needs all of, boot-plugged or hot-plugged: RLIMIT_MEMLOCK is inherited, and QEMU,
// without CAP_SYS_RESOURCE, cannot raise its own. The shim is root and unaffected; what
// QEMU may pin is bounded by its pod cgroup's memory limit, where it has one.
// Raising it takes CAP_SYS_RESOURCE, which a shim in a restricted container may lack:
// then only machines with passed-through devices fail, with this error.
var raiseMemlock = sync.OnceValue(func() error {
	inf := &unix.Rlimit{Cur: unix.RLIM_INFINITY, Max: unix.RLIM_INFINITY}
	if err := unix.Prlimit(0, unix.RLIMIT_MEMLOCK, inf, nil); err != nil {
		return fmt.Errorf("VFIO: QEMU runs as a user of its own and must pin guest RAM, but the shim cannot lift RLIMIT_MEMLOCK (%w; it needs CAP_SYS_RESOURCE)", err)
	}
	return nil
})

// qemuRecord names the file in the state dir that records QEMU's pid and start time: a
// sweep after a dead shim finds its QEMU by it (QEMU's command line names no path of the
// state dir any more), and a reused pid does not match the start time.
const qemuRecord = "qemu.pid"

// virtiofsdRecord records virtiofsd's pid the same way: one in a user namespace has no
// command line naming the state dir (it is given its VirtiofsdRoot alias).
const virtiofsdRecord = "virtiofsd.pid"

func recordProcess(stateDir, record string, pid int) error {
	start, err := processStart(pid)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(stateDir, record), []byte(fmt.Sprintf("%d %d\n", pid, start)), 0o600)
}

// QEMUOf is the pid of the QEMU of the machine with state dir stateDir, if it runs (its
// record there names a live process of the same start time), else 0.
func QEMUOf(stateDir string) int { return recordedProcess(stateDir, qemuRecord) }

// VirtiofsdOf is the pid of the virtiofsd of the machine with state dir stateDir, as
// QEMUOf.
func VirtiofsdOf(stateDir string) int { return recordedProcess(stateDir, virtiofsdRecord) }

// recordedProcess is the pid record names in stateDir, if that process still runs.
func recordedProcess(stateDir, record string) int {
	b, err := os.ReadFile(filepath.Join(stateDir, record))
	if err != nil {
		return 0
	}
	var pid int
	var start uint64
	if _, err := fmt.Sscanf(string(b), "%d %d", &pid, &start); err != nil || pid <= 0 {
		return 0
	}
	if now, err := processStart(pid); err != nil || now != start {
		return 0
	}
	return pid
}

// processStart is when pid started, in clock ticks after boot (/proc/<pid>/stat field 22).
func processStart(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// "pid (comm) state ppid ...": comm may hold spaces and parentheses
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 20 {
		return 0, errors.New("short /proc stat")
	}
	return strconv.ParseUint(f[19], 10, 64)
}
