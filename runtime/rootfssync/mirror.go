// Package rootfssync brings a container's rootfs at a migration's target to what it is at
// the source (docs/design/211). Both rootfs are overlays of the same image layers, so
// what differs is what the container wrote: the source overlay's upper directory. Mirror
// makes the target's upper directory, not yet mounted, a copy of it — files, directories,
// links, device nodes and the overlay's own whiteouts (character devices 0:0) and opaque
// markers (xattrs), owners, modes, times — and removes what the source no longer has. A
// second Mirror copies only what changed since: the first runs while the container does,
// the last while the guest is stopped, before virtiofsd's state (the files the guest has
// open, by path) reaches the target.
//
// The source is written by a container while it is read: every name is resolved one
// component at a time from a directory descriptor, never followed through a symbolic
// link, so a container that swaps a directory for a link mid-copy cannot point the copy
// elsewhere on the host. The target is written by nothing else while Mirror runs.
package rootfssync

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"

	"golang.org/x/sys/unix"
)

// Changes counts what a Mirror did.
type Changes struct {
	Copied  int   // entries written (files, directories, links, nodes)
	Removed int   // entries removed from the target
	Bytes   int64 // file content copied
}

// Mirror makes the directory tree dst a copy of src.
func Mirror(src, dst string) (Changes, error) {
	var c Changes
	s, err := unix.Open(src, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return c, fmt.Errorf("mirror %s: %w", src, err)
	}
	defer unix.Close(s)
	d, err := unix.Open(dst, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return c, fmt.Errorf("mirror into %s: %w", dst, err)
	}
	defer unix.Close(d)
	m := mirror{src: src, dst: dst, changes: &c}
	if err := m.dir(s, d, "."); err != nil {
		return c, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(s, &st); err != nil {
		return c, fmt.Errorf("mirror %s: %w", src, err)
	}
	if err := m.attributes(s, d, "", &st); err != nil {
		return c, err
	}
	return c, nil
}

type mirror struct {
	src, dst string
	changes  *Changes
}

func (m mirror) fail(rel string, err error) error {
	return fmt.Errorf("mirror %s into %s: %s: %w", m.src, m.dst, rel, err)
}

// dir mirrors the entries of the directory s into the directory d (rel names it).
func (m mirror) dir(s, d int, rel string) error {
	want, err := names(s)
	if err != nil {
		return m.fail(rel, err)
	}
	have, err := names(d)
	if err != nil {
		return m.fail(rel, err)
	}
	for _, name := range have {
		if _, found := slices.BinarySearch(want, name); !found {
			if err := removeAll(d, name); err != nil {
				return m.fail(filepath.Join(rel, name), err)
			}
			m.changes.Removed++
		}
	}
	for _, name := range want {
		if err := m.entry(s, d, name, filepath.Join(rel, name)); err != nil {
			return err
		}
	}
	return nil
}

// entry mirrors the entry name of the directory s into d.
func (m mirror) entry(s, d int, name, rel string) error {
	var st, old unix.Stat_t
	if err := unix.Fstatat(s, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil // removed since it was listed: the next Mirror removes it here
		}
		return m.fail(rel, err)
	}
	oldErr := unix.Fstatat(d, name, &old, unix.AT_SYMLINK_NOFOLLOW)
	exists := oldErr == nil
	if exists && old.Mode&unix.S_IFMT != st.Mode&unix.S_IFMT {
		if err := removeAll(d, name); err != nil {
			return m.fail(rel, err)
		}
		m.changes.Removed++
		exists = false
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		if !exists {
			if err := unix.Mkdirat(d, name, 0o700); err != nil {
				return m.fail(rel, err)
			}
			m.changes.Copied++
		}
		sub, err := unix.Openat(s, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return m.fail(rel, err)
		}
		defer unix.Close(sub)
		dsub, err := unix.Openat(d, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return m.fail(rel, err)
		}
		defer unix.Close(dsub)
		if err := m.dir(sub, dsub, rel); err != nil {
			return err
		}
		return m.attributes(sub, dsub, rel, &st)
	case unix.S_IFREG:
		if exists && same(&st, &old) {
			return m.xattrsOf(s, d, name, rel)
		}
		return m.file(s, d, name, rel, &st)
	case unix.S_IFLNK:
		target, err := readlinkat(s, name)
		if err != nil {
			return m.fail(rel, err)
		}
		if exists {
			if now, err := readlinkat(d, name); err == nil && now == target && same(&st, &old) {
				return nil
			}
			if err := unix.Unlinkat(d, name, 0); err != nil {
				return m.fail(rel, err)
			}
		}
		if err := unix.Symlinkat(target, d, name); err != nil {
			return m.fail(rel, err)
		}
		m.changes.Copied++
		return m.owner(d, name, rel, &st)
	default: // character and block devices (the overlay's whiteouts among them), FIFOs, sockets
		if exists && same(&st, &old) && st.Rdev == old.Rdev {
			return nil
		}
		if exists {
			if err := unix.Unlinkat(d, name, 0); err != nil {
				return m.fail(rel, err)
			}
		}
		if err := unix.Mknodat(d, name, st.Mode, int(st.Rdev)); err != nil {
			return m.fail(rel, err)
		}
		m.changes.Copied++
		return m.owner(d, name, rel, &st)
	}
}

