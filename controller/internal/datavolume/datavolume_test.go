package datavolume_test

// These tests run the real manager against a real kube-apiserver and etcd (envtest). envtest
// has no kubelet and no Job controller, so the test runs the importer itself: the real
// vmpod-importer binary, with the arguments and environment of the Job the controller made,
// authenticated as the Job's ServiceAccount, writing into a directory that stands for the PVC.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
	"github.com/vmpod/vmpod/controller/internal/datavolume"
	"github.com/vmpod/vmpod/controller/internal/s3test"
	"github.com/vmpod/vmpod/controller/internal/sigv4"
	"github.com/vmpod/vmpod/controller/internal/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

const (
	timeout = 30 * time.Second
	mib     = 1 << 20
)

type fixture struct {
	t   *testing.T
	env *testenv.Env
	c   client.Client
	ns  string
	ctx context.Context
}

func setup(t *testing.T) *fixture {
	env := testenv.Get(t)
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img is not installed (hack/install-deps.sh installs qemu-utils)")
	}
	ns := env.Namespace(t)
	env.StartManager(t, ns, nil)
	return &fixture{t: t, env: env, c: env.Client, ns: ns, ctx: context.Background()}
}

// image is a 4 MiB raw disk with recognisable data, and the qcow2 the real qemu-img makes of it.
func image(t *testing.T) (raw, qcow2 []byte) {
	t.Helper()
	dir := t.TempDir()
	raw = make([]byte, 4*mib)
	copy(raw, "vmpod envtest disk")
	copy(raw[2*mib:], bytes.Repeat([]byte{0x5a}, 4096))
	if err := os.WriteFile(filepath.Join(dir, "d.raw"), raw, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("qemu-img", "convert", "-f", "raw", "-O", "qcow2", filepath.Join(dir, "d.raw"), filepath.Join(dir, "d.qcow2")).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert: %v: %s", err, out)
	}
	qcow2, err := os.ReadFile(filepath.Join(dir, "d.qcow2"))
	if err != nil {
		t.Fatal(err)
	}
	return raw, qcow2
}

// slowServer serves files on loopback in 20 pieces over ~2 s, so progress can be seen.
func slowServer(t *testing.T, files map[string][]byte) string {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, ok := files[r.URL.Path]
		if !ok {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(b)))
		piece := len(b)/20 + 1
		for off := 0; off < len(b); off += piece {
			w.Write(b[off:min(off+piece, len(b))])
			w.(http.Flusher).Flush()
			time.Sleep(100 * time.Millisecond)
		}
	}))
	t.Cleanup(srv.Close)
	return srv.URL
}

func sha(b []byte) string { s := sha256.Sum256(b); return "sha256:" + hex.EncodeToString(s[:]) }

func (f *fixture) dataVolume(name string, src vmpodv1.DataVolumeSource) *vmpodv1.DataVolume {
	f.t.Helper()
	dv := &vmpodv1.DataVolume{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: f.ns},
		Spec: vmpodv1.DataVolumeSpec{Source: src, Storage: vmpodv1.StorageSpec{
			Resources: corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{"storage": resource.MustParse("64Mi")}}}},
	}
	if err := f.c.Create(f.ctx, dv); err != nil {
		f.t.Fatalf("create DataVolume %s: %v", name, err)
	}
	return dv
}

func (f *fixture) get(name string, o client.Object) error {
	return f.c.Get(f.ctx, types.NamespacedName{Namespace: f.ns, Name: name}, o)
}

func (f *fixture) dv(name string) *vmpodv1.DataVolume {
	f.t.Helper()
	dv := &vmpodv1.DataVolume{}
	if err := f.get(name, dv); err != nil {
		f.t.Fatalf("get DataVolume: %v", err)
	}
	return dv
}

func (f *fixture) waitPhase(name string, phase vmpodv1.DataVolumePhase) *vmpodv1.DataVolume {
	f.t.Helper()
	var dv *vmpodv1.DataVolume
	testenv.Eventually(f.t, timeout, fmt.Sprintf("DataVolume %s %s", name, phase), func() (bool, string) {
		dv = f.dv(name)
		return dv.Status.Phase == phase, describe(dv)
	})
	return dv
}

