package importer

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/ulikunitz/xz"
)

const mib = 1 << 20

// recorder is a Reporter that remembers what it was told.
type recorder struct {
	mu        sync.Mutex
	progress  []string
	succeeded bool
	failed    string
	ready     []string
}

func (r *recorder) Progress(_ context.Context, p, _ string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.progress = append(r.progress, p)
}
func (r *recorder) Ready(_ context.Context, msg string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ready = append(r.ready, msg)
}
func (r *recorder) readies() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.ready...)
}
func (r *recorder) Succeeded(context.Context) error { r.succeeded = true; return nil }
func (r *recorder) Failed(_ context.Context, reason, _ string, _ bool) error {
	r.failed = reason
	return nil
}

func needQemuImg(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img is not installed (hack/install-deps.sh installs qemu-utils)")
	}
}

// testImage makes a raw disk with recognisable data at the start and at 3 MiB, and
// returns its bytes and a qcow2 made from it by the real qemu-img.
func testImage(t *testing.T, size int64) (raw []byte, qcow2 []byte) {
	t.Helper()
	needQemuImg(t)
	dir := t.TempDir()
	raw = make([]byte, size)
	copy(raw, "vmpod test disk: boot sector")
	copy(raw[3*mib:], bytes.Repeat([]byte("data"), 1024))
	rawPath, qcowPath := filepath.Join(dir, "disk.raw"), filepath.Join(dir, "disk.qcow2")
	if err := os.WriteFile(rawPath, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("qemu-img", "convert", "-f", "raw", "-O", "qcow2", rawPath, qcowPath).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert: %v: %s", err, out)
	}
	qcow2, err := os.ReadFile(qcowPath)
	if err != nil {
		t.Fatal(err)
	}
	return raw, qcow2
}

func serve(t *testing.T, files map[string][]byte) string {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("X-Test") != "yes" {
			http.Error(w, "missing X-Test header", http.StatusBadRequest)
			return
		}
		b, ok := files[r.URL.Path]
		if !ok {
			http.NotFound(w, r)
			return
		}
		http.ServeContent(w, r, r.URL.Path, modTime, bytes.NewReader(b))
	}))
	t.Cleanup(srv.Close)
	return srv.URL
}

var modTime time.Time // zero: no Last-Modified header

func options(t *testing.T, url string) Options {
	return Options{Source: "http", URL: url, Headers: []string{"X-Test: yes"}, ContentType: "kubevirt",
		Dest: t.TempDir(), DestMode: "filesystem", Size: 64 * mib, Scratch: t.TempDir(), ProgressInterval: 1}
}

func sha(b []byte) string { s := sha256.Sum256(b); return "sha256:" + hex.EncodeToString(s[:]) }

// checkDisk verifies dest/disk.img: the raw image's bytes, then zeros up to want bytes.
func checkDisk(t *testing.T, dest string, raw []byte, want int64) {
	t.Helper()
	got, err := os.ReadFile(filepath.Join(dest, DiskImageFile))
	if err != nil {
		t.Fatalf("read the imported disk: %v", err)
	}
	if int64(len(got)) != want {
		t.Errorf("disk.img is %d bytes, want %d (resized to the PVC)", len(got), want)
	}
	if !bytes.Equal(got[:len(raw)], raw) {
		t.Errorf("disk.img does not hold the image's data")
	}
	if !isZero(got[len(raw):]) {
		t.Errorf("the resized part of disk.img is not zero")
	}
	if _, err := os.Stat(filepath.Join(dest, DiskImageFile+".partial")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("disk.img.partial left behind (%v)", err)
	}
}

