// Package idmap mounts directories through an ID mapping: a mount of a container's files in
// which each owner appears shifted into a host range of the pod's own, so that virtiofsd,
// running as that range's root in a user namespace, serves them without being root on the
// host (docs/design/025-virtiofsd-user-namespace.md).
//
// A file owned by u on disk appears owned by Root+u through the mount, and a file created
// through it by Root+u is owned by u on disk: the snapshot keeps its real owners.
package idmap

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/vmpod/vmpod/internal/mounts"
)

// Map is an ID mapping: the user namespace whose uid and gid maps it applies, and the host
// id its root (on-disk owner 0) becomes.
type Map struct {
	Userns *os.File
	Root   uint32
}

// Bind mounts src (a directory or a file, not what is mounted below it) at dst through m.
// The filesystem must support ID-mapped mounts (ext4, xfs, btrfs, tmpfs do; overlayfs does
// not: see Overlay).
func Bind(src, dst string, m Map, readonly bool) error {
	fd, err := unix.OpenTree(unix.AT_FDCWD, src, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC)
	if err != nil {
		return fmt.Errorf("id-mapped bind of %s: open_tree: %w", src, err)
	}
	defer unix.Close(fd)
	attr := &unix.MountAttr{Attr_set: unix.MOUNT_ATTR_IDMAP, Userns_fd: uint64(m.Userns.Fd())}
	if readonly {
		attr.Attr_set |= unix.MOUNT_ATTR_RDONLY
	}
	if err := unix.MountSetattr(fd, "", unix.AT_EMPTY_PATH, attr); err != nil {
		if errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("id-mapped bind of %s: its filesystem cannot be mounted ID-mapped: %w", src, err)
		}
		return fmt.Errorf("id-mapped bind of %s: mount_setattr: %w", src, err)
	}
	if err := unix.MoveMount(fd, "", unix.AT_FDCWD, dst, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("id-mapped bind of %s at %s: move_mount: %w", src, dst, err)
	}
	return nil
}

// Overlay mounts an overlay filesystem at target from options (overlayfs's: lowerdir,
// upperdir, workdir and the rest), its layers seen through m.
//
// Overlayfs itself cannot be mounted ID-mapped, but its layers can: each lower directory,
// and the directory holding upperdir and workdir (they must share a mount), gets an
// ID-mapped bind of its own, the overlay is mounted over those, and the binds are taken
// down again (overlayfs keeps private copies of its layers' mounts). The overlay writes its
// upper layer with its mounter's filesystem ids, so it is mounted with those set to
// m.Root: a file the guest creates as Root+u is then u on disk, not 0.
func Overlay(target string, options []string, m Map) (retErr error) {
	tmp, err := os.MkdirTemp(filepath.Dir(target), ".idmap-")
	if err != nil {
		return fmt.Errorf("id-mapped overlay at %s: %w", target, err)
	}
	var made []string
	defer func() {
		for _, mp := range made {
			if _, err := mounts.Unmount(mp); err != nil {
				retErr = errors.Join(retErr, err)
			}
		}
		if err := os.RemoveAll(tmp); err != nil {
			retErr = errors.Join(retErr, err)
		}
	}()
	bind := func(dir string, readonly bool) (string, error) {
		mp := filepath.Join(tmp, strconv.Itoa(len(made)))
		if err := os.Mkdir(mp, 0o700); err != nil {
			return "", err
		}
		if err := Bind(dir, mp, m, readonly); err != nil {
			return "", err
		}
		made = append(made, mp)
		return mp, nil
	}

	var rest []string
	var lower []string
	var upper, work string
	for _, o := range options {
		switch {
		case strings.HasPrefix(o, "lowerdir="):
			for _, dir := range strings.Split(strings.TrimPrefix(o, "lowerdir="), ":") {
				mp, err := bind(dir, true)
				if err != nil {
					return fmt.Errorf("id-mapped overlay at %s: lowerdir: %w", target, err)
				}
				lower = append(lower, mp)
			}
		case strings.HasPrefix(o, "upperdir="):
			upper = strings.TrimPrefix(o, "upperdir=")
		case strings.HasPrefix(o, "workdir="):
			work = strings.TrimPrefix(o, "workdir=")
		case strings.HasPrefix(o, "uidmap="), strings.HasPrefix(o, "gidmap="):
			return fmt.Errorf("id-mapped overlay at %s: option %q: the snapshot is ID-mapped already", target, o)
		default:
			rest = append(rest, o)
		}
	}
	if len(lower) == 0 {
		return fmt.Errorf("id-mapped overlay at %s: no lowerdir", target)
	}
	opts := []string{"lowerdir=" + strings.Join(lower, ":")}
	if (upper == "") != (work == "") {
		return fmt.Errorf("id-mapped overlay at %s: upperdir and workdir come together", target)
	}
	if upper != "" {
		parent := filepath.Dir(upper)
		if filepath.Dir(work) != parent {
			return fmt.Errorf("id-mapped overlay at %s: upperdir %s and workdir %s must be in one directory", target, upper, work)
		}
		mp, err := bind(parent, false)
		if err != nil {
			return fmt.Errorf("id-mapped overlay at %s: upperdir: %w", target, err)
		}
		opts = append(opts, "upperdir="+filepath.Join(mp, filepath.Base(upper)), "workdir="+filepath.Join(mp, filepath.Base(work)))
	}
	opts = append(opts, rest...)
	data := strings.Join(opts, ",")
	if len(data) >= unix.Getpagesize() {
		return fmt.Errorf("id-mapped overlay at %s: %d layers make options longer than a page", target, len(lower))
	}
	if err := mountAs(m.Root, func() error { return unix.Mount("overlay", target, "overlay", 0, data) }); err != nil {
		return fmt.Errorf("id-mapped overlay at %s: %w", target, err)
	}
	return nil
}