func describe(dv *vmpodv1.DataVolume) string {
	s := fmt.Sprintf("%s %s", dv.Status.Phase, dv.Status.Progress)
	for _, c := range dv.Status.Conditions {
		s += fmt.Sprintf(" %s=%s(%s: %s)", c.Type, c.Status, c.Reason, c.Message)
	}
	return s
}

// job waits for the DataVolume's worker Job.
func (f *fixture) job(dv *vmpodv1.DataVolume) *batchv1.Job {
	f.t.Helper()
	job := &batchv1.Job{}
	testenv.Eventually(f.t, timeout, "the importer Job", func() (bool, string) {
		err := f.get(datavolume.WorkerName(dv), job)
		return err == nil, fmt.Sprint(err)
	})
	return job
}

// paths stand for the worker pod's volumes.
type paths struct{ dest, scratch, source, auth string }

// runImporter runs the real vmpod-importer as the kubelet would run the Job's container:
// its args (volume paths mapped to test directories), its env (the downward API's
// namespace filled in) and its ServiceAccount's token. It returns the exit code.
func (f *fixture) runImporter(job *batchv1.Job, p paths, extra ...string) int {
	f.t.Helper()
	bin := f.env.Binary(f.t, "./cmd/vmpod-importer")
	c := job.Spec.Template.Spec.Containers[0]
	var args []string
	for _, a := range c.Args {
		switch {
		case strings.HasPrefix(a, "--dest="):
			a = "--dest=" + p.dest
		case strings.HasPrefix(a, "--scratch="):
			a = "--scratch=" + p.scratch
		case strings.HasPrefix(a, "--source-path="):
			a = "--source-path=" + p.source
		case strings.HasPrefix(a, "--auth-dir="):
			a = "--auth-dir=" + p.auth // the Secret's volume
		}
		args = append(args, a)
	}
	kubeconfig := f.env.ServiceAccountKubeconfig(f.t, f.ns, job.Spec.Template.Spec.ServiceAccountName)
	args = append(append(args, "--kubeconfig="+kubeconfig, "--progress-interval=100ms"), extra...)
	cmd := exec.Command(bin, args...)
	cmd.Env = os.Environ()
	for _, e := range c.Env {
		v := e.Value
		if e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "metadata.namespace" {
			v = f.ns
		}
		cmd.Env = append(cmd.Env, e.Name+"="+v)
	}
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ee):
		f.t.Logf("vmpod-importer exited %d:\n%s", ee.ExitCode(), out)
		return ee.ExitCode()
	}
	f.t.Fatalf("run vmpod-importer: %v\n%s", err, out)
	return -1
}

