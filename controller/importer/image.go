package importer

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"syscall"
)

// imageInfo is the part of `qemu-img info --output=json` the importer checks.
type imageInfo struct {
	Format          string `json:"format"`
	VirtualSize     int64  `json:"virtual-size"`
	BackingFilename string `json:"backing-filename"`
	FormatSpecific  struct {
		Data struct {
			Corrupt    bool   `json:"corrupt"`
			CreateType string `json:"create-type"` // vmdk
		} `json:"data"`
	} `json:"format-specific"`
}

// importFormats are the image formats an import converts, as CDI's: qcow2 and raw, and the
// other hypervisors' disks users bring (VMware's vmdk, VirtualBox's vdi, Hyper-V's vhd
// — qemu's "vpc" — and vhdx). Anything else qemu-img can parse (qed, bochs, cloop, dmg,
// parallels, luks...) is refused: every parser is attack surface on untrusted input.
var importFormats = []string{"raw", "qcow2", "vmdk", "vdi", "vpc", "vhdx"}

// checkedFormats are those qemu-img check verifies: a truncated image of these passes info
// and even converts, its missing clusters read as zeros.
var checkedFormats = []string{"qcow2", "vdi", "vhdx", "vmdk"}

// vmdkOneFile are the vmdk create types whose data is in the file itself; the others
// (monolithicFlat, twoGbMaxExtent*, vmfs...) are a descriptor naming extent files, which,
// like a backing file, could name any file on the node.
var vmdkOneFile = []string{"monolithicSparse", "streamOptimized"}

// writeImage converts the image at src (format, or probed if "") to a raw disk in the
// destination, sized to target. Only importFormats are accepted, and no image that refers
// to another file (a backing file, vmdk extents) could name any file on the node.
func writeImage(ctx context.Context, o Options, rep Reporter, src, format string, target int64) error {
	info, err := qemuImgInfo(ctx, src, format)
	if err != nil {
		return err
	}
	slog.Info("image", "format", info.Format, "virtualSize", info.VirtualSize, "targetSize", target)
	switch {
	case !slices.Contains(importFormats, info.Format):
		return permanent("InvalidImage", "format %s is not supported: use raw, qcow2, vmdk, vdi, vhd or vhdx", info.Format)
	case info.Format == "vmdk" && !slices.Contains(vmdkOneFile, info.FormatSpecific.Data.CreateType):
		return permanent("InvalidImage", "vmdk of type %q keeps its data in other files: convert it to a single-file vmdk (monolithicSparse or streamOptimized), qcow2 or raw", info.FormatSpecific.Data.CreateType)
	case info.BackingFilename != "":
		return permanent("InvalidImage", "the image has a backing file (%s): upload a standalone image", info.BackingFilename)
	case info.FormatSpecific.Data.Corrupt:
		return permanent("InvalidImage", "qemu-img reports the image as corrupt")
	case info.VirtualSize > target:
		return permanent("ImageTooLarge", "the image's virtual size %d is more than the %d bytes available in the PVC", info.VirtualSize, target)
	}
	if info.Format == "raw" && o.Source != "pvc" && o.SourceFormat != "raw" {
		// a raw "image" that is not whole sectors is almost certainly not a disk (an HTML
		// error page served with 200, say). qemu-img rounds the virtual size up: stat it.
		if st, err := os.Stat(src); err == nil && st.Size()%512 != 0 {
			return permanent("InvalidImage", "not a disk image: %d bytes is not a whole number of 512-byte sectors", st.Size())
		}
	}
	if slices.Contains(checkedFormats, info.Format) {
		if err := qemuImgCheck(ctx, src, info.Format); err != nil {
			return err
		}
	}

	dest := o.Dest
	args := []string{"convert", "-p", "-t", "writeback", "-f", info.Format, "-O", "raw"}
	if o.DestMode == "block" {
		args = append(args, "-n") // the device exists; do not try to create it
	} else {
		dest = filepath.Join(o.Dest, DiskImageFile+".partial")
		os.Remove(dest)
	}
	what := fmt.Sprintf("converting %s to raw", info.Format)
	err = runQemuImg(ctx, append(args, src, dest), func(pct float64) {
		progress := "100.00%" // the download is done; say what happens in the message
		if o.Source == "pvc" {
			progress = fmt.Sprintf("%.2f%%", pct)
		}
		rep.Progress(ctx, progress, fmt.Sprintf("%s: %.0f%%", what, pct))
	})
	if err != nil {
		return transient("ConvertFailed", "%s: %w", what, err)
	}
	if o.DestMode == "block" {
		return syncPath(o.Dest)
	}
	// resize: a raw image grows by extending the file (sparse)
	if err := os.Truncate(dest, target); err != nil {
		return transient("WriteFailed", "resize %s to %d: %w", dest, target, err)
	}
	return commit(dest, filepath.Join(o.Dest, DiskImageFile))
}

// writeBlank makes an empty (sparse) raw disk of the target size.
func writeBlank(_ context.Context, o Options, target int64) error {
	if o.DestMode == "block" {
		return nil // a new block volume is the blank disk
	}
	partial := filepath.Join(o.Dest, DiskImageFile+".partial")
	f, err := os.Create(partial)
	if err != nil {
		return transient("WriteFailed", "create %s: %w", partial, err)
	}
	err = f.Truncate(target)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return transient("WriteFailed", "size %s: %w", partial, err)
	}
	return commit(partial, filepath.Join(o.Dest, DiskImageFile))
}