func gz(t *testing.T, b []byte) []byte {
	var buf bytes.Buffer
	w := gzip.NewWriter(&buf)
	w.Write(b)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func xzip(t *testing.T, b []byte) []byte {
	var buf bytes.Buffer
	w, err := xz.NewWriter(&buf)
	if err != nil {
		t.Fatal(err)
	}
	w.Write(b)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestHTTPImport(t *testing.T) {
	raw, qcow2 := testImage(t, 4*mib)
	url := serve(t, map[string][]byte{
		"/disk.qcow2": qcow2, "/disk.raw": raw, "/disk.qcow2.gz": gz(t, qcow2), "/disk.raw.xz": xzip(t, raw),
	})
	// 64 MiB less 5.5% overhead, in whole MiB
	const want = 60 * mib
	for _, path := range []string{"/disk.qcow2", "/disk.raw", "/disk.qcow2.gz", "/disk.raw.xz"} {
		t.Run(path, func(t *testing.T) {
			o := options(t, url+path)
			o.FilesystemOverhead = 0.055
			rep := &recorder{}
			if err := Run(context.Background(), o, rep); err != nil {
				t.Fatalf("Run: %v", err)
			}
			checkDisk(t, o.Dest, raw, want)
			if !rep.succeeded || rep.failed != "" {
				t.Errorf("reported succeeded=%v failed=%q", rep.succeeded, rep.failed)
			}
			if last := rep.progress[len(rep.progress)-1]; last != "100.00%" {
				t.Errorf("last progress %q, want 100.00%% (all: %v)", last, rep.progress)
			}
		})
	}
}

// convertTo converts raw into another format with qemu-img (opts: its -o options).
func convertTo(t *testing.T, raw []byte, format, opts string) []byte {
	t.Helper()
	dir := t.TempDir()
	in, out := filepath.Join(dir, "in.raw"), filepath.Join(dir, "out."+format)
	if err := os.WriteFile(in, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	args := []string{"convert", "-f", "raw", "-O", format}
	if opts != "" {
		args = append(args, "-o", opts)
	}
	if b, err := exec.Command("qemu-img", append(args, in, out)...).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert to %s: %v: %s", format, err, b)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Other hypervisors' disks convert as CDI converts them; formats outside the list, and a
// vmdk whose data lives in other files (which could be any file on the node), do not.
func TestImageFormats(t *testing.T) {
	raw, _ := testImage(t, 4*mib)
	files := map[string][]byte{
		"/disk.vmdk":      convertTo(t, raw, "vmdk", "subformat=monolithicSparse"),
		"/stream.vmdk.gz": gz(t, convertTo(t, raw, "vmdk", "subformat=streamOptimized")),
		"/disk.vdi":       convertTo(t, raw, "vdi", ""),
		"/disk.vhd":       convertTo(t, raw, "vpc", "subformat=dynamic,force_size=on"),
		"/disk.vhdx.gz":   gz(t, convertTo(t, raw, "vhdx", "")),
		"/disk.qed":       convertTo(t, raw, "qed", ""),
		"/truncated.vhdx": convertTo(t, raw, "vhdx", "")[:1*mib],
	}
	secret := filepath.Join(t.TempDir(), "node-secret")
	os.WriteFile(secret, bytes.Repeat([]byte("node secret\n"), 512), 0o600)
	files["/flat.vmdk"] = []byte("# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\n" +
		"RW 12 FLAT \"" + secret + "\" 0\n\nddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"1\"\nddb.geometry.heads = \"16\"\nddb.geometry.sectors = \"63\"\nddb.adapterType = \"ide\"\n")
	url := serve(t, files)
	for _, path := range []string{"/disk.vmdk", "/stream.vmdk.gz", "/disk.vdi", "/disk.vhd", "/disk.vhdx.gz"} {
		t.Run(path, func(t *testing.T) {
			o := options(t, url+path)
			if err := Run(context.Background(), o, &recorder{}); err != nil {
				t.Fatalf("Run: %v", err)
			}
			checkDisk(t, o.Dest, raw, 64*mib)
		})
	}
	// a decompression bomb for a 64 MiB disk: 160 MiB of zeros in 160 gzip members of
	// 1 MiB each (gzip readers read on across members), a few hundred KiB in all
	files["/bomb.raw.gz"] = bytes.Repeat(gz(t, make([]byte, mib)), 160)
	url = serve(t, files)
	t.Run("/bomb.raw.gz", func(t *testing.T) {
		o := options(t, url+"/bomb.raw.gz")
		expectFailure(t, Run(context.Background(), o, &recorder{}), "ImageTooLarge", true)
		noDisk(t, o)
	})
	for path, want := range map[string]string{
		"/disk.qed":       "format qed is not supported",
		"/flat.vmdk":      `vmdk of type "monolithicFlat" keeps its data in other files`,
		"/truncated.vhdx": "",
	} {
		t.Run(path, func(t *testing.T) {
			o := options(t, url+path)
			err := Run(context.Background(), o, &recorder{})
			expectFailure(t, err, "InvalidImage", true)
			if !strings.Contains(err.Error(), want) {
				t.Errorf("err = %v, want %q", err, want)
			}
			noDisk(t, o)
		})
	}
}

func TestHTTPImportChecksum(t *testing.T) {
	raw, qcow2 := testImage(t, 4*mib)
	compressed := gz(t, qcow2)
	url := serve(t, map[string][]byte{"/disk.qcow2.gz": compressed})

	o := options(t, url+"/disk.qcow2.gz")
	o.Checksum = sha(compressed) // of the bytes as served
	if err := Run(context.Background(), o, &recorder{}); err != nil {
		t.Fatalf("Run with the right checksum: %v", err)
	}
	checkDisk(t, o.Dest, raw, 64*mib)

	o = options(t, url+"/disk.qcow2.gz")
	o.Checksum = sha(qcow2) // of the decompressed bytes: wrong
	rep := &recorder{}
	expectFailure(t, Run(context.Background(), o, rep), "ChecksumMismatch", true)
	if rep.failed != "ChecksumMismatch" || rep.succeeded {
		t.Errorf("reported failed=%q succeeded=%v", rep.failed, rep.succeeded)
	}
	noDisk(t, o)
}

func TestHTTPImportFailures(t *testing.T) {
	raw, qcow2 := testImage(t, 4*mib)
	_, bigQcow2 := testImage(t, 80*mib)
	withBacking := qcow2WithBacking(t)
	url := serve(t, map[string][]byte{
		"/truncated.qcow2": qcow2[:len(qcow2)/2],
		"/garbage.qcow2":   append(append([]byte(nil), qcow2[:512]...), bytes.Repeat([]byte{0xa5}, 100000)...),
		"/page.html":       []byte("<html>not found, but 200</html>"),
		"/big.qcow2":       bigQcow2,
		"/backing.qcow2":   withBacking,
		"/bad.gz":          append([]byte{0x1f, 0x8b}, raw[:1000]...),
		"/disk.qed":        convertTo(t, raw, "qed", ""),
	})
	for _, tc := range []struct {
		path, reason string
		permanent    bool
	}{
		{"/missing.qcow2", "HTTPNotFound", true},
		{"/truncated.qcow2", "InvalidImage", true},
		{"/garbage.qcow2", "InvalidImage", true},
		{"/page.html", "InvalidImage", true},
		{"/big.qcow2", "ImageTooLarge", true},
		{"/backing.qcow2", "InvalidImage", true},
		{"/bad.gz", "InvalidImage", true},
		{"/disk.qed", "InvalidImage", true},
	} {
		t.Run(tc.path, func(t *testing.T) {
			o := options(t, url+tc.path)
			rep := &recorder{}
			err := Run(context.Background(), o, rep)
			expectFailure(t, err, tc.reason, tc.permanent)
			if rep.succeeded || rep.failed != tc.reason {
				t.Errorf("reported succeeded=%v failed=%q", rep.succeeded, rep.failed)
			}
			noDisk(t, o)
		})
	}
	t.Run("wrong header", func(t *testing.T) {
		o := options(t, url+"/disk.qed")
		o.Headers = nil
		expectFailure(t, Run(context.Background(), o, &recorder{}), "HTTPError", true)
	})
	t.Run("connection refused", func(t *testing.T) {
		o := options(t, "http://127.0.0.1:1/x")
		expectFailure(t, Run(context.Background(), o, &recorder{}), "DownloadFailed", false)
	})
}

func expectFailure(t *testing.T, err error, reason string, permanent bool) {
	t.Helper()
	var ie *Error
	if !errors.As(err, &ie) {
		t.Fatalf("err = %v, want an import Error %s", err, reason)
	}
	if ie.Reason != reason || ie.Permanent != permanent {
		t.Fatalf("err = %v (reason %s, permanent %v), want reason %s, permanent %v", err, ie.Reason, ie.Permanent, reason, permanent)
	}
}

func noDisk(t *testing.T, o Options) {
	t.Helper()
	for _, f := range []string{DiskImageFile, DiskImageFile + ".partial"} {
		if _, err := os.Stat(filepath.Join(o.Dest, f)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("a failed import left %s in the PVC", f)
		}
	}
	if entries, _ := os.ReadDir(o.Scratch); len(entries) != 0 {
		t.Errorf("a failed import left %d files in scratch", len(entries))
	}
}

func qcow2WithBacking(t *testing.T) []byte {
	dir := t.TempDir()
	base, overlay := filepath.Join(dir, "base.raw"), filepath.Join(dir, "overlay.qcow2")
	if err := os.WriteFile(base, make([]byte, mib), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("qemu-img", "create", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw", overlay).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v: %s", err, out)
	}
	b, err := os.ReadFile(overlay)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestBlankAndClone(t *testing.T) {
	raw, _ := testImage(t, 4*mib)
	dest := t.TempDir()
	o := Options{Source: "blank", ContentType: "kubevirt", Dest: dest, DestMode: "filesystem", Size: 16 * mib}
	if err := Run(context.Background(), o, &recorder{}); err != nil {
		t.Fatalf("blank: %v", err)
	}
	checkDisk(t, dest, nil, 16*mib)

	src := t.TempDir()
	if err := os.WriteFile(filepath.Join(src, DiskImageFile), raw, 0o644); err != nil {
		t.Fatal(err)
	}
	o = Options{Source: "pvc", SourcePath: src, ContentType: "kubevirt", Dest: t.TempDir(), DestMode: "filesystem", Size: 8 * mib}
	rep := &recorder{}
	if err := Run(context.Background(), o, rep); err != nil {
		t.Fatalf("clone: %v", err)
	}
	checkDisk(t, o.Dest, raw, 8*mib)

	// a clone target smaller than the source cannot hold it
	o.Dest, o.Size = t.TempDir(), 2*mib
	expectFailure(t, Run(context.Background(), o, &recorder{}), "ImageTooLarge", true)
}

func TestBlockDestination(t *testing.T) {
	raw, qcow2 := testImage(t, 4*mib)
	url := serve(t, map[string][]byte{"/disk.qcow2": qcow2})
	// a regular file stands in for the block device: qemu-img writes into it in place (-n)
	dev := filepath.Join(t.TempDir(), "dev")
	if err := os.WriteFile(dev, make([]byte, 8*mib), 0o644); err != nil {
		t.Fatal(err)
	}
	o := options(t, url+"/disk.qcow2")
	o.Dest, o.DestMode = dev, "block"
	if err := Run(context.Background(), o, &recorder{}); err != nil {
		t.Fatalf("Run: %v", err)
	}
	got, _ := os.ReadFile(dev)
	if len(got) != 8*mib || !bytes.Equal(got[:len(raw)], raw) {
		t.Errorf("device holds %d bytes, image data equal: %v", len(got), bytes.Equal(got[:min(len(got), len(raw))], raw))
	}
}

func TestArchive(t *testing.T) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	add := func(h *tar.Header, body string) {
		h.Size = int64(len(body))
		if h.Mode == 0 {
			h.Mode = 0o644
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		tw.Write([]byte(body))
	}
	add(&tar.Header{Name: "etc/", Typeflag: tar.TypeDir, Mode: 0o755}, "")
	add(&tar.Header{Name: "etc/motd", Typeflag: tar.TypeReg}, "hello")
	add(&tar.Header{Name: "/abs/file", Typeflag: tar.TypeReg}, "absolute paths land inside")
	tw.Close()
	good := bytes.Clone(buf.Bytes())

	outside := t.TempDir()
	buf.Reset()
	tw = tar.NewWriter(&buf)
	add(&tar.Header{Name: "escape", Typeflag: tar.TypeSymlink, Linkname: outside}, "")
	add(&tar.Header{Name: "escape/pwned", Typeflag: tar.TypeReg}, "x")
	tw.Close()
	evil := buf.Bytes()

	url := serve(t, map[string][]byte{"/data.tar.gz": gz(t, good), "/evil.tar": evil})
	o := options(t, url+"/data.tar.gz")
	o.ContentType = "archive"
	if err := Run(context.Background(), o, &recorder{}); err != nil {
		t.Fatalf("Run: %v", err)
	}
	for f, want := range map[string]string{"etc/motd": "hello", "abs/file": "absolute paths land inside"} {
		if b, err := os.ReadFile(filepath.Join(o.Dest, f)); err != nil || string(b) != want {
			t.Errorf("%s = %q, %v; want %q", f, b, err, want)
		}
	}

	o = options(t, url+"/evil.tar")
	o.ContentType = "archive"
	expectFailure(t, Run(context.Background(), o, &recorder{}), "InvalidArchive", true)
	if _, err := os.Stat(filepath.Join(outside, "pwned")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the archive wrote outside the PVC through a symlink")
	}
}

// pushDisk pushes a one-layer containerDisk image holding data at file.
func pushDisk(t *testing.T, reference, file string, data []byte) string {
	t.Helper()
	var layerTar bytes.Buffer
	tw := tar.NewWriter(&layerTar)
	tw.WriteHeader(&tar.Header{Name: "disk/", Typeflag: tar.TypeDir, Mode: 0o555})
	tw.WriteHeader(&tar.Header{Name: file, Typeflag: tar.TypeReg, Mode: 0o444, Size: int64(len(data))})
	tw.Write(data)
	tw.Close()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(layerTar.Bytes())), nil })
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		t.Fatal(err)
	}
	ref, err := name.ParseReference(reference)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, img); err != nil {
		t.Fatalf("push the test image: %v", err)
	}
	return ref.String()
}