func TestHTTPImportQcow2(t *testing.T) {
	f := setup(t)
	raw, qcow2 := image(t)
	url := slowServer(t, map[string][]byte{"/cirros.qcow2": qcow2})
	dv := f.dataVolume("cirros", vmpodv1.DataVolumeSource{HTTP: &vmpodv1.HTTPSource{
		URL: url + "/cirros.qcow2", Checksum: sha(qcow2), ExtraHeaders: []string{"X-Trace: envtest"}}})

	// the controller makes the PVC and the Job, and the Job's identity
	pvc := &corev1.PersistentVolumeClaim{}
	testenv.Eventually(t, timeout, "the PVC", func() (bool, string) { err := f.get("cirros", pvc); return err == nil, fmt.Sprint(err) })
	if ref := metav1.GetControllerOf(pvc); ref == nil || ref.Kind != "DataVolume" || ref.Name != "cirros" {
		t.Errorf("PVC owner = %+v", ref)
	}
	if got := pvc.Spec.Resources.Requests[corev1.ResourceStorage]; got.Cmp(resource.MustParse("64Mi")) != 0 {
		t.Errorf("PVC size %s", got.String())
	}
	job := f.job(dv)
	args := strings.Join(job.Spec.Template.Spec.Containers[0].Args, " ")
	for _, want := range []string{"--source=http", "--url=" + url + "/cirros.qcow2", "--checksum=" + sha(qcow2), "--header=X-Trace: envtest",
		"--dest=/vmpod/data", "--dest-mode=filesystem", "--size=67108864"} {
		if !strings.Contains(args, want) {
			t.Errorf("Job args %q lack %q", args, want)
		}
	}
	// the importer runs where VMs can: the RuntimeClass's node selector (a WaitForFirstConsumer
	// volume binds on the importer's node)
	if ns := job.Spec.Template.Spec.NodeSelector; ns["vmpod.dev/runtime"] != "true" {
		t.Errorf("importer nodeSelector = %v, want the vmpod RuntimeClass's", ns)
	}
	if p := job.Spec.PodFailurePolicy; p == nil || p.Rules[0].OnExitCodes.Values[0] != 2 {
		t.Errorf("podFailurePolicy = %+v, want FailJob on exit 2", p)
	}
	role := &rbacv1.Role{}
	if err := f.get(job.Name, role); err != nil || len(role.Rules) != 1 || role.Rules[0].ResourceNames[0] != "cirros" {
		t.Errorf("importer Role = %+v (%v), want get/patch on PVC cirros only", role.Rules, err)
	}
	f.waitPhase("cirros", vmpodv1.PhaseImportScheduled)

	// run the importer; meanwhile its progress must reach the DataVolume
	dest := t.TempDir()
	done := make(chan int, 1)
	go func() { done <- f.runImporter(job, paths{dest: dest, scratch: t.TempDir()}) }()
	testenv.Eventually(t, timeout, "progress between 0 and 100% in the DataVolume", func() (bool, string) {
		d := f.dv("cirros")
		pct, err := strconv.ParseFloat(strings.TrimSuffix(d.Status.Progress, "%"), 64)
		return d.Status.Phase == vmpodv1.PhaseImportInProgress && err == nil && pct > 0 && pct < 100, describe(d)
	})
	if code := <-done; code != 0 {
		t.Fatalf("importer exit code %d", code)
	}

	got := f.waitPhase("cirros", vmpodv1.PhaseSucceeded)
	if got.Status.Progress != "100.00%" || got.Status.ClaimName != "cirros" {
		t.Errorf("status = %+v", got.Status)
	}
	if c := meta.FindStatusCondition(got.Status.Conditions, vmpodv1.DVReady); c == nil || c.Status != metav1.ConditionTrue {
		t.Errorf("Ready = %+v", c)
	}
	disk, err := os.ReadFile(filepath.Join(dest, "disk.img"))
	if err != nil {
		t.Fatalf("the PVC has no disk.img: %v", err)
	}
	if !bytes.Equal(disk[:len(raw)], raw) {
		t.Errorf("disk.img does not hold the qcow2's data")
	}
	// the test's "PVC" is a directory on a big filesystem: the image is sized to the
	// PVC's request less the filesystem overhead
	if want := diskSize(64 * mib); int64(len(disk)) != want {
		t.Errorf("disk.img is %d bytes, want %d", len(disk), want)
	}
	testenv.Eventually(t, timeout, "the finished Job to be deleted", func() (bool, string) {
		return apierrors.IsNotFound(f.get(job.Name, &batchv1.Job{})), "still there"
	})
}

func TestImportFailures(t *testing.T) {
	f := setup(t)
	_, qcow2 := image(t)
	url := slowServer(t, map[string][]byte{"/disk.qcow2": qcow2, "/truncated.qcow2": qcow2[:len(qcow2)/2]})
	for _, tc := range []struct {
		name, path, checksum, reason string
	}{
		{"checksum", "/disk.qcow2", sha([]byte("something else")), "ChecksumMismatch"},
		{"notfound", "/gone.qcow2", "", "HTTPNotFound"},
		{"corrupt", "/truncated.qcow2", "", "InvalidImage"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dv := f.dataVolume(tc.name, vmpodv1.DataVolumeSource{HTTP: &vmpodv1.HTTPSource{URL: url + tc.path, Checksum: tc.checksum}})
			dest := t.TempDir()
			if code := f.runImporter(f.job(dv), paths{dest: dest, scratch: t.TempDir()}); code != 2 {
				t.Errorf("importer exit code %d, want 2 (permanent: the Job fails at once)", code)
			}
			got := f.waitPhase(tc.name, vmpodv1.PhaseFailed)
			c := meta.FindStatusCondition(got.Status.Conditions, vmpodv1.DVReady)
			if c == nil || c.Status != metav1.ConditionFalse || c.Reason != tc.reason {
				t.Errorf("Ready = %+v, want False with reason %s", c, tc.reason)
			}
			if entries, _ := os.ReadDir(dest); len(entries) != 0 {
				t.Errorf("a failed import left %d files in the PVC", len(entries))
			}
			pvc := &corev1.PersistentVolumeClaim{}
			if err := f.get(tc.name, pvc); err != nil || pvc.Annotations[vmpodv1.ImportPhaseAnnotation] != "Failed" {
				t.Errorf("PVC import phase %q (%v), want Failed", pvc.Annotations[vmpodv1.ImportPhaseAnnotation], err)
			}
		})
	}
}

