package agent

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
)

// mount is one filesystem PID 1 sets up before anything else runs.
type mount struct {
	source, target, fstype string
	flags                  uintptr
	data                   string
}

// earlyMounts: no udev and no init system, so the agent mounts what the kernel, runc and
// containers expect. /run must be mounted before anything below it.
var earlyMounts = []mount{
	{"proc", "/proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	{"sysfs", "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755"},
	{"devpts", "/dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5"},
	{"shm", "/dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
	{"tmpfs", "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755"},
	{"tmpfs", "/tmp", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
	{"cgroup2", "/sys/fs/cgroup", "cgroup2", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "nsdelegate"},
	{"shm", agentv1.GuestPodShmDir, "tmpfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "mode=1777"},
}

func mountEarly() error {
	for _, m := range earlyMounts {
		if err := os.MkdirAll(m.target, 0o755); err != nil {
			return fmt.Errorf("mkdir %s: %w", m.target, err)
		}
		if err := unix.Mount(m.source, m.target, m.fstype, m.flags, m.data); err != nil && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("mount %s on %s: %w", m.fstype, m.target, err)
		}
	}
	for link, target := range map[string]string{
		"/dev/ptmx": "pts/ptmx", "/dev/fd": "/proc/self/fd",
		"/dev/stdin": "/proc/self/fd/0", "/dev/stdout": "/proc/self/fd/1", "/dev/stderr": "/proc/self/fd/2",
	} {
		_ = os.Remove(link)
		if err := os.Symlink(target, link); err != nil {
			return fmt.Errorf("symlink %s: %w", link, err)
		}
	}
	return enableControllers("/sys/fs/cgroup")
}

// enableControllers delegates every controller of the root cgroup to its children, where
// runc puts the containers.
func enableControllers(root string) error {
	b, err := os.ReadFile(filepath.Join(root, "cgroup.controllers"))
	if err != nil {
		return fmt.Errorf("cgroup controllers: %w", err)
	}
	var enable []string
	for c := range strings.FieldsSeq(string(b)) {
		enable = append(enable, "+"+c)
	}
	if len(enable) == 0 {
		return nil
	}
	if err := os.WriteFile(filepath.Join(root, "cgroup.subtree_control"), []byte(strings.Join(enable, " ")), 0); err != nil {
		return fmt.Errorf("enable cgroup controllers %v: %w", enable, err)
	}
	return nil
}

// kernelParams parses /proc/cmdline into key → value ("" for a bare flag).
func kernelParams() map[string]string {
	b, _ := os.ReadFile("/proc/cmdline")
	params := map[string]string{}
	for f := range strings.FieldsSeq(string(b)) {
		k, v, _ := strings.Cut(f, "=")
		params[k] = v
	}
	return params
}

// mountShare mounts the host's shared directory as the kernel command line says
// ("virtiofs:<tag>" or "9p:<tag>").
func mountShare(spec string) error {
	fstype, tag, ok := strings.Cut(spec, ":")
	if !ok || tag == "" {
		return fmt.Errorf("%s=%q: want <virtiofs|9p>:<tag>", agentv1.KernelParamShare, spec)
	}
	if err := os.MkdirAll(agentv1.GuestSharedDir, 0o755); err != nil {
		return err
	}
	var data string
	switch fstype {
	case "virtiofs":
	case "9p":
		// msize: the report measured 512 KiB as the fast setting for large reads.
		data = "trans=virtio,version=9p2000.L,msize=512000,cache=none,access=client"
	default:
		return fmt.Errorf("%s=%q: unknown filesystem %q", agentv1.KernelParamShare, spec, fstype)
	}
	if err := unix.Mount(tag, agentv1.GuestSharedDir, fstype, 0, data); err != nil {
		return fmt.Errorf("mount %s share %q on %s: %w", fstype, tag, agentv1.GuestSharedDir, err)
	}
	return nil
}

func poweroff() {
	unix.Sync()
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	// No ACPI power-off: a reboot ends QEMU too, since it runs with -no-reboot.
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART)
	select {}
}
