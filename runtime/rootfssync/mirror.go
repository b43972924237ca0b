// Package rootfssync brings a container's rootfs at a migration's target to what it is at
// the source (docs/design/211). Both rootfs are overlays of the same image layers, so
// what differs is what the container wrote: the source overlay's upper directory. A
// Mirror makes the target's upper directory, not yet mounted, a copy of it — files,
// directories, hard and symbolic links, device nodes and the overlay's own whiteouts
// (character devices 0:0) and opaque markers (xattrs), owners, modes, times — and removes
// what the source no longer has. Its first pass runs while the container does; each later
// one copies only what changed since, the last while the guest is stopped, before
// virtiofsd's state (the files the guest has open, by path) reaches the target.
//
// The source is written by a container, as root if it likes, while it is read: every
// name is resolved one component at a time from a directory descriptor, never through a
// symbolic link, and a file is opened only once it is known to be the regular file that
// was looked at (a device node swapped in would be opened by the host's root). What a
// pass copies is bounded by what it looked at: a file's size, a tree's depth. The target
// is written by nothing else while a pass runs.
package rootfssync

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// maxDepth bounds a tree's nesting: each level holds two descriptors during a pass.
const maxDepth = 256

// Changes counts what a pass did.
type Changes struct {
	Copied  int   // entries written (files, new directories, links, nodes)
	Removed int   // entries removed from the target
	Skipped int   // entries that changed while a live pass looked at them: the next pass's
	Bytes   int64 // file content copied
}

// Mirror keeps the tree dst a copy of the tree src over passes.
type Mirror struct {
	src, dst string
	// copied is, by path below the roots, the source entry as a pass last copied it: its
	// inode and status change time, which every write, rename, chown, chmod or xattr
	// change moves and nobody can set back. A later pass skips what still matches.
	copied map[string]stamp
}

type stamp struct {
	ino   uint64
	ctime unix.Timespec
}

// New is a Mirror of src into dst, both existing directories.
func New(src, dst string) *Mirror {
	return &Mirror{src: src, dst: dst, copied: map[string]stamp{}}
}

// errChanged marks an entry that changed between being looked at and being read.
var errChanged = errors.New("changed while it was copied")

// Pass brings dst to what src is now. A live pass (the container runs) leaves an entry
// that changes while it copies it to the next pass; a last pass, with the container
// stopped, fails on it.
func (m *Mirror) Pass(ctx context.Context, live bool) (Changes, error) {
	var c Changes
	s, err := unix.Open(m.src, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return c, fmt.Errorf("mirror %s: %w", m.src, err)
	}
	defer unix.Close(s)
	d, err := unix.Open(m.dst, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return c, fmt.Errorf("mirror into %s: %w", m.dst, err)
	}
	defer unix.Close(d)
	p := pass{Mirror: m, ctx: ctx, live: live, changes: &c, dstRoot: d, links: map[uint64]string{}}
	if err := p.dir(s, d, ".", 0); err != nil {
		return c, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(s, &st); err != nil {
		return c, fmt.Errorf("mirror %s: %w", m.src, err)
	}
	if err := p.attributes(s, d, ".", &st); err != nil {
		return c, err
	}
	return c, nil
}

// pass is one Pass's walk.
type pass struct {
	*Mirror
	ctx     context.Context
	live    bool
	changes *Changes
	dstRoot int
	// links maps the inode of a source file with more than one name to the first name
	// this pass gave it at the target: the others are linked to it
	links map[uint64]string
}

// failure is a pass's error, naming the trees and the entry.
type failure struct {
	src, dst, rel string
	err           error
}

func (f *failure) Error() string {
	return fmt.Sprintf("mirror %s into %s: %s: %v", f.src, f.dst, f.rel, f.err)
}
func (f *failure) Unwrap() error { return f.err }

func (p pass) fail(rel string, err error) error {
	return &failure{p.src, p.dst, rel, err}
}

// raced says whether err is a container's change under a live pass (the entry went,
// became a link or another kind of file, or lost an attribute), which the next pass
// copies; it then forgets rel, so that it does.
func (p pass) raced(rel string, err error) bool {
	if !p.live || !(errors.Is(err, errChanged) || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ELOOP) ||
		errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ENODATA) || errors.Is(err, unix.ERANGE)) {
		return false
	}
	p.forget(rel)
	p.changes.Skipped++
	return true
}

// forget drops what is known of rel and below it.
func (p pass) forget(rel string) {
	delete(p.copied, rel)
	prefix := rel + "/"
	for k := range p.copied {
		if strings.HasPrefix(k, prefix) {
			delete(p.copied, k)
		}
	}
}

