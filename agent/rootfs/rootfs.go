package rootfs

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// Prepare builds spec's filesystem in spec.Root.Path and makes it the calling process's
// root, as `runc init` does: the mounts in order, /dev's nodes and links when /dev is a
// filesystem of its own, the process's cwd, then the pivot. The caller must be alone in a mount namespace of its own, in the
// container's PID, IPC and cgroup namespaces (proc, mqueue and cgroup2 show the
// mounter's), and Unsupported(spec) must be "".
//
// The image is not trusted: every destination is resolved inside the root
// (openat2 RESOLVE_IN_ROOT, so a symlink in the image cannot point a mount outside it)
// and mounted on through its file descriptor. Sources are the agent's (guest paths the
// host shared), as runc trusts its bundle's.
func Prepare(spec *specs.Spec) error {
	prop, err := rootPropagation(spec.Linux.RootfsPropagation)
	if err != nil {
		return err
	}
	if err := unix.Mount("", "/", "", prop, ""); err != nil {
		return fmt.Errorf("linux.rootfsPropagation: %w", err)
	}
	root := spec.Root.Path
	if err := unix.Mount(root, root, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("root.path %s: bind: %w", root, err)
	}
	rootFD, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("root.path %s: %w", root, err)
	}
	defer unix.Close(rootFD)

	var ownDev, devpts bool
	for i, m := range spec.Mounts {
		dest := filepath.Clean(m.Destination)
		if dest == "/dev" && !isBind(m) {
			ownDev = true
		}
		if dest == "/dev/pts" && m.Type == "devpts" {
			devpts = true
		}
		if err := mountInRoot(rootFD, m); err != nil {
			return fmt.Errorf("mounts[%d] (%s): %w", i, m.Destination, err)
		}
	}
	if ownDev {
		if err := populateDev(rootFD, devpts); err != nil {
			return fmt.Errorf("/dev: %w", err)
		}
	}
	if cwd := strings.TrimPrefix(filepath.Clean("/"+spec.Process.Cwd), "/"); cwd != "" {
		// runc makes the process's cwd when the image lacks it.
		fd, err := mkdirAll(rootFD, cwd)
		if err != nil {
			return fmt.Errorf("process.cwd: %w", err)
		}
		unix.Close(fd)
	}
	if err := pivot(root); err != nil {
		return fmt.Errorf("pivot_root %s: %w", root, err)
	}
	return nil
}

// Finish makes the read-only paths read-only, masks the masked paths, and makes /dev and
// the root read-only when the spec asks. It runs after Prepare, once the caller set the
// sysctls (under /proc/sys, which is read-only next).
func Finish(spec *specs.Spec) error {
	if len(spec.Linux.MaskedPaths) > 0 {
		// What masks the files must be the null device, not a file the image put there
		// (runc's check since CVE-2025-31133).
		var st unix.Stat_t
		if err := unix.Stat("/dev/null", &st); err != nil {
			return fmt.Errorf("/dev/null: %w", err)
		}
		if st.Mode&unix.S_IFMT != unix.S_IFCHR || unix.Major(st.Rdev) != 1 || unix.Minor(st.Rdev) != 3 {
			return errors.New("/dev/null is not the null device")
		}
	}
	for i, p := range spec.Linux.ReadonlyPaths {
		if err := readonlyPath(p); err != nil {
			return fmt.Errorf("linux.readonlyPaths[%d] (%s): %w", i, p, err)
		}
	}
	for i, p := range spec.Linux.MaskedPaths {
		if err := maskPath(p); err != nil {
			return fmt.Errorf("linux.maskedPaths[%d] (%s): %w", i, p, err)
		}
	}
	for _, m := range spec.Mounts {
		if filepath.Clean(m.Destination) == "/dev" && !isBind(m) && slices.Contains(m.Options, "ro") {
			if err := remountBind("/dev", unix.MS_RDONLY, true); err != nil {
				return fmt.Errorf("/dev read-only: %w", err)
			}
		}
	}
	if spec.Root.Readonly {
		if err := remountBind("/", unix.MS_RDONLY, false); err != nil {
			return fmt.Errorf("root.readonly: %w", err)
		}
	}
	return nil
}

