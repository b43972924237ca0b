package render

import (
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/vmpod/vmpod/api/vmspec"
	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
)

func withHotplugVolume(vm *vmpodv1.VirtualMachine, name string, bus vmpodv1.DiskBus, readOnly bool) {
	spec := &vm.Spec.Template.Spec
	spec.Domain.Devices.Disks = append(spec.Domain.Devices.Disks, vmpodv1.Disk{Name: name, Disk: &vmpodv1.DiskTarget{Bus: bus, ReadOnly: readOnly}})
	spec.Volumes = append(spec.Volumes, vmpodv1.Volume{Name: name, VolumeSource: vmpodv1.VolumeSource{
		DataVolume: &vmpodv1.DataVolumeVolumeSource{Name: name + "-dv", Hotpluggable: true}}})
}

// A hotpluggable volume is none of the pod's business: not a pod volume, not a disk of the
// pod's VM spec, not in the template hash. It is a HotplugVolume, whose attachment pod
// mounts (or maps, for a Block PVC) its claim where the shim looks, as no user.
func TestHotplugVolumes(t *testing.T) {
	plain := fedora()
	before, err := Pod(plain, claims, cfg)
	if err != nil {
		t.Fatal(err)
	}
	vm := fedora()
	withHotplugVolume(vm, "hot", "", false)
	withHotplugVolume(vm, "logs", "virtio", true)
	pod, err := Pod(vm, claims, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if TemplateHash(pod) != TemplateHash(before) || strings.Contains(pod.Annotations[vmspec.Annotation], "hot-dv") || strings.Contains(pod.Annotations[vmspec.Annotation], `"hot"`) {
		t.Errorf("a hotpluggable volume changed the pod: hash %s vs %s, annotation %s", TemplateHash(pod), TemplateHash(before), pod.Annotations[vmspec.Annotation])
	}
	hvs, err := HotplugVolumes(vm)
	if err != nil || len(hvs) != 2 || hvs[0] != (HotplugVolume{Name: "hot", Claim: "hot-dv"}) || hvs[1] != (HotplugVolume{Name: "logs", Claim: "logs-dv", ReadOnly: true}) {
		t.Fatalf("HotplugVolumes = %+v, %v", hvs, err)
	}

	vmPod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "vmpod-fedora", Namespace: "ns", UID: "pod-uid"}, Spec: corev1.PodSpec{NodeName: "node-1"}}
	att := AttachmentPod(vm, vmPod, hvs[1], Claim{Block: true}, cfg)
	if att.Name != AttachmentPodName("fedora", "logs") || att.Labels[vmspec.AttachmentForLabel] != "pod-uid" || att.Labels[HotplugVolumeLabel] != "logs" || att.Labels[VMNameLabel] != "fedora" {
		t.Errorf("attachment pod %s labels %v", att.Name, att.Labels)
	}
	c := att.Spec.Containers[0]
	if len(c.VolumeMounts) != 0 || len(c.VolumeDevices) != 1 || c.VolumeDevices[0].DevicePath != vmspec.BlockDevicePath("logs") ||
		!att.Spec.Volumes[0].PersistentVolumeClaim.ReadOnly {
		t.Errorf("a read-only Block claim's attachment pod: mounts %v, devices %v, volumes %+v", c.VolumeMounts, c.VolumeDevices, att.Spec.Volumes)
	}
	if c.SecurityContext.Capabilities.Drop[0] != "ALL" || !*c.SecurityContext.ReadOnlyRootFilesystem || *att.Spec.SecurityContext.RunAsUser == 0 {
		t.Errorf("attachment pod security %+v %+v", att.Spec.SecurityContext, c.SecurityContext)
	}
	if AttachmentPodName("a-b", "c") == AttachmentPodName("a", "b-c") {
		t.Error("two VMs' volumes share an attachment pod name")
	}
	// a migration's target gets the same on its node, lent to it, named for it
	target := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "vmpod-fedora-mig", Namespace: "ns", UID: "target-uid"}, Spec: corev1.PodSpec{NodeName: "node-2"}}
	tatt, err := TargetAttachmentPod(vm, target, att)
	if err != nil {
		t.Fatal(err)
	}
	att.Name, att.Labels[vmspec.AttachmentForLabel], att.OwnerReferences[0].Name, att.OwnerReferences[0].UID = tatt.Name, "target-uid", target.Name, target.UID
	att.Spec.Affinity.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution.NodeSelectorTerms[0].MatchFields[0].Values = []string{"node-2"}
	if !equality.Semantic.DeepEqual(tatt, att) || tatt.Name == AttachmentPodName("fedora", "logs") || tatt.Name != TargetAttachmentPodName("fedora", "logs", "target-uid") {
		t.Errorf("the target's attachment pod %s:\n%+v\nwant the source's for node-2 and the target:\n%+v", tatt.Name, tatt, att)
	}
	if _, err := TargetAttachmentPod(vm, target, vmPod); err == nil || !strings.Contains(err.Error(), "not an attachment pod") {
		t.Errorf("a VM pod taken for an attachment pod: %v", err)
	}
	disk := HotplugDisk(hvs[1], Claim{Block: true}, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{UID: "att-uid"}})
	if want := (vmspec.HotplugDisk{Disk: vmspec.Disk{Name: "logs", Volume: "logs", Source: vmspec.SourceBlock, Device: vmspec.DeviceDisk, Bus: vmspec.BusVirtio, ReadOnly: true},
		AttachmentPod: "att-uid"}); disk != want {
		t.Errorf("HotplugDisk = %+v, want %+v", disk, want)
	}
	// a disk bus other than virtio (a preference's, past the schema) is refused, named
	bad := fedora()
	withHotplugVolume(bad, "sata", "sata", false)
	if _, err := HotplugVolumes(bad); err == nil || !strings.Contains(err.Error(), "volume sata is hotpluggable: its disk must be a virtio disk") {
		t.Errorf("HotplugVolumes with a sata disk: %v", err)
	}
}