// An S3 DataVolume's Job: the importer signs with the Secret's keys, mounted where --auth-dir
// says, and trusts the ConfigMap's CAs. (The download itself is the importer's own test,
// against a real S3 server.)
func TestS3ImportJob(t *testing.T) {
	f := setup(t)
	const url = "https://s3.eu-west-1.amazonaws.com/images/fedora.qcow2.xz"
	checksum := sha([]byte("fedora"))
	dv := f.dataVolume("fedora", vmpodv1.DataVolumeSource{S3: &vmpodv1.S3Source{
		URL: url, SecretRef: "s3-keys", CertConfigMap: "s3-ca", Region: "eu-west-1", Checksum: checksum}})
	job := f.job(dv)
	pod := job.Spec.Template.Spec
	args := strings.Join(pod.Containers[0].Args, " ")
	for _, want := range []string{"--source=s3", "--url=" + url, "--s3-region=eu-west-1", "--checksum=" + checksum,
		"--auth-dir=/vmpod/auth", "--ca-dir=/vmpod/ca"} {
		if !strings.Contains(args, want) {
			t.Errorf("Job args %q lack %q", args, want)
		}
	}
	volumes := map[string]corev1.VolumeSource{}
	for _, v := range pod.Volumes {
		volumes[v.Name] = v.VolumeSource
	}
	if s := volumes["auth"].Secret; s == nil || s.SecretName != "s3-keys" {
		t.Errorf("auth volume = %+v, want Secret s3-keys", volumes["auth"])
	}
	if c := volumes["ca"].ConfigMap; c == nil || c.Name != "s3-ca" {
		t.Errorf("ca volume = %+v, want ConfigMap s3-ca", volumes["ca"])
	}
	f.waitPhase("fedora", vmpodv1.PhaseImportScheduled)
}

