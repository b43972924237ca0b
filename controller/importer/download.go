package importer

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/ulikunitz/xz"

	"github.com/vmpod/vmpod/controller/internal/counting"
)

// downloadHTTP fetches o.URL into the scratch directory, decompressing gzip or xz on the way,
// and verifies the checksum of the bytes as served. It returns the decompressed file.
func downloadHTTP(ctx context.Context, o Options, rep Reporter) (string, error) {
	client, err := httpClient(o.CADir)
	if err != nil {
		return "", err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, o.URL, nil)
	if err != nil {
		return "", permanent("InvalidURL", "%s: %w", o.URL, err)
	}
	if err := addHeaders(req, o); err != nil {
		return "", err
	}
	resp, err := client.Do(req)
	if err != nil {
		return "", transient("DownloadFailed", "GET %s: %w", o.URL, err)
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusGone:
		return "", permanent("HTTPNotFound", "GET %s: %s", o.URL, resp.Status)
	case resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden:
		return "", permanent("HTTPUnauthorized", "GET %s: %s", o.URL, resp.Status)
	case resp.StatusCode >= 400 && resp.StatusCode < 500 && resp.StatusCode != http.StatusTooManyRequests:
		return "", permanent("HTTPError", "GET %s: %s", o.URL, resp.Status)
	case resp.StatusCode != http.StatusOK:
		return "", transient("HTTPError", "GET %s: %s", o.URL, resp.Status)
	}
	slog.Info("downloading", "url", o.URL, "bytes", resp.ContentLength, "contentType", resp.Header.Get("Content-Type"))
	return saveVerified(ctx, o, rep, resp.Body, resp.ContentLength, "downloading "+o.URL)
}

// saveVerified streams body (total bytes, or -1 if unknown) into a scratch file,
// decompressing it, reporting progress, and checking o.Checksum over the raw bytes.
func saveVerified(ctx context.Context, o Options, rep Reporter, body io.Reader, total int64, what string) (string, error) {
	sum, want, err := checksum(o.Checksum)
	if err != nil {
		return "", err
	}
	counter := &counting.Reader{R: body}
	raw := io.Reader(counter)
	if sum != nil {
		raw = io.TeeReader(counter, sum)
	}
	stop := reportEvery(ctx, o.ProgressInterval, func() {
		progress := "N/A"
		if total > 0 {
			progress = fmt.Sprintf("%.2f%%", 100*float64(counter.N())/float64(total))
		}
		rep.Progress(ctx, progress, fmt.Sprintf("%s: %d bytes", what, counter.N()))
	})
	defer stop()

	data, kind := io.Reader(raw), "none"
	if o.SourceFormat == "" {
		if data, kind, err = decompress(raw); err != nil {
			return "", err
		}
	}
	path := filepath.Join(o.Scratch, "download")
	f, err := os.Create(path)
	if err != nil {
		return "", transient("WriteFailed", "create %s: %w", path, err)
	}
	written, err := copySparse(f, limitImage(data, o.imageLimit))
	if cerr := f.Close(); err == nil && cerr != nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return "", streamError(ctx, err, what, kind, func(err error) error { return transient("DownloadFailed", "%s: %w", what, err) })
	}
	if total > 0 && counter.N() != total {
		os.Remove(path)
		return "", transient("DownloadFailed", "%s: got %d of %d bytes", what, counter.N(), total)
	}
	if sum != nil {
		if got := sum.Sum(nil); subtle.ConstantTimeCompare(got, want) != 1 {
			os.Remove(path)
			return "", permanent("ChecksumMismatch", "%s: checksum %s, want %s", what, hex.EncodeToString(got), o.Checksum)
		}
		slog.Info("checksum verified", "checksum", o.Checksum)
	}
	slog.Info("downloaded", "bytes", counter.N(), "compression", kind, "imageBytes", written)
	return path, nil
}

// streamError classifies an error of copying a (decompressed) download: the importer's own
// errors as they are, a cut connection by transport, anything else is the stream's content
// (a corrupt gzip or xz stream), which a retry will not fix.
func streamError(ctx context.Context, err error, what, kind string, transport func(error) error) error {
	var ie *Error
	switch {
	case errors.As(err, &ie):
		return err
	case ctx.Err() != nil || errors.Is(err, io.ErrUnexpectedEOF) || isNetError(err):
		return transport(err)
	}
	return permanent("InvalidImage", "%s: %s stream: %w", what, kind, err)
}

func isNetError(err error) bool {
	var ne interface{ Timeout() bool }
	return errors.As(err, &ne)
}

// checksum parses <algorithm>:<hex>.
func checksum(s string) (hash.Hash, []byte, error) {
	if s == "" {
		return nil, nil, nil
	}
	alg, hexsum, _ := strings.Cut(s, ":")
	want, err := hex.DecodeString(hexsum)
	if err != nil {
		return nil, nil, permanent("InvalidArguments", "checksum %q: %w", s, err)
	}
	var h hash.Hash
	switch alg {
	case "sha256":
		h = sha256.New()
	case "sha512":
		h = sha512.New()
	default:
		return nil, nil, permanent("InvalidArguments", "checksum %q: algorithm must be sha256 or sha512", s)
	}
	if len(want) != h.Size() {
		return nil, nil, permanent("InvalidArguments", "checksum %q: %d bytes, %s has %d", s, len(want), alg, h.Size())
	}
	return h, want, nil
}