// mountInRoot mounts m at its destination inside the root. A /dev asked read-only is
// mounted writable, for its nodes, and made read-only by Finish.
func mountInRoot(rootFD int, m specs.Mount) error {
	o, err := parseOptions(m.Options)
	if err != nil {
		return err
	}
	rel := strings.TrimPrefix(filepath.Clean(m.Destination), "/")
	if rel == "" {
		return errors.New("a mount over the root")
	}
	var dst int
	if isBind(m) {
		fi, err := os.Stat(m.Source)
		if err != nil {
			return fmt.Errorf("source: %w", err)
		}
		if fi.IsDir() {
			dst, err = mkdirAll(rootFD, rel)
		} else {
			dst, err = createFile(rootFD, rel)
		}
		if err != nil {
			return err
		}
		err = unix.Mount(m.Source, fdPath(dst), "", unix.MS_BIND|o.flags&unix.MS_REC, "")
		unix.Close(dst)
		if err != nil {
			return fmt.Errorf("bind %s: %w", m.Source, err)
		}
	} else {
		if dst, err = mkdirAll(rootFD, rel); err != nil {
			return err
		}
		if m.Type == "proc" || m.Type == "sysfs" {
			// As runc: not through a symlink, even one inside the root: another container
			// of the pod could swap one on a volume they share while this one resolves it
			// (runc's CVE-2019-19921).
			fd, err := unix.Openat2(rootFD, rel, &unix.OpenHow{Flags: unix.O_PATH | unix.O_CLOEXEC, Resolve: inRoot | unix.RESOLVE_NO_SYMLINKS})
			if err != nil {
				unix.Close(dst)
				return fmt.Errorf("%s over a symlink or a missing directory: %w", m.Type, err)
			}
			unix.Close(fd)
		}
		fstype := m.Type
		if fstype == "cgroup" {
			fstype = "cgroup2" // the guest has the unified hierarchy only, as runc does then
		}
		flags := o.flags
		if rel == "dev" {
			flags &^= unix.MS_RDONLY
		}
		err = unix.Mount(m.Source, fdPath(dst), fstype, flags, strings.Join(o.data, ","))
		unix.Close(dst)
		if err != nil {
			return fmt.Errorf("mount %s: %w", fstype, err)
		}
	}
	// A bind takes its flags from a remount (runc remounts when any flag is set or
	// cleared: "rw" over a read-only source must clear it).
	rest := o.flags &^ (unix.MS_BIND | unix.MS_REC)
	remount := isBind(m) && (rest != 0 || o.cleared != 0)
	if len(o.propagation) == 0 && !remount && (!isBind(m) || o.attrSet|o.attrClr == 0) {
		return nil
	}
	// Opened again: the descriptor used above names the directory under the new mount.
	mnt, err := openInRoot(rootFD, rel, unix.O_PATH)
	if err != nil {
		return err
	}
	defer unix.Close(mnt)
	if remount {
		if err := remountBind(fdPath(mnt), rest, false); err != nil {
			return fmt.Errorf("remount %s: %w", strings.Join(m.Options, ","), err)
		}
	}
	for _, p := range o.propagation {
		if err := unix.Mount("", fdPath(mnt), "", p, ""); err != nil {
			return fmt.Errorf("propagation: %w", err)
		}
	}
	if isBind(m) && o.attrSet|o.attrClr != 0 {
		attr := unix.MountAttr{Attr_set: o.attrSet, Attr_clr: o.attrClr}
		if err := unix.MountSetattr(mnt, "", unix.AT_EMPTY_PATH|unix.AT_RECURSIVE, &attr); err != nil {
			return fmt.Errorf("recursive options: %w", err)
		}
	}
	return nil
}

// fdPath names what fd refers to for mount(2), which follows the link.
func fdPath(fd int) string { return fmt.Sprintf("/proc/self/fd/%d", fd) }

// inRoot resolves a path inside the root: symlinks (absolute ones too) and ".." stay in
// it, and no /proc magic link is followed.
const inRoot = unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS

