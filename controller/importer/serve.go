package importer

import (
	"context"
	"crypto/subtle"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
)

// ServeOptions configure `vmpod-importer serve`: the source side of a clone from another
// namespace (docs/design/113). It serves one disk, read-only, to whoever presents the token,
// and nothing else.
type ServeOptions struct {
	// SourcePath is the source PVC's mount (a directory holding disk.img) or block device.
	SourcePath string
	Listen     string
	// TLSDir holds tls.crt, tls.key and token.
	TLSDir string
}

// serveMain is `vmpod-importer serve`.
func serveMain(ctx context.Context, args []string) int {
	var o ServeOptions
	fs := flag.NewFlagSet("vmpod-importer serve", flag.ContinueOnError)
	fs.StringVar(&o.SourcePath, "source-path", "", "the source PVC's mount (holding "+DiskImageFile+") or block device")
	fs.StringVar(&o.Listen, "listen", fmt.Sprintf(":%d", vmpodv1.ClonePort), "the address to serve on")
	fs.StringVar(&o.TLSDir, "tls-dir", "", "a directory with "+vmpodv1.CloneCertKey+", "+vmpodv1.CloneKeyKey+" and "+vmpodv1.CloneTokenKey)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return ExitOK
		}
		return ExitPermanent
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "vmpod-importer serve: unexpected arguments %q\n", fs.Args())
		return ExitPermanent
	}
	if err := Serve(ctx, o, nil); err != nil {
		slog.Error("serve", "err", err)
		writeTerminationMessage(err)
		return ExitPermanent
	}
	return ExitOK
}

// Serve serves o.SourcePath at vmpodv1.ClonePath until ctx ends. ready, if not nil, gets
// the address once it listens.
func Serve(ctx context.Context, o ServeOptions, ready func(net.Addr)) error {
	if o.SourcePath == "" || o.TLSDir == "" {
		return errors.New("--source-path and --tls-dir are required")
	}
	cert, err := tls.LoadX509KeyPair(filepath.Join(o.TLSDir, vmpodv1.CloneCertKey), filepath.Join(o.TLSDir, vmpodv1.CloneKeyKey))
	if err != nil {
		return fmt.Errorf("load the TLS certificate: %w", err)
	}
	token, err := os.ReadFile(filepath.Join(o.TLSDir, vmpodv1.CloneTokenKey))
	if err != nil {
		return fmt.Errorf("read the token: %w", err)
	}
	d := &diskServer{source: o.SourcePath, token: []byte(strings.TrimSpace(string(token)))}
	if len(d.token) < 32 {
		return fmt.Errorf("the token in %s is %d bytes: want at least 32", vmpodv1.CloneTokenKey, len(d.token))
	}
	// the disk must be there before the pod reports ready
	f, size, err := d.open()
	if err != nil {
		return err
	}
	f.Close()

	ln, err := net.Listen("tcp", o.Listen)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", o.Listen, err)
	}
	srv := &http.Server{
		Handler:           d,
		ReadHeaderTimeout: 30 * time.Second,
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13},
	}
	served := make(chan error, 1)
	go func() { served <- srv.ServeTLS(ln, "", "") }()
	slog.Info("serving the clone source", "address", ln.Addr().String(), "path", vmpodv1.ClonePath, "source", o.SourcePath, "bytes", size)
	if ready != nil {
		ready(ln.Addr())
	}
	select {
	case err := <-served:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = srv.Shutdown(shutdown)
	slog.Info("stopped serving", "cause", context.Cause(ctx))
	return nil
}

// diskServer answers GET and HEAD of the one disk, with Range requests, to a request that
// carries the token as a bearer token.
type diskServer struct {
	source string
	token  []byte
}

// open opens the disk: disk.img inside a directory source (resolved within it, so a
// symlink the guest's owner planted cannot point elsewhere), else the block device.
func (d *diskServer) open() (*os.File, int64, error) {
	var f *os.File
	st, err := os.Stat(d.source)
	if err != nil {
		return nil, 0, fmt.Errorf("source %s: %w", d.source, err)
	}
	if st.IsDir() {
		root, err := os.OpenRoot(d.source)
		if err != nil {
			return nil, 0, fmt.Errorf("open %s: %w", d.source, err)
		}
		defer root.Close()
		f, err = root.Open(DiskImageFile)
		if err != nil {
			return nil, 0, fmt.Errorf("open %s in %s: %w", DiskImageFile, d.source, err)
		}
	} else if f, err = os.Open(d.source); err != nil {
		return nil, 0, fmt.Errorf("open %s: %w", d.source, err)
	}
	size, err := f.Seek(0, io.SeekEnd)
	if err == nil {
		_, err = f.Seek(0, io.SeekStart)
	}
	if err != nil {
		f.Close()
		return nil, 0, fmt.Errorf("size of %s: %w", d.source, err)
	}
	return f, size, nil
}

func (d *diskServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok || subtle.ConstantTimeCompare([]byte(got), d.token) != 1 {
		slog.Warn("refused a request without the token", "remote", r.RemoteAddr, "path", r.URL.Path)
		http.Error(w, "unauthorized", http.StatusUnauthorized)
		return
	}
	switch {
	case r.URL.Path != vmpodv1.ClonePath:
		http.NotFound(w, r)
		return
	case r.Method != http.MethodGet && r.Method != http.MethodHead:
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "read-only", http.StatusMethodNotAllowed)
		return
	}
	f, size, err := d.open()
	if err != nil {
		slog.Error("open the disk", "err", err)
		http.Error(w, "the disk cannot be read", http.StatusInternalServerError)
		return
	}
	defer f.Close()
	slog.Info("serving the disk", "remote", r.RemoteAddr, "method", r.Method, "range", r.Header.Get("Range"), "bytes", size)
	w.Header().Set("Content-Type", "application/octet-stream")
	// ServeContent takes the size from Seek, which a block device answers too
	http.ServeContent(w, r, DiskImageFile, time.Time{}, f)
}