// file copies the regular file name of s into d.
func (m mirror) file(s, d int, name, rel string, st *unix.Stat_t) error {
	in, err := openRegular(s, name)
	if err != nil {
		return m.fail(rel, err)
	}
	from := os.NewFile(uintptr(in), rel)
	defer from.Close()
	out, err := unix.Openat(d, name, unix.O_WRONLY|unix.O_CREAT|unix.O_TRUNC|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return m.fail(rel, err)
	}
	to := os.NewFile(uintptr(out), rel)
	defer to.Close()
	n, err := io.Copy(to, from) // copy_file_range where the kernel can
	if err != nil {
		return m.fail(rel, err)
	}
	m.changes.Bytes += n
	m.changes.Copied++
	return m.attributes(in, out, rel, st)
}

// attributes gives the open target d the source's (s, st) extended attributes, owner,
// mode and times, the times last.
func (m mirror) attributes(s, d int, rel string, st *unix.Stat_t) error {
	if err := copyXattrs(s, d); err != nil {
		return m.fail(rel, err)
	}
	if err := unix.Fchown(d, int(st.Uid), int(st.Gid)); err != nil {
		return m.fail(rel, err)
	}
	if err := unix.Fchmod(d, st.Mode&0o7777); err != nil {
		return m.fail(rel, err)
	}
	// utimensat on the descriptor's /proc link: the descriptor's own file, whatever
	// its name now
	times := []unix.Timespec{st.Atim, st.Mtim}
	if err := unix.UtimesNanoAt(unix.AT_FDCWD, fmt.Sprintf("/proc/self/fd/%d", d), times, 0); err != nil {
		return m.fail(rel, err)
	}
	return nil
}

// xattrsOf brings the extended attributes of an unchanged regular file over: a
// container can change them alone.
func (m mirror) xattrsOf(s, d int, name, rel string) error {
	in, err := openRegular(s, name)
	if err != nil {
		return m.fail(rel, err)
	}
	defer unix.Close(in)
	out, err := unix.Openat(d, name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return m.fail(rel, err)
	}
	defer unix.Close(out)
	if err := copyXattrs(in, out); err != nil {
		return m.fail(rel, err)
	}
	return nil
}

