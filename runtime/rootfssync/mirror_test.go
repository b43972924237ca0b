package rootfssync

import (
	"bytes"
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
	old := time.Date(2020, 1, 2, 3, 4, 5, 6, time.UTC)
	must(t, os.Chtimes(p("etc/app/config"), old, old))
	return src
}

// entry is what Mirror promises to keep of a tree entry.
type entry struct {
	mode     fs.FileMode
	uid, gid uint32
	rdev     uint64
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
		switch {
		case info.Mode().IsRegular():
			b, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			e.content = string(b)
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
	c, err := Mirror(src, dst)
	must(t, err)
	assertSame(t, src, dst)
	if c.Bytes < 1<<20 || c.Removed != 0 {
		t.Errorf("first mirror: %+v, want the 1 MiB file copied and nothing removed", c)
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
	c, err = Mirror(src, dst)
	must(t, err)
	if c.Copied != 0 || c.Removed != 0 || c.Bytes != 0 {
		t.Errorf("a mirror of an unchanged tree: %+v, want nothing done", c)
	}
}

func TestMirrorBringsChangesOver(t *testing.T) {
	requireRoot(t)
	src, dst := upperDir(t), t.TempDir()
	_, err := Mirror(src, dst)
	must(t, err)
	p := func(rel string) string { return filepath.Join(src, rel) }
	// what the container did between the two copies
	must(t, os.WriteFile(p("etc/app/config"), []byte("key = 2\n"), 0o640)) // rewritten
	must(t, os.Remove(p("setuid")))                                        // removed
	must(t, os.RemoveAll(p("etc/app")))                                    // a directory ...
	must(t, os.WriteFile(p("etc/app"), []byte("now a file"), 0o644))       // ... replaced by a file
	must(t, os.Remove(p("var/fifo")))                                      // a FIFO ...
	must(t, os.Mkdir(p("var/fifo"), 0o700))                                // ... by a directory
	must(t, unix.Setxattr(p("var/big"), "trusted.app", []byte("v2"), 0))   // an attribute alone
	must(t, unix.Removexattr(p("var/cache"), "trusted.overlay.opaque"))    // no longer opaque
	must(t, unix.Mknod(p("var/cache/gone"), unix.S_IFCHR, 0))              // a new whiteout
	must(t, os.Symlink("../etc/app", p("var/link")))                       // a new link
	c, err := Mirror(src, dst)
	must(t, err)
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
	if _, err := Mirror(filepath.Join(dir, "link"), t.TempDir()); err == nil {
		t.Error("a source that is a symbolic link: want an error, not a copy of where it points")
	}
	if _, err := Mirror(dir, filepath.Join(dir, "missing")); err == nil {
		t.Error("a target that does not exist: want an error")
	}
}