// mountAs runs mount on a thread whose filesystem ids are id, with every capability the
// process has still effective (setfsuid clears the file ones): overlayfs takes its
// mounter's credentials for every later write to the upper layer.
//
// The thread is given back as it was, never left to die: a child started from it (QEMU,
// virtiofsd) gets its parent-death signal when that thread ends, not the process
// (measured: virtiofsd killed by the first rootfs mounted after it started). A thread whose
// ids cannot be restored is parked for good instead.
func mountAs(id uint32, mount func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		errc <- asIDs(id, mount)
		if err := restoreIDs(); err != nil {
			select {} // neither back to the scheduler with id's credentials, nor ended
		}
		runtime.UnlockOSThread()
	}()
	return <-errc
}

func asIDs(id uint32, mount func() error) error {
	if err := unix.Setfsgid(int(id)); err != nil {
		return fmt.Errorf("setfsgid %d: %w", id, err)
	}
	if err := unix.Setfsuid(int(id)); err != nil {
		return fmt.Errorf("setfsuid %d: %w", id, err)
	}
	// setfsuid and setfsgid fail silently: read both back
	if u, _ := unix.SetfsuidRetUid(-1); u != int(id) {
		return fmt.Errorf("setfsuid %d: fsuid is %d", id, u)
	}
	if g, _ := unix.SetfsgidRetGid(-1); g != int(id) {
		return fmt.Errorf("setfsgid %d: fsgid is %d", id, g)
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var caps [2]unix.CapUserData
	if err := unix.Capget(&hdr, &caps[0]); err != nil {
		return fmt.Errorf("capget: %w", err)
	}
	caps[0].Effective, caps[1].Effective = caps[0].Permitted, caps[1].Permitted
	if err := unix.Capset(&hdr, &caps[0]); err != nil {
		return fmt.Errorf("capset: %w", err)
	}
	return mount()
}

// restoreIDs gives the thread the process's filesystem ids back (its euid and egid, which
// setfsuid follows); the file capabilities come back with fsuid 0.
func restoreIDs() error {
	uid, gid := unix.Geteuid(), unix.Getegid()
	_ = unix.Setfsgid(gid)
	_ = unix.Setfsuid(uid)
	if u, _ := unix.SetfsuidRetUid(-1); u != uid {
		return fmt.Errorf("fsuid stays %d", u)
	}
	if g, _ := unix.SetfsgidRetGid(-1); g != gid {
		return fmt.Errorf("fsgid stays %d", g)
	}
	return nil
}
