// Package rootfssync brings a container's rootfs at a migration's target to what it is at
// the source (docs/design/211). Both rootfs are overlays of the same image layers, so
// what differs is what the container wrote: the source overlay's upper directory. A
// Mirror makes the target's upper directory, not yet mounted, a copy of it — files,
// directories, hard and symbolic links, the overlay's own whiteouts (character devices
// 0:0) and opaque markers (xattrs), FIFOs, owners, modes, times — and removes what the
// source no longer has. Its first pass runs while the container does; each later one
// copies only what changed since, the last while the guest is stopped, before
// virtiofsd's state (the files the guest has open, by path) reaches the target.
//
// A pass is a stream (wire.go): the Mirror walks the source and sends what changed, and
// Receive, at the target, writes it. Between nodes the stream is a connection (Over);
// on one host (New) a receiver in the same process reads it.
//
// The source is written by a container, as root if it likes, while it is read: every
// name is resolved one component at a time from a directory descriptor, never through a
// symbolic link, and a file is opened only once it is known to be the regular file that
// was looked at (a device node swapped in would be opened by the host's root). What a
// pass copies is bounded by what it looked at: a file's size, a tree's depth. The
// stream is the other node's input and is checked as such (receive.go). The target is
// written by nothing else while a pass runs.
package rootfssync

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// maxDepth bounds a tree's nesting: each level holds a descriptor at each end.
const maxDepth = 256

// Changes counts what a pass did.
type Changes struct {
	Copied  int   // entries written (files, new directories, links, nodes)
	Removed int   // entries removed from the target, or replaced by one of another kind
	Skipped int   // entries that changed while a live pass looked at them: the next pass's
	Bytes   int64 // file content sent
}

// Mirror keeps a target tree a copy of the tree src over passes.
type Mirror struct {
	src string
	dst string // New's: the directory a receiver in this process writes into
	// Over's: the connection to a Receive
	r *bufio.Reader
	w frameWriter
	// copied is, by path below the roots, the source entry as a pass last sent it: its
	// inode and status change time, which every write, rename, chown, chmod or xattr
	// change moves and nobody can set back. A later pass skips what still matches.
	copied map[string]stamp
	// listed is, by directory, the names the last pass sent for it: the target removed
	// those gone since, and what was known of them goes
	listed map[string][]string
}

type stamp struct {
	ino   uint64
	ctime unix.Timespec
}

// New is a Mirror of src into dst, both existing directories on this host.
func New(src, dst string) *Mirror {
	return &Mirror{src: src, dst: dst, copied: map[string]stamp{}, listed: map[string][]string{}}
}

// Over is a Mirror of src into the tree a Receive at the other end of conn writes.
func Over(src string, conn io.ReadWriter) *Mirror {
	m := New(src, "")
	m.r, m.w = bufio.NewReader(conn), frameWriter{bufio.NewWriter(conn)}
	return m
}

// errChanged marks an entry that changed between being looked at and being read.
var errChanged = errors.New("changed while it was copied")

// Pass brings the target to what src is now. A live pass (the container runs) leaves an
// entry that changes while it copies it to the next pass; a last pass, with the
// container stopped, fails on it. A pass that fails leaves the target partly written
// and the next one sends everything again.
func (m *Mirror) Pass(ctx context.Context, live bool) (Changes, error) {
	if m.r != nil {
		return m.send(ctx, m.r, m.w, live)
	}
	here, there := net.Pipe()
	received := make(chan error, 1)
	go func() {
		defer there.Close()
		received <- receivePass(ctx, bufio.NewReader(there), frameWriter{bufio.NewWriter(there)}, m.dst)
	}()
	c, err := m.send(ctx, bufio.NewReader(here), frameWriter{bufio.NewWriter(here)}, live)
	here.Close()
	if rerr := <-received; err == nil && rerr != nil {
		err = fmt.Errorf("mirror %s into %s: %w", m.src, m.dst, rerr)
	}
	return c, err
}

