package importer

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
	"github.com/vmpod/vmpod/controller/internal/selfsigned"
)

const testToken = "0123456789abcdef0123456789abcdef0123456789abcdef"

// cloneServer runs Serve on source with a certificate for 127.0.0.1 and testToken, and
// returns its base URL and the certificate.
func cloneServer(t *testing.T, source string) (string, []byte) {
	t.Helper()
	cert, key, err := selfsigned.New(net.IPv4(127, 0, 0, 1), "test", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	dir := writeFiles(t, map[string]string{vmpodv1.CloneCertKey: string(cert), vmpodv1.CloneKeyKey: string(key), vmpodv1.CloneTokenKey: testToken + "\n"})
	ctx, cancel := context.WithCancel(context.Background())
	addr := make(chan net.Addr, 1)
	done := make(chan error, 1)
	go func() {
		done <- Serve(ctx, ServeOptions{SourcePath: source, Listen: "127.0.0.1:0", TLSDir: dir}, func(a net.Addr) { addr <- a })
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	select {
	case a := <-addr:
		return "https://" + a.String(), cert
	case err := <-done:
		t.Fatalf("Serve: %v", err)
	}
	return "", nil
}

func writeFiles(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// A clone's source server: only the token gets the disk, only the disk is served, Range
// works; and the importer pulls a guest-written disk through it byte for byte, although the
// guest made it look like a qcow2 with a backing file on the host (which a probe would follow
// or refuse).
func TestCloneServer(t *testing.T) {
	needQemuImg(t)
	disk := make([]byte, 4*mib)
	copy(disk, qcow2WithBacking(t))
	copy(disk[3*mib:], "guest data")
	src := t.TempDir()
	if err := os.WriteFile(filepath.Join(src, DiskImageFile), disk, 0o644); err != nil {
		t.Fatal(err)
	}
	base, cert := cloneServer(t, src)
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(cert)
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}

	for _, tc := range []struct {
		name, method, path, auth, rng string
		want                          int
		body                          []byte
	}{
		{"no token", "GET", vmpodv1.ClonePath, "", "", http.StatusUnauthorized, nil},
		{"wrong token", "GET", vmpodv1.ClonePath, "Bearer " + strings.Repeat("x", len(testToken)), "", http.StatusUnauthorized, nil},
		{"token as basic auth", "GET", vmpodv1.ClonePath, "Basic " + testToken, "", http.StatusUnauthorized, nil},
		{"another path", "GET", "/etc/passwd", "Bearer " + testToken, "", http.StatusNotFound, nil},
		{"write", "PUT", vmpodv1.ClonePath, "Bearer " + testToken, "", http.StatusMethodNotAllowed, nil},
		{"range", "GET", vmpodv1.ClonePath, "Bearer " + testToken, "bytes=3145728-3145737", http.StatusPartialContent, []byte("guest data")},
		{"whole", "GET", vmpodv1.ClonePath, "Bearer " + testToken, "", http.StatusOK, disk},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest(tc.method, base+tc.path, nil)
			if tc.auth != "" {
				req.Header.Set("Authorization", tc.auth)
			}
			if tc.rng != "" {
				req.Header.Set("Range", tc.rng)
			}
			resp, err := client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.want {
				t.Fatalf("%s %s: %s, want %d", tc.method, tc.path, resp.Status, tc.want)
			}
			if tc.body != nil && !bytes.Equal(body, tc.body) {
				t.Errorf("body: %d bytes, not the disk's", len(body))
			}
		})
	}

	// the importer as the clone's Job runs it
	pull := func(format string) (Options, error) {
		o := Options{Source: "http", URL: base + vmpodv1.ClonePath, SourceFormat: format, ContentType: "kubevirt",
			HeaderDirs: []string{writeFiles(t, map[string]string{"authorization": "Authorization: Bearer " + testToken})},
			CADir:      writeFiles(t, map[string]string{"ca.crt": string(cert)}),
			Dest:       t.TempDir(), DestMode: "filesystem", Size: 8 * mib, Scratch: t.TempDir(), ProgressInterval: time.Second}
		return o, Run(context.Background(), o, &recorder{})
	}
	o, err := pull("raw")
	if err != nil {
		t.Fatalf("clone through the server: %v", err)
	}
	checkDisk(t, o.Dest, disk, 8*mib)
	// without --source-format=raw the same bytes are probed, and refused for the backing file
	o, err = pull("")
	expectFailure(t, err, "InvalidImage", true)
	noDisk(t, o)
}

// The server refuses to start on what it must not serve: a disk.img that is a symlink out
// of its PVC, a short token, a missing certificate.
func TestCloneServerRefuses(t *testing.T) {
	cert, key, err := selfsigned.New(net.IPv4(127, 0, 0, 1), "test", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	escape := t.TempDir()
	if err := os.Symlink("/etc/hostname", filepath.Join(escape, DiskImageFile)); err != nil {
		t.Fatal(err)
	}
	good := t.TempDir()
	if err := os.WriteFile(filepath.Join(good, DiskImageFile), make([]byte, mib), 0o644); err != nil {
		t.Fatal(err)
	}
	tlsDir := func(token string) string {
		return writeFiles(t, map[string]string{vmpodv1.CloneCertKey: string(cert), vmpodv1.CloneKeyKey: string(key), vmpodv1.CloneTokenKey: token})
	}
	for _, tc := range []struct {
		name string
		o    ServeOptions
		want string
	}{
		{"symlink out of the PVC", ServeOptions{SourcePath: escape, TLSDir: tlsDir(testToken)}, "path escapes from parent"},
		{"short token", ServeOptions{SourcePath: good, TLSDir: tlsDir("short")}, "want at least 32"},
		{"no certificate", ServeOptions{SourcePath: good, TLSDir: t.TempDir()}, "load the TLS certificate"},
		{"no source", ServeOptions{TLSDir: tlsDir(testToken)}, "--source-path and --tls-dir are required"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.o.Listen = "127.0.0.1:0"
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			err := Serve(ctx, tc.o, func(net.Addr) { t.Error("it listened"); cancel() })
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Serve: %v, want an error with %q", err, tc.want)
			}
		})
	}
}
