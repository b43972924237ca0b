package importer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
)

// serveUpload waits for a user to upload the image (kubectl vmpod image-upload), then writes
// it like a download. It listens on o.Listen, the worker pod's loopback: the only way in is
// the API server's port-forward, so Kubernetes RBAC (pods/portforward in the namespace) is
// the access check and no token or upload proxy is needed (docs/design/103). An upload that
// is not a usable image is refused with its reason and the importer waits for another one;
// the first one that is written completes the import.
func serveUpload(ctx context.Context, o Options, rep Reporter, target int64) error {
	ln, err := net.Listen("tcp", o.Listen)
	if err != nil {
		return transient("UploadFailed", "listen on %s: %w", o.Listen, err)
	}
	u := &uploader{ctx: ctx, o: o, rep: rep, target: target, done: make(chan struct{})}
	srv := &http.Server{Handler: u, ReadHeaderTimeout: 30 * time.Second}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	slog.Info("waiting for an upload", "address", ln.Addr().String(), "path", vmpodv1.UploadPath)
	rep.Ready(ctx, "waiting for an upload (kubectl vmpod image-upload)")

	select {
	case <-u.done:
	case <-ctx.Done():
	case err := <-served:
		return transient("UploadFailed", "serve uploads: %w", err)
	}
	// let the successful upload's response reach the client
	shutdown, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = srv.Shutdown(shutdown)
	select {
	case <-u.done:
		return nil
	default:
		return transient("UploadFailed", "stopped before an upload completed: %w", context.Cause(ctx))
	}
}

// uploader takes one upload at a time until one is written.
type uploader struct {
	ctx    context.Context // the import's: reports outlive a request whose client went away
	o      Options
	rep    Reporter
	target int64

	busy     sync.Mutex
	done     chan struct{} // closed once an upload is written
	doneOnce sync.Once
}

func (u *uploader) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	form := r.URL.Path == vmpodv1.UploadFormPath
	switch {
	case r.URL.Path != vmpodv1.UploadPath && !form:
		http.NotFound(w, r)
		return
	case form && r.Method != http.MethodPost:
		w.Header().Set("Allow", "POST")
		http.Error(w, "post the form with the image in field "+vmpodv1.UploadFormField, http.StatusMethodNotAllowed)
		return
	case r.Method != http.MethodPut && r.Method != http.MethodPost:
		w.Header().Set("Allow", "PUT, POST")
		http.Error(w, "upload the image with PUT or POST", http.StatusMethodNotAllowed)
		return
	}
	if !u.busy.TryLock() {
		http.Error(w, "another upload is in progress", http.StatusConflict)
		return
	}
	defer u.busy.Unlock()
	select {
	case <-u.done:
		http.Error(w, "the image was uploaded already", http.StatusConflict)
		return
	default:
	}

	body, total := io.Reader(r.Body), r.ContentLength
	if form {
		file, err := formFile(r)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		body, total = file, -1 // the part's length is not told
	}
	slog.Info("upload started", "remote", r.RemoteAddr, "bytes", total, "form", form)
	err := u.write(r.Context(), body, total)
	var ie *Error
	switch {
	case err == nil:
		slog.Info("upload written")
		w.WriteHeader(http.StatusOK)
		fmt.Fprintln(w, "the image is written to the volume")
		u.doneOnce.Do(func() { close(u.done) })
		return
	case errors.As(err, &ie) && ie.Permanent:
		// the upload was not a usable image: say why and wait for another
		slog.Warn("upload refused", "reason", ie.Reason, "err", ie.Err)
		http.Error(w, err.Error(), http.StatusBadRequest)
		u.rep.Ready(u.ctx, "upload refused ("+err.Error()+"); waiting for another upload")
	default:
		// a cut connection, a full disk: the same upload may work again
		slog.Warn("upload failed", "err", err)
		http.Error(w, err.Error(), http.StatusInternalServerError)
		u.rep.Ready(u.ctx, "upload failed ("+err.Error()+"); waiting for another upload")
	}
}

// formFile returns the form's file field, streamed: the parts before it are skipped.
func formFile(r *http.Request) (io.Reader, error) {
	mr, err := r.MultipartReader()
	if err != nil {
		return nil, fmt.Errorf("not a multipart/form-data upload: %w", err)
	}
	for {
		part, err := mr.NextPart()
		if errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("the form has no field %q with the image", vmpodv1.UploadFormField)
		}
		if err != nil {
			return nil, fmt.Errorf("read the form: %w", err)
		}
		if part.FormName() == vmpodv1.UploadFormField {
			return part, nil
		}
	}
}

// write receives body (total bytes, -1 if unknown) and writes the image into the volume
// (or, for content type archive, extracts the tar archive into it). ctx is the request's,
// which ends when the client goes away.
func (u *uploader) write(ctx context.Context, body io.Reader, total int64) error {
	received, err := saveVerified(ctx, u.o, u.rep, body, total, "receiving the upload")
	if err != nil {
		return err
	}
	defer os.Remove(received)
	if u.o.ContentType == "archive" {
		return extractArchive(ctx, received, u.o.Dest)
	}
	if err := writeImage(ctx, u.o, u.rep, received, "", u.target); err != nil {
		if u.o.DestMode == "filesystem" {
			os.Remove(filepath.Join(u.o.Dest, DiskImageFile+".partial"))
		}
		return err
	}
	return nil
}
