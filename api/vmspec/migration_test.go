package vmspec

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
)

func TestParseMigrationRequest(t *testing.T) {
	target, source, err := NewMigrationCredentials()
	if err != nil {
		t.Fatal(err)
	}
	good, _ := json.Marshal(MigrationRequest{Target: "10.88.0.7:49152", TLS: source, Options: MigrationRequestOptions{AutoConverge: true, AllowPostCopy: true}})
	r, err := ParseMigrationRequest(good)
	if err != nil {
		t.Fatalf("a good request: %v", err)
	}
	if r.Options.BandwidthMiB != DefaultMigrationBandwidthMiB || r.Options.CompletionTimeoutPerGiB != DefaultMigrationCompletionPerGiB ||
		r.Options.ProgressTimeoutSeconds != DefaultMigrationProgressTimeoutSec || !r.Options.AutoConverge || !r.Options.AllowPostCopy {
		t.Errorf("defaults not filled in: %+v", r.Options)
	}
	tlsJSON, _ := json.Marshal(source)
	for name, tc := range map[string]struct{ in, want string }{
		"not JSON":       {`{`, "request: not JSON"},
		"unknown field":  {`{"target":"10.0.0.1:1","tls":` + string(tlsJSON) + `,"uri":"exec:sh"}`, "request.uri: unknown field"},
		"host name":      {`{"target":"evil.example:49152","tls":` + string(tlsJSON) + `}`, `request.target: must be the target pod's IP address, got "evil.example"`},
		"no port":        {`{"target":"10.0.0.1","tls":` + string(tlsJSON) + `}`, "request.target: must be host:port"},
		"unix socket":    {`{"target":"unix:/run/containerd/containerd.sock","tls":` + string(tlsJSON) + `}`, `must be the target pod's IP address, got "unix"`},
		"no tls":         {`{"target":"10.0.0.1:49152"}`, "request.tls: cert, key:"},
		"bad peer":       {`{"target":"10.0.0.1:49152","tls":{"cert":` + jsonString(source.Cert) + `,"key":` + jsonString(source.Key) + `,"peerCert":"x"}}`, "request.tls: peerCert: not a PEM certificate"},
		"wrong key":      {`{"target":"10.0.0.1:49152","tls":{"cert":` + jsonString(source.Cert) + `,"key":` + jsonString(target.Key) + `,"peerCert":` + jsonString(target.Cert) + `}}`, "request.tls: cert, key: tls: private key does not match public key"},
		"bandwidth":      {`{"target":"10.0.0.1:49152","tls":` + string(tlsJSON) + `,"options":{"bandwidthMiB":-1}}`, "request.options.bandwidthMiB: must be between 0 (the default) and"},
		"progress type":  {`{"target":"10.0.0.1:49152","tls":` + string(tlsJSON) + `,"options":{"progressTimeoutSeconds":"1"}}`, "request.options.progressTimeoutSeconds: must be an integer"},
		"trailing":       {string(good) + `{}`, "request: trailing data"},
		"accept in send": {`{"tls":` + string(tlsJSON) + `,"timeoutSeconds":5}`, "request.timeoutSeconds: unknown field"},
		"post-copy type": {`{"target":"10.0.0.1:49152","tls":` + string(tlsJSON) + `,"options":{"allowPostCopy":"yes"}}`, "request.options.allowPostCopy: must be true or false"},
	} {
		if _, err := ParseMigrationRequest([]byte(tc.in)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error containing %q", name, err, tc.want)
		}
	}
}

func jsonString(s string) string { b, _ := json.Marshal(s); return string(b) }

func TestParseMigrationAccept(t *testing.T) {
	target, _, err := NewMigrationCredentials()
	if err != nil {
		t.Fatal(err)
	}
	good, _ := json.Marshal(MigrationAccept{TLS: target, PostCopy: true})
	a, err := ParseMigrationAccept(good)
	if err != nil || a.AcceptTimeout() != DefaultMigrationAcceptTimeout || !a.PostCopy {
		t.Fatalf("a good accept: %+v, %v", a, err)
	}
	bad, _ := json.Marshal(MigrationAccept{TLS: target, TimeoutSeconds: 7200})
	if _, err := ParseMigrationAccept(bad); err == nil || !strings.Contains(err.Error(), "accept.timeoutSeconds: must be between 0 and 3600") {
		t.Errorf("a two-hour wait: %v", err)
	}
	if _, err := ParseMigrationAccept([]byte(`{"tls":{}}`)); err == nil || !strings.Contains(err.Error(), "accept.tls: cert, key") {
		t.Errorf("no credentials: %v", err)
	}
	lent, _ := json.Marshal(MigrationAccept{TLS: target, Attachments: map[string]string{"data": "0b5e1d7c-4f2a-4e8e-9d1a-2c3b4d5e6f70"}})
	if a, err := ParseMigrationAccept(lent); err != nil || a.Attachments["data"] == "" {
		t.Errorf("an attachment pod for disk data: %+v, %v", a.Attachments, err)
	}
	for attachments, want := range map[string]string{
		`{"Data":"uid"}`:       "accept.attachments[Data]: must be a DNS label",
		`{"data":"../../etc"}`: "accept.attachments[data]: must be a pod's UID",
		`{"data":"a b"}`:       "accept.attachments[data]: must be a pod's UID",
	} {
		tls, _ := json.Marshal(target)
		data := fmt.Sprintf(`{"tls":%s,"attachments":%s}`, tls, attachments)
		if _, err := ParseMigrationAccept([]byte(data)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("attachments %s: %v; want %q", attachments, err, want)
		}
	}
}

