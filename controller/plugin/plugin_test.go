package plugin_test

// kubectl-vmpod as a user runs it: the real binary, found by the real kubectl (built with
// the envtest assets) as a plugin on PATH, against a real kube-apiserver with the vmpod
// controller running.

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/api/vmspec"
	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
	"github.com/vmpod/vmpod/controller/internal/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

const timeout = 20 * time.Second

type fixture struct {
	t          *testing.T
	env        *testenv.Env
	ns         string
	kubeconfig string
	path       string // PATH with kubectl-vmpod on it
	kubectl    string
}

func setup(t *testing.T) *fixture {
	env := testenv.Get(t)
	ns := env.Namespace(t)
	env.StartManager(t, ns, nil)
	plugin := env.Binary(t, "./cmd/kubectl-vmpod")
	return &fixture{t: t, env: env, ns: ns, kubeconfig: env.KubeconfigFile(t),
		path:    filepath.Dir(plugin) + string(os.PathListSeparator) + os.Getenv("PATH"),
		kubectl: filepath.Join(os.Getenv("KUBEBUILDER_ASSETS"), "kubectl")}
}

// run runs kubectl (and through it kubectl-vmpod) with stdin, returning stdout and stderr.
func (f *fixture) run(stdin []byte, args ...string) (string, string, error) {
	f.t.Helper()
	// kubectl passes flags after a plugin's name to the plugin; built-in commands take them too
	cmd := exec.Command(f.kubectl, append(args, "--kubeconfig", f.kubeconfig, "-n", f.ns)...)
	cmd.Env = append(os.Environ(), "PATH="+f.path)
	cmd.Stdin = bytes.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	return out.String(), errb.String(), err
}

func (f *fixture) mustRun(stdin []byte, args ...string) string {
	f.t.Helper()
	out, stderr, err := f.run(stdin, args...)
	if err != nil {
		f.t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, stderr)
	}
	return out
}

func (f *fixture) vm(name string) *vmpodv1.VirtualMachine {
	v := &vmpodv1.VirtualMachine{}
	if err := f.env.Client.Get(context.Background(), types.NamespacedName{Namespace: f.ns, Name: name}, v); err != nil {
		f.t.Fatalf("get VM: %v", err)
	}
	return v
}

func (f *fixture) waitPod(vmName string, not types.UID) *corev1.Pod {
	f.t.Helper()
	return f.env.WaitVMPod(f.t, f.ns, vmName, not, timeout, func() string { return string(f.vm(vmName).Status.PrintableStatus) })
}

func (f *fixture) waitNoPod(vmName string) {
	f.t.Helper()
	f.env.WaitNoVMPod(f.t, f.ns, vmName, timeout)
}

