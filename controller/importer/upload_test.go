package importer

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"mime/multipart"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
)

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func upload(t *testing.T, addr, method string, body io.Reader) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, "http://"+addr+vmpodv1.UploadPath, body)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s: %v", method, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// startUpload runs an upload import into a 64 MiB filesystem volume until it is ready for an
// upload; finished waits for it to succeed.
func startUpload(t *testing.T) (o Options, rep *recorder, finished func()) {
	t.Helper()
	o = Options{Source: "upload", Listen: freeAddr(t), ContentType: "kubevirt", Dest: t.TempDir(), DestMode: "filesystem",
		Size: 64 * mib, FilesystemOverhead: 0.055, Scratch: t.TempDir(), ProgressInterval: 1}
	rep = &recorder{}
	done := make(chan error, 1)
	go func() { done <- Run(context.Background(), o, rep) }()
	for deadline := time.Now().Add(30 * time.Second); len(rep.readies()) == 0; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the importer never said it was ready")
		}
	}
	return o, rep, func() {
		t.Helper()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("Run: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("the importer did not finish after a good upload")
		}
	}
}

// An upload that is not a usable image is refused with its reason, and the importer waits
// for the next; a good one completes the import, and then the importer stops listening.
func TestUpload(t *testing.T) {
	raw, qcow2 := testImage(t, 4*mib)
	o, rep, finished := startUpload(t)
	addr := o.Listen
	if code, _ := upload(t, addr, http.MethodGet, nil); code != http.StatusMethodNotAllowed {
		t.Errorf("GET: %d, want 405", code)
	}
	code, answer := upload(t, addr, http.MethodPut, strings.NewReader("<html>not a disk</html>"))
	if code != http.StatusBadRequest || !strings.Contains(answer, "InvalidImage") {
		t.Errorf("a page as image: %d %q, want 400 InvalidImage", code, answer)
	}
	if r := rep.readies(); len(r) != 2 || !strings.Contains(r[1], "upload refused (InvalidImage") {
		t.Errorf("ready reports %q, want a second one saying the upload was refused", r)
	}
	noDisk(t, o)
	// a cut upload: the importer is told less than it was promised
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(conn, "PUT %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", vmpodv1.UploadPath, len(qcow2))
	conn.Write(qcow2[:len(qcow2)/3])
	conn.Close()

	// until the importer notices the cut, it refuses another upload
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		code, answer = upload(t, addr, http.MethodPost, bytes.NewReader(gz(t, qcow2)))
		if code != http.StatusConflict || time.Now().After(deadline) {
			break
		}
	}
	if code != http.StatusOK {
		t.Fatalf("gzip'd qcow2: %d %q", code, answer)
	}
	finished()
	checkDisk(t, o.Dest, raw, 60*mib)
	if !rep.succeeded {
		t.Error("not reported as succeeded")
	}
	if r := rep.readies(); len(r) != 3 || !strings.Contains(r[2], "upload failed (DownloadFailed") {
		t.Errorf("ready reports %q, want a third one saying the cut upload failed", r)
	}
	if _, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		t.Error("the importer still listens after the import")
	}
}

func TestUploadStopped(t *testing.T) {
	o := Options{Source: "upload", Listen: freeAddr(t), ContentType: "kubevirt", Dest: t.TempDir(), DestMode: "filesystem",
		Size: 64 * mib, Scratch: t.TempDir()}
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(200*time.Millisecond, cancel)
	expectFailure(t, Run(ctx, o, &recorder{}), "UploadFailed", false)

	o.Listen = "127.0.0.1:1:2"
	expectFailure(t, Run(context.Background(), o, &recorder{}), "UploadFailed", false)
	o.Listen = ""
	expectFailure(t, Run(context.Background(), o, &recorder{}), "InvalidArguments", true)
}

// An archive upload is unpacked into the volume, like an archive download; one larger than
// the 64 MiB slack of an image's limit goes through (the limit is the volume's free space).
func TestUploadArchive(t *testing.T) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	big := make([]byte, 80*mib)
	for _, f := range []struct {
		name string
		data []byte
	}{{"www/index.html", []byte("hello")}, {"www/big.bin", big}} {
		if err := tw.WriteHeader(&tar.Header{Name: f.name, Mode: 0o644, Size: int64(len(f.data)), Typeflag: tar.TypeReg}); err != nil {
			t.Fatal(err)
		}
		tw.Write(f.data)
	}
	tw.Close()
	addr := freeAddr(t)
	o := Options{Source: "upload", Listen: addr, ContentType: "archive", Dest: t.TempDir(), DestMode: "filesystem",
		Size: 128 * mib, Scratch: t.TempDir(), ProgressInterval: 1}
	rep := &recorder{}
	done := make(chan error, 1)
	go func() { done <- Run(context.Background(), o, rep) }()
	for deadline := time.Now().Add(30 * time.Second); len(rep.readies()) == 0; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the importer never said it was ready")
		}
	}
	if code, answer := upload(t, addr, http.MethodPut, bytes.NewReader(gz(t, buf.Bytes()))); code != http.StatusOK {
		t.Fatalf("archive upload: %d %q", code, answer)
	}
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(o.Dest, "www/index.html")); err != nil || string(b) != "hello" {
		t.Errorf("www/index.html = %q, %v", b, err)
	}
	if st, err := os.Stat(filepath.Join(o.Dest, "www/big.bin")); err != nil || st.Size() != int64(len(big)) {
		t.Errorf("www/big.bin: %v, %v; want %d bytes", st, err, len(big))
	}
	if _, err := os.Stat(filepath.Join(o.Dest, DiskImageFile)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("an archive import wrote a disk image (%v)", err)
	}
}

// The form endpoint takes the image from the form's file field, streamed after the fields
// before it; a form without it, or a GET, is refused and the importer waits on.
func TestUploadForm(t *testing.T) {
	raw, qcow2 := testImage(t, 4*mib)
	o, _, finished := startUpload(t)
	addr := o.Listen
	post := func(fields map[string][]byte, order ...string) (int, string) {
		t.Helper()
		pr, pw := io.Pipe()
		mw := multipart.NewWriter(pw)
		go func() {
			for _, name := range order {
				part, err := mw.CreateFormFile(name, name+".qcow2")
				if err == nil {
					_, err = part.Write(fields[name])
				}
				if err != nil {
					pw.CloseWithError(err)
					return
				}
			}
			pw.CloseWithError(mw.Close())
		}()
		resp, err := http.Post("http://"+addr+vmpodv1.UploadFormPath, mw.FormDataContentType(), pr)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	resp, err := http.Get("http://" + addr + vmpodv1.UploadFormPath)
	if err != nil || resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("GET the form endpoint: %v %v, want 405", err, resp.Status)
	}
	if code, answer := post(map[string][]byte{"image": qcow2}, "image"); code != http.StatusBadRequest || !strings.Contains(answer, `no field "file"`) {
		t.Errorf("a form without the file field: %d %q, want 400 naming the field", code, answer)
	}
	noDisk(t, o)
	if code, answer := post(map[string][]byte{"notes": []byte("a field before the file"), "file": qcow2}, "notes", "file"); code != http.StatusOK {
		t.Fatalf("the form with the qcow2: %d %q", code, answer)
	}
	finished()
	checkDisk(t, o.Dest, raw, 60*mib)
}
