package importer

import (
	"context"
	"encoding/xml"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"time"

	"github.com/vmpod/vmpod/controller/internal/sigv4"
)

// S3 source, with CDI's addressing: the URL is http(s)://<endpoint>/<bucket>/<object key>
// (path-style, which every S3-compatible server serves), the credentials are a Secret's
// accessKeyId and secretKey, and without them the object is fetched anonymously (a public
// bucket). CDI derives the signing region from the host's first label; that is wrong for
// most S3-compatible endpoints, so vmpod takes the region from an AWS host name
// (s3.<region>.amazonaws.com), else us-east-1 (MinIO's, Ceph RGW's and versitygw's default),
// and lets the DataVolume say it (s3.region).

// defaultS3Region is the signing region of an endpoint that is not AWS's.
const defaultS3Region = "us-east-1"

// awsS3Host matches AWS's regional S3 endpoints: s3.<region>.amazonaws.com,
// s3-<region>.amazonaws.com and s3.dualstack.<region>.amazonaws.com.
var awsS3Host = regexp.MustCompile(`^s3(?:[.-]dualstack)?[.-]([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?$`)

// s3Object is where an S3 URL points.
type s3Object struct {
	Endpoint *url.URL // scheme and host
	Bucket   string
	Key      string
}

// parseS3URL splits http(s)://endpoint/bucket/key.
func parseS3URL(raw string) (s3Object, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return s3Object{}, permanent("InvalidURL", "%s: %w", raw, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" || u.Host == "" {
		return s3Object{}, permanent("InvalidURL", "%s: want http(s)://<endpoint>/<bucket>/<object>", raw)
	}
	if u.RawQuery != "" || u.Fragment != "" || u.User != nil {
		return s3Object{}, permanent("InvalidURL", "%s: an S3 URL has no query, fragment or user info", raw)
	}
	bucket, key, _ := strings.Cut(strings.TrimPrefix(u.Path, "/"), "/")
	if bucket == "" || key == "" {
		return s3Object{}, permanent("InvalidURL", "%s: want http(s)://<endpoint>/<bucket>/<object> (path-style)", raw)
	}
	return s3Object{Endpoint: &url.URL{Scheme: u.Scheme, Host: u.Host}, Bucket: bucket, Key: key}, nil
}

// s3Region is the signing region for host: AWS's from its name, else the default.
func s3Region(host string) string {
	u := url.URL{Host: host}
	if m := awsS3Host.FindStringSubmatch(strings.ToLower(u.Hostname())); m != nil {
		return m[1]
	}
	return defaultS3Region
}

// s3Error is the body of an S3 error response.
type s3Error struct {
	Code    string `xml:"Code"`
	Message string `xml:"Message"`
	Region  string `xml:"Region"`
}

// downloadS3 fetches the object o.URL names into the scratch directory, as downloadHTTP does.
func downloadS3(ctx context.Context, o Options, rep Reporter) (string, error) {
	obj, err := parseS3URL(o.URL)
	if err != nil {
		return "", err
	}
	region := o.S3Region
	if region == "" {
		region = s3Region(obj.Endpoint.Host)
	}
	client, err := httpClient(o.CADir)
	if err != nil {
		return "", err
	}
	u := *obj.Endpoint
	u.Path = "/" + obj.Bucket + "/" + obj.Key
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return "", permanent("InvalidURL", "%s: %w", o.URL, err)
	}
	what := "s3://" + obj.Bucket + "/" + obj.Key + " at " + obj.Endpoint.String()
	signed := o.AuthDir != ""
	if signed {
		user, pass, err := readAuth(o.AuthDir)
		if err != nil {
			return "", err
		}
		sigv4.Sign(req, sigv4.Credentials{AccessKeyID: user, SecretKey: pass}, region, "s3", time.Now())
	}
	resp, err := client.Do(req)
	if err != nil {
		return "", transient("DownloadFailed", "GET %s: %w", what, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return "", s3Failure(resp, what, region, signed)
	}
	slog.Info("downloading", "object", what, "region", region, "signed", signed, "bytes", resp.ContentLength)
	return saveVerified(ctx, o, rep, resp.Body, resp.ContentLength, "downloading "+what)
}

// s3Failure maps an S3 error response to an import error: missing objects and refused
// credentials fail the import, throttling and server errors are retried.
func s3Failure(resp *http.Response, what, region string, signed bool) error {
	var e s3Error
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if xml.Unmarshal(body, &e) != nil || e.Code == "" {
		e.Code = resp.Status
	}
	msg := e.Code
	if e.Message != "" {
		msg += ": " + e.Message
	}
	auth := "anonymous"
	if signed {
		auth = "signed for region " + region
	}
	switch {
	case resp.StatusCode == http.StatusNotFound:
		return permanent("S3NotFound", "GET %s: %s", what, msg)
	case resp.StatusCode == http.StatusForbidden || resp.StatusCode == http.StatusUnauthorized:
		return permanent("S3Unauthorized", "GET %s (%s): %s", what, auth, msg)
	case e.Code == "AuthorizationHeaderMalformed" || e.Code == "PermanentRedirect" || resp.StatusCode == http.StatusMovedPermanently:
		hint := ""
		if e.Region != "" || resp.Header.Get("X-Amz-Bucket-Region") != "" {
			hint = "; the bucket is in " + e.Region + resp.Header.Get("X-Amz-Bucket-Region") + " (set s3.region)"
		}
		return permanent("S3WrongRegion", "GET %s (%s): %s%s", what, auth, msg, hint)
	case resp.StatusCode >= 500 || resp.StatusCode == http.StatusTooManyRequests || e.Code == "SlowDown":
		return transient("S3Error", "GET %s: %s", what, msg)
	}
	return permanent("S3Error", "GET %s (%s): %s", what, auth, msg)
}