func openInRoot(rootFD int, rel string, flags int) (int, error) {
	fd, err := unix.Openat2(rootFD, rel, &unix.OpenHow{Flags: uint64(flags | unix.O_CLOEXEC), Resolve: inRoot})
	if err != nil {
		return -1, fmt.Errorf("%s in the root: %w", rel, err)
	}
	return fd, nil
}

// mkdirAll opens directory rel inside the root, making what is missing of it (0755, as
// runc does).
func mkdirAll(rootFD int, rel string) (int, error) {
	how := unix.OpenHow{Flags: unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC, Resolve: inRoot}
	fd, err := unix.Openat2(rootFD, rel, &how)
	if !errors.Is(err, unix.ENOENT) || rel == "." {
		if err != nil {
			return -1, fmt.Errorf("%s in the root: %w", rel, err)
		}
		return fd, nil
	}
	parent, err := mkdirAll(rootFD, filepath.Dir(rel))
	if err != nil {
		return -1, err
	}
	err = unix.Mkdirat(parent, filepath.Base(rel), 0o755)
	unix.Close(parent)
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return -1, fmt.Errorf("mkdir %s in the root: %w", rel, err)
	}
	return openInRoot(rootFD, rel, unix.O_PATH|unix.O_DIRECTORY)
}

// createFile opens file rel inside the root (O_PATH), creating an empty one, and its
// directories, if missing: the mount point of a bind-mounted file.
func createFile(rootFD int, rel string) (int, error) {
	fd, err := unix.Openat2(rootFD, rel, &unix.OpenHow{Flags: unix.O_PATH | unix.O_CLOEXEC, Resolve: inRoot})
	if err == nil {
		return fd, nil
	}
	if !errors.Is(err, unix.ENOENT) {
		return -1, fmt.Errorf("%s in the root: %w", rel, err)
	}
	parent, err := mkdirAll(rootFD, filepath.Dir(rel))
	if err != nil {
		return -1, err
	}
	// Created in its resolved directory by name: nothing is followed.
	f, err := unix.Openat(parent, filepath.Base(rel), unix.O_CREAT|unix.O_EXCL|unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o755)
	unix.Close(parent)
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return -1, fmt.Errorf("create %s in the root: %w", rel, err)
	}
	if err == nil {
		unix.Close(f)
	}
	return openInRoot(rootFD, rel, unix.O_PATH)
}

// defaultDevices are the nodes every container's /dev has (runc's list, the
// runtime-spec's required devices).
var defaultDevices = []struct {
	name         string
	major, minor uint32
}{
	{"null", 1, 3}, {"zero", 1, 5}, {"full", 1, 7}, {"random", 1, 8}, {"urandom", 1, 9}, {"tty", 5, 0},
}

// populateDev makes the default device nodes and runc's links in a /dev of the
// container's own: fd, stdin, stdout, stderr into /proc/self, core to /proc/kcore when
// the kernel has it, and ptmx to the container's devpts instance.
func populateDev(rootFD int, devpts bool) error {
	dev, err := openInRoot(rootFD, "dev", unix.O_PATH|unix.O_DIRECTORY)
	if err != nil {
		return err
	}
	defer unix.Close(dev)
	old := unix.Umask(0)
	defer unix.Umask(old)
	for _, d := range defaultDevices {
		if err := unix.Mknodat(dev, d.name, unix.S_IFCHR|0o666, int(unix.Mkdev(d.major, d.minor))); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("mknod %s: %w", d.name, err)
		}
		if err := unix.Fchownat(dev, d.name, 0, 0, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fmt.Errorf("chown %s: %w", d.name, err)
		}
	}
	links := [][2]string{{"/proc/self/fd", "fd"}, {"/proc/self/fd/0", "stdin"}, {"/proc/self/fd/1", "stdout"}, {"/proc/self/fd/2", "stderr"}}
	if _, err := os.Stat("/proc/kcore"); err == nil {
		links = append(links, [2]string{"/proc/kcore", "core"})
	}
	if devpts {
		if err := unix.Unlinkat(dev, "ptmx", 0); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("remove ptmx: %w", err)
		}
		links = append(links, [2]string{"pts/ptmx", "ptmx"})
	}
	for _, l := range links {
		if err := unix.Symlinkat(l[0], dev, l[1]); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("symlink %s: %w", l[1], err)
		}
	}
	return nil
}

