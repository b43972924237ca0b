package vm_test

import (
	"reflect"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	nodev1 "k8s.io/api/node/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/vmpod/vmpod/api/vmspec"
	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
	"github.com/vmpod/vmpod/controller/internal/render"
	"github.com/vmpod/vmpod/controller/internal/testenv"
)

func TestVMCreatesPod(t *testing.T) {
	f := setup(t)
	block := corev1.PersistentVolumeBlock
	for _, pvc := range []*corev1.PersistentVolumeClaim{
		{ObjectMeta: metav1.ObjectMeta{Name: "data", Namespace: f.ns}, Spec: corev1.PersistentVolumeClaimSpec{
			AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			Resources:   corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{"storage": resource.MustParse("1Gi")}}}},
		{ObjectMeta: metav1.ObjectMeta{Name: "fast", Namespace: f.ns}, Spec: corev1.PersistentVolumeClaimSpec{
			AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce}, VolumeMode: &block,
			Resources: corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{"storage": resource.MustParse("1Gi")}}}},
	} {
		f.create(pvc)
	}
	v := f.cirros("db", vmpodv1.RunStrategyAlways)
	spec := &v.Spec.Template.Spec
	v.Spec.Template.ObjectMeta.Labels = map[string]string{"app": "db"}
	spec.Domain.CPU = &vmpodv1.CPU{Cores: 2}
	spec.Domain.Memory = &vmpodv1.Memory{Guest: ptr.To(resource.MustParse("1Gi"))}
	spec.Domain.Resources.Requests = nil // the request defaults to the guest's memory
	spec.Domain.Devices.Disks = append(spec.Domain.Devices.Disks,
		vmpodv1.Disk{Name: "data", Disk: &vmpodv1.DiskTarget{Bus: "scsi"}}, vmpodv1.Disk{Name: "fast"})
	spec.Volumes = append(spec.Volumes,
		vmpodv1.Volume{Name: "data", VolumeSource: vmpodv1.VolumeSource{PersistentVolumeClaim: &vmpodv1.PersistentVolumeClaimVolumeSource{PersistentVolumeClaimVolumeSource: corev1.PersistentVolumeClaimVolumeSource{ClaimName: "data"}}}},
		vmpodv1.Volume{Name: "fast", VolumeSource: vmpodv1.VolumeSource{PersistentVolumeClaim: &vmpodv1.PersistentVolumeClaimVolumeSource{PersistentVolumeClaimVolumeSource: corev1.PersistentVolumeClaimVolumeSource{ClaimName: "fast"}}}})
	spec.Domain.Devices.Interfaces = []vmpodv1.Interface{{Name: "default"}, {Name: "storage"}}
	spec.Networks = []vmpodv1.Network{{Name: "default", Pod: &vmpodv1.PodNetwork{}}, {Name: "storage", Multus: &vmpodv1.MultusNetwork{NetworkName: "storage-net"}}}
	f.create(v)

	pod := f.waitPod("db", "")
	if got := pod.Spec.RuntimeClassName; got == nil || *got != "vmpod" {
		t.Errorf("runtimeClassName = %v", got)
	}
	if ref := metav1.GetControllerOf(pod); ref == nil || ref.UID != f.vm("db").UID {
		t.Errorf("owner = %+v, want the VM", ref)
	}
	if pod.Labels["app"] != "db" || pod.Labels[render.VMNameLabel] != "db" {
		t.Errorf("labels = %v", pod.Labels)
	}
	// The API server's RuntimeClass admission added the overhead (whatever
	// runtimeclass/runtimeclass.yaml says) and the node selector; the container asks for the
	// guest's memory only.
	var rc nodev1.RuntimeClass
	if err := f.c.Get(f.ctx, client.ObjectKey{Name: "vmpod"}, &rc); err != nil {
		t.Fatalf("RuntimeClass vmpod: %v", err)
	}
	if rc.Overhead == nil || len(rc.Overhead.PodFixed) == 0 {
		t.Fatal("RuntimeClass vmpod has no overhead")
	}
	if want := rc.Overhead.PodFixed; !equality.Semantic.DeepEqual(pod.Spec.Overhead, want) {
		t.Errorf("pod overhead = %v, want the RuntimeClass's %v", pod.Spec.Overhead, want)
	}
	if pod.Spec.NodeSelector["vmpod.dev/runtime"] != "true" {
		t.Errorf("nodeSelector = %v, want the RuntimeClass's scheduling", pod.Spec.NodeSelector)
	}
	res := pod.Spec.Containers[0].Resources
	if m := res.Requests["memory"]; m.Cmp(resource.MustParse("1Gi")) != 0 {
		t.Errorf("memory request %s, want the guest's 1Gi (no overhead)", m.String())
	}
	if c := res.Requests["cpu"]; c.Cmp(resource.MustParse("200m")) != 0 {
		t.Errorf("cpu request %s, want 200m (2 vCPUs / 10)", c.String())
	}
	// the containerDisk is an OCI image volume: the API server kept it (ImageVolume is on)
	if v := pod.Spec.Volumes[0]; v.Name != "containerdisk" || v.Image == nil || v.Image.Reference != "quay.io/kubevirt/cirros-container-disk-demo:v1.7.0" {
		t.Errorf("containerDisk volume = %+v, want an image volume", v)
	}
	if len(pod.Spec.Containers[0].VolumeDevices) != 1 || pod.Spec.Containers[0].VolumeDevices[0].DevicePath != "/vmpod/devices/fast" {
		t.Errorf("volumeDevices = %v", pod.Spec.Containers[0].VolumeDevices)
	}

	ann, err := vmspec.Parse([]byte(pod.Annotations[vmspec.Annotation]))
	if err != nil {
		t.Fatalf("the pod's %s annotation does not parse: %v", vmspec.Annotation, err)
	}
	var disks []string
	for _, d := range ann.Disks {
		disks = append(disks, d.Name+":"+string(d.Source)+":"+string(d.Bus))
	}
	if want := []string{"containerdisk:image:virtio", "data:file:scsi", "fast:block:virtio"}; !reflect.DeepEqual(disks, want) {
		t.Errorf("annotation disks = %v, want %v", disks, want)
	}
	if ann.MemoryMiB != 1024 || ann.CPU.VCPUs() != 2 || ann.CloudInit == nil || ann.CloudInit.UserData != "#!/bin/sh\necho hi\n" {
		t.Errorf("annotation = %+v", ann)
	}
	if len(ann.Interfaces) != 2 || ann.Interfaces[1].PodInterface != "net1" {
		t.Errorf("annotation interfaces = %+v", ann.Interfaces)
	}
	if pod.Annotations[render.MultusNetworksAnnotation] != `[{"name":"storage-net","interface":"net1"}]` {
		t.Errorf("multus annotation = %q", pod.Annotations[render.MultusNetworksAnnotation])
	}

	st := f.waitStatus("db", vmpodv1.StatusStarting).Status
	if !st.Created || st.PodName != pod.Name || st.PodUID != pod.UID {
		t.Errorf("status = %+v", st)
	}
	f.waitEvent("db", "SuccessfulCreate")

	// the kubelet starts it: Running, Ready, with the pod's IP
	f.kubeletRuns(pod)
	v = f.waitStatus("db", vmpodv1.StatusRunning)
	if c := condition(v, vmpodv1.VMReady); c == nil || c.Status != metav1.ConditionTrue || !v.Status.Ready {
		t.Errorf("Ready condition = %+v", c)
	}
	if !reflect.DeepEqual(v.Status.IPs, []string{"10.99.0.7"}) {
		t.Errorf("ips = %v", v.Status.IPs)
	}

	// a template change does not touch the running pod; it is reported
	v.Spec.Template.Spec.Domain.Memory.Guest = ptr.To(resource.MustParse("2Gi"))
	if err := f.c.Update(f.ctx, v); err != nil {
		t.Fatalf("update VM: %v", err)
	}
	testenv.Eventually(t, timeout, "RestartRequired", func() (bool, string) {
		c := condition(f.vm("db"), vmpodv1.VMRestartRequired)
		return c != nil && c.Status == metav1.ConditionTrue, f.describe("db")
	})
	if p := f.pod("db"); p == nil || p.UID != pod.UID {
		t.Errorf("the template change replaced the running pod")
	}
}