// commit syncs a finished file and renames it into place: disk.img exists only complete.
func commit(partial, final string) error {
	if err := syncPath(partial); err != nil {
		return err
	}
	if err := os.Rename(partial, final); err != nil {
		return transient("WriteFailed", "rename %s: %w", partial, err)
	}
	return syncPath(filepath.Dir(final))
}

func syncPath(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return transient("WriteFailed", "open %s for sync: %w", path, err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return transient("WriteFailed", "sync %s: %w", path, err)
	}
	return nil
}

func freeBytes(dir string) (int64, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return 0, err
	}
	return int64(st.Bavail) * st.Bsize, nil
}

// qemuImgInfo runs qemu-img info under resource limits, as CDI does: a crafted image must
// not make the parser eat the node (1 GiB of address space, 30 s of CPU).
func qemuImgInfo(ctx context.Context, path, format string) (*imageInfo, error) {
	args := []string{"info", "--output=json"}
	if format != "" {
		args = append(args, "-f", format)
	}
	var out bytes.Buffer
	cmd := limitedCommand(ctx, append(args, path)...)
	cmd.Stdout = &out
	stderr := &boundedBuffer{}
	cmd.Stderr = stderr
	if err := cmd.Run(); err != nil {
		return nil, permanent("InvalidImage", "qemu-img info: %v: %s", err, stderr)
	}
	info := &imageInfo{}
	if err := json.Unmarshal(out.Bytes(), info); err != nil {
		return nil, fmt.Errorf("parse qemu-img info output: %w", err)
	}
	return info, nil
}

// qemuImgCheck fails on a corrupt image. Leaked clusters (exit 3) waste space but are safe.
func qemuImgCheck(ctx context.Context, path, format string) error {
	cmd := limitedCommand(ctx, "check", "-f", format, path)
	out := &boundedBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &ee) && ee.ExitCode() == 3:
		slog.Warn("qcow2 image has leaked clusters (harmless)", "output", out.String())
		return nil
	case errors.As(err, &ee) && (ee.ExitCode() == 1 || ee.ExitCode() == 2):
		return permanent("InvalidImage", "the %s image is corrupt (qemu-img check exit %d): %s", format, ee.ExitCode(), out)
	}
	return fmt.Errorf("qemu-img check: %w: %s", err, out)
}

func limitedCommand(ctx context.Context, args ...string) *exec.Cmd {
	if prlimit, err := exec.LookPath("prlimit"); err == nil {
		return exec.CommandContext(ctx, prlimit, append([]string{"--as=1073741824", "--cpu=30", "--", "qemu-img"}, args...)...)
	}
	slog.Warn("prlimit not found: running qemu-img without resource limits")
	return exec.CommandContext(ctx, "qemu-img", args...)
}

var progressRE = regexp.MustCompile(`\((\d+\.\d+)/100%\)`)

// runQemuImg runs qemu-img with -p, calling progress with each new whole percent.
func runQemuImg(ctx context.Context, args []string, progress func(float64)) error {
	cmd := exec.CommandContext(ctx, "qemu-img", args...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	stderr := &boundedBuffer{}
	cmd.Stderr = stderr
	slog.Info("running", "cmd", cmd.String())
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start qemu-img: %w", err)
	}
	sc := bufio.NewScanner(stdout)
	sc.Split(splitCR)
	last := -1.0
	for sc.Scan() {
		if m := progressRE.FindSubmatch(sc.Bytes()); m != nil {
			if pct, err := strconv.ParseFloat(string(m[1]), 64); err == nil && pct >= last+1 {
				last = pct
				progress(pct)
			}
		}
	}
	if err := cmd.Wait(); err != nil {
		return fmt.Errorf("%s: %w: %s", cmd, err, stderr)
	}
	return nil
}

// splitCR splits qemu-img's "\r"-separated progress updates.
func splitCR(data []byte, atEOF bool) (int, []byte, error) {
	if i := bytes.IndexAny(data, "\r\n"); i >= 0 {
		return i + 1, data[:i], nil
	}
	if atEOF && len(data) > 0 {
		return len(data), data, nil
	}
	return 0, nil, nil
}

// boundedBuffer keeps the start and the end of a command's output: qemu-img check can
// print a line per cluster of a corrupt image.
type boundedBuffer struct {
	head, tail []byte
	dropped    int
}

const boundedHalf = 1024

func (b *boundedBuffer) Write(p []byte) (int, error) {
	n := len(p)
	if room := boundedHalf - len(b.head); room > 0 {
		k := min(room, len(p))
		b.head = append(b.head, p[:k]...)
		p = p[k:]
	}
	b.tail = append(b.tail, p...)
	if over := len(b.tail) - boundedHalf; over > 0 {
		b.dropped += over
		b.tail = append(b.tail[:0], b.tail[over:]...)
	}
	return n, nil
}

func (b *boundedBuffer) String() string {
	if b.dropped == 0 {
		return string(bytes.TrimSpace(append(append([]byte(nil), b.head...), b.tail...)))
	}
	return fmt.Sprintf("%s\n[... %d bytes ...]\n%s", bytes.TrimSpace(b.head), b.dropped, bytes.TrimSpace(b.tail))
}
