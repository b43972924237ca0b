package rootfssync

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Receive writes the passes a Mirror sends Over the other end of conn into the directory
// dst, until conn ends between two passes. A pass it cannot write is answered with why
// (dst then holds part of it, which the next pass, sending everything again, mends); a
// stream that is not one ends Receive with an error. The stream comes from another node
// and is checked as any input: paths are names below the directory the stream is in,
// attributes and sizes within the kernel's bounds, device nodes only the overlay's
// whiteouts. Cancel by closing conn.
func Receive(ctx context.Context, conn io.ReadWriter, dst string) error {
	r, w := bufio.NewReader(conn), frameWriter{bufio.NewWriter(conn)}
	for {
		if _, err := r.Peek(1); errors.Is(err, io.EOF) {
			return nil
		} else if err != nil {
			return fmt.Errorf("mirror into %s: %w", dst, err)
		}
		if err := receivePass(ctx, r, w, dst); err != nil {
			return fmt.Errorf("mirror into %s: %w", dst, err)
		}
	}
}

// receivePass writes one pass and answers it.
func receivePass(ctx context.Context, r *bufio.Reader, w frameWriter, dst string) error {
	rc := &receiver{dst: dst}
	defer rc.close()
	var buf []byte
	for {
		kind, body, err := readFrame(r, &buf)
		if errors.Is(err, io.EOF) {
			err = fmt.Errorf("%w: the stream ended inside a pass", errProtocol)
		}
		if err != nil {
			return err
		}
		if kind == framePassEnd || kind == frameGaveUp {
			var h header
			if err := decode(kind, body, &h); err != nil {
				return err
			}
			switch {
			case rc.err != nil:
			case kind == frameGaveUp:
				rc.err = fmt.Errorf("the source gave up: %s", h.Reason)
			case rc.file != nil || len(rc.dirs) > 0 || !rc.done:
				rc.err = errors.New("the pass ended before its tree did")
			}
			rc.close()
			a := rc.answer
			if rc.err != nil {
				a.Error = fmt.Sprintf("mirror into %s: %v", dst, rc.err)
			}
			if err := w.json(frameAnswer, a); err != nil {
				return err
			}
			return w.w.Flush()
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if rc.err != nil {
			continue // a pass that failed is read to its end, not written
		}
		if err := rc.apply(kind, body); err != nil {
			if errors.Is(err, errProtocol) {
				return err
			}
			rc.err = err
			rc.close()
		}
	}
}

// receiver is one pass being written.
type receiver struct {
	dst  string
	dirs []openDir // the directories the stream is inside, the root first
	done bool      // the root's end came
	file *openFile // the file whose data is coming
	answer
	err error // the first error: the rest of the pass is read, not written
}

type openDir struct {
	fd  int
	rel string
}

type openFile struct {
	fd        int
	dir       int
	rel, name string
	size, end int64
	attrs     *attrs
}

func (rc *receiver) close() {
	if rc.file != nil {
		unix.Close(rc.file.fd)
		rc.file = nil
	}
	for _, d := range rc.dirs {
		unix.Close(d.fd)
	}
	rc.dirs = nil
}

// entryError names the entry a frame was about.
type entryError struct {
	rel string
	err error
}

func (e *entryError) Error() string { return e.rel + ": " + e.err.Error() }
func (e *entryError) Unwrap() error { return e.err }

func (rc *receiver) apply(kind byte, body []byte) error {
	if kind == frameData {
		return rc.data(body)
	}
	var h header
	if err := decode(kind, body, &h); err != nil {
		return err
	}
	var err error
	switch kind {
	case frameDir:
		err = rc.dir(&h)
	case frameDirEnd:
		err = rc.dirEnd(&h)
	case frameFile:
		err = rc.fileStart(&h)
	case frameFileEnd:
		err = rc.fileEnd(&h)
	case frameLink:
		err = rc.link(&h)
	case frameSymlink:
		err = rc.symlink(&h)
	case frameNode:
		err = rc.node(&h)
	default:
		return fmt.Errorf("%w: frame kind %q", errProtocol, kind)
	}
	if err != nil {
		return &entryError{h.Path, err}
	}
	return nil
}

// child checks that rel names an entry of the directory the stream is in, and returns
// that directory and the entry's name.
func (rc *receiver) child(rel string) (int, string, error) {
	switch {
	case rc.file != nil:
		return -1, "", fmt.Errorf("an entry inside the file %s", rc.file.rel)
	case len(rc.dirs) == 0:
		return -1, "", errors.New("an entry outside the tree")
	}
	if err := checkPath(rel); err != nil {
		return -1, "", err
	}
	top := rc.dirs[len(rc.dirs)-1]
	if rel == "." || filepath.Dir(rel) != top.rel {
		return -1, "", fmt.Errorf("not an entry of %s, the directory the stream is in", top.rel)
	}
	return top.fd, filepath.Base(rel), nil
}

// clearFor makes room for an entry of kind at name: whatever is there goes (counted as
// removed if it is of another kind).
func (rc *receiver) clearFor(dir int, name string, kind uint32) error {
	var st unix.Stat_t
	if err := unix.Fstatat(dir, name, &st, unix.AT_SYMLINK_NOFOLLOW); errors.Is(err, unix.ENOENT) {
		return nil
	} else if err != nil {
		return err
	}
	if st.Mode&unix.S_IFMT != kind {
		rc.Removed++
	}
	return removeAll(dir, name, 0)
}

func (rc *receiver) dir(h *header) error {
	var fd int
	switch {
	case len(rc.dirs) == 0 && !rc.done && h.Path == ".":
		var err error
		if fd, err = unix.Open(rc.dst, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0); err != nil {
			return err
		}
	case len(rc.dirs) == 0:
		return errors.New("a pass is one tree, from its root \".\"")
	case len(rc.dirs) > maxDepth:
		return fmt.Errorf("nested deeper than %d directories", maxDepth)
	default:
		dir, name, err := rc.child(h.Path)
		if err != nil {
			return err
		}
		var st unix.Stat_t
		err = unix.Fstatat(dir, name, &st, unix.AT_SYMLINK_NOFOLLOW)
		if err == nil && st.Mode&unix.S_IFMT != unix.S_IFDIR {
			if err = rc.clearFor(dir, name, unix.S_IFDIR); err == nil {
				err = unix.ENOENT
			}
		}
		if errors.Is(err, unix.ENOENT) {
			if err = unix.Mkdirat(dir, name, 0o700); err == nil {
				rc.Created++
			}
		}
		if err != nil {
			return err
		}
		if fd, err = unix.Openat(dir, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0); err != nil {
			return err
		}
	}
	rc.dirs = append(rc.dirs, openDir{fd, h.Path})
	want := make(map[string]bool, len(h.Names))
	for i, name := range h.Names {
		if err := checkName(name); err != nil {
			return fmt.Errorf("names[%d]: %w", i, err)
		}
		if want[name] {
			return fmt.Errorf("names[%d]: %q twice", i, name)
		}
		want[name] = true
	}
	have, err := names(fd)
	if err != nil {
		return err
	}
	for _, name := range have {
		if !want[name] {
			if err := removeAll(fd, name, 0); err != nil {
				return fmt.Errorf("remove %s: %w", name, err)
			}
			rc.Removed++
		}
	}
	return nil
}

func (rc *receiver) dirEnd(h *header) error {
	if rc.file != nil || len(rc.dirs) == 0 || rc.dirs[len(rc.dirs)-1].rel != h.Path {
		return errors.New("not the end of the directory the stream is in")
	}
	if err := checkAttrs(h.Attrs, unix.S_IFDIR); err != nil {
		return err
	}
	top := rc.dirs[len(rc.dirs)-1]
	if err := setAttrs(top.fd, h.Attrs); err != nil {
		return err
	}
	unix.Close(top.fd)
	rc.dirs = rc.dirs[:len(rc.dirs)-1]
	rc.done = len(rc.dirs) == 0
	return nil
}

func (rc *receiver) fileStart(h *header) error {
	dir, name, err := rc.child(h.Path)
	if err != nil {
		return err
	}
	if h.Size < 0 {
		return fmt.Errorf("size %d", h.Size)
	}
	if err := checkAttrs(h.Attrs, unix.S_IFREG); err != nil {
		return err
	}
	if err := rc.clearFor(dir, name, unix.S_IFREG); err != nil {
		return err
	}
	fd, err := unix.Openat(dir, name, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return err
	}
	rc.file = &openFile{fd: fd, dir: dir, rel: h.Path, name: name, size: h.Size, attrs: h.Attrs}
	return nil
}

// data writes a chunk of the open file: in order, within its size.
func (rc *receiver) data(body []byte) error {
	f := rc.file
	if f == nil {
		return errors.New("data outside a file")
	}
	if len(body) < 8 {
		return &entryError{f.rel, errors.New("a data frame without its offset")}
	}
	off, data := int64(binary.BigEndian.Uint64(body)), body[8:]
	if off < f.end || off > f.size || int64(len(data)) > f.size-off {
		return &entryError{f.rel, fmt.Errorf("data at %d+%d: out of order or beyond the size %d", off, len(data), f.size)}
	}
	for len(data) > 0 {
		n, err := unix.Pwrite(f.fd, data, off)
		if err != nil {
			return &entryError{f.rel, err}
		}
		data, off = data[n:], off+int64(n)
	}
	f.end = off
	return nil
}

func (rc *receiver) fileEnd(h *header) error {
	f := rc.file
	if f == nil || h.Path != f.rel {
		return errors.New("not the end of the file the stream is in")
	}
	rc.file = nil
	defer unix.Close(f.fd)
	if h.Abandon {
		return unix.Unlinkat(f.dir, f.name, 0)
	}
	if err := unix.Ftruncate(f.fd, f.size); err != nil {
		return err
	}
	return setAttrs(f.fd, f.attrs)
}

// link makes the entry a hard link to the file sent under first, a path below the root
// resolved with no symbolic link and no way out.
func (rc *receiver) link(h *header) error {
	dir, name, err := rc.child(h.Path)
	if err != nil {
		return err
	}
	if err := checkPath(h.First); err != nil || h.First == "." {
		return fmt.Errorf("first: %q is no file's path (%v)", h.First, err)
	}
	parent := rc.dirs[0].fd
	if up := filepath.Dir(h.First); up != "." {
		how := unix.OpenHow{Flags: unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC,
			Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS | unix.RESOLVE_NO_XDEV}
		if parent, err = unix.Openat2(parent, up, &how); err != nil {
			return fmt.Errorf("first %s: %w", h.First, err)
		}
		defer unix.Close(parent)
	}
	var a, b unix.Stat_t
	if err := unix.Fstatat(parent, filepath.Base(h.First), &b, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("first %s: %w", h.First, err)
	}
	if b.Mode&unix.S_IFMT != unix.S_IFREG {
		return fmt.Errorf("first %s: not a regular file", h.First)
	}
	if unix.Fstatat(dir, name, &a, unix.AT_SYMLINK_NOFOLLOW) == nil && a.Ino == b.Ino && a.Dev == b.Dev {
		return nil
	}
	if err := rc.clearFor(dir, name, unix.S_IFREG); err != nil {
		return err
	}
	return unix.Linkat(parent, filepath.Base(h.First), dir, name, 0)
}

func (rc *receiver) symlink(h *header) error {
	dir, name, err := rc.child(h.Path)
	if err != nil {
		return err
	}
	if h.Target == "" || len(h.Target) > maxLinkTarget || strings.ContainsRune(h.Target, 0) {
		return fmt.Errorf("target: %d bytes, empty, over %d or holding a NUL", len(h.Target), maxLinkTarget)
	}
	if err := checkAttrs(h.Attrs, unix.S_IFLNK); err != nil {
		return err
	}
	if err := rc.clearFor(dir, name, unix.S_IFLNK); err != nil {
		return err
	}
	if err := unix.Symlinkat(h.Target, dir, name); err != nil {
		return err
	}
	return setNodeAttrs(dir, name, h.Attrs)
}

// node makes a FIFO, a socket's name, or the overlay's whiteout (a character device 0:0).
// Other device nodes are refused: a tree served to a guest holds no host device, and the
// target's host would open one as whoever walks the tree.
func (rc *receiver) node(h *header) error {
	dir, name, err := rc.child(h.Path)
	if err != nil {
		return err
	}
	if h.Attrs == nil {
		return errors.New("attrs: missing")
	}
	kind := h.Attrs.Mode & unix.S_IFMT
	switch {
	case kind != unix.S_IFCHR && kind != unix.S_IFIFO && kind != unix.S_IFSOCK:
		return fmt.Errorf("attrs.mode %#o: not a whiteout, FIFO or socket", h.Attrs.Mode)
	case h.Rdev != 0:
		return fmt.Errorf("rdev %d:%d: a device node other than the overlay's whiteout (0:0)", unix.Major(h.Rdev), unix.Minor(h.Rdev))
	}
	if err := checkAttrs(h.Attrs, kind); err != nil {
		return err
	}
	if err := rc.clearFor(dir, name, kind); err != nil {
		return err
	}
	if err := unix.Mknodat(dir, name, h.Attrs.Mode, 0); err != nil {
		return err
	}
	return setNodeAttrs(dir, name, h.Attrs)
}

// setAttrs gives the open file or directory fd a's owner, mode, extended attributes and
// times, in that order: a chown drops file capabilities (security.capability) and
// set-id bits, and every change moves the times.
func setAttrs(fd int, a *attrs) error {
	if err := unix.Fchown(fd, int(a.UID), int(a.GID)); err != nil {
		return err
	}
	if err := unix.Fchmod(fd, a.Mode&0o7777); err != nil {
		return err
	}
	if err := setXattrs(fd, a.Xattrs); err != nil {
		return err
	}
	// utimensat on the descriptor's /proc link: the descriptor's own file, whatever its
	// name now
	return unix.UtimesNanoAt(unix.AT_FDCWD, fmt.Sprintf("/proc/self/fd/%d", fd), a.times(), 0)
}

// setNodeAttrs gives a link or node a's owner, mode (a symbolic link has none of its
// own) and times.
func setNodeAttrs(dir int, name string, a *attrs) error {
	if err := unix.Fchownat(dir, name, int(a.UID), int(a.GID), unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return err
	}
	if a.Mode&unix.S_IFMT != unix.S_IFLNK {
		if err := unix.Fchmodat(dir, name, a.Mode&0o7777, 0); err != nil {
			return err
		}
	}
	return unix.UtimesNanoAt(dir, name, a.times(), unix.AT_SYMLINK_NOFOLLOW)
}

// setXattrs makes the extended attributes of the open file fd want: the overlay's own
// (trusted.overlay.opaque on a directory that hides the layers' one), file capabilities,
// ACLs, users' attributes.
func setXattrs(fd int, want map[string][]byte) error {
	have, err := xattrs(fd)
	if err != nil {
		return err
	}
	for name := range have {
		if _, ok := want[name]; !ok {
			if err := unix.Fremovexattr(fd, name); err != nil {
				return fmt.Errorf("remove xattr %s: %w", name, err)
			}
		}
	}
	for name, value := range want {
		if old, ok := have[name]; ok && string(old) == string(value) {
			continue
		}
		if err := unix.Fsetxattr(fd, name, value, 0); err != nil {
			return fmt.Errorf("set xattr %s: %w", name, err)
		}
	}
	return nil
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