func TestAlwaysRestartsFailedPodWithBackoff(t *testing.T) {
	f := setup(t)
	f.create(f.cirros("web", vmpodv1.RunStrategyAlways))
	first := f.waitPod("web", "")
	f.kubeletRuns(first)
	f.waitStatus("web", vmpodv1.StatusRunning)

	var prev *corev1.Pod = first
	for n := int32(1); n <= 2; n++ {
		f.kubeletEnds(f.pod("web"), 1)
		var sf *vmpodv1.StartFailure
		testenv.Eventually(t, timeout, "the failure to be counted", func() (bool, string) {
			sf = f.vm("web").Status.StartFailure
			return sf != nil && sf.ConsecutiveFailCount == n, f.describe("web")
		})
		if sf.LastFailedPodUID != prev.UID {
			t.Errorf("lastFailedPodUID = %s, want %s", sf.LastFailedPodUID, prev.UID)
		}
		// the n-th failure waits 1s, 2s, ...
		minRetry := time.Now().Add(fast.Delay(n) - time.Second)
		if sf.RetryAfterTimestamp == nil || sf.RetryAfterTimestamp.Time.Before(minRetry) {
			t.Errorf("failure %d: retryAfter %v, want at least %v", n, sf.RetryAfterTimestamp, minRetry)
		}
		// during the back-off the failed pod stays (its log is the VM's console)
		if st := f.vm("web").Status; st.PrintableStatus != vmpodv1.StatusCrashLoopBackOff || st.PodUID != prev.UID {
			t.Errorf("failure %d: during back-off status %s pod %s, want CrashLoopBackOff with the failed pod", n, st.PrintableStatus, st.PodUID)
		}
		next := f.waitPod("web", prev.UID)
		if next.CreationTimestamp.Time.Before(sf.RetryAfterTimestamp.Time) {
			t.Errorf("failure %d: new pod created at %v, before retryAfter %v", n, next.CreationTimestamp, sf.RetryAfterTimestamp)
		}
		prev = next
	}
	f.waitEvent("web", "Replacing")

	// a clean guest shutdown is restarted at once and ends the crash loop
	f.kubeletEnds(prev, 0)
	f.waitPod("web", prev.UID)
	testenv.Eventually(t, timeout, "startFailure cleared", func() (bool, string) {
		return f.vm("web").Status.StartFailure == nil, f.describe("web")
	})
}