// dir mirrors the entries of the directory s into the directory d (rel names it).
func (p pass) dir(s, d int, rel string, depth int) error {
	if err := p.ctx.Err(); err != nil {
		return p.fail(rel, err)
	}
	if depth > maxDepth {
		return p.fail(rel, fmt.Errorf("nested deeper than %d directories", maxDepth))
	}
	want, err := names(s)
	if err != nil {
		return p.fail(rel, err)
	}
	have, err := names(d)
	if err != nil {
		return p.fail(rel, err)
	}
	for _, name := range have {
		if _, found := slices.BinarySearch(want, name); !found {
			if err := removeAll(d, name, 0); err != nil {
				return p.fail(filepath.Join(rel, name), err)
			}
			p.forget(filepath.Join(rel, name))
			p.changes.Removed++
		}
	}
	for _, name := range want {
		sub := filepath.Join(rel, name)
		err := p.entry(s, d, name, sub, depth)
		var named *failure
		switch {
		case err == nil:
		case errors.As(err, &named):
			return err // from below, where races were already let go: it names its entry
		case p.raced(sub, err):
		default:
			return p.fail(sub, err)
		}
	}
	return nil
}

// entry mirrors the entry name of the directory s into d. Errors name nothing: dir
// adds the path.
func (p pass) entry(s, d int, name, rel string, depth int) error {
	var st, old unix.Stat_t
	if err := unix.Fstatat(s, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return err
	}
	kind := st.Mode & unix.S_IFMT
	exists := unix.Fstatat(d, name, &old, unix.AT_SYMLINK_NOFOLLOW) == nil
	if exists && old.Mode&unix.S_IFMT != kind {
		if err := removeAll(d, name, 0); err != nil {
			return err
		}
		p.forget(rel)
		p.changes.Removed++
		exists = false
	}
	if kind == unix.S_IFDIR {
		return p.subdir(s, d, name, rel, exists, depth)
	}
	if exists && p.copied[rel] == (stamp{st.Ino, st.Ctim}) {
		return nil // as the last pass copied it
	}
	var err error
	switch kind {
	case unix.S_IFREG:
		err = p.file(s, d, name, rel, &st, exists)
	case unix.S_IFLNK:
		err = p.symlink(s, d, name, &st, exists)
	default: // character and block devices (the overlay's whiteouts among them), FIFOs, sockets
		err = p.node(d, name, &st, exists)
	}
	if err != nil {
		return err
	}
	p.copied[rel] = stamp{st.Ino, st.Ctim}
	p.changes.Copied++
	return nil
}