func TestConvertedKubeVirtManifestsAreAcceptedAndRun(t *testing.T) {
	f := setup(t)
	// kubectl vmpod convert -f vm.yaml | kubectl apply -f -
	converted := f.mustRun(nil, "vmpod", "convert", "-f", "../convert/testdata/kubevirt-vm-cirros.yaml")
	if out := f.mustRun([]byte(converted), "apply", "-f", "-"); !strings.Contains(out, "virtualmachine.vmpod.dev/cirros-net created") {
		t.Fatalf("kubectl apply: %s", out)
	}
	// running: true became runStrategy Always: the controller gives it a pod
	pod := f.waitPod("cirros-net", "")
	spec, err := vmspec.Parse([]byte(pod.Annotations[vmspec.Annotation]))
	if err != nil {
		t.Fatalf("annotation: %v", err)
	}
	if len(spec.Disks) != 1 || spec.Disks[0].Source != vmspec.SourceImage || spec.CloudInit == nil || len(spec.Interfaces) != 2 ||
		spec.Interfaces[1].PodInterface != "net1" || spec.Interfaces[1].MACAddress != "02:00:00:1a:2b:3c" {
		t.Errorf("the converted VM's annotation = %+v", spec)
	}

	// a VM with a DataVolume template and a Secret, and CDI DataVolumes: warnings on
	// stderr, every object accepted
	for _, file := range []string{"kubevirt-vm-fedora.yaml", "cdi-datavolumes.yaml", "kubevirt-vmi.yaml", "kubevirt-instancetypes.yaml", "kubevirt-vm-windows.yaml", "cdi-datasource.yaml", "kubevirt-vm-golden-image.yaml"} {
		out, stderr, err := f.run(nil, "vmpod", "convert", "-f", "../convert/testdata/"+file)
		if err != nil {
			t.Fatalf("convert %s: %v\n%s", file, err, stderr)
		}
		if !strings.Contains(stderr, "Warning:") && file != "cdi-datasource.yaml" && file != "kubevirt-vm-golden-image.yaml" {
			t.Errorf("convert %s printed no warnings", file)
		}
		t.Logf("kubectl vmpod convert -f %s warned:\n%s", file, stderr)
		f.mustRun([]byte(out), "apply", "-f", "-")
	}
	got := f.mustRun(nil, "get", "virtualmachines,datavolumes,secrets,datasources", "-o", "name")
	for _, want := range []string{"datasource.vmpod.dev/fedora", "virtualmachine.vmpod.dev/fedora-from-golden", "virtualmachine.vmpod.dev/fedora-db", "virtualmachine.vmpod.dev/scratch-vm", "datavolume.vmpod.dev/alpine-root", "datavolume.vmpod.dev/alpine-copy", "secret/fedora-db-cloudinit",
		"virtualmachine.vmpod.dev/rhel-from-shared-golden", "datavolume.vmpod.dev/centos-stream-copy"} {
		if !strings.Contains(got, want) {
			t.Errorf("kubectl get lacks %s:\n%s", want, got)
		}
	}
	// the VM sized by the converted instance type and preference gets their CPU and memory
	sized := f.waitPod("fedora-sized", "")
	if spec, err := vmspec.Parse([]byte(sized.Annotations[vmspec.Annotation])); err != nil || spec.MemoryMiB != 4096 || spec.Firmware.Type != vmspec.FirmwareUEFI {
		t.Errorf("fedora-sized: %v, %+v: want u1.medium's 4Gi and the fedora preference's EFI", err, spec)
	}
	// the Windows VM's enlightenments pass the CRD's rules and reach the pod's annotation
	win := f.waitPod("win2k22", "")
	wantHV := machine.HyperV{Relaxed: true, VAPIC: true, VPIndex: true, Runtime: true, Reset: true, Spinlocks: 8191, SynIC: true,
		SynICTimer: true, SynICTimerDirect: true, Frequencies: true, Reenlightenment: true, TLBFlush: true, IPI: true, VendorID: "KVMKVMKVM"}
	if spec, err := vmspec.Parse([]byte(win.Annotations[vmspec.Annotation])); err != nil {
		t.Errorf("win2k22's annotation: %v", err)
	} else if hv := spec.Features.HyperV; hv == nil || *hv != wantHV || !*spec.Features.SMM || !spec.Firmware.SecureBoot {
		t.Errorf("win2k22: hyperv %+v, smm %v, secure boot %v; want %+v with SMM and secure boot", hv, *spec.Features.SMM, spec.Firmware.SecureBoot, wantHV)
	}
	// the VM's template DataVolume is created by the controller
	testenv.Eventually(t, timeout, "the fedora-db-root DataVolume", func() (bool, string) {
		out, _, err := f.run(nil, "get", "dv", "fedora-db-root", "-o", "name")
		return err == nil && strings.TrimSpace(out) == "datavolume.vmpod.dev/fedora-db-root", out
	})

	// a manifest vmpod cannot honour is refused, and nothing is printed
	out, stderr, err := f.run(nil, "vmpod", "convert", "-f", "../convert/testdata/kubevirt-vm-unsupported.yaml")
	if err == nil || out != "" || !strings.Contains(stderr, "hostDisk is not supported") {
		t.Errorf("unsupported manifest: err %v, stdout %q, stderr %s", err, out, stderr)
	}
	// and so are KubeVirt kinds vmpod has no equivalent of: never printed back as if converted
	out, stderr, err = f.run(nil, "vmpod", "convert", "-f", "../convert/testdata/kubevirt-not-converted.yaml")
	if err == nil || out != "" || !strings.Contains(stderr, "VirtualMachinePool workers: not converted") {
		t.Errorf("KubeVirt kinds without an equivalent: err %v, stdout %q, stderr %s", err, out, stderr)
	}
}

