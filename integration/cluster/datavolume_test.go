package cluster

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/vmpod/vmpod/integration/testenv"
)

// cdiDataVolume is a CDI DataVolume importing a disk over HTTP, as CDI's examples write
// one; STORAGE is its storage stanza.
const cdiDataVolume = `apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: NAME
spec:
  source:
    http:
      url: URL
  storage:
STORAGE`

// TestDataVolumeImportAndBoot: DataVolumes import the test guest over HTTP from a server pod
// in the cluster into a local-path Filesystem PVC and into a Block PVC (a local PV on a loop
// device), and a VirtualMachine boots from each; a URL that answers 404 and a corrupt qcow2
// (truncated: its header promises clusters the file does not hold) fail the DataVolume with
// the reason.
func TestDataVolumeImportAndBoot(t *testing.T) {
	c := testenv.RequireCluster(t)
	t.Parallel() // with TestVirtualMachine: see there
	raw := os.Getenv("VMPOD_VM_GUEST_RAW")
	qcow2 := filepath.Join(filepath.Dir(raw), "disk.qcow2")
	if _, err := os.Stat(qcow2); raw == "" || err != nil {
		t.Fatalf("the test guest's disk.qcow2 next to VMPOD_VM_GUEST_RAW=%q: %v (make test sets it; by hand: VMPOD_VM_GUEST_RAW=$(hack/vm-guest-image.sh)/disk.raw)", raw, err)
	}
	ns := c.Namespace(t)
	// served: the guest's image, and a copy cut short after its first MiB
	dir := t.TempDir()
	if err := os.Link(qcow2, filepath.Join(dir, "disk.qcow2")); err != nil {
		st, _ := os.Stat(qcow2)
		copyPrefix(t, qcow2, filepath.Join(dir, "disk.qcow2"), st.Size()) // another filesystem
	}
	copyPrefix(t, qcow2, filepath.Join(dir, "truncated.qcow2"), 1<<20)
	base := imageServer(t, c, ns, dir)

	for _, tc := range []struct{ name, storage string }{
		{"fs", "    resources: {requests: {storage: 1500Mi}}\n"},
		{"block", "    volumeMode: Block\n    storageClassName: local-block\n    resources: {requests: {storage: 2Gi}}\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dv := "root-" + tc.name
			applyConverted(t, c, ns, strings.NewReplacer("NAME", dv, "URL", base+"/disk.qcow2", "STORAGE", tc.storage).Replace(cdiDataVolume))
			t0 := time.Now()
			waitDataVolume(t, c, ns, dv, "Succeeded", 6*time.Minute)
			t.Logf("DataVolume %s imported in %v", dv, time.Since(t0).Round(time.Second))

			vm := "vm-" + tc.name
			manifest := strings.NewReplacer("name: debian", "name: "+vm, "kubevirt.io/vm: debian", "kubevirt.io/vm: "+vm,
				"containerDisk:\n          image: docker.io/vmpod-test/debian-vm:bookworm", "dataVolume:\n          name: "+dv).Replace(kubevirtVM)
			applyConverted(t, c, ns, manifest)
			pod := waitVM(t, c, ns, vm, vmBootWithin, "Running", "True")
			var out string
			if !testenv.PollWithin(3*time.Minute, func() bool {
				out, _ = c.KubectlErr("exec", "-n", ns, pod, "-c", "compute", "--", "cat", "/var/tmp/e2e.txt")
				return strings.Contains(out, "written by cloud-init")
			}) {
				t.Errorf("cloud-init's file in the guest booted from %s: %q", dv, out)
			}
			if tc.name == "fs" {
				hotplugVolume(t, c, ns, vm, pod)
			}
			c.Kubectl(t, "delete", "vm.vmpod.dev", "-n", ns, vm, "--wait=true", "--timeout=150s")
		})
	}

	t.Run("404", func(t *testing.T) {
		t.Parallel()
		applyConverted(t, c, ns, strings.NewReplacer("NAME", "missing", "URL", base+"/no-such.qcow2",
			"STORAGE", "    resources: {requests: {storage: 100Mi}}\n").Replace(cdiDataVolume))
		waitDataVolume(t, c, ns, "missing", "Failed", 3*time.Minute)
		msg := c.Kubectl(t, "get", "datavolume.vmpod.dev", "-n", ns, "missing", "-o", `jsonpath={.status.conditions[?(@.type=="Ready")].message}`)
		if !strings.Contains(msg, "404") {
			t.Errorf("the failed DataVolume's Ready message %q does not give the 404", msg)
		}
	})

	t.Run("corrupt", func(t *testing.T) {
		t.Parallel()
		applyConverted(t, c, ns, strings.NewReplacer("NAME", "corrupt", "URL", base+"/truncated.qcow2",
			"STORAGE", "    resources: {requests: {storage: 1500Mi}}\n").Replace(cdiDataVolume))
		waitDataVolume(t, c, ns, "corrupt", "Failed", 3*time.Minute)
		cond := c.Kubectl(t, "get", "datavolume.vmpod.dev", "-n", ns, "corrupt", "-o",
			`jsonpath={.status.conditions[?(@.type=="Ready")].reason}: {.status.conditions[?(@.type=="Ready")].message}`)
		if !strings.HasPrefix(cond, "InvalidImage: ") {
			t.Errorf("the failed DataVolume's Ready condition is %q, want reason InvalidImage", cond)
		}
	})
}