// An upload DataVolume: UploadScheduled, then UploadReady once its importer listens; a refused
// upload leaves it UploadReady, a good one completes it.
func TestUpload(t *testing.T) {
	f := setup(t)
	raw, qcow2 := image(t)
	dv := f.dataVolume("uploaded", vmpodv1.DataVolumeSource{Upload: &vmpodv1.UploadSource{}})
	job := f.job(dv)
	args := strings.Join(job.Spec.Template.Spec.Containers[0].Args, " ")
	if !strings.Contains(args, "--source=upload") || !strings.Contains(args, fmt.Sprintf("--listen=127.0.0.1:%d", vmpodv1.UploadPort)) {
		t.Errorf("Job args %q: want an upload on the pod's loopback port %d", args, vmpodv1.UploadPort)
	}
	f.waitPhase("uploaded", vmpodv1.PhaseUploadScheduled)

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	dest := t.TempDir()
	done := make(chan int, 1)
	go func() { done <- f.runImporter(job, paths{dest: dest, scratch: t.TempDir()}, "--listen="+addr) }()
	f.waitPhase("uploaded", vmpodv1.PhaseUploadReady)

	put := func(body []byte) int {
		req, err := http.NewRequest(http.MethodPut, "http://"+addr+vmpodv1.UploadPath, bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := put(qcow2[:len(qcow2)/2]); code != http.StatusBadRequest {
		t.Errorf("a truncated qcow2: %d, want 400", code)
	}
	testenv.Eventually(t, timeout, "UploadReady saying the upload was refused", func() (bool, string) {
		d := f.dv("uploaded")
		c := meta.FindStatusCondition(d.Status.Conditions, vmpodv1.DVRunning)
		return d.Status.Phase == vmpodv1.PhaseUploadReady && c != nil && strings.Contains(c.Message, "upload refused (InvalidImage"), describe(d)
	})
	if code := put(qcow2); code != http.StatusOK {
		t.Fatalf("the qcow2: %d, want 200", code)
	}
	if code := <-done; code != 0 {
		t.Fatalf("importer exit code %d", code)
	}
	f.waitPhase("uploaded", vmpodv1.PhaseSucceeded)
	disk, err := os.ReadFile(filepath.Join(dest, "disk.img"))
	if err != nil || !bytes.Equal(disk[:len(raw)], raw) {
		t.Errorf("disk.img does not hold the uploaded image (%v)", err)
	}
}

// An S3 DataVolume imported by the real importer, with the Job's args, from a real S3 server
// that checks the request's signature: with the Secret's keys it succeeds, with a key the
// server does not know it fails with the reason.
func TestS3Import(t *testing.T) {
	f := setup(t)
	raw, qcow2 := image(t)
	m := s3test.Start(t, map[string][]byte{"images/disk.qcow2": qcow2})
	for _, tc := range []struct {
		name   string
		cred   sigv4.Credentials
		code   int
		phase  vmpodv1.DataVolumePhase
		reason string
	}{
		{"signed", m.Cred, 0, vmpodv1.PhaseSucceeded, ""},
		{"unknown-key", sigv4.Credentials{AccessKeyID: "AKIAIOSFODNN7EXAMPLE", SecretKey: "x"}, 2, vmpodv1.PhaseFailed, "S3Unauthorized"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dv := f.dataVolume(tc.name, vmpodv1.DataVolumeSource{S3: &vmpodv1.S3Source{URL: m.ObjectURL("images/disk.qcow2"), SecretRef: "s3-keys"}})
			dest := t.TempDir()
			if code := f.runImporter(f.job(dv), paths{dest: dest, scratch: t.TempDir(), auth: s3test.WriteCredentials(t, tc.cred)}); code != tc.code {
				t.Errorf("importer exit code %d, want %d", code, tc.code)
			}
			got := f.waitPhase(tc.name, tc.phase)
			if tc.reason != "" {
				if c := meta.FindStatusCondition(got.Status.Conditions, vmpodv1.DVReady); c == nil || c.Reason != tc.reason {
					t.Errorf("Ready = %+v, want reason %s", c, tc.reason)
				}
				return
			}
			disk, err := os.ReadFile(filepath.Join(dest, "disk.img"))
			if err != nil || !bytes.Equal(disk[:len(raw)], raw) {
				t.Errorf("disk.img does not hold the object's image (%v)", err)
			}
		})
	}
}

func TestCloneAndBlank(t *testing.T) {
	f := setup(t)
	// the clone's source is itself a DataVolume still being filled
	blank := f.dataVolume("blank", vmpodv1.DataVolumeSource{Blank: &vmpodv1.BlankSource{}})
	clone := f.dataVolume("clone", vmpodv1.DataVolumeSource{PVC: &vmpodv1.PVCSource{Name: "blank"}})
	testenv.Eventually(t, timeout, "the clone to wait for its source", func() (bool, string) {
		d := f.dv("clone")
		c := meta.FindStatusCondition(d.Status.Conditions, vmpodv1.DVRunning)
		return d.Status.Phase == vmpodv1.PhaseCloneScheduled && c != nil && c.Reason == "SourceNotReady", describe(d)
	})
	if err := f.get(datavolume.WorkerName(clone), &batchv1.Job{}); !apierrors.IsNotFound(err) {
		t.Fatalf("a clone Job exists before its source is complete (%v)", err)
	}

	src := t.TempDir()
	if code := f.runImporter(f.job(blank), paths{dest: src}); code != 0 {
		t.Fatalf("blank importer exit %d", code)
	}
	f.waitPhase("blank", vmpodv1.PhaseSucceeded)
	if st, err := os.Stat(filepath.Join(src, "disk.img")); err != nil || st.Size() != diskSize(64*mib) {
		t.Fatalf("blank disk.img: %v %v", st, err)
	}
	// mark the blank disk so the clone can be told from a new blank one
	if err := os.WriteFile(filepath.Join(src, "disk.img"), append([]byte("cloned!"), make([]byte, 4*mib-7)...), 0o644); err != nil {
		t.Fatal(err)
	}

	job := f.job(clone)
	if vols := job.Spec.Template.Spec.Volumes; !hasReadOnlyClaim(vols, "blank") {
		t.Errorf("clone Job volumes %+v lack the source PVC read-only", vols)
	}
	dest := t.TempDir()
	if code := f.runImporter(job, paths{dest: dest, source: src}); code != 0 {
		t.Fatalf("clone importer exit %d", code)
	}
	f.waitPhase("clone", vmpodv1.PhaseSucceeded)
	b, err := os.ReadFile(filepath.Join(dest, "disk.img"))
	if err != nil || !bytes.HasPrefix(b, []byte("cloned!")) {
		t.Fatalf("the clone does not hold the source's data (%v)", err)
	}
}

func TestImporterMayOnlyTouchItsPVC(t *testing.T) {
	f := setup(t)
	dv := f.dataVolume("mine", vmpodv1.DataVolumeSource{Blank: &vmpodv1.BlankSource{}})
	f.dataVolume("other", vmpodv1.DataVolumeSource{Blank: &vmpodv1.BlankSource{}})
	job := f.job(dv)
	kubeconfig := f.env.ServiceAccountKubeconfig(t, f.ns, job.Spec.Template.Spec.ServiceAccountName)
	kubectl := filepath.Join(os.Getenv("KUBEBUILDER_ASSETS"), "kubectl")
	patch := `{"metadata":{"annotations":{"vmpod.dev/import-phase":"Succeeded"}}}`
	for pvc, allowed := range map[string]bool{"mine": true, "other": false} {
		out, err := exec.Command(kubectl, "--kubeconfig", kubeconfig, "-n", f.ns, "patch", "pvc", pvc, "--type=merge", "-p", patch).CombinedOutput()
		if (err == nil) != allowed {
			t.Errorf("importer ServiceAccount patching PVC %s: err %v (%s), want allowed=%v", pvc, err, out, allowed)
		}
	}
	if f.dv("other").Status.Phase == vmpodv1.PhaseSucceeded {
		t.Errorf("another DataVolume's importer marked this one Succeeded")
	}
}

// diskSize is the disk image in a filesystem PVC of the given size: less the 5.5%
// filesystem overhead, in whole MiB.
func diskSize(pvc int64) int64 {
	overhead, _ := strconv.ParseFloat(datavolume.FilesystemOverhead, 64)
	return int64(float64(pvc)*(1-overhead)) &^ (mib - 1)
}

func hasReadOnlyClaim(vols []corev1.Volume, claim string) bool {
	for _, v := range vols {
		if v.PersistentVolumeClaim != nil && v.PersistentVolumeClaim.ClaimName == claim && v.PersistentVolumeClaim.ReadOnly {
			return true
		}
	}
	return false
}

func TestJobFailureWithoutReportFailsTheDataVolume(t *testing.T) {
	f := setup(t)
	dv := f.dataVolume("flaky", vmpodv1.DataVolumeSource{HTTP: &vmpodv1.HTTPSource{URL: "http://127.0.0.1:1/disk.qcow2"}})
	job := f.job(dv)
	// the importer ran out of retries on a transient error (as it reports it on the PVC),
	// then the Job controller gave up
	dest := t.TempDir()
	if code := f.runImporter(job, paths{dest: dest, scratch: t.TempDir()}); code != 1 {
		t.Fatalf("importer exit code %d, want 1 (transient: connection refused)", code)
	}
	now := metav1.Now()
	job.Status = batchv1.JobStatus{StartTime: &now, Failed: 4, Conditions: []batchv1.JobCondition{
		{Type: batchv1.JobFailureTarget, Status: corev1.ConditionTrue, Reason: "BackoffLimitExceeded", Message: "Job has reached the specified backoff limit", LastTransitionTime: now},
		{Type: batchv1.JobFailed, Status: corev1.ConditionTrue, Reason: "BackoffLimitExceeded", Message: "Job has reached the specified backoff limit", LastTransitionTime: now},
	}}
	if err := f.c.Status().Update(f.ctx, job); err != nil {
		t.Fatalf("mark the Job failed, as the Job controller would: %v", err)
	}
	got := f.waitPhase("flaky", vmpodv1.PhaseFailed)
	c := meta.FindStatusCondition(got.Status.Conditions, vmpodv1.DVReady)
	if c == nil || c.Reason != "DownloadFailed" || !strings.Contains(c.Message, "BackoffLimitExceeded") || !strings.Contains(c.Message, "connection refused") {
		t.Errorf("Ready = %+v, want the last attempt's reason and the Job's verdict", c)
	}
	if got.Status.RestartCount != 4 {
		t.Errorf("restartCount = %d, want the Job's 4 failed pods", got.Status.RestartCount)
	}
}

// TestCloneThroughDataSource: a DataVolume whose sourceRef names a DataSource waits for
// the DataSource, then clones the PVC it names like a pvc source (a Job mounting it
// read-only).
func TestCloneThroughDataSource(t *testing.T) {
	f := setup(t)
	golden := f.dataVolume("golden", vmpodv1.DataVolumeSource{Blank: &vmpodv1.BlankSource{}})
	ref := func(name, dataSource string) *vmpodv1.DataVolume {
		dv := &vmpodv1.DataVolume{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: f.ns},
			Spec: vmpodv1.DataVolumeSpec{SourceRef: &vmpodv1.DataVolumeSourceRef{Kind: vmpodv1.DataSourceKind, Name: dataSource},
				Storage: vmpodv1.StorageSpec{Resources: corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{"storage": resource.MustParse("64Mi")}}}}}
		if err := f.c.Create(f.ctx, dv); err != nil {
			t.Fatalf("create DataVolume %s: %v", name, err)
		}
		return dv
	}
	clone := ref("from-fedora", "fedora")
	testenv.Eventually(t, timeout, "the clone to wait for its DataSource", func() (bool, string) {
		d := f.dv("from-fedora")
		c := meta.FindStatusCondition(d.Status.Conditions, vmpodv1.DVRunning)
		return c != nil && c.Reason == "DataSourceNotFound" && strings.Contains(c.Message, f.ns+"/fedora"), describe(d)
	})
	dataSource := func(name, pvcNamespace string) {
		ds := &vmpodv1.DataSource{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: f.ns},
			Spec: vmpodv1.DataSourceSpec{Source: vmpodv1.DataSourceSource{PVC: vmpodv1.DataSourcePVC{Name: "golden", Namespace: pvcNamespace}}}}
		if err := f.c.Create(f.ctx, ds); err != nil {
			t.Fatalf("create DataSource %s: %v", name, err)
		}
	}
	dataSource("fedora", "")
	// the DataSource's PVC is a DataVolume still being filled: the clone waits for it
	testenv.Eventually(t, timeout, "the clone to wait for the golden PVC", func() (bool, string) {
		c := meta.FindStatusCondition(f.dv("from-fedora").Status.Conditions, vmpodv1.DVRunning)
		return c != nil && c.Reason == "SourceNotReady", describe(f.dv("from-fedora"))
	})
	src := t.TempDir()
	if code := f.runImporter(f.job(golden), paths{dest: src}); code != 0 {
		t.Fatalf("golden importer exit %d", code)
	}
	f.waitPhase("golden", vmpodv1.PhaseSucceeded)
	if err := os.WriteFile(filepath.Join(src, "disk.img"), append([]byte("golden!"), make([]byte, 4*mib-7)...), 0o644); err != nil {
		t.Fatal(err)
	}
	job := f.job(clone)
	if vols := job.Spec.Template.Spec.Volumes; !hasReadOnlyClaim(vols, "golden") {
		t.Errorf("clone Job volumes %+v lack the golden PVC read-only", vols)
	}
	dest := t.TempDir()
	if code := f.runImporter(job, paths{dest: dest, source: src}); code != 0 {
		t.Fatalf("clone importer exit %d", code)
	}
	f.waitPhase("from-fedora", vmpodv1.PhaseSucceeded)
	if b, err := os.ReadFile(filepath.Join(dest, "disk.img")); err != nil || !bytes.HasPrefix(b, []byte("golden!")) {
		t.Fatalf("the clone does not hold the golden PVC's data (%v)", err)
	}

}