func (m *Mirror) send(ctx context.Context, r *bufio.Reader, w frameWriter, live bool) (Changes, error) {
	var c Changes
	p := &pass{Mirror: m, ctx: ctx, live: live, changes: &c, w: w, links: map[uint64]string{}, buf: make([]byte, dataChunk)}
	err := p.root()
	var broken *connError
	switch {
	case errors.As(err, &broken):
	case err != nil:
		// the target hears why and answers: the connection serves the next pass
		if w.json(frameGaveUp, header{Reason: err.Error()}) == nil && w.w.Flush() == nil {
			_, _ = readAnswer(r)
		}
	default:
		if err = w.json(framePassEnd, header{}); err == nil {
			err = w.w.Flush()
		}
		var a answer
		if err == nil {
			a, err = readAnswer(r)
		}
		c.Copied += a.Created
		c.Removed += a.Removed
		if err != nil {
			err = fmt.Errorf("mirror %s: the target's answer: %w", m.src, err)
		} else if a.Error != "" {
			err = fmt.Errorf("mirror %s: the target: %s", m.src, a.Error)
		}
	}
	if err != nil {
		clear(m.copied) // what the target holds is not known any more
		clear(m.listed)
	}
	return c, err
}

func readAnswer(r *bufio.Reader) (answer, error) {
	var a answer
	var buf []byte
	kind, body, err := readFrame(r, &buf)
	if err != nil {
		return a, err
	}
	if kind != frameAnswer {
		return a, fmt.Errorf("%w: a %q frame, want the answer", errProtocol, kind)
	}
	return a, decode(kind, body, &a)
}

// pass is one Pass's walk.
type pass struct {
	*Mirror
	ctx     context.Context
	live    bool
	changes *Changes
	w       frameWriter
	// links maps the inode of a source file with more than one name to the first name
	// this pass sent it under: the others are linked to it
	links map[uint64]string
	buf   []byte // a file's data on its way
}

// failure is a pass's error, naming the tree and the entry.
type failure struct {
	src, rel string
	err      error
}

func (f *failure) Error() string {
	return fmt.Sprintf("mirror %s: %s: %v", f.src, f.rel, f.err)
}
func (f *failure) Unwrap() error { return f.err }

func (p *pass) fail(rel string, err error) error {
	return &failure{p.src, rel, err}
}

// connError is a failure to write the stream: the connection is no use any more.
type connError struct{ err error }

func (e *connError) Error() string { return "the stream to the target: " + e.err.Error() }
func (e *connError) Unwrap() error { return e.err }

func (p *pass) send(kind byte, h header) error {
	err := p.w.json(kind, h)
	if err != nil && !errors.Is(err, errTooBig) {
		return &connError{err}
	}
	return err
}

// raced says whether err is a container's change under a live pass (the entry went,
// became a link or another kind of file, or lost an attribute), which the next pass
// copies; it then forgets rel, so that it does.
func (p *pass) raced(rel string, err error) bool {
	if !p.live || !(errors.Is(err, errChanged) || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ELOOP) ||
		errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ENODATA) || errors.Is(err, unix.ERANGE)) {
		return false
	}
	p.forget(rel)
	p.changes.Skipped++
	return true
}

// forget drops what is known of rel and below it.
func (p *pass) forget(rel string) {
	delete(p.copied, rel)
	delete(p.listed, rel)
	prefix := rel + "/"
	for k := range p.copied {
		if strings.HasPrefix(k, prefix) {
			delete(p.copied, k)
		}
	}
	for k := range p.listed {
		if strings.HasPrefix(k, prefix) {
			delete(p.listed, k)
		}
	}
}

func (p *pass) root() error {
	s, err := unix.Open(p.src, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return p.fail(".", err)
	}
	defer unix.Close(s)
	if err := p.dir(s, ".", 0); err != nil {
		var named *failure
		if !errors.As(err, &named) {
			err = p.fail(".", err)
		}
		return err
	}
	return nil
}

