package rootfssync

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// overConnection is a Mirror of src over a socket to a Receive into dst, as between two
// nodes; the cleanup closes the connection and checks Receive ended cleanly.
func overConnection(t *testing.T, src, dst string) *Mirror {
	t.Helper()
	here, there, err := socketPair()
	must(t, err)
	received := make(chan error, 1)
	go func() { received <- Receive(context.Background(), there, dst); there.Close() }()
	t.Cleanup(func() {
		here.Close()
		if err := <-received; err != nil {
			t.Errorf("Receive, once the source closed the connection between passes: %v", err)
		}
	})
	return Over(src, here)
}

func socketPair() (net.Conn, net.Conn, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, err
	}
	conns := make([]net.Conn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "mirror")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			return nil, nil, err
		}
		conns[i] = c
	}
	return conns[0], conns[1], nil
}

func TestMirrorOverAConnection(t *testing.T) {
	requireRoot(t)
	src, dst := upperDir(t), t.TempDir()
	m := overConnection(t, src, dst)
	mirror(t, m)
	assertSame(t, src, dst)
	if c := mirror(t, m); c.Copied != 0 || c.Removed != 0 || c.Bytes != 0 {
		t.Errorf("a mirror of an unchanged tree: %+v, want nothing done", c)
	}
	p := func(rel string) string { return filepath.Join(src, rel) }
	must(t, os.RemoveAll(p("etc/app")))
	must(t, os.WriteFile(p("etc/app"), []byte("now a file"), 0o644))
	must(t, os.Remove(p("var/fifo")))
	must(t, os.MkdirAll(p("var/fifo/deeper"), 0o700))
	must(t, os.Link(p("ping"), p("var/fifo/deeper/ping")))
	c := mirror(t, m)
	assertSame(t, src, dst)
	if c.Removed < 2 || c.Bytes >= 1<<20 {
		t.Errorf("second mirror: %+v, want the replaced entries removed and the 1 MiB file not sent again", c)
	}
}

// A pass the target could not write (here: its tree is not a directory any more) fails,
// and the next one sends everything: the source no longer knows what the target has.
func TestAFailedPassIsFollowedByAWholeOne(t *testing.T) {
	requireRoot(t)
	src, dst := upperDir(t), filepath.Join(t.TempDir(), "upper")
	must(t, os.Mkdir(dst, 0o755))
	m := overConnection(t, src, dst)
	first := mirror(t, m)
	must(t, os.RemoveAll(dst))
	must(t, os.WriteFile(dst, nil, 0o600))
	_, err := m.Pass(context.Background(), false)
	if err == nil || !strings.Contains(err.Error(), "the target: mirror into "+dst) {
		t.Fatalf("a pass into a file: %v, want the target's error", err)
	}
	must(t, os.Remove(dst))
	must(t, os.Mkdir(dst, 0o755))
	if c := mirror(t, m); c.Copied != first.Copied || c.Bytes != first.Bytes {
		t.Errorf("the pass after a failed one: %+v, want all of it again, as the first (%+v)", c, first)
	}
	assertSame(t, src, dst)
}

// frames is a stream written by hand, as another node could send it.
type frames struct {
	bytes.Buffer
	w    frameWriter
	last byte // the kind of the last frame added
}

func newFrames() *frames {
	f := &frames{}
	f.w = frameWriter{bufio.NewWriter(&f.Buffer)}
	return f
}

func (f *frames) add(kind byte, h header) *frames {
	if err := f.w.json(kind, h); err != nil {
		panic(err)
	}
	f.w.w.Flush()
	f.last = kind
	return f
}

func (f *frames) data(off int64, b string) *frames {
	f.w.data(off, []byte(b))
	f.w.w.Flush()
	f.last = frameData
	return f
}

func dirAttrs() *attrs  { return &attrs{Mode: unix.S_IFDIR | 0o755} }
func fileAttrs() *attrs { return &attrs{Mode: unix.S_IFREG | 0o644} }

// receive runs one Receive over the stream and returns the answers it gave.
func receive(t *testing.T, dst string, stream []byte) ([]answer, error) {
	t.Helper()
	var out bytes.Buffer
	err := Receive(context.Background(), struct {
		io.Reader
		io.Writer
	}{bytes.NewReader(stream), &out}, dst)
	var answers []answer
	r := bufio.NewReader(&out)
	for {
		a, rerr := readAnswer(r)
		if rerr != nil {
			break
		}
		answers = append(answers, a)
	}
	return answers, err
}

