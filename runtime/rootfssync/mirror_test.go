package rootfssync

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// requireRoot: the trees hold what an overlay's upper directory holds — whiteouts
// (device nodes), trusted.overlay.* attributes, other owners' files.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: whiteouts are device nodes, opaque markers trusted.* xattrs, and files have other owners")
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// upperDir builds what a container's writes leave in an overlay's upper directory.
func upperDir(t *testing.T) string {
	t.Helper()
	src := t.TempDir()
	p := func(rel string) string { return filepath.Join(src, rel) }
	must(t, os.MkdirAll(p("etc/app"), 0o755))
	must(t, os.WriteFile(p("etc/app/config"), []byte("key = 1\n"), 0o640))
	must(t, os.Chown(p("etc/app/config"), 1000, 1001))
	must(t, os.WriteFile(p("setuid"), []byte("#!/bin/sh\n"), 0o755))
	must(t, os.Chmod(p("setuid"), 0o4755))
	must(t, unix.Mknod(p("etc/removed"), unix.S_IFCHR, 0)) // a whiteout: a layer's file deleted
	must(t, os.MkdirAll(p("var/cache"), 0o750))
	must(t, unix.Setxattr(p("var/cache"), "trusted.overlay.opaque", []byte("y"), 0)) // hides the layers' cache
	must(t, os.Symlink("/etc", p("escape")))                                         // copied as a link, never followed
	must(t, unix.Mkfifo(p("var/fifo"), 0o600))
	must(t, os.WriteFile(p("var/big"), bytes.Repeat([]byte("x"), 1<<20), 0o600))
	must(t, unix.Setxattr(p("var/big"), "trusted.app", []byte("v1"), 0))
	must(t, os.WriteFile(p("ping"), []byte("\x7fELF"), 0o755))
	must(t, unix.Setxattr(p("ping"), "security.capability", netRawCapability(), 0)) // what setcap leaves
	must(t, os.Link(p("var/big"), p("etc/big-too")))                                // one file, two names
	sparse, err := os.Create(p("sparse"))
	must(t, err)
	_, err = sparse.WriteAt([]byte("data in the middle"), 32<<20) // 64 MiB, nearly all hole
	must(t, err)
	must(t, sparse.Truncate(64<<20))
	must(t, sparse.Close())
	old := time.Date(2020, 1, 2, 3, 4, 5, 6, time.UTC)
	must(t, os.Chtimes(p("etc/app/config"), old, old))
	return src
}

// netRawCapability is a security.capability value granting CAP_NET_RAW, effective
// (VFS_CAP_REVISION_2: magic and flags, then permitted and inheritable, low and high).
func netRawCapability() []byte {
	v := make([]byte, 20)
	binary.LittleEndian.PutUint32(v[0:], 0x02000000|0x1)
	binary.LittleEndian.PutUint32(v[4:], 1<<unix.CAP_NET_RAW)
	return v
}

func mirror(t *testing.T, m *Mirror) Changes {
	t.Helper()
	c, err := m.Pass(context.Background(), false)
	must(t, err)
	return c
}

// entry is what Mirror promises to keep of a tree entry.
type entry struct {
	mode     fs.FileMode
	uid, gid uint32
	rdev     uint64
	nlink    uint64
	mtime    int64
	content  string
	link     string
	xattrs   string
}

func snapshot(t *testing.T, root string) map[string]entry {
	t.Helper()
	out := map[string]entry{}
	must(t, filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		var st unix.Stat_t
		if err := unix.Lstat(path, &st); err != nil {
			return err
		}
		info, _ := d.Info()
		e := entry{mode: info.Mode(), uid: st.Uid, gid: st.Gid, rdev: st.Rdev, mtime: st.Mtim.Nano()}
		if !info.IsDir() {
			e.nlink = uint64(st.Nlink)
		}
		switch {
		case info.Mode().IsRegular():
			b, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			e.content = fmt.Sprintf("%x", sha256.Sum256(b))
		case info.Mode()&fs.ModeSymlink != 0:
			e.link, _ = os.Readlink(path)
		}
		if info.Mode()&(fs.ModeSymlink|fs.ModeDevice|fs.ModeNamedPipe) == 0 {
			buf := make([]byte, 4096)
			n, _ := unix.Llistxattr(path, buf)
			names := bytes.Split(bytes.TrimRight(buf[:n], "\x00"), []byte{0})
			slices.SortFunc(names, bytes.Compare)
			for _, name := range names {
				if len(name) == 0 {
					continue
				}
				v := make([]byte, 256)
				vn, _ := unix.Lgetxattr(path, string(name), v)
				e.xattrs += fmt.Sprintf("%s=%s;", name, v[:vn])
			}
		}
		out[rel] = e
		return nil
	}))
	return out
}

func assertSame(t *testing.T, src, dst string) {
	t.Helper()
	a, b := snapshot(t, src), snapshot(t, dst)
	for rel, want := range a {
		if got, ok := b[rel]; !ok {
			t.Errorf("%s: missing in the copy", rel)
		} else if got != want {
			t.Errorf("%s: copy %+v, source %+v", rel, got, want)
		}
	}
	for rel := range b {
		if _, ok := a[rel]; !ok {
			t.Errorf("%s: in the copy, not in the source", rel)
		}
	}
}