// dir sends the open directory s (rel names it): every name it holds, what changed
// among its entries, its own attributes last (the entries written at the target changed
// the target's). An error before its listing is sent is its own (a race, maybe); after,
// it names the entry and ends the pass.
func (p *pass) dir(s int, rel string, depth int) error {
	if err := p.ctx.Err(); err != nil {
		return p.fail(rel, err)
	}
	if depth > maxDepth {
		return p.fail(rel, fmt.Errorf("nested deeper than %d directories", maxDepth))
	}
	want, err := names(s)
	if err != nil {
		return err
	}
	for _, name := range p.listed[rel] {
		if _, found := slices.BinarySearch(want, name); !found {
			p.forget(filepath.Join(rel, name)) // the target removes it
		}
	}
	p.listed[rel] = want
	if err := p.send(frameDir, header{Path: rel, Names: want}); err != nil {
		return p.fail(rel, err)
	}
	for _, name := range want {
		sub := filepath.Join(rel, name)
		err := p.entry(s, name, sub, depth)
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
	var st unix.Stat_t
	if err := unix.Fstat(s, &st); err != nil {
		return p.fail(rel, err)
	}
	xa, err := xattrs(s)
	if err != nil {
		return p.fail(rel, err)
	}
	if err := p.send(frameDirEnd, header{Path: rel, Attrs: attrsOf(&st, xa)}); err != nil {
		return p.fail(rel, err)
	}
	return nil
}

// entry sends the entry name of the directory s if it changed since the last pass sent
// it. Errors before its frame is sent name nothing: dir adds the path.
func (p *pass) entry(s int, name, rel string, depth int) error {
	var st unix.Stat_t
	if err := unix.Fstatat(s, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return err
	}
	kind := st.Mode & unix.S_IFMT
	if kind == unix.S_IFDIR {
		sub, err := unix.Openat(s, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(sub)
		return p.dir(sub, rel, depth+1)
	}
	if p.copied[rel] == (stamp{st.Ino, st.Ctim}) {
		return nil // as the last pass sent it
	}
	if _, wasDir := p.listed[rel]; wasDir {
		p.forget(rel)
	}
	var err error
	switch kind {
	case unix.S_IFREG:
		err = p.file(s, name, rel, &st)
	case unix.S_IFLNK:
		var target string
		if target, err = readlinkat(s, name); err == nil {
			err = p.send(frameSymlink, header{Path: rel, Target: target, Attrs: attrsOf(&st, nil)})
		}
	default: // character and block devices (the overlay's whiteouts among them), FIFOs, sockets
		err = p.send(frameNode, header{Path: rel, Rdev: st.Rdev, Attrs: attrsOf(&st, nil)})
	}
	if err != nil {
		return err
	}
	p.copied[rel] = stamp{st.Ino, st.Ctim}
	p.changes.Copied++
	return nil
}

// file sends the regular file name of s; a file the pass sent under another name
// already is sent as a link to it.
func (p *pass) file(s int, name, rel string, st *unix.Stat_t) error {
	if st.Nlink > 1 {
		if first, ok := p.links[st.Ino]; ok {
			return p.send(frameLink, header{Path: rel, First: first})
		}
	}
	in, err := openRegular(s, name, st)
	if err != nil {
		return err
	}
	from := os.NewFile(uintptr(in), rel)
	defer from.Close()
	if err := unix.Fstat(in, st); err != nil { // what is sent: this inode as it is now
		return err
	}
	xa, err := xattrs(in)
	if err != nil {
		return err
	}
	if err := p.send(frameFile, header{Path: rel, Size: st.Size, Attrs: attrsOf(st, xa)}); err != nil {
		return err
	}
	if st.Nlink > 1 {
		p.links[st.Ino] = rel
	}
	n, err := p.data(from, st.Size)
	p.changes.Bytes += n
	if err != nil {
		return p.fail(rel, err) // inside the file's frames: the pass ends
	}
	return p.send(frameFileEnd, header{Path: rel})
}

// data sends the first size bytes of src, its data only: its holes stay holes at the
// target (a sparse file the container made costs the target no more than the source).
// A file that shrinks meanwhile is sent as far as it goes (the target's is size bytes
// long all the same) and one that grows as far as size: its status change time moved,
// and the next pass sends it again.
func (p *pass) data(src *os.File, size int64) (int64, error) {
	var sent int64
	for off := int64(0); off < size; {
		start, err := unix.Seek(int(src.Fd()), off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // a hole up to the end
		}
		if err != nil {
			return sent, err
		}
		if start >= size {
			break
		}
		hole, err := unix.Seek(int(src.Fd()), start, unix.SEEK_HOLE)
		if err != nil {
			return sent, err
		}
		end := min(hole, size)
		for at := start; at < end; {
			n, err := src.ReadAt(p.buf[:min(end-at, int64(len(p.buf)))], at)
			if n > 0 {
				if err := p.w.data(at, p.buf[:n]); err != nil {
					return sent, &connError{err}
				}
				sent += int64(n)
				at += int64(n)
			}
			if errors.Is(err, io.EOF) {
				return sent, nil
			}
			if err != nil {
				return sent, err
			}
		}
		off = end
	}
	return sent, nil
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
