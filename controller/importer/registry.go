package importer

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync/atomic"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
)

// pullRegistry pulls a containerDisk image (docker://ref) and saves the disk file it holds
// under /disk into the scratch directory.
func pullRegistry(ctx context.Context, o Options, rep Reporter) (string, error) {
	ref, err := name.ParseReference(strings.TrimPrefix(o.URL, "docker://"))
	if err != nil {
		return "", permanent("InvalidURL", "%s: %w", o.URL, err)
	}
	client, err := httpClient(o.CADir)
	if err != nil {
		return "", err
	}
	counted := &countingTransport{next: client.Transport}
	auth := authn.Anonymous
	if o.AuthDir != "" {
		user, pass, err := readAuth(o.AuthDir)
		if err != nil {
			return "", err
		}
		auth = &authn.Basic{Username: user, Password: pass}
	}
	img, err := remote.Image(ref, remote.WithContext(ctx), remote.WithTransport(counted), remote.WithAuth(auth))
	if err != nil {
		return "", registryError(o.URL, err)
	}
	manifest, err := img.Manifest()
	if err != nil {
		return "", registryError(o.URL, err)
	}
	var total int64
	for _, l := range manifest.Layers {
		total += l.Size
	}
	slog.Info("pulling", "image", ref.String(), "layers", len(manifest.Layers), "bytes", total)
	stop := reportEvery(ctx, o.ProgressInterval, func() {
		progress := "N/A"
		if total > 0 {
			progress = fmt.Sprintf("%.2f%%", min(100, 100*float64(counted.n.Load())/float64(total)))
		}
		rep.Progress(ctx, progress, fmt.Sprintf("pulling %s: %d bytes", ref, counted.n.Load()))
	})
	defer stop()

	// the flattened filesystem: later layers and whiteouts already applied
	fs := mutate.Extract(img)
	defer fs.Close()
	tr := tar.NewReader(fs)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return "", permanent("InvalidImage", "%s has no disk file in /%s", ref, "disk")
		}
		if err != nil {
			return "", registryError(o.URL, err)
		}
		name := path.Clean(strings.TrimPrefix(h.Name, "/"))
		if h.Typeflag != tar.TypeReg || path.Dir(name) != "disk" {
			continue
		}
		slog.Info("found the disk", "file", "/"+name, "bytes", h.Size)
		dst := filepath.Join(o.Scratch, "download")
		f, err := os.Create(dst)
		if err != nil {
			return "", transient("WriteFailed", "create %s: %w", dst, err)
		}
		// a containerDisk's disk may be compressed, as CDI allows: unwrap gzip or xz
		var data io.Reader
		var kind string
		entry := &readErr{r: tr}
		if data, kind, err = decompress(entry); err == nil {
			if kind != "none" {
				slog.Info("decompressing the disk", "compression", kind)
			}
			_, err = copySparse(f, limitImage(data, o.imageLimit))
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(dst)
			if entry.err == nil && ctx.Err() == nil {
				// the layer arrived whole (its digest checked), the disk in it did not
				// decompress: a bad image, not a bad connection
				err = streamError(ctx, err, "/"+name, kind, func(err error) error { return permanent("InvalidImage", "/%s: %s stream: %w", name, kind, err) })
				return "", err
			}
			return "", streamError(ctx, err, "/"+name, kind, func(err error) error { return registryError(o.URL, err) })
		}
		return dst, nil
	}
}

// readErr remembers the first error (but EOF) of reading r: the layer's transport.
type readErr struct {
	r   io.Reader
	err error
}

func (e *readErr) Read(p []byte) (int, error) {
	n, err := e.r.Read(p)
	if err != nil && !errors.Is(err, io.EOF) && e.err == nil {
		e.err = err
	}
	return n, err
}

func registryError(url string, err error) error {
	var ie *Error
	if errors.As(err, &ie) {
		return err
	}
	var te *transport.Error
	if errors.As(err, &te) {
		switch te.StatusCode {
		case http.StatusNotFound:
			return permanent("ImageNotFound", "%s: %w", url, err)
		case http.StatusUnauthorized, http.StatusForbidden:
			return permanent("RegistryUnauthorized", "%s: %w", url, err)
		}
	}
	return transient("RegistryError", "%s: %w", url, err)
}

// countingTransport counts the bytes of blob downloads, for progress.
type countingTransport struct {
	next http.RoundTripper
	n    atomic.Int64
}

func (t *countingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.next.RoundTrip(req)
	if err == nil && strings.Contains(req.URL.Path, "/blobs/") {
		resp.Body = &countingBody{ReadCloser: resp.Body, n: &t.n}
	}
	return resp, err
}

type countingBody struct {
	io.ReadCloser
	n *atomic.Int64
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.n.Add(int64(n))
	return n, err
}
