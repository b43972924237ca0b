package rootfssync

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// The stream a pass makes (docs/design/211): frames of one kind byte, a 4-byte
// big-endian length and a body — JSON for what describes an entry, raw for a file's
// data. A pass is the source tree walked depth first:
//
//	D "."  (a directory: every name it holds now)
//	  F path, then B (offset + bytes)*, then Z    a file, its data, its end
//	  L path first                                 a hard link to a file sent before
//	  S path target, M path mode rdev              a symbolic link, a node
//	  D path ... E path                            a directory, its attributes last
//	E "."
//	T  (the pass is whole) or X reason (the source gave up)
//
// and the receiver answers A with what it did or why it could not. Every entry's path
// names a child of the directory it is inside, so the receiver writes each from that
// directory's descriptor by its name: no path from the stream is ever resolved, but a
// hard link's first name, resolved below the root with no symbolic links.
const (
	frameDir      = 'D'
	frameDirEnd   = 'E'
	frameFile     = 'F'
	frameData     = 'B'
	frameFileEnd  = 'Z'
	frameLink     = 'L'
	frameSymlink  = 'S'
	frameNode     = 'M'
	framePassEnd  = 'T'
	frameGaveUp   = 'X'
	frameAnswer   = 'A'
	maxFrame      = 16 << 20 // a directory of ~500 000 names; a file's data goes in chunks
	dataChunk     = 1 << 20
	maxPath       = unix.PathMax - 1
	maxXattrName  = 255 // XATTR_NAME_MAX
	maxLinkTarget = unix.PathMax - 1
)

// header describes one entry; which fields a frame kind carries is checked by the
// receiver (check).
type header struct {
	Path    string   `json:"path,omitempty"`
	Names   []string `json:"names,omitempty"`   // D: the directory's entries, all of them
	Size    int64    `json:"size,omitempty"`    // F: the file's length
	First   string   `json:"first,omitempty"`   // L: the name the file was sent under
	Target  string   `json:"target,omitempty"`  // S
	Rdev    uint64   `json:"rdev,omitempty"`    // M
	Attrs   *attrs   `json:"attrs,omitempty"`   // F, S, M, E
	Abandon bool     `json:"abandon,omitempty"` // Z: the file changed under a live pass: drop it
	Reason  string   `json:"reason,omitempty"`  // X
}

// attrs are an entry's owner, mode (its type bits for a node), times and, for files and
// directories, extended attributes.
type attrs struct {
	Mode   uint32            `json:"mode"`
	UID    uint32            `json:"uid"`
	GID    uint32            `json:"gid"`
	Atime  [2]int64          `json:"atime"`
	Mtime  [2]int64          `json:"mtime"`
	Xattrs map[string][]byte `json:"xattrs,omitempty"`
}

func attrsOf(st *unix.Stat_t, xattrs map[string][]byte) *attrs {
	return &attrs{Mode: st.Mode, UID: st.Uid, GID: st.Gid,
		Atime: [2]int64{st.Atim.Sec, st.Atim.Nsec}, Mtime: [2]int64{st.Mtim.Sec, st.Mtim.Nsec}, Xattrs: xattrs}
}

func (a *attrs) times() []unix.Timespec {
	return []unix.Timespec{{Sec: a.Atime[0], Nsec: a.Atime[1]}, {Sec: a.Mtime[0], Nsec: a.Mtime[1]}}
}

// answer is the receiver's A.
type answer struct {
	Created int    `json:"created"` // directories made
	Removed int    `json:"removed"` // entries removed, or replaced by one of another kind
	Error   string `json:"error,omitempty"`
}

// frameWriter writes frames.
type frameWriter struct{ w *bufio.Writer }

func (f frameWriter) raw(kind byte, parts ...[]byte) error {
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	if n > maxFrame {
		return fmt.Errorf("%w: a %c frame of %d bytes, over %d", errTooBig, kind, n, maxFrame)
	}
	var head [5]byte
	head[0] = kind
	binary.BigEndian.PutUint32(head[1:], uint32(n))
	if _, err := f.w.Write(head[:]); err != nil {
		return err
	}
	for _, p := range parts {
		if _, err := f.w.Write(p); err != nil {
			return err
		}
	}
	return nil
}

func (f frameWriter) json(kind byte, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return f.raw(kind, b)
}

func (f frameWriter) data(off int64, b []byte) error {
	var o [8]byte
	binary.BigEndian.PutUint64(o[:], uint64(off))
	return f.raw(frameData, o[:], b)
}

