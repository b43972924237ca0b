package importer

import (
	"bytes"
	"context"
	"encoding/xml"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// AWS's published example of a signed GET Object (Amazon S3 API reference, "Signature
// Calculations for the Authorization Header: Transferring Payload in a Single Chunk").
func TestSignV4KnownAnswer(t *testing.T) {
	req, err := http.NewRequest(http.MethodGet, "https://examplebucket.s3.amazonaws.com/test.txt", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Range", "bytes=0-9")
	cred := s3Credentials{AccessKeyID: "AKIAIOSFODNN7EXAMPLE", SecretKey: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}
	signV4(req, cred, "us-east-1", "s3", time.Date(2013, 5, 24, 0, 0, 0, 0, time.UTC))
	want := "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, " +
		"SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, " +
		"Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
	if got := req.Header.Get("Authorization"); got != want {
		t.Errorf("Authorization =\n  %s\nwant\n  %s", got, want)
	}
	if got := req.Header.Get("X-Amz-Date"); got != "20130524T000000Z" {
		t.Errorf("X-Amz-Date = %q", got)
	}
}

func TestAWSURIEncode(t *testing.T) {
	for in, want := range map[string]string{
		"/bucket/a b+c~d_e.f-g": "/bucket/a%20b%2Bc~d_e.f-g",
		"/b/ünï/$&=":            "/b/%C3%BCn%C3%AF/%24%26%3D",
	} {
		if got := awsURIEncode(in, false); got != want {
			t.Errorf("awsURIEncode(%q) = %q, want %q", in, got, want)
		}
	}
	if got := awsURIEncode("a/b", true); got != "a%2Fb" {
		t.Errorf("with slashes encoded: %q", got)
	}
}

func TestParseS3URL(t *testing.T) {
	obj, err := parseS3URL("https://s3.eu-west-1.amazonaws.com/images/os/fedora.qcow2")
	if err != nil {
		t.Fatal(err)
	}
	if obj.Endpoint.String() != "https://s3.eu-west-1.amazonaws.com" || obj.Bucket != "images" || obj.Key != "os/fedora.qcow2" {
		t.Errorf("parsed %+v", obj)
	}
	for _, bad := range []string{
		"ftp://host/b/k", "https:///b/k", "https://host/bucket", "https://host/bucket/", "https://host/",
		"https://host/b/k?versionId=1", "https://user:pw@host/b/k", "https://host/b/k#frag",
	} {
		if _, err := parseS3URL(bad); err == nil {
			t.Errorf("parseS3URL(%q) accepted", bad)
		} else {
			expectFailure(t, err, "InvalidURL", true)
		}
	}
	for host, want := range map[string]string{
		"s3.eu-west-1.amazonaws.com":            "eu-west-1",
		"s3-us-west-2.amazonaws.com":            "us-west-2",
		"s3.dualstack.ap-south-1.amazonaws.com": "ap-south-1",
		"s3.amazonaws.com":                      defaultS3Region,
		"minio.example.com:9000":                defaultS3Region,
		"127.0.0.1:9000":                        defaultS3Region,
		"[::1]:9000":                            defaultS3Region,
	} {
		if got := s3Region(host); got != want {
			t.Errorf("s3Region(%q) = %q, want %q", host, got, want)
		}
	}
}

// motoS3 is a real S3 API server: moto's server mode, with authentication enforced, so that
// every request's SigV4 signature is checked by botocore's signer and its access by IAM.
type motoS3 struct {
	URL    string
	Bucket string
	Cred   s3Credentials // an IAM user's key allowed to get the bucket's objects
}

func startMotoS3(t *testing.T, objects map[string][]byte) *motoS3 {
	t.Helper()
	bin, err := exec.LookPath("moto_server")
	if err != nil {
		t.Skip("moto_server is not installed (pip install 'moto[server]'): no S3 server to import from")
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
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("moto_server's log:\n%s", out.String())
		}
	})
	m := &motoS3{URL: fmt.Sprintf("http://127.0.0.1:%d", port), Bucket: "vmpod-images"}
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := http.Get(m.URL + "/moto-api/data.json")
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
	m.do(t, http.MethodPut, "/"+m.Bucket, nil)
	for key, data := range objects {
		m.do(t, http.MethodPut, "/"+m.Bucket+"/"+key, data)
	}
	m.iam(t, url.Values{"Action": {"CreateUser"}, "UserName": {"importer"}})
	var created struct {
		AccessKeyID     string `xml:"CreateAccessKeyResult>AccessKey>AccessKeyId"`
		SecretAccessKey string `xml:"CreateAccessKeyResult>AccessKey>SecretAccessKey"`
	}
	if err := xml.Unmarshal(m.iam(t, url.Values{"Action": {"CreateAccessKey"}, "UserName": {"importer"}}), &created); err != nil || created.SecretAccessKey == "" {
		t.Fatalf("CreateAccessKey: %v %+v", err, created)
	}
	m.Cred = s3Credentials{AccessKeyID: created.AccessKeyID, SecretKey: created.SecretAccessKey}
	policy := `{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:GetObject","Resource":"arn:aws:s3:::` + m.Bucket + `/*"}]}`
	m.iam(t, url.Values{"Action": {"PutUserPolicy"}, "UserName": {"importer"}, "PolicyName": {"read"}, "PolicyDocument": {policy}})
	// from here on every request is authenticated and authorized
	m.do(t, http.MethodPost, "/moto-api/reset-auth", []byte("0"))
	return m
}

