// Package importer is vmpod-importer: it fills one PVC for a DataVolume. It downloads a
// disk image over HTTP(S) or from S3, takes an upload, or pulls a containerDisk from a registry (verifying a checksum),
// converts raw, qcow2, vmdk, vdi, vhd or vhdx, gzip- or xz-compressed, to a raw image with
// qemu-img and sizes it to
// the PVC; or clones another PVC's disk; or makes a blank disk; or extracts a tar archive.
//
// It reports progress and the result as annotations on the PVC (see Reporter); the
// DataVolume controller mirrors them into the DataVolume's status. A PVC is marked
// Succeeded only after its data is complete and synced to disk.
package importer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"
)

// Options says what to import where. Every path is a flag so that the Job spec alone decides
// the pod's layout.
type Options struct {
	Source string // http, s3, registry, upload, pvc or blank
	// http, s3 and registry
	URL        string
	Checksum   string   // <algorithm>:<hex> of the downloaded bytes
	Headers    []string // "Name: value"
	HeaderDirs []string // directories whose files each hold one "Name: value" header
	AuthDir    string   // files accessKeyId and secretKey: basic auth / S3 keys / registry credentials
	S3Region   string   // s3: the signing region (default: from an AWS host name, else us-east-1)
	CADir      string   // *.pem, *.crt (any file) with CA certificates to trust
	// upload: the address to take the upload on (the worker pod's loopback)
	Listen string
	// pvc: the source PVC's mount (a directory holding disk.img) or its block device
	SourcePath string
	// SourceFormat "raw" takes a download as a raw disk as it is: a clone from another
	// namespace is a guest-written disk, which must be neither format-probed (a guest can
	// make its first sector look like a qcow2 header with a backing file on the host) nor
	// decompressed. Empty: probe.
	SourceFormat string

	ContentType        string // kubevirt (a disk image) or archive (a tar archive)
	Dest               string // the PVC's mount (filesystem) or block device (block)
	DestMode           string // filesystem or block
	Size               int64  // the PVC's requested size in bytes
	FilesystemOverhead float64
	Scratch            string // a directory for the download
	// imageLimit bounds the bytes a download may decompress to (run sets it from the
	// target size): an image is not much larger than the disk it holds, and a small
	// compressed stream of zeros must not keep the importer busy for hours.
	imageLimit int64

	// ProgressInterval is how often progress is reported.
	ProgressInterval time.Duration
}

// DiskImageFile is the disk in a filesystem PVC, as in KubeVirt (and api/vmspec).
const DiskImageFile = "disk.img"

// Error is a failed import with a reason for the DataVolume's status. A permanent error
// (a 404, a checksum mismatch, a corrupt image) fails the DataVolume; others are retried.
type Error struct {
	Reason    string
	Permanent bool
	Err       error
}

func (e *Error) Error() string { return e.Reason + ": " + e.Err.Error() }
func (e *Error) Unwrap() error { return e.Err }

func permanent(reason string, format string, args ...any) error {
	return &Error{Reason: reason, Permanent: true, Err: fmt.Errorf(format, args...)}
}

func transient(reason string, format string, args ...any) error {
	return &Error{Reason: reason, Err: fmt.Errorf(format, args...)}
}

// Run performs the import and reports it. It returns the import's error, if any, after
// reporting it.
func Run(ctx context.Context, o Options, rep Reporter) error {
	t0 := time.Now()
	err := run(ctx, o, rep)
	if err == nil {
		slog.Info("import succeeded", "took", time.Since(t0).Round(time.Millisecond))
		if err := rep.Succeeded(ctx); err != nil {
			return transient("ReportFailed", "the data is complete but marking the PVC failed: %w", err)
		}
		return nil
	}
	var ie *Error
	if !errors.As(err, &ie) {
		ie = &Error{Reason: "ImportFailed", Err: err}
		err = ie
	}
	slog.Error("import failed", "reason", ie.Reason, "permanent", ie.Permanent, "err", ie.Err)
	if rerr := rep.Failed(ctx, ie.Reason, ie.Err.Error(), ie.Permanent); rerr != nil {
		slog.Error("could not report the failure on the PVC", "err", rerr)
	}
	return err
}