// Enter makes root, bound onto itself, the root of the caller's mount namespace — which
// must be its own, unshared — and detaches the rest of the tree: for an init that needs
// none of the spec's mounts (a pod's pause). Unlike a chroot, nothing of the old tree is
// left to climb back to, even through /proc/<pid>/root from another process.
func Enter(root string) error {
	if err := unix.Mount("", "/", "", unix.MS_SLAVE|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("root propagation: %w", err)
	}
	if err := unix.Mount(root, root, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("bind %s: %w", root, err)
	}
	if err := pivot(root); err != nil {
		return fmt.Errorf("pivot_root %s: %w", root, err)
	}
	return nil
}

// pivot makes root the process's root and detaches the old one (runc's pivot_root(".",
// ".") without a directory for the old root).
func pivot(root string) error {
	oldRoot, err := unix.Open("/", unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(oldRoot)
	newRoot, err := unix.Open(root, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(newRoot)
	if err := unix.Fchdir(newRoot); err != nil {
		return err
	}
	if err := unix.PivotRoot(".", "."); err != nil {
		return err
	}
	if err := unix.Fchdir(oldRoot); err != nil {
		return err
	}
	// The old root is stacked under the new one at "/": slave it first, so that its
	// unmount does not propagate back to the guest's mounts.
	if err := unix.Mount("", ".", "", unix.MS_SLAVE|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("old root propagation: %w", err)
	}
	if err := unix.Unmount(".", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detach old root: %w", err)
	}
	return unix.Chdir("/")
}

// readonlyPath makes p (after the pivot) a read-only bind of itself; a path the kernel
// does not have is left alone.
func readonlyPath(p string) error {
	if err := unix.Mount(p, p, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		return err
	}
	return remountBind(p, unix.MS_RDONLY, true)
}

// maskPath hides p (after the pivot): /dev/null over a file, an empty read-only tmpfs
// over a directory.
func maskPath(p string) error {
	err := unix.Mount("/dev/null", p, "", unix.MS_BIND, "")
	switch {
	case err == nil, errors.Is(err, unix.ENOENT):
		return nil
	case errors.Is(err, unix.ENOTDIR):
		// runc's size: the smallest a tmpfs can have, one inode (its root)
		return unix.Mount("tmpfs", p, "tmpfs", unix.MS_RDONLY, "size=4k,nr_inodes=1")
	}
	return err
}

// remountBind sets flags on the bind mount at p. keep adds the flags p has now (nosuid,
// nodev, ...), which a remount would otherwise clear; without it they are added only when
// the kernel refuses to clear them (locked flags), as runc does.
func remountBind(p string, flags uintptr, keep bool) error {
	if !keep {
		err := unix.Mount("", p, "", unix.MS_BIND|unix.MS_REMOUNT|flags, "")
		if !errors.Is(err, unix.EPERM) {
			return err
		}
	}
	var st unix.Statfs_t
	if err := unix.Statfs(p, &st); err != nil {
		return err
	}
	return unix.Mount("", p, "", unix.MS_BIND|unix.MS_REMOUNT|flags|mountFlags(st.Flags), "")
}

// mountFlags maps statfs(2)'s ST_* flags to mount(2)'s MS_* ones.
func mountFlags(st int64) uintptr {
	var f uintptr
	for stFlag, msFlag := range map[int64]uintptr{
		unix.ST_RDONLY: unix.MS_RDONLY, unix.ST_NOSUID: unix.MS_NOSUID, unix.ST_NODEV: unix.MS_NODEV,
		unix.ST_NOEXEC: unix.MS_NOEXEC, unix.ST_SYNCHRONOUS: unix.MS_SYNCHRONOUS, unix.ST_MANDLOCK: unix.MS_MANDLOCK,
		unix.ST_NOATIME: unix.MS_NOATIME, unix.ST_NODIRATIME: unix.MS_NODIRATIME, unix.ST_RELATIME: unix.MS_RELATIME,
	} {
		if st&stFlag != 0 {
			f |= msFlag
		}
	}
	return f
}