// errTooBig is an entry that does not fit in a frame (a directory of too many names):
// nothing of it was written, and the connection serves on.
var errTooBig = errors.New("too big for the stream")

// errProtocol marks a stream that is not one: framing, an unknown kind, a body that does
// not parse. The connection is no use after it.
var errProtocol = errors.New("not a mirror stream")

// readFrame reads one frame into buf (grown as needed) and returns its kind and body.
func readFrame(r *bufio.Reader, buf *[]byte) (byte, []byte, error) {
	var head [5]byte
	if _, err := io.ReadFull(r, head[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(head[1:])
	if n > maxFrame {
		return 0, nil, fmt.Errorf("%w: a %q frame of %d bytes, over %d", errProtocol, head[0], n, maxFrame)
	}
	if cap(*buf) < int(n) {
		*buf = make([]byte, n)
	}
	body := (*buf)[:n]
	if _, err := io.ReadFull(r, body); err != nil {
		return 0, nil, fmt.Errorf("%w: a %q frame cut short: %v", errProtocol, head[0], err)
	}
	return head[0], body, nil
}

func decode(kind byte, body []byte, v any) error {
	d := json.NewDecoder(bytes.NewReader(body))
	d.DisallowUnknownFields()
	if err := d.Decode(v); err != nil {
		return fmt.Errorf("%w: a %q frame: %v", errProtocol, kind, err)
	}
	if d.More() {
		return fmt.Errorf("%w: a %q frame: data after its JSON", errProtocol, kind)
	}
	return nil
}

// checkName is a directory entry's name: one component, not . or .., no NUL.
func checkName(name string) error {
	switch {
	case name == "", name == ".", name == "..":
		return fmt.Errorf("%q is no entry name", name)
	case len(name) > 255:
		return fmt.Errorf("an entry name of %d bytes, over 255", len(name))
	case strings.ContainsAny(name, "/\x00"):
		return fmt.Errorf("entry name %q holds a / or a NUL", name)
	}
	return nil
}

// checkPath is a path below the root: relative, clean, every component a name.
func checkPath(rel string) error {
	if len(rel) > maxPath {
		return fmt.Errorf("a path of %d bytes, over %d", len(rel), maxPath)
	}
	if rel == "." {
		return nil
	}
	if filepath.IsAbs(rel) || filepath.Clean(rel) != rel {
		return fmt.Errorf("path %q is not relative and clean", rel)
	}
	for part := range strings.SplitSeq(rel, "/") {
		if err := checkName(part); err != nil {
			return fmt.Errorf("path %q: %w", rel, err)
		}
	}
	return nil
}

// checkAttrs refuses what a tree entry cannot have: a type other than kind, mode bits
// beyond the type and 07777, owner -1 (chown's "unchanged"), nanoseconds out of range, extended attributes
// outside the user, trusted, security and system namespaces or over the kernel's sizes.
func checkAttrs(a *attrs, kind uint32) error {
	if a == nil {
		return errors.New("attrs: missing")
	}
	if a.Mode&^uint32(unix.S_IFMT|0o7777) != 0 {
		return fmt.Errorf("attrs.mode %#o: bits beyond the type and 07777", a.Mode)
	}
	if a.Mode&unix.S_IFMT != kind {
		return fmt.Errorf("attrs.mode %#o: not of the frame's kind (%#o)", a.Mode, kind)
	}
	if a.UID == ^uint32(0) || a.GID == ^uint32(0) {
		return fmt.Errorf("attrs: owner %d:%d is no owner", int32(a.UID), int32(a.GID))
	}
	for _, t := range [][2]int64{a.Atime, a.Mtime} {
		if t[1] < 0 || t[1] >= 1e9 {
			return fmt.Errorf("attrs: time %d.%d: nanoseconds out of range", t[0], t[1])
		}
	}
	for name, value := range a.Xattrs {
		ns, _, _ := strings.Cut(name, ".")
		switch {
		case ns != "user" && ns != "trusted" && ns != "security" && ns != "system", !strings.Contains(name, "."):
			return fmt.Errorf("attrs.xattrs: %q is in no namespace a tree keeps (user, trusted, security, system)", name)
		case len(name) > maxXattrName || strings.ContainsRune(name, 0):
			return fmt.Errorf("attrs.xattrs: name %q: over %d bytes or holds a NUL", name, maxXattrName)
		case len(value) > xattrSizeMax:
			return fmt.Errorf("attrs.xattrs[%s]: %d bytes, over %d", name, len(value), xattrSizeMax)
		}
	}
	return nil
}
