package vmspec

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"maps"
	"math/big"
	"net"
	"reflect"
	"slices"
	"strconv"
	"time"
)

// The execs that move a running VM pod's guest into another VM pod (issue 12,
// docs/design/209), answered by the shims in the compute containers as PauseCommand is
// (authorized as any exec: pods/exec). Their argument is JSON on the exec's stdin, never
// on the command line: it carries a private key.
//
//	target pod: vmpod.dev/migrate-accept  < MigrationAccept   prints MigrationListening
//	source pod: vmpod.dev/migrate         < MigrationRequest  prints MigrationProgress lines
//	source pod: vmpod.dev/migrate-cancel                      ends a migration in flight
//
// The target is a pod rendered from the same VM spec with Migration.Role target: its QEMU
// waits for the guest instead of booting. The source's shim dials the target pod's
// MigrationPort from the source pod's network namespace; each end proves itself with the
// certificate the other was told to expect (MigrationTLS).
const (
	MigrateAcceptCommand = "vmpod.dev/migrate-accept"
	MigrateCommand       = "vmpod.dev/migrate"
	MigrateCancelCommand = "vmpod.dev/migrate-cancel"

	// MigrationPort is the TCP port a target pod receives its guest on, in the pod's network
	// namespace. A masquerade binding never forwards it to the guest (KubeVirt reserves
	// 49152 and 49153 the same way), so a guest's own service cannot take it.
	MigrationPort = 49152

	// MigratedReason starts the termination message of a source pod's compute container
	// whose guest moved away: its exit status is 0.
	MigratedReason = "Migrated"
	// MigrationFailedReason starts the termination message of a target pod's compute
	// container whose guest never arrived: its exit status is 1.
	MigrationFailedReason = "MigrationFailed"
)

// MigrationTLS is one end's credentials for a migration's connections: its own certificate
// and key, and the one certificate it accepts from the other end (pinned: no CA, no names).
// NewMigrationCredentials makes a matching pair.
type MigrationTLS struct {
	Cert     string `json:"cert"`     // PEM
	Key      string `json:"key"`      // PEM, PKCS#8
	PeerCert string `json:"peerCert"` // PEM
}

// MigrationAccept is MigrateAcceptCommand's stdin.
type MigrationAccept struct {
	TLS MigrationTLS `json:"tls"`
	// TimeoutSeconds is how long the target waits for the source to connect; the target
	// pod fails after it (0: DefaultMigrationAcceptTimeout).
	TimeoutSeconds int `json:"timeoutSeconds,omitempty"`
	// PostCopy readies the target for a migration the source may switch to post-copy
	// (MigrationRequestOptions.AllowPostCopy, which must match): its QEMU handles the
	// guest's faults on pages not yet sent. A node that cannot (QEMU as a user of its own
	// without vm.unprivileged_userfaultfd) refuses before the source connects.
	PostCopy bool `json:"postCopy,omitempty"`
	// Attachments are the pods on the target's node that lend the target pod the volumes
	// of the guest's hot-plugged disks, by disk name (HotplugDisk.AttachmentPod's UIDs):
	// the source's attachment pods are on the source's node. A hot-plugged disk the
	// source took from an attachment pod needs one here; one the source's compute
	// container mounts comes from the target's.
	Attachments map[string]string `json:"attachments,omitempty"`
}

// MigrationListening is MigrateAcceptCommand's output: where the source is to connect.
type MigrationListening struct {
	// Address is host:port: a VM pod's IP and MigrationPort; for a container pod, whose IP
	// is its guest's, its node's address and a port of its own (docs/design/212)
	Address string `json:"address"`
}

// MigrationRequest is MigrateCommand's stdin.
type MigrationRequest struct {
	// Target is the target pod's address, as its MigrationListening said.
	Target  string                  `json:"target"`
	TLS     MigrationTLS            `json:"tls"`
	Options MigrationRequestOptions `json:"options"`
}

// MigrationRequestOptions tune a migration, in KubeVirt's MigrationPolicy terms. Zero
// values take the defaults below.
type MigrationRequestOptions struct {
	// BandwidthMiB caps the stream in MiB/s (KubeVirt's default: 64).
	BandwidthMiB int `json:"bandwidthMiB,omitempty"`
	// DowntimeLimitMs is the longest the guest may stop for the final copy (QEMU: 300).
	DowntimeLimitMs int `json:"downtimeLimitMs,omitempty"`
	// AutoConverge throttles a guest that dirties memory faster than it is sent.
	AutoConverge bool `json:"autoConverge,omitempty"`
	// CompletionTimeoutPerGiB bounds the migration at this many seconds per GiB of guest
	// memory (KubeVirt's default: 800).
	CompletionTimeoutPerGiB int `json:"completionTimeoutPerGiB,omitempty"`
	// ProgressTimeoutSeconds cancels a migration whose remaining bytes have not dropped for
	// this long (KubeVirt's default: 150).
	ProgressTimeoutSeconds int `json:"progressTimeoutSeconds,omitempty"`
	// AllowPostCopy switches a migration that hits either timeout to post-copy instead of
	// cancelling it (KubeVirt's default: false): the guest runs on in the target pod at
	// once, which fetches the pages not yet sent as the guest touches them. From then on
	// the migration cannot be cancelled, and if the stream breaks the guest is lost. The
	// target must have been readied for it (MigrationAccept.PostCopy).
	AllowPostCopy bool `json:"allowPostCopy,omitempty"`
}