// TestDataVolumeUpload: kubectl vmpod image-upload (pvc, then dv) creates an upload DataVolume and sends a
// local image through the API server's port-forward to the importer pod on the vmpod node;
// an image the importer refuses fails the command with the reason and leaves the DataVolume
// waiting for another upload, which then completes it.
func TestDataVolumeUpload(t *testing.T) {
	c := testenv.RequireCluster(t)
	t.Parallel()
	ns := c.Namespace(t)
	dir := t.TempDir()
	raw, qcow2 := filepath.Join(dir, "disk.raw"), filepath.Join(dir, "disk.qcow2")
	if err := os.WriteFile(raw, append([]byte("vmpod upload test"), make([]byte, 8<<20)...)[:8<<20], 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert: %v: %s", err, out)
	}
	copyPrefix(t, qcow2, filepath.Join(dir, "truncated.qcow2"), 64<<10)

	upload := func(kind string, args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		out, err := c.Command(ctx, append([]string{"vmpod", "image-upload", kind, "uploaded", "-n", ns, "--wait-secs=240"}, args...)...).CombinedOutput()
		return string(out), err
	}
	// virtctl's image-upload pvc: the DataVolume of the same name is made, and fills the PVC
	out, err := upload("pvc", "--size=100Mi", "--image-path="+filepath.Join(dir, "truncated.qcow2"))
	if err == nil || !strings.Contains(out, "refused the upload") || !strings.Contains(out, "InvalidImage") {
		t.Fatalf("uploading a truncated qcow2: err %v, output:\n%s\nwant the importer's refusal with reason InvalidImage", err, out)
	}
	waitDataVolume(t, c, ns, "uploaded", "UploadReady", time.Minute)

	t0 := time.Now()
	out, err = upload("dv", "--no-create", "--image-path="+qcow2)
	if err != nil || !strings.Contains(out, "DataVolume uploaded: Succeeded") {
		t.Fatalf("kubectl vmpod image-upload: %v\n%s", err, out)
	}
	t.Logf("uploaded and imported in %v:\n%s", time.Since(t0).Round(time.Second), out)
	waitDataVolume(t, c, ns, "uploaded", "Succeeded", time.Minute)
}

// copyPrefix writes the first n bytes of src to dst.
func copyPrefix(t *testing.T, src, dst string, n int64) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.CopyN(out, in, n); err != nil {
		t.Fatalf("copy %s: %v", src, err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

// imageServer runs busybox httpd on the runc node serving dir (read-only) behind a
// Service, and returns its base URL (by ClusterIP: the test cluster has no DNS).
func imageServer(t *testing.T, c *testenv.Cluster, ns, dir string) string {
	t.Helper()
	labels := map[string]string{"app": "images"}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "images", Labels: labels},
		Spec: corev1.PodSpec{
			NodeName:                      runcNode,
			TerminationGracePeriodSeconds: ptr.To[int64](1),
			Containers: []corev1.Container{{Name: "httpd", Image: busybox, Command: []string{"httpd", "-f", "-p", "8080", "-h", "/srv"},
				VolumeMounts: []corev1.VolumeMount{{Name: "images", MountPath: "/srv", ReadOnly: true}}}},
			Volumes: []corev1.Volume{{Name: "images", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: dir}}}},
		},
	}
	if _, err := c.Client.CoreV1().Pods(ns).Create(t.Context(), pod, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create image server: %v", err)
	}
	svc, err := c.Client.CoreV1().Services(ns).Create(t.Context(), &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "images"},
		Spec:       corev1.ServiceSpec{Selector: labels, Ports: []corev1.ServicePort{{Port: 80, TargetPort: intstr.FromInt32(8080)}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create image service: %v", err)
	}
	c.WaitPod(t, ns, "images", 2*time.Minute, "Running", func(p *corev1.Pod) bool { return p.Status.Phase == corev1.PodRunning })
	return fmt.Sprintf("http://%s", svc.Spec.ClusterIP)
}

// applyConverted converts a KubeVirt/CDI manifest with kubectl vmpod convert and applies it.
func applyConverted(t *testing.T, c *testenv.Cluster, ns, manifest string) {
	t.Helper()
	kubectlStdin(t, c, kubectlStdin(t, c, manifest, "vmpod", "convert", "-f", "-"), "apply", "-n", ns, "-f", "-")
}