// owner gives a link or node the source's owner and times (a symbolic link has no mode
// of its own).
func (m mirror) owner(d int, name, rel string, st *unix.Stat_t) error {
	if err := unix.Fchownat(d, name, int(st.Uid), int(st.Gid), unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return m.fail(rel, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFLNK {
		if err := unix.Fchmodat(d, name, st.Mode&0o7777, 0); err != nil {
			return m.fail(rel, err)
		}
	}
	if err := unix.UtimesNanoAt(d, name, []unix.Timespec{st.Atim, st.Mtim}, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return m.fail(rel, err)
	}
	return nil
}

// same says whether a target entry still matches the source's: type, size, owner, mode
// and modification time (rsync's quick check).
func same(a, b *unix.Stat_t) bool {
	return a.Mode == b.Mode && a.Size == b.Size && a.Uid == b.Uid && a.Gid == b.Gid && a.Mtim == b.Mtim
}

// openRegular opens the source's regular file name for reading, and fails if the
// container made it something else since it was looked at (non-blocking: a FIFO put in
// its place would otherwise hold the open forever).
func openRegular(dir int, name string) (int, error) {
	fd, err := unix.Openat(dir, name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
		unix.Close(fd)
		if err == nil {
			err = fmt.Errorf("no longer a regular file (mode %#o)", st.Mode)
		}
		return -1, err
	}
	return fd, nil
}

// names lists the directory fd's entries, sorted.
func names(fd int) ([]string, error) {
	dup, err := unix.Openat(fd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(dup), ".")
	defer f.Close()
	list, err := f.Readdirnames(-1)
	if err != nil {
		return nil, err
	}
	slices.Sort(list)
	return list, nil
}

func readlinkat(dir int, name string) (string, error) {
	for size := 256; ; size *= 2 {
		buf := make([]byte, size)
		n, err := unix.Readlinkat(dir, name, buf)
		if err != nil {
			return "", err
		}
		if n < size {
			return string(buf[:n]), nil
		}
	}
}

// removeAll removes the entry name of the directory dir, a whole tree if it is one.
func removeAll(dir int, name string) error {
	err := unix.Unlinkat(dir, name, 0)
	if err == nil || !errors.Is(err, unix.EISDIR) {
		return err
	}
	sub, err := unix.Openat(dir, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	list, err := names(sub)
	if err == nil {
		for _, n := range list {
			if err = removeAll(sub, n); err != nil {
				break
			}
		}
	}
	unix.Close(sub)
	if err != nil {
		return err
	}
	return unix.Unlinkat(dir, name, unix.AT_REMOVEDIR)
}

// copyXattrs makes the extended attributes of the open file d those of s: the overlay's
// own (trusted.overlay.opaque on a directory that hides the layers' one), file
// capabilities, ACLs, users' attributes.
func copyXattrs(s, d int) error {
	want, err := xattrs(s)
	if err != nil {
		return err
	}
	have, err := xattrs(d)
	if err != nil {
		return err
	}
	for name := range have {
		if _, ok := want[name]; !ok {
			if err := unix.Fremovexattr(d, name); err != nil {
				return fmt.Errorf("remove xattr %s: %w", name, err)
			}
		}
	}
	for name, value := range want {
		if old, ok := have[name]; ok && string(old) == string(value) {
			continue
		}
		if err := unix.Fsetxattr(d, name, value, 0); err != nil {
			return fmt.Errorf("set xattr %s: %w", name, err)
		}
	}
	return nil
}

// xattrs reads every extended attribute of the open file fd.
func xattrs(fd int) (map[string][]byte, error) {
	size, err := unix.Flistxattr(fd, nil)
	if err != nil || size == 0 {
		if errors.Is(err, unix.ENOTSUP) {
			err = nil
		}
		return nil, err
	}
	buf := make([]byte, size)
	if size, err = unix.Flistxattr(fd, buf); err != nil {
		return nil, err
	}
	out := map[string][]byte{}
	for _, name := range splitNames(buf[:size]) {
		n, err := unix.Fgetxattr(fd, name, nil)
		if err != nil {
			return nil, fmt.Errorf("xattr %s: %w", name, err)
		}
		value := make([]byte, n)
		if n, err = unix.Fgetxattr(fd, name, value); err != nil {
			return nil, fmt.Errorf("xattr %s: %w", name, err)
		}
		out[name] = value[:n]
	}
	return out, nil
}

func splitNames(buf []byte) []string {
	var out []string
	for len(buf) > 0 {
		i := slices.Index(buf, 0)
		if i < 0 {
			i = len(buf)
		}
		if i > 0 {
			out = append(out, string(buf[:i]))
		}
		buf = buf[min(i+1, len(buf)):]
	}
	return out
}