// KubeVirt's migration defaults, which a zero MigrationRequestOptions field takes.
const (
	DefaultMigrationBandwidthMiB       = 64
	DefaultMigrationCompletionPerGiB   = 800
	DefaultMigrationProgressTimeoutSec = 150
	DefaultMigrationAcceptTimeout      = 5 * time.Minute
	maxMigrationAcceptTimeout          = time.Hour
)

// MigrationCancelled is MigrateCancelCommand's output: where the guest is once the
// migration in flight (if any) has ended. A cancel that came too late finds the guest
// moved: the caller must then treat the migration as done, not delete its target.
type MigrationCancelled struct {
	// GuestMoved: the guest left for MovedTo (a migration completed, this one or before).
	GuestMoved bool   `json:"guestMoved"`
	MovedTo    string `json:"movedTo,omitempty"`
	// WasInFlight: a migration was running and has now ended.
	WasInFlight bool `json:"wasInFlight"`
}

// MigrationProgress is one line of MigrateCommand's output: a reading of QEMU's account of
// the migration, the last one its outcome.
type MigrationProgress struct {
	Status           string `json:"status"`
	TotalBytes       uint64 `json:"totalBytes,omitempty"` // the guest's RAM
	TransferredBytes uint64 `json:"transferredBytes,omitempty"`
	RemainingBytes   uint64 `json:"remainingBytes,omitempty"`
	DirtyPagesRate   uint64 `json:"dirtyPagesRate,omitempty"` // pages per second
	ElapsedMs        int64  `json:"elapsedMs,omitempty"`
	DowntimeMs       int64  `json:"downtimeMs,omitempty"` // QEMU's figure, once completed
	Error            string `json:"error,omitempty"`
}

// Migratable says why a VM of this spec cannot move to another pod, naming each field, or
// nil. What only the running VM knows (hot-plugged devices, a pause) its shim
// checks as well.
func (vm *VM) Migratable() error {
	var errs []error
	for i, d := range vm.Disks {
		switch d.Source {
		case SourceImage:
			errs = append(errs, fmt.Errorf("disks[%d] (%s): a containerDisk's writable overlay is on its node only", i, d.Name))
		case SourceEmpty:
			errs = append(errs, fmt.Errorf("disks[%d] (%s): an empty disk lives in the compute container's scratch space on its node", i, d.Name))
		}
	}
	for i, iface := range vm.Interfaces {
		switch {
		case iface.Binding != BindingMasquerade:
			errs = append(errs, fmt.Errorf("interfaces[%d] (%s): the %s binding gives the guest the pod's IP, which the target pod does not have (masquerade keeps the guest's address)", i, iface.Name, iface.Binding))
		case iface.MACAddress == "" && vm.UUID == "":
			errs = append(errs, fmt.Errorf("interfaces[%d] (%s): the guest's MAC would change (the spec has neither macAddress nor uuid)", i, iface.Name))
		}
	}
	if n := len(vm.GPUs) + len(vm.HostDevices); n > 0 {
		errs = append(errs, fmt.Errorf("gpus/hostDevices: %d passed-through PCI devices carry no migratable state", n))
	}
	return errors.Join(errs...)
}

// ParseMigrationAccept decodes and checks a MigrateAcceptCommand's stdin. Errors name the
// field.
func ParseMigrationAccept(data []byte) (MigrationAccept, error) {
	var a MigrationAccept
	if err := decodeStrict(data, &a, "accept"); err != nil {
		return a, err
	}
	v := &validator{}
	a.TLS.validate(v, "accept.tls")
	if a.TimeoutSeconds < 0 || time.Duration(a.TimeoutSeconds)*time.Second > maxMigrationAcceptTimeout {
		v.add("accept.timeoutSeconds", "must be between 0 and %d, got %d", int(maxMigrationAcceptTimeout.Seconds()), a.TimeoutSeconds)
	}
	for _, disk := range slices.Sorted(maps.Keys(a.Attachments)) {
		field := "accept.attachments[" + disk + "]"
		if v.label(field, disk) {
			v.podUID(field, a.Attachments[disk])
		}
	}
	return a, errors.Join(v.errs...)
}

// AcceptTimeout is how long the target waits for the source.
func (a MigrationAccept) AcceptTimeout() time.Duration {
	if a.TimeoutSeconds == 0 {
		return DefaultMigrationAcceptTimeout
	}
	return time.Duration(a.TimeoutSeconds) * time.Second
}