func run(ctx context.Context, o Options, rep Reporter) error {
	if err := o.validate(); err != nil {
		return err
	}
	rep.Progress(ctx, "N/A", "starting "+o.Source+" import")
	if o.DestMode == "filesystem" {
		// an earlier, interrupted attempt's leftovers must not count against the free space
		if err := os.Remove(filepath.Join(o.Dest, DiskImageFile+".partial")); err != nil && !errors.Is(err, os.ErrNotExist) {
			return transient("WriteFailed", "remove the last attempt's partial image: %w", err)
		}
	}
	target, err := o.targetSize()
	if err != nil {
		return err
	}
	slog.Info("importing", "source", o.Source, "url", o.URL, "dest", o.Dest, "mode", o.DestMode, "targetSize", target)

	switch o.Source {
	case "blank":
		return writeBlank(ctx, o, target)
	case "pvc":
		src := o.SourcePath
		if st, err := os.Stat(src); err == nil && st.IsDir() {
			src = filepath.Join(src, DiskImageFile)
		}
		// a clone source is raw by construction: never let qemu-img probe a guest-written
		// disk, whose first sector a guest could have made look like a qcow2 header
		return writeImage(ctx, o, rep, src, "raw", target)
	}

	// every format's metadata (qcow2's tables, vmdk's grain directories) fits in an eighth
	o.imageLimit = target + target/8 + 64<<20
	var downloaded string
	switch o.Source {
	case "http":
		downloaded, err = downloadHTTP(ctx, o, rep)
	case "s3":
		downloaded, err = downloadS3(ctx, o, rep)
	case "registry":
		downloaded, err = pullRegistry(ctx, o, rep)
	case "upload":
		return serveUpload(ctx, o, rep, target)
	}
	if err != nil {
		return err
	}
	defer os.Remove(downloaded)
	if o.ContentType == "archive" {
		return extractArchive(ctx, downloaded, o.Dest)
	}
	return writeImage(ctx, o, rep, downloaded, o.SourceFormat, target)
}

func (o *Options) validate() error {
	bad := func(format string, args ...any) error { return permanent("InvalidArguments", format, args...) }
	switch o.Source {
	case "http", "s3", "registry":
		if o.URL == "" {
			return bad("--url is required for source %s", o.Source)
		}
	case "upload":
		if o.Listen == "" {
			return bad("--listen is required for source upload")
		}
	case "pvc":
		if o.SourcePath == "" {
			return bad("--source-path is required for source pvc")
		}
	case "blank":
	default:
		return bad("--source must be http, s3, registry, upload, pvc or blank, got %q", o.Source)
	}
	switch {
	case o.ContentType != "kubevirt" && o.ContentType != "archive":
		return bad("--content-type must be kubevirt or archive, got %q", o.ContentType)
	case o.DestMode != "filesystem" && o.DestMode != "block":
		return bad("--dest-mode must be filesystem or block, got %q", o.DestMode)
	case o.ContentType == "archive" && (o.DestMode != "filesystem" || (o.Source != "http" && o.Source != "s3" && o.Source != "upload")):
		return bad("an archive is extracted from an http, s3 or upload source into a filesystem")
	case o.SourceFormat != "" && (o.SourceFormat != "raw" || (o.Source != "http" && o.Source != "s3") || o.ContentType != "kubevirt"):
		return bad("--source-format=raw is for a disk image from an http or s3 source, got %q", o.SourceFormat)
	case o.Dest == "":
		return bad("--dest is required")
	case o.Scratch == "" && o.Source != "pvc" && o.Source != "blank":
		return bad("--scratch is required for downloads")
	case o.FilesystemOverhead < 0 || o.FilesystemOverhead >= 1:
		return bad("--filesystem-overhead must be in [0, 1), got %v", o.FilesystemOverhead)
	}
	return nil
}

// targetSize is the size of the disk image to write: the block device's size, or the PVC's
// size less the filesystem overhead (and at most the free space), in whole MiB.
func (o *Options) targetSize() (int64, error) {
	if o.DestMode == "block" {
		f, err := os.Open(o.Dest)
		if err != nil {
			return 0, transient("WriteFailed", "open %s: %w", o.Dest, err)
		}
		defer f.Close()
		size, err := f.Seek(0, 2)
		if err != nil {
			return 0, transient("WriteFailed", "size of %s: %w", o.Dest, err)
		}
		return size, nil
	}
	free, err := freeBytes(o.Dest)
	if err != nil {
		return 0, transient("WriteFailed", "free space of %s: %w", o.Dest, err)
	}
	if o.ContentType == "archive" {
		// what the files can take up: it bounds the archive as a disk's size bounds an image
		return free, nil
	}
	size := o.Size
	if size <= 0 || free < size {
		size = free // a PVC may be smaller than asked (or we were not told): use what is there
	}
	size = int64(float64(size)*(1-o.FilesystemOverhead)) &^ (1<<20 - 1)
	if size <= 0 {
		return 0, permanent("ImageTooLarge", "%s has no room for a disk image (%d bytes free)", o.Dest, free)
	}
	return size, nil
}