func waitDataVolume(t *testing.T, c *testenv.Cluster, ns, name, phase string, within time.Duration) {
	t.Helper()
	var last string
	if !testenv.PollWithin(within, func() bool {
		last, _ = c.KubectlErr("get", "datavolume.vmpod.dev", "-n", ns, name, "-o", "jsonpath={.status.phase} {.status.progress}")
		return strings.HasPrefix(last, phase)
	}) {
		desc, _ := c.KubectlErr("describe", "datavolume.vmpod.dev", "-n", ns, name)
		pods, _ := c.KubectlErr("get", "pods,pvc", "-n", ns, "-o", "wide")
		t.Fatalf("DataVolume %s: not %s after %v (last %q)\n%s\n%s", name, phase, within, last, desc, pods)
	}
}

// TestDataVolumeCloneAcrossNamespaces: CDI's golden-image pattern across namespaces. A
// DataVolume imports an image in one namespace, a DataSource there publishes it, and a
// DataVolume in another namespace clones it by sourceRef: refused (waiting, saying how to
// grant it) until the source namespace binds vmpod-datavolume-cloner to the other
// namespace's default ServiceAccount, then pulled from a server pod in the source namespace
// over TLS. The clone holds the golden bytes, and the server side is gone afterwards.
func TestDataVolumeCloneAcrossNamespaces(t *testing.T) {
	c := testenv.RequireCluster(t)
	t.Parallel()
	golden, ns := c.Namespace(t), c.Namespace(t)
	dir := t.TempDir()
	disk := make([]byte, 8<<20)
	copy(disk, "vmpod golden image")
	copy(disk[5<<20:], "written by the golden image's guest")
	if err := os.WriteFile(filepath.Join(dir, "disk.raw"), disk, 0o644); err != nil {
		t.Fatal(err)
	}
	base := imageServer(t, c, golden, dir)
	size := "    resources: {requests: {storage: 64Mi}}\n"
	applyConverted(t, c, golden, strings.NewReplacer("NAME", "golden", "URL", base+"/disk.raw", "STORAGE", size).Replace(cdiDataVolume))
	applyConverted(t, c, golden, "apiVersion: cdi.kubevirt.io/v1beta1\nkind: DataSource\nmetadata: {name: os-image}\nspec: {source: {pvc: {name: golden}}}\n")
	waitDataVolume(t, c, golden, "golden", "Succeeded", 4*time.Minute)

	applyConverted(t, c, ns, `apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata: {name: copy}
spec:
  sourceRef: {kind: DataSource, name: os-image, namespace: `+golden+`}
  storage:
`+size)
	grant := "kubectl create rolebinding clone-to-" + ns + " -n " + golden + " --clusterrole=vmpod-datavolume-cloner --serviceaccount=" + ns + ":default"
	var last string
	if !testenv.PollWithin(time.Minute, func() bool {
		last, _ = c.KubectlErr("get", "datavolume.vmpod.dev", "-n", ns, "copy", "-o", `jsonpath={.status.conditions[?(@.type=="Running")].reason}: {.status.conditions[?(@.type=="Running")].message}`)
		return strings.HasPrefix(last, "CloneNotAuthorized: ") && strings.Contains(last, grant)
	}) {
		t.Fatalf("the clone before the grant: %q, want CloneNotAuthorized saying %q", last, grant)
	}
	c.Kubectl(t, strings.Fields(grant)[1:]...)
	t0 := time.Now()
	waitDataVolume(t, c, ns, "copy", "Succeeded", 4*time.Minute)
	t.Logf("cloned across namespaces in %v", time.Since(t0).Round(time.Second))

	// the clone's disk starts with the golden image's bytes
	want := sha256.Sum256(disk)
	reader := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "reader"},
		Spec: corev1.PodSpec{
			RestartPolicy: corev1.RestartPolicyNever,
			Containers: []corev1.Container{{Name: "sha", Image: busybox, Command: []string{"sh", "-c", fmt.Sprintf("head -c %d /data/disk.img | sha256sum", len(disk))},
				VolumeMounts: []corev1.VolumeMount{{Name: "data", MountPath: "/data", ReadOnly: true}}}},
			Volumes: []corev1.Volume{{Name: "data", VolumeSource: corev1.VolumeSource{PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: "copy", ReadOnly: true}}}},
		},
	}
	if _, err := c.Client.CoreV1().Pods(ns).Create(t.Context(), reader, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create reader pod: %v", err)
	}
	c.WaitPod(t, ns, "reader", 2*time.Minute, "Succeeded", func(p *corev1.Pod) bool { return p.Status.Phase == corev1.PodSucceeded })
	if out := c.Kubectl(t, "logs", "-n", ns, "reader"); !strings.HasPrefix(out, hex.EncodeToString(want[:])) {
		t.Errorf("the clone's first %d bytes hash to %q, want the golden image's %x", len(disk), out, want)
	}
	var left string
	if !testenv.PollWithin(time.Minute, func() bool {
		left = c.Kubectl(t, "get", "pods,services,secrets", "-n", golden, "-l", "vmpod.dev/clone-for", "-o", "name")
		return strings.TrimSpace(left) == ""
	}) {
		t.Errorf("the clone's server side is left in %s:\n%s", golden, left)
	}
}
