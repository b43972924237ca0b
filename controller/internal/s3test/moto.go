// Package s3test runs a real S3 API server for tests: moto's server mode with authentication
// enforced, so that every request's SigV4 signature is checked by botocore's signer and its
// access by IAM policy. Tests skip (saying why) where moto_server is not installed.
package s3test

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/vmpod/vmpod/controller/internal/sigv4"
)

// Server is a running moto S3 with one bucket.
type Server struct {
	URL    string // http://127.0.0.1:PORT
	Bucket string
	// Cred is an IAM user's key allowed s3:GetObject on the bucket's objects.
	Cred sigv4.Credentials
}

// Start runs moto_server until the test ends, with a bucket holding objects and an IAM user
// allowed to read them, then turns authentication on.
func Start(t *testing.T, objects map[string][]byte) *Server {
	t.Helper()
	bin, err := exec.LookPath("moto_server")
	if err != nil {
		// pip installs it under pyenv's shims, which a non-login shell may not have on PATH
		bin = filepath.Join(os.Getenv("HOME"), ".pyenv", "shims", "moto_server")
		if _, serr := os.Stat(bin); serr != nil {
			t.Skip("moto_server is not installed (pip install 'moto[server]'): no S3 server to import from")
		}
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	cmd := exec.Command(bin, "-H", "127.0.0.1", "-p", fmt.Sprint(port))
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("moto_server's log:\n%s", out.String())
		}
	})
	s := &Server{URL: fmt.Sprintf("http://127.0.0.1:%d", port), Bucket: "vmpod-images"}
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := http.Get(s.URL + "/moto-api/data.json")
		if err == nil {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("moto_server did not answer in 60 s: %v\n%s", err, out.String())
		}
		time.Sleep(200 * time.Millisecond)
	}

	// set up while authentication is still off (moto's default)
	s.do(t, http.MethodPut, "/"+s.Bucket, nil)
	for key, data := range objects {
		s.do(t, http.MethodPut, "/"+s.Bucket+"/"+key, data)
	}
	s.iam(t, url.Values{"Action": {"CreateUser"}, "UserName": {"importer"}})
	var created struct {
		AccessKeyID     string `xml:"CreateAccessKeyResult>AccessKey>AccessKeyId"`
		SecretAccessKey string `xml:"CreateAccessKeyResult>AccessKey>SecretAccessKey"`
	}
	if err := xml.Unmarshal(s.iam(t, url.Values{"Action": {"CreateAccessKey"}, "UserName": {"importer"}}), &created); err != nil || created.SecretAccessKey == "" {
		t.Fatalf("CreateAccessKey: %v %+v", err, created)
	}
	s.Cred = sigv4.Credentials{AccessKeyID: created.AccessKeyID, SecretKey: created.SecretAccessKey}
	policy := `{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:GetObject","Resource":"arn:aws:s3:::` + s.Bucket + `/*"}]}`
	s.iam(t, url.Values{"Action": {"PutUserPolicy"}, "UserName": {"importer"}, "PolicyName": {"read"}, "PolicyDocument": {policy}})
	// from here on every request is authenticated and authorized
	s.do(t, http.MethodPost, "/moto-api/reset-auth", []byte("0"))
	return s
}

// ObjectURL is the path-style URL of key, as a DataVolume's s3.url names it.
func (s *Server) ObjectURL(key string) string { return s.URL + "/" + s.Bucket + "/" + key }

// WriteCredentials writes cred as a Secret volume holds CDI's keys (accessKeyId, secretKey)
// into a new directory, and returns it.
func WriteCredentials(t *testing.T, cred sigv4.Credentials) string {
	t.Helper()
	dir := t.TempDir()
	for name, v := range map[string]string{"accessKeyId": cred.AccessKeyID, "secretKey": cred.SecretKey + "\n"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(v), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func (s *Server) do(t *testing.T, method, path string, body []byte) []byte {
	t.Helper()
	u, err := url.Parse(s.URL)
	if err != nil {
		t.Fatal(err)
	}
	u.Path = path
	req, err := http.NewRequest(method, u.String(), bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	return s.send(t, req)
}

// iam calls IAM's query API. Its request is signed (with any key: authentication is still
// off) because moto routes a request to a service by its signature's scope.
func (s *Server) iam(t *testing.T, params url.Values) []byte {
	t.Helper()
	params.Set("Version", "2010-05-08")
	req, err := http.NewRequest(http.MethodGet, s.URL+"/?"+params.Encode(), nil)
	if err != nil {
		t.Fatal(err)
	}
	sigv4.Sign(req, sigv4.Credentials{AccessKeyID: "setup", SecretKey: "setup"}, "us-east-1", "iam", time.Now())
	return s.send(t, req)
}

func (s *Server) send(t *testing.T, req *http.Request) []byte {
	t.Helper()
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode/100 != 2 {
		t.Fatalf("%s %s: %s: %s", req.Method, req.URL, resp.Status, b)
	}
	return b
}