func TestRerunOnFailureAndOnce(t *testing.T) {
	f := setup(t)
	f.create(f.cirros("rerun", vmpodv1.RunStrategyRerunOnFailure))
	f.create(f.cirros("once", vmpodv1.RunStrategyOnce))

	// RerunOnFailure: a failed pod is replaced, a clean shutdown stays down
	p := f.waitPod("rerun", "")
	f.kubeletEnds(p, 1)
	p2 := f.waitPod("rerun", p.UID)
	f.kubeletEnds(p2, 0)
	f.waitStatus("rerun", vmpodv1.StatusStopped)

	// Once: whatever the end, no second pod
	p = f.waitPod("once", "")
	f.kubeletEnds(p, 1)
	f.waitStatus("once", vmpodv1.StatusFailed)

	// Give the controller time to (wrongly) act, then check that it did not.
	time.Sleep(2 * time.Second)
	if q := f.pod("rerun"); q == nil || q.UID != p2.UID {
		t.Errorf("RerunOnFailure replaced a pod that shut down cleanly")
	}
	if q := f.pod("once"); q == nil || q.UID != p.UID {
		t.Errorf("Once replaced its finished pod")
	}

	// a start request runs a RerunOnFailure VM again
	f.request("rerun", vmpodv1.StateChangeRequest{Action: vmpodv1.StateChangeStart})
	f.waitPod("rerun", p2.UID)
	f.waitRequestDone("rerun")
}

func TestHaltedRemovesThePod(t *testing.T) {
	f := setup(t)
	f.create(f.cirros("h", vmpodv1.RunStrategyAlways))
	p := f.waitPod("h", "")
	f.kubeletRuns(p)

	f.setStrategy("h", vmpodv1.RunStrategyHalted)
	f.waitNoPod("h")
	v := f.waitStatus("h", vmpodv1.StatusStopped)
	if v.Status.Created || v.Status.PodName != "" {
		t.Errorf("status after Halted = %+v", v.Status)
	}
	f.waitEvent("h", "Stopping")

	f.setStrategy("h", vmpodv1.RunStrategyAlways)
	f.waitPod("h", p.UID)
}