func (p pass) subdir(s, d int, name, rel string, exists bool, depth int) error {
	if !exists {
		if err := unix.Mkdirat(d, name, 0o700); err != nil {
			return err
		}
		p.changes.Copied++
	}
	sub, err := unix.Openat(s, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(sub)
	dsub, err := unix.Openat(d, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(dsub)
	if err := p.dir(sub, dsub, rel, depth+1); err != nil {
		return err
	}
	// the directory's own attributes, as it is now (what was opened), its times last:
	// the entries just written changed the target's
	var st unix.Stat_t
	if err := unix.Fstat(sub, &st); err != nil {
		return err
	}
	return p.attributes(sub, dsub, rel, &st)
}

// file copies the regular file name of s into d; a file the pass met under another
// name already is linked to that copy.
func (p pass) file(s, d int, name, rel string, st *unix.Stat_t, exists bool) error {
	if st.Nlink > 1 {
		if first, ok := p.links[st.Ino]; ok {
			return p.link(d, name, first, exists)
		}
		p.links[st.Ino] = rel
	}
	in, err := openRegular(s, name, st)
	if err != nil {
		return err
	}
	from := os.NewFile(uintptr(in), rel)
	defer from.Close()
	if err := unix.Fstat(in, st); err != nil { // what is copied: this inode as it is now
		return err
	}
	if exists {
		// a name that was linked to another file's copy gets a file of its own
		if err := unix.Unlinkat(d, name, 0); err != nil {
			return err
		}
	}
	out, err := unix.Openat(d, name, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return err
	}
	to := os.NewFile(uintptr(out), rel)
	defer to.Close()
	n, err := copySparse(to, from, st.Size)
	if err != nil {
		return err
	}
	p.changes.Bytes += n
	return p.attributes(in, out, rel, st)
}

// link makes name in d a hard link to the target's copy first (a path below the root).
func (p pass) link(d int, name, first string, exists bool) error {
	var a, b unix.Stat_t
	if exists && unix.Fstatat(d, name, &a, unix.AT_SYMLINK_NOFOLLOW) == nil &&
		unix.Fstatat(p.dstRoot, first, &b, unix.AT_SYMLINK_NOFOLLOW) == nil && a.Ino == b.Ino {
		return nil
	}
	if exists {
		if err := unix.Unlinkat(d, name, 0); err != nil {
			return err
		}
	}
	return unix.Linkat(p.dstRoot, first, d, name, 0)
}

func (p pass) symlink(s, d int, name string, st *unix.Stat_t, exists bool) error {
	target, err := readlinkat(s, name)
	if err != nil {
		return err
	}
	if exists {
		if err := unix.Unlinkat(d, name, 0); err != nil {
			return err
		}
	}
	if err := unix.Symlinkat(target, d, name); err != nil {
		return err
	}
	return nodeAttributes(d, name, st)
}

func (p pass) node(d int, name string, st *unix.Stat_t, exists bool) error {
	if exists {
		if err := unix.Unlinkat(d, name, 0); err != nil {
			return err
		}
	}
	if err := unix.Mknodat(d, name, st.Mode, int(st.Rdev)); err != nil {
		return err
	}
	return nodeAttributes(d, name, st)
}

// attributes gives the open target d the source's (s, st) owner, mode, extended
// attributes and times, in that order: a chown drops file capabilities
// (security.capability) and set-id bits, and every change moves the times.
func (p pass) attributes(s, d int, rel string, st *unix.Stat_t) error {
	if err := unix.Fchown(d, int(st.Uid), int(st.Gid)); err != nil {
		return err
	}
	if err := unix.Fchmod(d, st.Mode&0o7777); err != nil {
		return err
	}
	if err := copyXattrs(s, d); err != nil {
		return err
	}
	// utimensat on the descriptor's /proc link: the descriptor's own file, whatever its
	// name now
	times := []unix.Timespec{st.Atim, st.Mtim}
	return unix.UtimesNanoAt(unix.AT_FDCWD, fmt.Sprintf("/proc/self/fd/%d", d), times, 0)
}

// nodeAttributes gives a link or node the source's owner, mode (a symbolic link has none
// of its own) and times.
func nodeAttributes(d int, name string, st *unix.Stat_t) error {
	if err := unix.Fchownat(d, name, int(st.Uid), int(st.Gid), unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFLNK {
		if err := unix.Fchmodat(d, name, st.Mode&0o7777, 0); err != nil {
			return err
		}
	}
	return unix.UtimesNanoAt(d, name, []unix.Timespec{st.Atim, st.Mtim}, unix.AT_SYMLINK_NOFOLLOW)
}

// openRegular opens the source's file name for reading if it is still the regular file
// st describes: first as a path (which opens nothing: no device's open runs), checked,
// then for reading through that descriptor.
func openRegular(dir int, name string, st *unix.Stat_t) (int, error) {
	path, err := unix.Openat(dir, name, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	defer unix.Close(path)
	var now unix.Stat_t
	if err := unix.Fstat(path, &now); err != nil {
		return -1, err
	}
	if now.Mode&unix.S_IFMT != unix.S_IFREG || now.Ino != st.Ino || now.Dev != st.Dev {
		return -1, errChanged
	}
	return unix.Open(fmt.Sprintf("/proc/self/fd/%d", path), unix.O_RDONLY|unix.O_NOCTTY|unix.O_NOATIME|unix.O_CLOEXEC, 0)
}

// copySparse copies the first size bytes of src into the empty dst, leaving src's holes
// holes (a sparse file the container made costs the target no more than the source), and
// makes dst size bytes long. A file that grows meanwhile is copied as far as size: the
// next pass sees its new status change time.
func copySparse(dst, src *os.File, size int64) (int64, error) {
	var copied int64
	for off := int64(0); off < size; {
		data, err := unix.Seek(int(src.Fd()), off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // a hole up to the end
		}
		if err != nil {
			return copied, err
		}
		if data >= size {
			break
		}
		hole, err := unix.Seek(int(src.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			return copied, err
		}
		end := min(hole, size)
		n, err := io.Copy(io.NewOffsetWriter(dst, data), io.NewSectionReader(src, data, end-data))
		copied += n
		if err != nil {
			return copied, err
		}
		off = end
	}
	return copied, dst.Truncate(size)
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

// removeAll removes the entry name of the target's directory dir, a whole tree if it is
// one.
func removeAll(dir int, name string, depth int) error {
	err := unix.Unlinkat(dir, name, 0)
	if err == nil || !errors.Is(err, unix.EISDIR) {
		return err
	}
	if depth > maxDepth {
		return fmt.Errorf("nested deeper than %d directories", maxDepth)
	}
	sub, err := unix.Openat(dir, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	list, err := names(sub)
	if err == nil {
		for _, n := range list {
			if err = removeAll(sub, n, depth+1); err != nil {
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

// xattrSizeMax is the kernel's bound on one attribute's value (XATTR_SIZE_MAX) and on
// the list of names (XATTR_LIST_MAX): reading into that much never comes back ERANGE.
const xattrSizeMax = 64 << 10

// xattrs reads every extended attribute of the open file fd. An attribute removed while
// it is read is left out.
func xattrs(fd int) (map[string][]byte, error) {
	buf := make([]byte, xattrSizeMax)
	n, err := unix.Flistxattr(fd, buf)
	if errors.Is(err, unix.ENOTSUP) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list xattrs: %w", err)
	}
	names := splitNames(buf[:n])
	out := make(map[string][]byte, len(names))
	for _, name := range names {
		n, err := unix.Fgetxattr(fd, name, buf)
		if errors.Is(err, unix.ENODATA) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("xattr %s: %w", name, err)
		}
		out[name] = slices.Clone(buf[:n])
	}
	return out, nil
}

func splitNames(buf []byte) []string {
	var out []string
	for name := range strings.SplitSeq(string(buf), "\x00") {
		if name != "" {
			out = append(out, name)
		}
	}
	return out
}