func TestMirrorCopiesAnUpperDirectory(t *testing.T) {
	requireRoot(t)
	src, dst := upperDir(t), t.TempDir()
	m := New(src, dst)
	c := mirror(t, m)
	assertSame(t, src, dst)
	if c.Bytes < 1<<20 || c.Bytes > 2<<20 || c.Removed != 0 {
		t.Errorf("first mirror: %+v, want the 1 MiB file copied once (not its second name, not the sparse file's hole) and nothing removed", c)
	}
	var a, b unix.Stat_t
	must(t, unix.Stat(filepath.Join(dst, "var/big"), &a))
	must(t, unix.Stat(filepath.Join(dst, "etc/big-too"), &b))
	if a.Ino != b.Ino {
		t.Error("var/big and etc/big-too: two files in the copy, want one file with two names")
	}
	must(t, unix.Stat(filepath.Join(dst, "sparse"), &a))
	if a.Size != 64<<20 || a.Blocks*512 > 1<<20 {
		t.Errorf("sparse: size %d, %d bytes allocated; want 64 MiB with its hole kept", a.Size, a.Blocks*512)
	}
	if _, err := os.Stat(filepath.Join(dst, "escape", "passwd")); err != nil {
		t.Errorf("escape: want the link copied as it is (to /etc): %v", err)
	}
	if _, err := os.Lstat(filepath.Join(dst, "escape")); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Lstat(filepath.Join(dst, "escape")); fi.Mode()&fs.ModeSymlink == 0 {
		t.Error("escape: followed, want a link")
	}

	// nothing changed: nothing copied
	if c := mirror(t, m); c.Copied != 0 || c.Removed != 0 || c.Bytes != 0 {
		t.Errorf("a mirror of an unchanged tree: %+v, want nothing done", c)
	}
	// an attribute alone changed: that file is copied again
	must(t, unix.Setxattr(filepath.Join(src, "etc/app/config"), "trusted.app", []byte("new"), 0))
	if c := mirror(t, m); c.Copied != 1 {
		t.Errorf("one file's attribute changed: %+v, want that file copied", c)
	}
	assertSame(t, src, dst)
}

func TestMirrorBringsChangesOver(t *testing.T) {
	requireRoot(t)
	src, dst := upperDir(t), t.TempDir()
	m := New(src, dst)
	mirror(t, m)
	p := func(rel string) string { return filepath.Join(src, rel) }
	// what the container did between the two copies
	must(t, os.WriteFile(p("etc/app/config"), []byte("key = 2\n"), 0o640)) // rewritten
	must(t, os.Remove(p("setuid")))                                        // removed
	must(t, os.RemoveAll(p("etc/app")))                                    // a directory ...
	must(t, os.WriteFile(p("etc/app"), []byte("now a file"), 0o644))       // ... replaced by a file
	must(t, os.Remove(p("var/fifo")))                                      // a FIFO ...
	must(t, os.Mkdir(p("var/fifo"), 0o700))                                // ... by a directory
	must(t, unix.Setxattr(p("sparse"), "trusted.app", []byte("v2"), 0))    // an attribute alone
	must(t, unix.Removexattr(p("var/cache"), "trusted.overlay.opaque"))    // no longer opaque
	must(t, unix.Mknod(p("var/cache/gone"), unix.S_IFCHR, 0))              // a new whiteout
	must(t, os.Symlink("../etc/app", p("var/link")))                       // a new link
	c := mirror(t, m)
	assertSame(t, src, dst)
	if c.Bytes >= 1<<20 {
		t.Errorf("the second mirror copied %d bytes: the unchanged 1 MiB file again", c.Bytes)
	}
	if c.Removed < 3 {
		t.Errorf("second mirror: %+v, want the removed file and the replaced entries removed", c)
	}
}

func TestMirrorRefusesWhatIsNotADirectory(t *testing.T) {
	dir := t.TempDir()
	must(t, os.Symlink(dir, filepath.Join(dir, "link")))
	if _, err := New(filepath.Join(dir, "link"), t.TempDir()).Pass(context.Background(), false); err == nil {
		t.Error("a source that is a symbolic link: want an error, not a copy of where it points")
	}
	if _, err := New(dir, filepath.Join(dir, "missing")).Pass(context.Background(), false); err == nil {
		t.Error("a target that does not exist: want an error")
	}
}

// A container that puts a device node where a file was looked at does not get the node
// opened by the host's root: the open goes through a path descriptor, checked first.
func TestOpenRegularRefusesWhatReplacedTheFile(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	name := filepath.Join(dir, "file")
	must(t, os.WriteFile(name, []byte("x"), 0o600))
	var st unix.Stat_t
	must(t, unix.Lstat(name, &st))
	must(t, os.Remove(name))
	must(t, unix.Mknod(name, unix.S_IFCHR|0o600, int(unix.Mkdev(1, 3))))
	d, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	must(t, err)
	defer unix.Close(d)
	if fd, err := openRegular(d, "file", &st); !errors.Is(err, errChanged) {
		if err == nil {
			unix.Close(fd)
		}
		t.Errorf("a device node in the file's place: %v, want errChanged (and nothing opened)", err)
	}
}

// A live pass lets go of what the container changed under it, for the next pass; a last
// pass fails on it.
func TestRacesAreTheNextPassesInALivePass(t *testing.T) {
	for _, live := range []bool{true, false} {
		var c Changes
		p := pass{Mirror: New("/src", "/dst"), live: live, changes: &c}
		p.copied["a/b"] = stamp{ino: 1}
		for _, err := range []error{errChanged, unix.ENOENT, unix.ELOOP, unix.ENODATA} {
			if got := p.raced("a", err); got != live {
				t.Errorf("live %v, %v: raced %v", live, err, got)
			}
		}
		if _, known := p.copied["a/b"]; known == live {
			t.Errorf("live %v: what was known below the raced entry: kept %v", live, known)
		}
		if p.raced("a", unix.EACCES) {
			t.Error("EACCES taken for a race")
		}
	}
}