// decompress sniffs gzip and xz magic numbers and unwraps them.
func decompress(r io.Reader) (io.Reader, string, error) {
	br := bufio.NewReaderSize(r, 1<<20)
	magic, err := br.Peek(6)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, "", transient("DownloadFailed", "read: %w", err)
	}
	switch {
	case bytes.HasPrefix(magic, []byte{0x1f, 0x8b}):
		z, err := gzip.NewReader(br)
		if err != nil {
			return nil, "", permanent("InvalidImage", "gzip: %w", err)
		}
		return z, "gzip", nil
	case bytes.HasPrefix(magic, []byte{0xfd, '7', 'z', 'X', 'Z', 0}):
		z, err := xz.NewReader(br)
		if err != nil {
			return nil, "", permanent("InvalidImage", "xz: %w", err)
		}
		return z, "xz", nil
	}
	return br, "none", nil
}

// limitImage fails a read past max bytes (none if max is 0) with ImageTooLarge.
func limitImage(r io.Reader, max int64) io.Reader {
	if max <= 0 {
		return r
	}
	return &limitedImage{r: r, left: max}
}

type limitedImage struct {
	r    io.Reader
	left int64
}

func (l *limitedImage) Read(p []byte) (int, error) {
	if l.left <= 0 {
		// one byte more is too many
		var b [1]byte
		n, err := l.r.Read(b[:])
		if n > 0 {
			return 0, permanent("ImageTooLarge", "the image decompresses to more bytes than the disk it could hold")
		}
		return 0, err
	}
	if int64(len(p)) > l.left {
		p = p[:l.left]
	}
	n, err := l.r.Read(p)
	l.left -= int64(n)
	return n, err
}

// copySparse copies r to f, seeking over all-zero chunks so that a raw image's holes stay
// holes on the scratch filesystem. It returns the logical size.
func copySparse(f *os.File, r io.Reader) (int64, error) {
	buf := make([]byte, 256<<10)
	var off int64
	for {
		n, err := r.Read(buf)
		if n > 0 {
			if isZero(buf[:n]) {
				if _, serr := f.Seek(int64(n), io.SeekCurrent); serr != nil {
					return off, &Error{Reason: "WriteFailed", Err: fmt.Errorf("seek %s: %w", f.Name(), serr)}
				}
			} else if _, werr := f.Write(buf[:n]); werr != nil {
				return off, &Error{Reason: "WriteFailed", Err: fmt.Errorf("write %s: %w", f.Name(), werr)}
			}
			off += int64(n)
		}
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return off, err
		}
	}
	// a trailing hole must still count towards the size
	if err := f.Truncate(off); err != nil {
		return off, &Error{Reason: "WriteFailed", Err: fmt.Errorf("truncate %s: %w", f.Name(), err)}
	}
	return off, nil
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// reportEvery calls f every interval until stop is called; stop calls f a last time.
func reportEvery(ctx context.Context, interval time.Duration, f func()) (stop func()) {
	if interval <= 0 {
		interval = 2 * time.Second
	}
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				f()
			case <-done:
				return
			case <-ctx.Done():
				return
			}
		}
	}()
	return func() {
		close(done)
		<-finished
		f()
	}
}

func httpClient(caDir string) (*http.Client, error) {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	if caDir != "" {
		pool, err := certPool(caDir)
		if err != nil {
			return nil, err
		}
		tr.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	// no overall timeout: images are large. A stalled server is caught by these.
	tr.ResponseHeaderTimeout = 60 * time.Second
	return &http.Client{Transport: tr}, nil
}

func certPool(dir string) (*x509.CertPool, error) {
	pool := x509.NewCertPool()
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, permanent("InvalidCertificates", "read %s: %w", dir, err)
	}
	added := 0
	for _, e := range entries {
		// ConfigMap volumes hold ..data symlinks and dot-directories: files only
		if e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		pem, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			return nil, transient("InvalidCertificates", "read %s: %w", e.Name(), err)
		}
		if pool.AppendCertsFromPEM(pem) {
			added++
		}
	}
	if added == 0 {
		return nil, permanent("InvalidCertificates", "no PEM certificates in %s", dir)
	}
	return pool, nil
}

// addHeaders adds the extra headers and basic auth to req.
func addHeaders(req *http.Request, o Options) error {
	headers := append([]string(nil), o.Headers...)
	for _, dir := range o.HeaderDirs {
		entries, err := os.ReadDir(dir)
		if err != nil {
			return permanent("InvalidHeaders", "read %s: %w", dir, err)
		}
		for _, e := range entries {
			if e.IsDir() || strings.HasPrefix(e.Name(), ".") {
				continue
			}
			b, err := os.ReadFile(filepath.Join(dir, e.Name()))
			if err != nil {
				return transient("InvalidHeaders", "read %s: %w", e.Name(), err)
			}
			headers = append(headers, strings.TrimSpace(string(b)))
		}
	}
	for _, h := range headers {
		name, value, ok := strings.Cut(h, ":")
		if !ok || strings.TrimSpace(name) == "" {
			return permanent("InvalidHeaders", "header %q is not \"Name: value\"", truncate(h, 40))
		}
		req.Header.Add(strings.TrimSpace(name), strings.TrimSpace(value))
	}
	if o.AuthDir != "" {
		user, pass, err := readAuth(o.AuthDir)
		if err != nil {
			return err
		}
		req.SetBasicAuth(user, pass)
	}
	return nil
}

// readAuth reads CDI's credential Secret keys.
func readAuth(dir string) (user, pass string, err error) {
	u, err1 := os.ReadFile(filepath.Join(dir, "accessKeyId"))
	p, err2 := os.ReadFile(filepath.Join(dir, "secretKey"))
	if err := errors.Join(err1, err2); err != nil {
		return "", "", permanent("InvalidCredentials", "the credentials Secret needs keys accessKeyId and secretKey: %w", err)
	}
	return strings.TrimSpace(string(u)), strings.TrimSpace(string(p)), nil
}