// The pair NewMigrationCredentials makes lets its two ends, and only them, talk: a third
// party with credentials of its own is refused by either end.
func TestMigrationCredentialsPinThePeer(t *testing.T) {
	target, source, err := NewMigrationCredentials()
	if err != nil {
		t.Fatal(err)
	}
	otherTarget, otherSource, err := NewMigrationCredentials()
	if err != nil {
		t.Fatal(err)
	}
	handshake := func(server, client MigrationTLS) (serverErr, clientErr error) {
		sc, err := server.Config()
		if err != nil {
			t.Fatal(err)
		}
		cc, err := client.Config()
		if err != nil {
			t.Fatal(err)
		}
		// a real TCP connection: net.Pipe's unbuffered writes deadlock a failing handshake
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		b, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		a, err := l.Accept()
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() {
			s := tls.Server(a, sc)
			err := s.Handshake()
			if err == nil {
				_, err = io.WriteString(s, "x")
			}
			_ = s.Close()
			done <- err
		}()
		c := tls.Client(b, cc)
		clientErr = c.Handshake()
		if clientErr == nil {
			_, clientErr = io.ReadFull(c, make([]byte, 1))
		}
		_ = c.Close()
		return <-done, clientErr
	}
	if s, c := handshake(target, source); s != nil || c != nil {
		t.Fatalf("the pair: server %v, client %v", s, c)
	}
	// a source with another migration's credentials: the target refuses it
	if s, _ := handshake(target, otherSource); s == nil {
		t.Error("the target accepted a source it was not told to expect")
	}
	// a server that is not the target: the source refuses it
	if _, c := handshake(otherTarget, source); c == nil {
		t.Error("the source accepted a target it was not told to expect")
	}
	if _, c := handshake(otherTarget, source); c == nil || !strings.Contains(c.Error(), "not the one this migration expects") {
		t.Errorf("the source's refusal of another target: %v, want it to say why", c)
	}
}

// FuzzParseMigrationRequest: the source shim's parser of a migrate exec's stdin (what a
// pods/exec caller sends) never panics, and what it accepts is usable as is: an IP:port
// target, options within bounds with the defaults filled in, credentials that make a TLS
// configuration.
//
// A valid request and accept (fresh credentials) are in testdata/fuzz: seeds made here
// would differ in every fuzzing worker, which stalls Go's fuzzer (1 exec/s).
func FuzzParseMigrationRequest(f *testing.F) {
	for _, s := range [][]byte{[]byte(`{}`), []byte(`null`), []byte(`{"target":"[::1]:1","tls":{}}`),
		[]byte(`{"target":"10.0.0.1:49152","options":{"bandwidthMiB":-1,"downtimeLimitMs":70000}}`)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := ParseMigrationRequest(data)
		if err == nil {
			host, port, serr := net.SplitHostPort(r.Target)
			if serr != nil || net.ParseIP(host) == nil || port == "" {
				t.Fatalf("accepted target %q", r.Target)
			}
			o := r.Options
			if o.BandwidthMiB <= 0 || o.CompletionTimeoutPerGiB <= 0 || o.ProgressTimeoutSeconds <= 0 || o.DowntimeLimitMs < 0 || o.DowntimeLimitMs > 60_000 {
				t.Fatalf("accepted options %+v", o)
			}
			if _, err := r.TLS.Config(); err != nil {
				t.Fatalf("accepted credentials that make no TLS configuration: %v", err)
			}
		}
		a, err := ParseMigrationAccept(data)
		if err == nil {
			if d := a.AcceptTimeout(); d <= 0 || d > maxMigrationAcceptTimeout {
				t.Fatalf("accepted timeout %v", d)
			}
			if _, err := a.TLS.Config(); err != nil {
				t.Fatalf("accepted credentials that make no TLS configuration: %v", err)
			}
		}
	})
}
