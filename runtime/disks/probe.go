package disks

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"time"
)

// Limits for qemu-img on an untrusted image, as OpenStack applies them: a crafted qcow2
// can make it allocate or loop without bound.
const (
	probeAddressSpace = 1 << 30
	probeCPUSeconds   = 30
	probeTimeout      = 60 * time.Second
)

var qcow2Magic = []byte{'Q', 'F', 'I', 0xfb}

type imageInfo struct {
	format string
	size   int64
}

// probe tells a qcow2 image from a raw one by its header (never by asking QEMU to guess:
// a raw disk the guest wrote a qcow2 header into must stay raw) and checks a qcow2 with
// qemu-img: no backing file, not marked corrupt, consistent to its end.
func probe(ctx context.Context, qemuImg string, f *os.File, block bool) (imageInfo, error) {
	size, err := sizeOf(f, block)
	if err != nil {
		return imageInfo{}, err
	}
	head := make([]byte, qcow2HeaderLen)
	if _, err := f.ReadAt(head, 0); err != nil && !errors.Is(err, io.EOF) {
		return imageInfo{}, fmt.Errorf("read image header: %w", err)
	}
	if !bytes.Equal(head[:4], qcow2Magic) {
		if size == 0 {
			return imageInfo{}, errors.New("the disk is empty (0 bytes)")
		}
		return imageInfo{format: "raw", size: size}, nil
	}
	// What would make QEMU open another file goes before qemu-img sees the image at all.
	if err := checkQcow2Header(head); err != nil {
		return imageInfo{}, err
	}
	out, err := runQEMUImg(ctx, qemuImg, f, "info", "--output=json", "-U", "-f", "qcow2", "/dev/fd/3")
	if err != nil {
		return imageInfo{}, fmt.Errorf("qcow2 image: %w", err)
	}
	var info struct {
		VirtualSize     int64  `json:"virtual-size"`
		BackingFilename string `json:"backing-filename"`
		FormatSpecific  struct {
			Data struct {
				Corrupt  bool   `json:"corrupt"`
				DataFile string `json:"data-file"`
			} `json:"data"`
		} `json:"format-specific"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		return imageInfo{}, fmt.Errorf("qcow2 image: qemu-img info: %w", err)
	}
	switch {
	case info.BackingFilename != "":
		return imageInfo{}, fmt.Errorf("qcow2 image has a backing file (%q): a disk image must be self-contained", info.BackingFilename)
	case info.FormatSpecific.Data.DataFile != "":
		return imageInfo{}, fmt.Errorf("qcow2 image keeps its data in an external file (%q): a disk image must be self-contained", info.FormatSpecific.Data.DataFile)
	case info.FormatSpecific.Data.Corrupt:
		return imageInfo{}, errors.New("qcow2 image is marked corrupt")
	case info.VirtualSize <= 0:
		return imageInfo{}, fmt.Errorf("qcow2 image has virtual size %d", info.VirtualSize)
	}
	// check reads every table: a truncated or inconsistent image fails here, not later
	// as I/O errors in the guest. Exit 3 (leaked clusters only) is harmless.
	if _, err := runQEMUImg(ctx, qemuImg, f, "check", "--output=json", "-U", "-f", "qcow2", "/dev/fd/3"); err != nil {
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 3 {
			return imageInfo{}, fmt.Errorf("qcow2 image fails qemu-img check (truncated or corrupt): %w", err)
		}
	}
	return imageInfo{format: "qcow2", size: info.VirtualSize}, nil
}

func sizeOf(f *os.File, block bool) (int64, error) {
	if block {
		// a block device's size is where seeking to its end lands
		n, err := f.Seek(0, io.SeekEnd)
		if err != nil {
			return 0, fmt.Errorf("block device size: %w", err)
		}
		if _, err := f.Seek(0, io.SeekStart); err != nil {
			return 0, err
		}
		return n, nil
	}
	fi, err := f.Stat()
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

// qemuImgError is qemu-img failing, with what it said.
type qemuImgError struct {
	err    error
	stderr string
}

func (e *qemuImgError) Error() string {
	if e.stderr == "" {
		return e.err.Error()
	}
	return fmt.Sprintf("%v: %s", e.err, e.stderr)
}

func (e *qemuImgError) Unwrap() error { return e.err }

// runQEMUImg runs qemu-img under address-space and CPU limits (prlimit) and a timeout,
// with f (if any) as fd 3, and returns its stdout.
func runQEMUImg(ctx context.Context, qemuImg string, f *os.File, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	argv := append([]string{fmt.Sprintf("--as=%d", probeAddressSpace), fmt.Sprintf("--cpu=%d", probeCPUSeconds), "--", qemuImg}, args...)
	cmd := exec.CommandContext(ctx, "prlimit", argv...)
	if f != nil {
		cmd.ExtraFiles = []*os.File{f}
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), &qemuImgError{err: err, stderr: strings.TrimSpace(stderr.String())}
	}
	return stdout.Bytes(), nil
}

// The qcow2 header fields checked in Go (docs/interop/qcow2.txt, big-endian).
const (
	qcow2HeaderLen        = 104 // version 3's header; version 2's is 72 bytes of it
	qcow2BackingOffset    = 8   // uint64: where the backing file's name is, 0 for none
	qcow2CryptMethod      = 32  // uint32: 0 none, 1 AES, 2 LUKS
	qcow2Incompatible     = 72  // uint64, version 3: features a reader must understand
	qcow2IncompatDataFile = 1 << 2
	qcow2IncompatKnown    = 1<<5 - 1 // dirty, corrupt, external data file, compression type, extended L2
)

// checkQcow2Header refuses, from the header alone, a qcow2 that would make QEMU open a file
// the image names (a backing file, an external data file: a pod author could name any host
// path, CVE-2024-4467), an encrypted one, and one with incompatible features vmpod does not
// know.
func checkQcow2Header(h []byte) error {
	version := binary.BigEndian.Uint32(h[4:8])
	switch {
	case version != 2 && version != 3:
		return fmt.Errorf("qcow2 image: version %d: want 2 or 3", version)
	case binary.BigEndian.Uint64(h[qcow2BackingOffset:]) != 0:
		return errors.New("qcow2 image has a backing file: a disk image must be self-contained")
	case binary.BigEndian.Uint32(h[qcow2CryptMethod:]) != 0:
		return errors.New("qcow2 image is encrypted")
	}
	if version < 3 {
		return nil
	}
	incompat := binary.BigEndian.Uint64(h[qcow2Incompatible:])
	switch {
	case incompat&qcow2IncompatDataFile != 0:
		return errors.New("qcow2 image keeps its data in an external file: a disk image must be self-contained")
	case incompat&^qcow2IncompatKnown != 0:
		return fmt.Errorf("qcow2 image has unknown incompatible features %#x", incompat&^qcow2IncompatKnown)
	}
	return nil
}