// The stream is another node's input: what no tree below dst can hold is answered with an
// error naming the entry and the field, nothing is written outside dst, and the
// connection serves the next pass.
func TestReceiveRefusesWhatNoTreeHolds(t *testing.T) {
	requireRoot(t)
	outside := t.TempDir()
	must(t, os.WriteFile(filepath.Join(outside, "secret"), []byte("x"), 0o600))
	good := func(f *frames) *frames {
		return f.add(frameDir, header{Path: ".", Names: []string{"ok"}}).
			add(frameFile, header{Path: "ok", Size: 2, Attrs: fileAttrs()}).data(0, "ok").add(frameFileEnd, header{Path: "ok"}).
			add(frameDirEnd, header{Path: ".", Attrs: dirAttrs()}).add(framePassEnd, header{})
	}
	root := func(names ...string) *frames { return newFrames().add(frameDir, header{Path: ".", Names: names}) }
	for _, tc := range []struct {
		name   string
		stream *frames
		want   string
	}{
		{"a path up and out", root("x").add(frameFile, header{Path: "../x", Attrs: fileAttrs()}), `../x: path "../x"`},
		{"an absolute path", root("x").add(frameSymlink, header{Path: "/etc/x", Target: "y", Attrs: &attrs{Mode: unix.S_IFLNK}}), `/etc/x: path "/etc/x" is not relative`},
		{"an entry of another directory", root("d").add(frameFile, header{Path: "d/x", Attrs: fileAttrs()}), "not an entry of ."},
		{"a name with a slash", newFrames().add(frameDir, header{Path: ".", Names: []string{"a/b"}}), `names[0]: entry name "a/b"`},
		{"a name twice", root("a", "a"), `names[1]: "a" twice`},
		{"a tree from elsewhere than its root", newFrames().add(frameDir, header{Path: "etc"}), `from its root`},
		{"a device node", root("sda").add(frameNode, header{Path: "sda", Rdev: unix.Mkdev(8, 0), Attrs: &attrs{Mode: unix.S_IFBLK | 0o666}}), "not a whiteout, FIFO or socket"},
		{"a character device", root("mem").add(frameNode, header{Path: "mem", Rdev: unix.Mkdev(1, 1), Attrs: &attrs{Mode: unix.S_IFCHR | 0o666}}), "rdev 1:1: a device node other than the overlay's whiteout"},
		{"a file's mode of a node", root("f").add(frameFile, header{Path: "f", Attrs: &attrs{Mode: unix.S_IFCHR}}), "attrs.mode 020000: not of the frame's kind"},
		{"mode bits beyond 07777", root("f").add(frameFile, header{Path: "f", Attrs: &attrs{Mode: unix.S_IFREG | 1<<16}}), "bits beyond"},
		{"no attrs", root("f").add(frameFile, header{Path: "f"}), "attrs: missing"},
		{"owner -1", root("f").add(frameFile, header{Path: "f", Attrs: &attrs{Mode: unix.S_IFREG, UID: ^uint32(0)}}), "is no owner"},
		{"an xattr in no namespace", root("f").add(frameFile, header{Path: "f", Attrs: &attrs{Mode: unix.S_IFREG, Xattrs: map[string][]byte{"os2.x": nil}}}), `attrs.xattrs: "os2.x" is in no namespace`},
		{"nanoseconds out of range", root("f").add(frameFile, header{Path: "f", Attrs: &attrs{Mode: unix.S_IFREG, Mtime: [2]int64{0, 1e9}}}), "nanoseconds out of range"},
		{"a negative size", root("f").add(frameFile, header{Path: "f", Size: -1, Attrs: fileAttrs()}), "size -1"},
		{"data beyond the size", root("f").add(frameFile, header{Path: "f", Size: 2, Attrs: fileAttrs()}).data(1, "xy"), "f: data at 1+2: out of order or beyond the size 2"},
		{"data out of order", root("f").add(frameFile, header{Path: "f", Size: 9, Attrs: fileAttrs()}).data(4, "x").data(0, "y"), "data at 0+1: out of order"},
		{"data outside a file", root().data(0, "x"), "data outside a file"},
		{"an entry inside a file", root("f", "g").add(frameFile, header{Path: "f", Size: 1, Attrs: fileAttrs()}).add(frameFile, header{Path: "g", Attrs: fileAttrs()}), "an entry inside the file f"},
		{"an empty link target", root("l").add(frameSymlink, header{Path: "l", Attrs: &attrs{Mode: unix.S_IFLNK}}), "target: 0 bytes"},
		{"a hard link through a symbolic link", root("esc", "l").
			add(frameSymlink, header{Path: "esc", Target: outside, Attrs: &attrs{Mode: unix.S_IFLNK}}).
			add(frameLink, header{Path: "l", First: "esc/secret"}), "first esc/secret: too many levels of symbolic links"},
		{"a hard link up and out", root("l").add(frameLink, header{Path: "l", First: "../secret"}), `first: "../secret" is no file's path`},
		{"a hard link to a directory", root("d", "l").add(frameDir, header{Path: "d"}).add(frameDirEnd, header{Path: "d", Attrs: dirAttrs()}).
			add(frameLink, header{Path: "l", First: "d"}), "first d: not a regular file"},
		{"a directory's end out of turn", root("d").add(frameDir, header{Path: "d"}).add(frameDirEnd, header{Path: ".", Attrs: dirAttrs()}), "not the end of the directory the stream is in"},
		{"a pass that ends inside its tree", root("d").add(frameDir, header{Path: "d"}), "the pass ended before its tree did"},
		{"a source that gave up", root().add(frameGaveUp, header{Reason: "the container's disk failed"}), "the source gave up: the container's disk failed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dst := t.TempDir()
			stream := tc.stream
			if stream.last != frameGaveUp {
				stream.add(framePassEnd, header{})
			}
			answers, err := receive(t, dst, good(stream).Bytes())
			if err != nil {
				t.Fatalf("Receive: %v, want the bad pass answered and the next one taken", err)
			}
			if len(answers) != 2 {
				t.Fatalf("%d answers, want 2: %+v", len(answers), answers)
			}
			if !strings.Contains(answers[0].Error, tc.want) {
				t.Errorf("answer %q, want it to say %q", answers[0].Error, tc.want)
			}
			if answers[1].Error != "" {
				t.Errorf("the good pass after it: %q", answers[1].Error)
			}
			if b, err := os.ReadFile(filepath.Join(dst, "ok")); err != nil || string(b) != "ok" {
				t.Errorf("the good pass's file: %q, %v", b, err)
			}
			if list, _ := os.ReadDir(outside); len(list) != 1 {
				t.Errorf("outside the tree: %d entries, want its one secret", len(list))
			}
		})
	}
}