// ParseMigrationRequest decodes and checks a MigrateCommand's stdin, filling in the
// defaults. Errors name the field.
func ParseMigrationRequest(data []byte) (MigrationRequest, error) {
	var r MigrationRequest
	if err := decodeStrict(data, &r, "request"); err != nil {
		return r, err
	}
	v := &validator{}
	if host, port, err := net.SplitHostPort(r.Target); err != nil {
		v.add("request.target", "must be host:port (the target pod's migrate-accept output), got %q", r.Target)
	} else if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() || ip.IsMulticast() {
		v.add("request.target", "must be the target pod's IP address, got %q", host)
	} else if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		v.add("request.target", "port must be between 1 and 65535, got %q", port)
	}
	r.TLS.validate(v, "request.tls")
	o := &r.Options
	for _, f := range []struct {
		path string
		val  *int
		def  int
		max  int
	}{
		{"request.options.bandwidthMiB", &o.BandwidthMiB, DefaultMigrationBandwidthMiB, 1 << 20},
		{"request.options.downtimeLimitMs", &o.DowntimeLimitMs, 0, 60_000},
		{"request.options.completionTimeoutPerGiB", &o.CompletionTimeoutPerGiB, DefaultMigrationCompletionPerGiB, 86_400},
		{"request.options.progressTimeoutSeconds", &o.ProgressTimeoutSeconds, DefaultMigrationProgressTimeoutSec, 86_400},
	} {
		switch {
		case *f.val < 0 || *f.val > f.max:
			v.add(f.path, "must be between 0 (the default) and %d, got %d", f.max, *f.val)
		case *f.val == 0:
			*f.val = f.def
		}
	}
	return r, errors.Join(v.errs...)
}

func (t MigrationTLS) validate(v *validator, at string) {
	if _, err := t.Config(); err != nil {
		v.add(at, "%v", err)
	}
}

// Config is a TLS configuration that presents t's certificate and accepts only t's peer
// certificate, for either end (the server asks the client for its certificate).
func (t MigrationTLS) Config() (*tls.Config, error) {
	pair, err := tls.X509KeyPair([]byte(t.Cert), []byte(t.Key))
	if err != nil {
		return nil, fmt.Errorf("cert, key: %w", err)
	}
	block, _ := pem.Decode([]byte(t.PeerCert))
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, errors.New("peerCert: not a PEM certificate")
	}
	if _, err := x509.ParseCertificate(block.Bytes); err != nil {
		return nil, fmt.Errorf("peerCert: %w", err)
	}
	peer := block.Bytes
	pinned := func(raw [][]byte, _ [][]*x509.Certificate) error {
		if len(raw) == 0 || !bytes.Equal(raw[0], peer) {
			return errors.New("vmpod migration: the peer's certificate is not the one this migration expects")
		}
		return nil
	}
	return &tls.Config{
		Certificates: []tls.Certificate{pair},
		MinVersion:   tls.VersionTLS13,
		// no CA and no names: the one certificate the controller handed this end for its peer
		// is the whole of the verification, done by VerifyPeerCertificate
		InsecureSkipVerify:    true,
		ClientAuth:            tls.RequireAnyClientCert,
		VerifyPeerCertificate: pinned,
	}, nil
}

// NewMigrationCredentials makes a fresh key pair for each end of one migration and gives
// each end the other's certificate to pin: the target's and the source's MigrationTLS.
func NewMigrationCredentials() (target, source MigrationTLS, err error) {
	tc, tk, err := selfSigned("vmpod migration target")
	if err != nil {
		return target, source, err
	}
	sc, sk, err := selfSigned("vmpod migration source")
	if err != nil {
		return target, source, err
	}
	return MigrationTLS{Cert: tc, Key: tk, PeerCert: sc}, MigrationTLS{Cert: sc, Key: sk, PeerCert: tc}, nil
}

// migrationCertLifetime bounds a migration's certificates; the pins end with the
// migration anyway.
const migrationCertLifetime = 24 * time.Hour

func selfSigned(name string) (certPEM, keyPEM string, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", "", fmt.Errorf("migration credentials: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return "", "", fmt.Errorf("migration credentials: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{SerialNumber: serial, Subject: pkix.Name{CommonName: name},
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(migrationCertLifetime),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return "", "", fmt.Errorf("migration credentials: %w", err)
	}
	pk, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return "", "", fmt.Errorf("migration credentials: %w", err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})),
		string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: pk})), nil
}

// decodeStrict decodes one JSON object into out, reporting unknown fields and wrong types
// by their path under at.
func decodeStrict(data []byte, out any, at string) error {
	var raw any
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	if err := dec.Decode(&raw); err != nil {
		return fmt.Errorf("%s: not JSON: %w", at, err)
	}
	if dec.More() {
		return fmt.Errorf("%s: trailing data after the JSON object", at)
	}
	if err := checkShape(raw, reflect.TypeOf(out), at); err != nil {
		return err
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("%s: %w", at, err)
	}
	return nil
}