func TestManualWaitsForStartAndStop(t *testing.T) {
	f := setup(t)
	f.create(f.cirros("m", vmpodv1.RunStrategyManual))
	v := f.waitStatus("m", vmpodv1.StatusStopped)
	if v.Status.ObservedGeneration != v.Generation {
		t.Fatalf("status not from this generation")
	}
	time.Sleep(time.Second)
	if f.pod("m") != nil {
		t.Fatalf("a Manual VM got a pod without a start request")
	}

	f.request("m", vmpodv1.StateChangeRequest{Action: vmpodv1.StateChangeStart})
	p := f.waitPod("m", "")
	f.waitRequestDone("m")
	f.kubeletRuns(p)
	f.waitStatus("m", vmpodv1.StatusRunning)

	// a failed Manual VM stays failed
	f.kubeletEnds(p, 1)
	f.waitStatus("m", vmpodv1.StatusFailed)
	if q := f.pod("m"); q == nil || q.UID != p.UID {
		t.Fatalf("Manual replaced a failed pod without a request")
	}

	// start again: the finished pod is replaced
	f.request("m", vmpodv1.StateChangeRequest{Action: vmpodv1.StateChangeStart})
	p2 := f.waitPod("m", p.UID)
	f.waitRequestDone("m")

	f.request("m", vmpodv1.StateChangeRequest{Action: vmpodv1.StateChangeStop})
	f.waitNoPod("m")
	f.waitRequestDone("m")
	f.waitStatus("m", vmpodv1.StatusStopped)
	_ = p2
}

func TestRestartWaitsForTheOldPod(t *testing.T) {
	f := setup(t)
	f.create(f.cirros("r", vmpodv1.RunStrategyAlways))
	p := f.waitPod("r", "")
	// scheduled to a node, the pod's deletion waits for that node's kubelet
	binding := &corev1.Binding{ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: f.ns},
		Target: corev1.ObjectReference{Kind: "Node", Name: "node-1"}}
	if err := f.c.SubResource("binding").Create(f.ctx, p, binding); err != nil {
		t.Fatalf("bind pod: %v", err)
	}
	f.kubeletRuns(f.pod("r"))
	f.waitStatus("r", vmpodv1.StatusRunning)

	f.request("r", vmpodv1.StateChangeRequest{Action: vmpodv1.StateChangeRestart, PodUID: p.UID})
	f.waitStatus("r", vmpodv1.StatusStopping)
	old := f.pod("r")
	if old == nil || old.UID != p.UID || old.DeletionTimestamp == nil {
		t.Fatalf("want the old pod terminating, got %+v", old)
	}
	if _, pending := f.vm("r").Annotations[vmpodv1.StateChangeRequestAnnotation]; !pending {
		t.Fatalf("the restart request was cleared before a new pod ran")
	}
	f.waitEvent("r", "Restarting")
	// the kubelet has powered the VM off: the pod goes
	if err := f.c.Delete(f.ctx, old, client.GracePeriodSeconds(0)); err != nil {
		t.Fatalf("finish deleting the pod: %v", err)
	}
	f.waitPod("r", p.UID)
	f.waitRequestDone("r")

	// a stop request under Always cannot work (the pod would come back): it is refused
	cur := f.pod("r")
	f.request("r", vmpodv1.StateChangeRequest{Action: vmpodv1.StateChangeStop})
	f.waitRequestDone("r")
	f.waitEvent("r", "RequestIgnored")
	if q := f.pod("r"); q == nil || q.UID != cur.UID || q.DeletionTimestamp != nil {
		t.Errorf("an ignored stop request touched the pod")
	}
}