// A stream that is not one ends Receive: the connection is no use after it.
func TestReceiveEndsOnWhatIsNotAStream(t *testing.T) {
	dst := t.TempDir()
	big := make([]byte, 5)
	big[0] = frameDir
	big[1] = 0xff
	for _, tc := range []struct {
		name   string
		stream []byte
		want   string
	}{
		{"an unknown frame", newFrames().add('?', header{}).Bytes(), "frame kind '?'"},
		{"a frame over the bound", big, "over 16777216"},
		{"a body that is no JSON", []byte{frameDir, 0, 0, 0, 1, '{'}, "a 'D' frame"},
		{"an unknown field", append([]byte{frameDir, 0, 0, 0, 13}, `{"path2":"."}`...), `unknown field "path2"`},
		{"a stream cut inside a pass", newFrames().add(frameDir, header{Path: "."}).Bytes(), "the stream ended inside a pass"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := receive(t, dst, tc.stream)
			if !errors.Is(err, errProtocol) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Receive: %v, want errProtocol saying %q", err, tc.want)
			}
		})
	}
}

// recordPass is the stream a Mirror of src sends in its first pass.
func recordPass(t testing.TB, src string) []byte {
	var sent bytes.Buffer
	answers := newFrames().add(frameAnswer, header{})
	m := Over(src, struct {
		io.Reader
		io.Writer
	}{bytes.NewReader(answers.Bytes()), &sent})
	if _, err := m.Pass(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	return sent.Bytes()
}

func openFDs(t testing.TB) int {
	list, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(list)
}

// FuzzReceive feeds the receiver streams another node could send: it never panics, writes
// nothing but below its directory (every write is from a descriptor of it, by one name),
// and keeps no descriptor.
func FuzzReceive(f *testing.F) {
	src := f.TempDir()
	must := func(err error) {
		if err != nil {
			f.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(src, "etc/app"), 0o755))
	must(os.WriteFile(filepath.Join(src, "etc/app/config"), []byte("key = 1\n"), 0o640))
	must(os.Link(filepath.Join(src, "etc/app/config"), filepath.Join(src, "config")))
	must(os.Symlink("/etc", filepath.Join(src, "escape")))
	must(unix.Mkfifo(filepath.Join(src, "fifo"), 0o600))
	must(unix.Setxattr(filepath.Join(src, "etc"), "user.app", []byte("v"), 0))
	f.Add(recordPass(f, src))
	f.Add(newFrames().add(frameDir, header{Path: ".", Names: []string{"l"}}).add(frameLink, header{Path: "l", First: "../x"}).Bytes())
	f.Fuzz(func(t *testing.T, stream []byte) {
		dst := t.TempDir()
		before := openFDs(t)
		_ = Receive(context.Background(), struct {
			io.Reader
			io.Writer
		}{bytes.NewReader(stream), io.Discard}, dst)
		if after := openFDs(t); after != before {
			t.Errorf("%d descriptors open after Receive, %d before", after, before)
		}
	})
}

// A directory whose listing does not fit in a frame fails its pass, naming it, and the
// connection serves the next pass (nothing of the listing was written).
func TestADirectoryTooBigForAFrameFailsOnlyItsPass(t *testing.T) {
	src, dst := t.TempDir(), t.TempDir()
	long := strings.Repeat("n", 250)
	big := filepath.Join(src, "big")
	must(t, os.Mkdir(big, 0o755))
	for i := range maxFrame/len(long) + 1 {
		f, err := os.Create(filepath.Join(big, fmt.Sprintf("%s%05d", long[:245], i)))
		must(t, err)
		f.Close()
	}
	m := overConnection(t, src, dst)
	if _, err := m.Pass(context.Background(), false); !errors.Is(err, errTooBig) || !strings.Contains(err.Error(), ": big: ") {
		t.Fatalf("a directory of %d bytes of names: %v, want errTooBig naming it", maxFrame, err)
	}
	must(t, os.RemoveAll(big))
	if _, err := m.Pass(context.Background(), false); err != nil {
		t.Errorf("the pass after it: %v", err)
	}
}