func TestRegistryImport(t *testing.T) {
	raw, qcow2 := testImage(t, 4*mib)
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	host := strings.TrimPrefix(srv.URL, "http://")

	// a containerDisk image: the disk in /disk, as KubeVirt's containerDisks are built
	ref := pushDisk(t, host+"/vmpod/fedora:42", "disk/fedora.qcow2", qcow2)
	o := options(t, "docker://"+ref)
	o.Source = "registry"
	rep := &recorder{}
	if err := Run(context.Background(), o, rep); err != nil {
		t.Fatalf("Run: %v", err)
	}
	checkDisk(t, o.Dest, raw, 64*mib)

	// the disk compressed in the image, as CDI takes it
	xzRef := pushDisk(t, host+"/vmpod/fedora:42-xz", "disk/fedora.qcow2.xz", xzip(t, qcow2))
	o = options(t, "docker://"+xzRef)
	o.Source = "registry"
	if err := Run(context.Background(), o, &recorder{}); err != nil {
		t.Fatalf("Run of an xz disk: %v", err)
	}
	checkDisk(t, o.Dest, raw, 64*mib)

	// a compressed disk whose stream is corrupt: the image is bad, retrying will not help
	badGz := gz(t, qcow2)
	badGz = append(badGz[:len(badGz)/2:len(badGz)/2], bytes.Repeat([]byte{0x5a}, 4096)...)
	badRef := pushDisk(t, host+"/vmpod/fedora:42-bad", "disk/fedora.qcow2.gz", badGz)
	o = options(t, "docker://"+badRef)
	o.Source = "registry"
	expectFailure(t, Run(context.Background(), o, &recorder{}), "InvalidImage", true)

	o = options(t, "docker://"+host+"/vmpod/missing:1")
	o.Source = "registry"
	expectFailure(t, Run(context.Background(), o, &recorder{}), "ImageNotFound", true)

	// an image with no /disk
	noDisk, _ := name.ParseReference(host + "/vmpod/nodisk:1")
	if err := remote.Write(noDisk, empty.Image); err != nil {
		t.Fatal(err)
	}
	o = options(t, "docker://"+noDisk.String())
	o.Source = "registry"
	expectFailure(t, Run(context.Background(), o, &recorder{}), "InvalidImage", true)
}