func newVM(ns, name string, s vmpodv1.RunStrategy) *vmpodv1.VirtualMachine {
	return &vmpodv1.VirtualMachine{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: vmpodv1.VirtualMachineSpec{RunStrategy: s, Template: vmpodv1.VirtualMachineTemplateSpec{Spec: vmpodv1.InstanceSpec{
			Domain: vmpodv1.DomainSpec{
				Resources: vmpodv1.ResourceRequirements{Requests: corev1.ResourceList{"memory": resource.MustParse("64Mi")}},
				Devices:   vmpodv1.Devices{Disks: []vmpodv1.Disk{{Name: "root"}}},
			},
			Volumes: []vmpodv1.Volume{{Name: "root", VolumeSource: vmpodv1.VolumeSource{ContainerDisk: &vmpodv1.ContainerDiskSource{Image: "quay.io/x/y:1"}}}},
		}}},
	}
}

func TestStartStopRestart(t *testing.T) {
	f := setup(t)
	ctx := context.Background()
	for _, v := range []*vmpodv1.VirtualMachine{newVM(f.ns, "halted", vmpodv1.RunStrategyHalted), newVM(f.ns, "manual", vmpodv1.RunStrategyManual)} {
		if err := f.env.Client.Create(ctx, v); err != nil {
			t.Fatal(err)
		}
	}

	// Halted: start and stop change the runStrategy
	if out := f.mustRun(nil, "vmpod", "start", "halted"); !strings.Contains(out, "runStrategy Halted -> Always") {
		t.Errorf("start: %s", out)
	}
	p := f.waitPod("halted", "")
	testenv.Eventually(t, timeout, "status to show the pod", func() (bool, string) {
		return f.vm("halted").Status.PodUID == p.UID, ""
	})
	if out := f.mustRun(nil, "vmpod", "restart", "halted"); !strings.Contains(out, "restart requested") {
		t.Errorf("restart: %s", out)
	}
	f.waitPod("halted", p.UID)
	if out := f.mustRun(nil, "vmpod", "stop", "halted"); !strings.Contains(out, "runStrategy Always -> Halted") {
		t.Errorf("stop: %s", out)
	}
	f.waitNoPod("halted")

	// Manual: start and stop are requests
	if out := f.mustRun(nil, "vmpod", "start", "manual"); !strings.Contains(out, "start requested") {
		t.Errorf("start: %s", out)
	}
	f.waitPod("manual", "")
	if f.vm("manual").Spec.RunStrategy != vmpodv1.RunStrategyManual {
		t.Errorf("start changed a Manual VM's runStrategy")
	}
	testenv.Eventually(t, timeout, "the start request to be consumed", func() (bool, string) {
		_, pending := f.vm("manual").Annotations[vmpodv1.StateChangeRequestAnnotation]
		return !pending, ""
	})
	f.mustRun(nil, "vmpod", "stop", "manual")
	f.waitNoPod("manual")

	// errors a user can act on
	if _, stderr, err := f.run(nil, "vmpod", "restart", "manual"); err == nil || !strings.Contains(stderr, "has no pod to restart") {
		t.Errorf("restart of a stopped VM: %v %s", err, stderr)
	}
	for _, verb := range []string{"pause", "unpause"} {
		if _, stderr, err := f.run(nil, "vmpod", verb, "manual"); err == nil || !strings.Contains(stderr, "is not running") {
			t.Errorf("%s of a stopped VM: %v %s", verb, err, stderr)
		}
	}
	if _, stderr, err := f.run(nil, "vmpod", "console", "manual"); err == nil || !strings.Contains(stderr, "not Running: no console") {
		t.Errorf("console of a stopped VM: %v %s", err, stderr)
	}
	if _, stderr, err := f.run(nil, "vmpod", "vnc", "manual"); err == nil || !strings.Contains(stderr, "not Running: no display") {
		t.Errorf("vnc of a stopped VM: %v %s", err, stderr)
	}
	if _, stderr, err := f.run(nil, "vmpod", "guestosinfo", "manual"); err == nil || !strings.Contains(stderr, "not Running: no guest agent") {
		t.Errorf("guestosinfo of a stopped VM: %v %s", err, stderr)
	}
	if _, stderr, err := f.run(nil, "vmpod", "port-forward", "manual", "8080"); err == nil || !strings.Contains(stderr, "not Running: no guest to forward to") {
		t.Errorf("port-forward to a stopped VM: %v %s", err, stderr)
	}
	// a bad port is refused before the VM is looked up
	for _, args := range [][]string{{"manual", "http"}, {"manual", "1:2:3"}, {"manual", "8080:0"}, {"manual"}, {"--stdio", "manual", "1:22"}} {
		if _, stderr, err := f.run(nil, append([]string{"vmpod", "port-forward"}, args...)...); err == nil || !strings.Contains(stderr, "port") {
			t.Errorf("port-forward %q: %v %s, want an error about the port", args, err, stderr)
		}
	}
	if _, stderr, err := f.run(nil, "vmpod", "start", "nosuchvm"); err == nil || !strings.Contains(stderr, "not found") {
		t.Errorf("start of a missing VM: %v %s", err, stderr)
	}
	fmt.Fprintln(os.Stderr) // keep go test's output tidy after the plugin's
}

