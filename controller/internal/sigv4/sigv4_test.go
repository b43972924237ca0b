package sigv4

import (
	"net/http"
	"testing"
	"time"
)

// AWS's published example of a signed GET Object (Amazon S3 API reference, "Signature
// Calculations for the Authorization Header: Transferring Payload in a Single Chunk").
func TestSignKnownAnswer(t *testing.T) {
	req, err := http.NewRequest(http.MethodGet, "https://examplebucket.s3.amazonaws.com/test.txt", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Range", "bytes=0-9")
	cred := Credentials{AccessKeyID: "AKIAIOSFODNN7EXAMPLE", SecretKey: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}
	Sign(req, cred, "us-east-1", "s3", time.Date(2013, 5, 24, 0, 0, 0, 0, time.UTC))
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

func TestURIEncode(t *testing.T) {
	for in, want := range map[string]string{
		"/bucket/a b+c~d_e.f-g": "/bucket/a%20b%2Bc~d_e.f-g",
		"/b/ünï/$&=":            "/b/%C3%BCn%C3%AF/%24%26%3D",
	} {
		if got := uriEncode(in, false); got != want {
			t.Errorf("uriEncode(%q) = %q, want %q", in, got, want)
		}
	}
	if got := uriEncode("a/b", true); got != "a%2Fb" {
		t.Errorf("with slashes encoded: %q", got)
	}
}

// The path sent is the path signed: Go would send a '+' or '=' unescaped.
func TestSignSetsTheSentPath(t *testing.T) {
	req, err := http.NewRequest(http.MethodGet, "http://127.0.0.1:9000/b/a+b=c.img", nil)
	if err != nil {
		t.Fatal(err)
	}
	Sign(req, Credentials{AccessKeyID: "k", SecretKey: "s"}, "us-east-1", "s3", time.Now())
	if got := req.URL.EscapedPath(); got != "/b/a%2Bb%3Dc.img" {
		t.Errorf("the request goes to %q", got)
	}
}