func (m *motoS3) do(t *testing.T, method, path string, body []byte) []byte {
	t.Helper()
	u, err := url.Parse(m.URL)
	if err != nil {
		t.Fatal(err)
	}
	u.Path = path
	req, err := http.NewRequest(method, u.String(), bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	return m.send(t, req)
}

// iam calls IAM's query API. Its request is signed (with any key: authentication is still
// off) because moto routes a request to a service by its signature's scope.
func (m *motoS3) iam(t *testing.T, params url.Values) []byte {
	t.Helper()
	params.Set("Version", "2010-05-08")
	req, err := http.NewRequest(http.MethodGet, m.URL+"/?"+params.Encode(), nil)
	if err != nil {
		t.Fatal(err)
	}
	signV4(req, s3Credentials{AccessKeyID: "setup", SecretKey: "setup"}, "us-east-1", "iam", time.Now())
	return m.send(t, req)
}

func (m *motoS3) send(t *testing.T, req *http.Request) []byte {
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

func (m *motoS3) options(t *testing.T, key string, cred *s3Credentials) Options {
	t.Helper()
	o := Options{Source: "s3", URL: m.URL + "/" + m.Bucket + "/" + key, ContentType: "kubevirt",
		Dest: t.TempDir(), DestMode: "filesystem", Size: 64 * mib, Scratch: t.TempDir(), ProgressInterval: 1}
	if cred != nil {
		o.AuthDir = t.TempDir()
		for name, v := range map[string]string{"accessKeyId": cred.AccessKeyID, "secretKey": cred.SecretKey + "\n"} {
			if err := os.WriteFile(filepath.Join(o.AuthDir, name), []byte(v), 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	return o
}

func TestS3Import(t *testing.T) {
	raw, qcow2 := testImage(t, 4*mib)
	// a key with a space and a tilde: the canonical URI must be encoded as the server's
	// signer encodes it. (moto's check re-encodes the path it received its own way and
	// rejects AWS's encoding of '+', '=', ',', '!' and non-ASCII letters, which AWS, MinIO
	// and the AWS SDKs encode as we do; TestAWSURIEncode covers those.)
	const oddKey = "os/fedora 41~cloud.qcow2.gz"
	m := startMotoS3(t, map[string][]byte{"disk.qcow2": qcow2, oddKey: gz(t, qcow2), "disk.raw.xz": xzip(t, raw)})
	const want = 60 * mib

	for _, key := range []string{"disk.qcow2", oddKey, "disk.raw.xz"} {
		t.Run(key, func(t *testing.T) {
			o := m.options(t, key, &m.Cred)
			o.FilesystemOverhead = 0.055
			rep := &recorder{}
			if err := Run(context.Background(), o, rep); err != nil {
				t.Fatalf("import: %v", err)
			}
			if !rep.succeeded {
				t.Error("not reported as succeeded")
			}
			checkDisk(t, o.Dest, raw, want)
			if last := rep.progress[len(rep.progress)-1]; last != "100.00%" {
				t.Errorf("last progress %q, want 100.00%%", last)
			}
		})
	}
	t.Run("checksum", func(t *testing.T) {
		o := m.options(t, "disk.qcow2", &m.Cred)
		o.Checksum = sha(qcow2)
		if err := Run(context.Background(), o, &recorder{}); err != nil {
			t.Fatalf("import with the right checksum: %v", err)
		}
		o = m.options(t, "disk.qcow2", &m.Cred)
		o.Checksum = sha(raw)
		expectFailure(t, Run(context.Background(), o, &recorder{}), "ChecksumMismatch", true)
		noDisk(t, o)
	})

	wrongSecret := m.Cred
	wrongSecret.SecretKey += "x"
	unknownKey := s3Credentials{AccessKeyID: "AKIAIOSFODNN7EXAMPLE", SecretKey: m.Cred.SecretKey}
	for _, tc := range []struct {
		name, key string
		cred      *s3Credentials
		reason    string
		message   string
	}{
		{"missing object", "nothing-here.qcow2", &m.Cred, "S3NotFound", "NoSuchKey"},
		{"wrong secret", "disk.qcow2", &wrongSecret, "S3Unauthorized", "SignatureDoesNotMatch"},
		{"unknown key", "disk.qcow2", &unknownKey, "S3Unauthorized", "InvalidAccessKeyId"},
		{"anonymous", "disk.qcow2", nil, "S3Unauthorized", "anonymous"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := m.options(t, tc.key, tc.cred)
			rep := &recorder{}
			err := Run(context.Background(), o, rep)
			expectFailure(t, err, tc.reason, true)
			if !strings.Contains(err.Error(), tc.message) {
				t.Errorf("error %q does not say %q", err, tc.message)
			}
			if rep.failed != tc.reason {
				t.Errorf("reported failure %q", rep.failed)
			}
			noDisk(t, o)
		})
	}
	t.Run("credentials Secret without secretKey", func(t *testing.T) {
		o := m.options(t, "disk.qcow2", &m.Cred)
		os.Remove(filepath.Join(o.AuthDir, "secretKey"))
		expectFailure(t, Run(context.Background(), o, &recorder{}), "InvalidCredentials", true)
	})
	t.Run("endpoint down", func(t *testing.T) {
		o := m.options(t, "disk.qcow2", &m.Cred)
		o.URL = "http://127.0.0.1:1/b/k"
		expectFailure(t, Run(context.Background(), o, &recorder{}), "DownloadFailed", false)
	})
}

// How S3 error responses the test server cannot produce are classified (AWS's documented
// bodies).
func TestS3Failure(t *testing.T) {
	for _, tc := range []struct {
		status    int
		header    http.Header
		body      string
		reason    string
		permanent bool
		says      string
	}{
		{400, nil, `<Error><Code>AuthorizationHeaderMalformed</Code><Message>the region 'us-east-1' is wrong; expecting 'eu-west-1'</Message><Region>eu-west-1</Region></Error>`,
			"S3WrongRegion", true, "the bucket is in eu-west-1 (set s3.region)"},
		{301, http.Header{"X-Amz-Bucket-Region": {"ap-south-1"}}, `<Error><Code>PermanentRedirect</Code></Error>`, "S3WrongRegion", true, "ap-south-1"},
		{503, nil, `<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>`, "S3Error", false, "SlowDown"},
		{500, nil, `not xml`, "S3Error", false, "500 Internal Server Error"},
		{400, nil, `<Error><Code>InvalidRequest</Code></Error>`, "S3Error", true, "InvalidRequest"},
	} {
		resp := &http.Response{StatusCode: tc.status, Status: fmt.Sprintf("%d %s", tc.status, http.StatusText(tc.status)),
			Header: tc.header, Body: io.NopCloser(strings.NewReader(tc.body))}
		if resp.Header == nil {
			resp.Header = http.Header{}
		}
		err := s3Failure(resp, "s3://b/k at https://s3.example.com", "us-east-1", true)
		expectFailure(t, err, tc.reason, tc.permanent)
		if !strings.Contains(err.Error(), tc.says) {
			t.Errorf("%d: %q does not say %q", tc.status, err, tc.says)
		}
	}
}