func TestVolumesGateThePod(t *testing.T) {
	f := setup(t)
	// a VM whose disk is a DataVolume from a template, and one naming a missing PVC
	v := f.cirros("dv", vmpodv1.RunStrategyAlways)
	v.Spec.DataVolumeTemplates = []vmpodv1.DataVolumeTemplateSpec{{
		Metadata: vmpodv1.DataVolumeTemplateMeta{Name: "dv-root"},
		Spec: vmpodv1.DataVolumeSpec{Source: vmpodv1.DataVolumeSource{Blank: &vmpodv1.BlankSource{}},
			Storage: vmpodv1.StorageSpec{Resources: corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{"storage": resource.MustParse("1Gi")}}}},
	}}
	v.Spec.Template.Spec.Volumes[0] = vmpodv1.Volume{Name: "containerdisk", VolumeSource: vmpodv1.VolumeSource{DataVolume: &vmpodv1.DataVolumeVolumeSource{Name: "dv-root"}}}
	f.create(v)
	w := f.cirros("pvc", vmpodv1.RunStrategyAlways)
	w.Spec.Template.Spec.Volumes[0] = vmpodv1.Volume{Name: "containerdisk", VolumeSource: vmpodv1.VolumeSource{
		PersistentVolumeClaim: &vmpodv1.PersistentVolumeClaimVolumeSource{PersistentVolumeClaimVolumeSource: corev1.PersistentVolumeClaimVolumeSource{ClaimName: "late"}}}}
	f.create(w)

	got := f.waitStatus("dv", vmpodv1.StatusProvisioning)
	if c := condition(got, vmpodv1.VMDataVolumesReady); c == nil || c.Status != metav1.ConditionFalse {
		t.Errorf("DataVolumesReady = %+v", c)
	}
	dv := &vmpodv1.DataVolume{}
	if err := f.c.Get(f.ctx, client.ObjectKey{Namespace: f.ns, Name: "dv-root"}, dv); err != nil {
		t.Fatalf("the template's DataVolume was not created: %v", err)
	}
	if ref := metav1.GetControllerOf(dv); ref == nil || ref.Name != "dv" {
		t.Errorf("DataVolume owner = %+v", ref)
	}
	got = f.waitStatus("pvc", vmpodv1.StatusPvcNotFound)
	if c := condition(got, vmpodv1.VMFailure); c == nil || c.Status != metav1.ConditionTrue || c.Reason != "PVCNotFound" {
		t.Errorf("Failure = %+v", c)
	}
	if f.pod("dv") != nil || f.pod("pvc") != nil {
		t.Fatalf("a VM got a pod before its volumes were ready")
	}

	// the importer reports the blank disk complete on the PVC the DataVolume controller made
	testenv.Eventually(t, timeout, "the DataVolume's PVC", func() (bool, string) {
		pvc := &corev1.PersistentVolumeClaim{}
		if err := f.c.Get(f.ctx, client.ObjectKey{Namespace: f.ns, Name: "dv-root"}, pvc); err != nil {
			return false, err.Error()
		}
		pvc.Annotations = map[string]string{vmpodv1.ImportPhaseAnnotation: "Succeeded"}
		return f.c.Update(f.ctx, pvc) == nil, "update"
	})
	pod := f.waitPod("dv", "")
	if c := pod.Spec.Volumes; len(c) == 0 || c[0].PersistentVolumeClaim == nil || c[0].PersistentVolumeClaim.ClaimName != "dv-root" {
		t.Errorf("pod volumes = %+v", c)
	}

	f.create(&corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Name: "late", Namespace: f.ns}, Spec: corev1.PersistentVolumeClaimSpec{
		AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
		Resources:   corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{"storage": resource.MustParse("1Gi")}}}})
	f.waitPod("pvc", "")
}

func TestForeignPodIsNotTouched(t *testing.T) {
	f := setup(t)
	foreign := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: render.PodName("taken"), Namespace: f.ns},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "c", Image: "busybox"}}}}
	f.create(foreign)
	f.create(f.cirros("taken", vmpodv1.RunStrategyAlways))
	testenv.Eventually(t, timeout, "Failure PodNameTaken", func() (bool, string) {
		c := condition(f.vm("taken"), vmpodv1.VMFailure)
		return c != nil && c.Status == metav1.ConditionTrue && c.Reason == "PodNameTaken", f.describe("taken")
	})
	if p := f.pod("taken"); p == nil || p.UID != foreign.UID || p.DeletionTimestamp != nil {
		t.Fatalf("the foreign pod was touched")
	}
}