// image-upload's mistakes a user can make are refused before anything is created; the
// upload itself (through the kubelet's port-forward) is the cluster's end-to-end test.
func TestImageUploadBadInput(t *testing.T) {
	f := setup(t)
	ctx := context.Background()
	image := filepath.Join(t.TempDir(), "disk.qcow2")
	if err := os.WriteFile(image, []byte("QFI\xfb"), 0o644); err != nil {
		t.Fatal(err)
	}
	takesImages := &vmpodv1.DataVolume{ObjectMeta: metav1.ObjectMeta{Name: "takes-images", Namespace: f.ns},
		Spec: vmpodv1.DataVolumeSpec{Source: vmpodv1.DataVolumeSource{Upload: &vmpodv1.UploadSource{}},
			Storage: vmpodv1.StorageSpec{Resources: corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")}}}}}
	if err := f.env.Client.Create(ctx, takesImages); err != nil {
		t.Fatal(err)
	}
	imported := &vmpodv1.DataVolume{ObjectMeta: metav1.ObjectMeta{Name: "imported", Namespace: f.ns},
		Spec: vmpodv1.DataVolumeSpec{Source: vmpodv1.DataVolumeSource{Blank: &vmpodv1.BlankSource{}},
			Storage: vmpodv1.StorageSpec{Resources: corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")}}}}}
	if err := f.env.Client.Create(ctx, imported); err != nil {
		t.Fatal(err)
	}
	bare := &corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Name: "bare", Namespace: f.ns},
		Spec: corev1.PersistentVolumeClaimSpec{AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			Resources: corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")}}}}
	if err := f.env.Client.Create(ctx, bare); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"pv", "disk", "--image-path", image}, "image-upload takes dv NAME or pvc NAME"},
		{[]string{"pvc", "bare", "--size=1Gi", "--image-path", image}, "PVC bare exists and no DataVolume fills it"},
		{[]string{"pvc", "disk", "--size=1Gi", "--volume-mode=raw", "--image-path", image}, `--volume-mode "raw": want block or filesystem`},
		{[]string{"dv", "disk", "--size=1Gi"}, "needs --image-path"},
		{[]string{"dv", "disk", "--size=1Gi", "--image-path", image, "--archive-path", image}, "not both"},
		{[]string{"dv", "disk", "--size=1Gi", "--volume-mode=block", "--archive-path", image}, "needs --volume-mode filesystem"},
		{[]string{"dv", "disk", "--size=1Gi", "--archive-path", filepath.Dir(image)}, "--archive-path " + filepath.Dir(image) + " is not a regular file"},
		{[]string{"dv", "takes-images", "--archive-path", image}, "takes a disk image: upload it with --image-path"},
		{[]string{"dv", "disk", "--size=1Gi", "--image-path", image + ".missing"}, "no such file"},
		{[]string{"dv", "disk", "--size=1Gi", "--image-path", filepath.Dir(image)}, "is not a regular file"},
		{[]string{"dv", "disk", "--image-path", image}, "give --size to create it"},
		{[]string{"dv", "disk", "--no-create", "--image-path", image}, "does not exist (--no-create)"},
		{[]string{"dv", "disk", "--size=big", "--image-path", image}, `--size "big": not a positive quantity`},
		{[]string{"dv", "disk", "--size=1Gi", "--volume-mode=raw", "--image-path", image}, `--volume-mode "raw": want block or filesystem`},
		{[]string{"dv", "imported", "--image-path", image}, "does not take uploads"},
	} {
		_, stderr, err := f.run(nil, append([]string{"vmpod", "image-upload"}, tc.args...)...)
		if err == nil || !strings.Contains(stderr, tc.want) {
			t.Errorf("image-upload %q: %v %q, want an error saying %q", tc.args, err, stderr, tc.want)
		}
	}
	dvs := &vmpodv1.DataVolumeList{}
	if err := f.env.Client.List(ctx, dvs, client.InNamespace(f.ns)); err != nil || len(dvs.Items) != 2 {
		t.Errorf("DataVolumes after refused uploads: %d (%v), want only the two made by the test", len(dvs.Items), err)
	}
}

// TestAddRemoveVolume: addvolume adds a DataVolume (or else a PVC) as a hotpluggable volume
// with a virtio disk of its name; removevolume takes it out again, and refuses a volume of
// the VM's pod and a name it does not know. A name too long for a disk serial is refused
// by the API server's schema, naming the rule.
func TestAddRemoveVolume(t *testing.T) {
	f := setup(t)
	ctx := context.Background()
	if err := f.env.Client.Create(ctx, newVM(f.ns, "hot", vmpodv1.RunStrategyHalted)); err != nil {
		t.Fatal(err)
	}
	claim := &corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Name: "scratch", Namespace: f.ns},
		Spec: corev1.PersistentVolumeClaimSpec{AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			Resources: corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")}}}}
	long := claim.DeepCopy()
	long.Name = "a-claim-name-of-21-ch"
	for _, o := range []*corev1.PersistentVolumeClaim{claim, long} {
		if err := f.env.Client.Create(ctx, o); err != nil {
			t.Fatal(err)
		}
	}

	if out := f.mustRun(nil, "vmpod", "addvolume", "hot", "--volume-name=scratch", "--persist"); !strings.Contains(out, "volume scratch added") {
		t.Errorf("addvolume: %s", out)
	}
	spec := f.vm("hot").Spec.Template.Spec
	v := spec.Volumes[len(spec.Volumes)-1]
	d := spec.Domain.Devices.Disks[len(spec.Domain.Devices.Disks)-1]
	if v.Name != "scratch" || v.PersistentVolumeClaim == nil || v.PersistentVolumeClaim.ClaimName != "scratch" || !v.Hotpluggable() ||
		d.Name != "scratch" || d.Disk == nil || d.Disk.Bus != "virtio" {
		t.Errorf("after addvolume: volume %+v, disk %+v", v, d)
	}
	for args, want := range map[string]string{
		"addvolume hot --volume-name=scratch":               "has a volume or disk named scratch already",
		"addvolume hot --volume-name=nothing":               "neither a DataVolume nor a PVC",
		"addvolume hot --volume-name=a-claim-name-of-21-ch": "at most 20 characters",
		"addvolume hot": "needs --volume-name",
		"removevolume hot --volume-name=" + spec.Volumes[0].Name: "is not hotpluggable",
		"removevolume hot --volume-name=nothing":                 "has no volume nothing",
	} {
		if _, stderr, err := f.run(nil, append([]string{"vmpod"}, strings.Fields(args)...)...); err == nil || !strings.Contains(stderr, want) {
			t.Errorf("kubectl vmpod %s: %v %s; want an error saying %q", args, err, stderr, want)
		}
	}
	if out := f.mustRun(nil, "vmpod", "removevolume", "hot", "--volume-name=scratch"); !strings.Contains(out, "volume scratch removed") {
		t.Errorf("removevolume: %s", out)
	}
	after := f.vm("hot").Spec.Template.Spec
	if len(after.Volumes) != len(spec.Volumes)-1 || len(after.Domain.Devices.Disks) != len(spec.Domain.Devices.Disks)-1 {
		t.Errorf("after removevolume: %d volumes, %d disks; want one fewer of each than %d, %d", len(after.Volumes), len(after.Domain.Devices.Disks), len(spec.Volumes), len(spec.Domain.Devices.Disks))
	}
}

// migrate creates a VirtualMachineMigration the controller acts on (here: refuses, the VM
// is not running); migrate-cancel deletes the unfinished ones, saying so when there are
// none. The migration itself is the controller's (controller/internal/vm).
func TestMigrateCommands(t *testing.T) {
	f := setup(t)
	ctx := context.Background()
	if err := f.env.Client.Create(ctx, newVM(f.ns, "still", vmpodv1.RunStrategyHalted)); err != nil {
		t.Fatal(err)
	}
	out := f.mustRun(nil, "vmpod", "migrate", "still")
	if !strings.Contains(out, "VM still: migration still-migration-") {
		t.Fatalf("migrate: %s", out)
	}
	name := strings.Fields(strings.TrimPrefix(out, "VM still: migration "))[0]
	testenv.Eventually(t, timeout, "the controller to refuse the migration", func() (bool, string) {
		m := &vmpodv1.VirtualMachineMigration{}
		if err := f.env.Client.Get(ctx, types.NamespacedName{Namespace: f.ns, Name: name}, m); err != nil {
			return false, err.Error()
		}
		return m.Status.Phase == vmpodv1.MigrationFailed && strings.Contains(m.Status.FailureReason, "not running"), fmt.Sprintf("%+v", m.Status)
	})
	if out := f.mustRun(nil, "vmpod", "migrate-cancel", "still"); !strings.Contains(out, "no migration in flight") {
		t.Errorf("migrate-cancel with none in flight: %s", out)
	}
	// the policy knobs on the command line go into the spec; those not given stay unset
	// (the cluster's policy), an explicit false included
	out = f.mustRun(nil, "vmpod", "migrate", "still", "--bandwidth-mib=8", "--allow-post-copy", "--auto-converge=false", "--completion-timeout-per-gib", "30")
	m := &vmpodv1.VirtualMachineMigration{}
	if err := f.env.Client.Get(ctx, types.NamespacedName{Namespace: f.ns, Name: strings.Fields(strings.TrimPrefix(out, "VM still: migration "))[0]}, m); err != nil {
		t.Fatal(err)
	}
	want := vmpodv1.VirtualMachineMigrationSpec{VMName: "still", BandwidthMiB: 8, AllowPostCopy: ptr.To(true), AutoConverge: ptr.To(false), CompletionTimeoutPerGiB: 30}
	if !equality.Semantic.DeepEqual(m.Spec, want) {
		t.Errorf("migrate with flags: spec %+v, want %+v", m.Spec, want)
	}
	// out of the CRD's range: the API server's refusal names the field
	if _, stderr, err := f.run(nil, "vmpod", "migrate", "still", "--bandwidth-mib=-1"); err == nil || !strings.Contains(stderr, "bandwidthMiB") {
		t.Errorf("migrate --bandwidth-mib=-1: %v %s; want the refusal naming bandwidthMiB", err, stderr)
	}
	if _, stderr, err := f.run(nil, "vmpod", "migrate", "nosuchvm"); err == nil || !strings.Contains(stderr, "not found") {
		t.Errorf("migrate of a missing VM: %v %s", err, stderr)
	}

	// --pod: a container pod's migration (here refused: the pod is not running), the knobs
	// as for a VM's, post-copy refused by the API server
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: f.ns},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "busybox"}}}}
	if err := f.env.Client.Create(ctx, pod); err != nil {
		t.Fatal(err)
	}
	out = f.mustRun(nil, "vmpod", "migrate", "--pod", "web", "--bandwidth-mib=8")
	if !strings.Contains(out, "pod web: migration web-migration-") {
		t.Fatalf("migrate --pod: %s", out)
	}
	m = &vmpodv1.VirtualMachineMigration{}
	if err := f.env.Client.Get(ctx, types.NamespacedName{Namespace: f.ns, Name: strings.Fields(strings.TrimPrefix(out, "pod web: migration "))[0]}, m); err != nil {
		t.Fatal(err)
	}
	if want := (vmpodv1.VirtualMachineMigrationSpec{PodName: "web", BandwidthMiB: 8}); !equality.Semantic.DeepEqual(m.Spec, want) {
		t.Errorf("migrate --pod: spec %+v, want %+v", m.Spec, want)
	}
	testenv.Eventually(t, timeout, "the controller to refuse the pod's migration", func() (bool, string) {
		got := &vmpodv1.VirtualMachineMigration{}
		if err := f.env.Client.Get(ctx, client.ObjectKeyFromObject(m), got); err != nil {
			return false, err.Error()
		}
		return got.Status.Phase == vmpodv1.MigrationFailed && strings.Contains(got.Status.FailureReason, "no runtimeClassName"), fmt.Sprintf("%+v", got.Status)
	})
	if out := f.mustRun(nil, "vmpod", "migrate-cancel", "--pod", "web"); !strings.Contains(out, "pod web: no migration in flight") {
		t.Errorf("migrate-cancel --pod with none in flight: %s", out)
	}
	if _, stderr, err := f.run(nil, "vmpod", "migrate", "--pod", "web", "--allow-post-copy"); err == nil || !strings.Contains(stderr, "spec.allowPostCopy") {
		t.Errorf("migrate --pod --allow-post-copy: %v %s; want the refusal naming spec.allowPostCopy", err, stderr)
	}
	if _, stderr, err := f.run(nil, "vmpod", "migrate", "--pod", "nosuchpod"); err == nil || !strings.Contains(stderr, "not found") {
		t.Errorf("migrate --pod of a missing pod: %v %s", err, stderr)
	}
}
