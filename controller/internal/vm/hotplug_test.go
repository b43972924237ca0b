package vm_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/vmpod/vmpod/api/vmspec"
	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
	"github.com/vmpod/vmpod/controller/internal/render"
	"github.com/vmpod/vmpod/controller/internal/testenv"
	"github.com/vmpod/vmpod/controller/manager"
)

// TestHotplugVolume: a hotpluggable volume added to a running VM gets an attachment pod on
// the VM pod's node, lent to that pod, and once it runs, an attach exec naming it; the VM
// pod is never replaced. A failed exec is retried and said in the volume's status; a
// volume whose PVC does not exist waits without holding the VM back. Removed from the
// spec, the disk is detached and the attachment pod deleted. A new VM pod gets its own
// attachment pod, after the old one is gone. (The shim's side, and a real kubelet, are
// integration/vmpod's and integration/cluster's.)
func TestHotplugVolume(t *testing.T) {
	env := testenv.Get(t)
	ns := env.Namespace(t)
	exec := &recordingExec{}
	env.StartManager(t, ns, func(o *manager.Options) { o.Backoff = fast; o.PodExec = exec })
	f := &fixture{t: t, env: env, c: env.Client, ns: ns, ctx: context.Background()}

	// a hotpluggable volume of a PVC that does not exist yet: the VM starts all the same
	vm := f.cirros("hp", vmpodv1.RunStrategyAlways)
	addHotplugVolume(vm, "later", "later-pvc")
	f.create(vm)
	pod := f.waitPod("hp", "")
	if ann := pod.Annotations[vmspec.Annotation]; strings.Contains(ann, "later") {
		t.Errorf("the hotpluggable volume is in the pod's VM spec: %s", ann)
	}
	for _, v := range pod.Spec.Volumes {
		if v.Name == "later" {
			t.Errorf("the hotpluggable volume is a volume of the VM's pod")
		}
	}
	f.bind(pod, "node-a")
	f.kubeletRuns(pod)
	f.waitStatus("hp", vmpodv1.StatusRunning)
	f.waitVolume("hp", "later", vmpodv1.VolumePending, "PVCNotFound")

	// added while it runs: an attachment pod on the VM pod's node, lent to that pod
	f.create(pvc(ns, "data"))
	f.update("hp", func(v *vmpodv1.VirtualMachine) { addHotplugVolume(v, "data", "data") })
	exec.mu.Lock()
	exec.fail = errors.New("vmpod.dev/attach-disk: the guest is busy")
	exec.mu.Unlock()
	att := f.waitAttachmentPod("hp", "data")
	if got := att.Labels[vmspec.AttachmentForLabel]; got != string(pod.UID) {
		t.Errorf("attachment pod label %s=%q, want the VM pod's UID %s", vmspec.AttachmentForLabel, got, pod.UID)
	}
	if !metav1.IsControlledBy(att, pod) {
		t.Errorf("attachment pod owners %+v: want the VM's pod, to go with it", att.OwnerReferences)
	}
	if terms := att.Spec.Affinity.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution.NodeSelectorTerms; len(terms) != 1 || terms[0].MatchFields[0].Values[0] != "node-a" {
		t.Errorf("attachment pod node affinity %+v, want node-a", terms)
	}
	if c := att.Spec.Containers[0]; len(c.VolumeMounts) != 1 || c.VolumeMounts[0].MountPath != vmspec.VolumeMountPath("data") ||
		att.Spec.Volumes[0].PersistentVolumeClaim.ClaimName != "data" {
		t.Errorf("attachment pod does not mount PVC data at %s: %+v %+v", vmspec.VolumeMountPath("data"), c.VolumeMounts, att.Spec.Volumes)
	}
	if sc := att.Spec.SecurityContext; sc == nil || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot || *att.Spec.AutomountServiceAccountToken {
		t.Errorf("attachment pod runs as root or with a token: %+v", sc)
	}
	if !slices.Contains(att.Finalizers, render.AttachmentFinalizer) {
		t.Errorf("attachment pod finalizers %v: want %s, holding its volume until the disk is out", att.Finalizers, render.AttachmentFinalizer)
	}
	f.waitVolume("hp", "data", vmpodv1.VolumePending, "AttachmentPodNotRunning")

	// it runs: the attach exec names it; failing, it is retried and said
	f.kubeletRuns(att)
	f.waitVolume("hp", "data", vmpodv1.VolumeAttachedToNode, "FailedAttach")
	f.waitEvent("hp", "FailedAttach")
	exec.mu.Lock()
	exec.fail = nil
	exec.mu.Unlock()
	s := f.waitVolume("hp", "data", vmpodv1.VolumeReady, "")
	if s.PodUID != pod.UID || s.AttachmentPod != att.Name {
		t.Errorf("volume status %+v, want pod %s and attachment pod %s", s, pod.UID, att.Name)
	}
	f.waitEvent("hp", "VolumeAttached")
	attach := lastExec(t, exec, vmspec.AttachDiskCommand)
	var disk vmspec.HotplugDisk
	if err := json.Unmarshal([]byte(strings.TrimPrefix(attach, pod.Name+"/"+vmspec.ComputeContainer+":"+vmspec.AttachDiskCommand+" ")), &disk); err != nil {
		t.Fatalf("attach exec %q: %v", attach, err)
	}
	if want := (vmspec.HotplugDisk{Disk: vmspec.Disk{Name: "data", Volume: "data", Source: vmspec.SourceFile, Device: vmspec.DeviceDisk, Bus: vmspec.BusVirtio},
		AttachmentPod: string(att.UID)}); disk != want {
		t.Errorf("attach exec disk %+v, want %+v", disk, want)
	}
	if now := f.pod("hp"); now.UID != pod.UID {
		t.Fatalf("adding a hotpluggable volume replaced the VM's pod")
	}
	if c := condition(f.vm("hp"), vmpodv1.VMRestartRequired); c != nil && c.Status == metav1.ConditionTrue {
		t.Errorf("adding a hotpluggable volume asks for a restart: %+v", c)
	}

	// the attachment pod deleted by someone else (a drain, a user): the disk comes out
	// before the pod may go, and a new attachment pod brings it back
	detaches := countExec(exec, vmspec.DetachDiskCommand)
	if err := f.c.Delete(f.ctx, att); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, timeout, "a detach, then the deleted attachment pod gone and another one made", func() (bool, string) {
		p := f.attachmentPod("hp", "data")
		return countExec(exec, vmspec.DetachDiskCommand) > detaches && p != nil && p.UID != att.UID, fmt.Sprint(f.vm("hp").Status.VolumeStatus)
	})
	att = f.waitAttachmentPod("hp", "data")
	f.kubeletRuns(att)
	f.waitVolume("hp", "data", vmpodv1.VolumeReady, "")

	// removed: detached, then its attachment pod deleted, and gone from the status
	f.update("hp", func(v *vmpodv1.VirtualMachine) { removeVolume(v, "data") })
	testenv.Eventually(t, timeout, "the volume to be detached", func() (bool, string) {
		return volumeStatus(f.vm("hp"), "data") == nil && f.attachmentPod("hp", "data") == nil, fmt.Sprint(f.vm("hp").Status.VolumeStatus)
	})
	if got := lastExec(t, exec, vmspec.DetachDiskCommand); got != pod.Name+"/"+vmspec.ComputeContainer+":"+vmspec.DetachDiskCommand+" data" {
		t.Errorf("detach exec %q", got)
	}
	f.waitEvent("hp", "VolumeDetached")

	// a new VM pod: the old attachment pod goes, and the new pod gets its own
	f.update("hp", func(v *vmpodv1.VirtualMachine) { addHotplugVolume(v, "data", "data") })
	old := f.waitAttachmentPod("hp", "data")
	f.kubeletRuns(old)
	f.waitVolume("hp", "data", vmpodv1.VolumeReady, "")
	f.kubeletEnds(f.pod("hp"), 1)
	// (a pod that has ended is deleted at once: no kubelet needs to finish it)
	next := f.waitPod("hp", pod.UID)
	f.bind(next, "node-b")
	f.kubeletRuns(next)
	testenv.Eventually(t, timeout, "an attachment pod lent to the new VM pod", func() (bool, string) {
		p := f.attachmentPod("hp", "data")
		return p != nil && p.Labels[vmspec.AttachmentForLabel] == string(next.UID), fmt.Sprint(f.vm("hp").Status.VolumeStatus)
	})
	// the status follows the new attachment pod in a later reconcile (measured: a cold
	// run read it still absent)
	testenv.Eventually(t, timeout, "the volume's status for the new pod", func() (bool, string) {
		return volumeStatus(f.vm("hp"), "data") != nil, fmt.Sprint(f.vm("hp").Status.VolumeStatus)
	})
	if s := volumeStatus(f.vm("hp"), "data"); s == nil || s.Phase == vmpodv1.VolumeReady {
		t.Errorf("volume status %+v with the new pod's attachment pod not running, want it not Ready", s)
	}

	// the VM deleted: its attachment pod is held while the VM pod's QEMU may run, and let
	// go once that pod has ended (the garbage collector, absent here, then deletes both)
	last := f.waitAttachmentPod("hp", "data")
	if err := f.c.Delete(f.ctx, f.vm("hp")); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, timeout, "the VM to go", func() (bool, string) {
		err := f.c.Get(f.ctx, types.NamespacedName{Namespace: ns, Name: "hp"}, &vmpodv1.VirtualMachine{})
		return apierrors.IsNotFound(err), fmt.Sprint(err)
	})
	time.Sleep(time.Second)
	if p := f.attachmentPod("hp", "data"); p == nil || !slices.Contains(p.Finalizers, render.AttachmentFinalizer) {
		t.Fatalf("the attachment pod lost its finalizer while its VM pod runs: %+v", p)
	}
	f.kubeletEnds(f.pod("hp"), 0)
	testenv.Eventually(t, timeout, "the attachment pod let go", func() (bool, string) {
		p := f.attachmentPod("hp", "data")
		return p == nil || p.UID != last.UID || !slices.Contains(p.Finalizers, render.AttachmentFinalizer), fmt.Sprintf("%+v", p)
	})
}

// countExec counts the execs of command the controller ran.
func countExec(exec *recordingExec, command string) int {
	n := 0
	for _, c := range exec.ran() {
		if strings.Contains(c, ":"+command+" ") {
			n++
		}
	}
	return n
}

func addHotplugVolume(v *vmpodv1.VirtualMachine, name, claim string) {
	spec := &v.Spec.Template.Spec
	spec.Domain.Devices.Disks = append(spec.Domain.Devices.Disks, vmpodv1.Disk{Name: name, Disk: &vmpodv1.DiskTarget{Bus: "virtio"}})
	spec.Volumes = append(spec.Volumes, vmpodv1.Volume{Name: name, VolumeSource: vmpodv1.VolumeSource{
		PersistentVolumeClaim: &vmpodv1.PersistentVolumeClaimVolumeSource{
			PersistentVolumeClaimVolumeSource: corev1.PersistentVolumeClaimVolumeSource{ClaimName: claim}, Hotpluggable: true}}})
}

func removeVolume(v *vmpodv1.VirtualMachine, name string) {
	spec := &v.Spec.Template.Spec
	var disks []vmpodv1.Disk
	for _, d := range spec.Domain.Devices.Disks {
		if d.Name != name {
			disks = append(disks, d)
		}
	}
	var volumes []vmpodv1.Volume
	for _, vol := range spec.Volumes {
		if vol.Name != name {
			volumes = append(volumes, vol)
		}
	}
	spec.Domain.Devices.Disks, spec.Volumes = disks, volumes
}

func pvc(ns, name string) *corev1.PersistentVolumeClaim {
	return &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: corev1.PersistentVolumeClaimSpec{AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			Resources: corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")}}},
	}
}

func volumeStatus(v *vmpodv1.VirtualMachine, name string) *vmpodv1.VolumeStatus {
	for i := range v.Status.VolumeStatus {
		if v.Status.VolumeStatus[i].Name == name {
			return &v.Status.VolumeStatus[i]
		}
	}
	return nil
}

// lastExec is the last exec of command the controller ran.
func lastExec(t *testing.T, exec *recordingExec, command string) string {
	t.Helper()
	calls := exec.ran()
	for i := len(calls) - 1; i >= 0; i-- {
		if strings.Contains(calls[i], ":"+command+" ") {
			return calls[i]
		}
	}
	t.Fatalf("no %s exec in %v", command, calls)
	return ""
}

// bind does what the scheduler does: puts the pod on a node.
func (f *fixture) bind(p *corev1.Pod, node string) {
	f.t.Helper()
	b := &corev1.Binding{ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace},
		Target: corev1.ObjectReference{Kind: "Node", Name: node}}
	if err := f.c.SubResource("binding").Create(f.ctx, p, b); err != nil {
		f.t.Fatalf("bind pod %s to %s: %v", p.Name, node, err)
	}
	if err := f.c.Get(f.ctx, types.NamespacedName{Namespace: p.Namespace, Name: p.Name}, p); err != nil {
		f.t.Fatal(err)
	}
}

// update changes the VM's spec, retrying on conflicts with the controller's writes.
func (f *fixture) update(vmName string, change func(*vmpodv1.VirtualMachine)) {
	f.t.Helper()
	for {
		v := f.vm(vmName)
		change(v)
		err := f.c.Update(f.ctx, v)
		if err == nil {
			return
		}
		if !apierrors.IsConflict(err) {
			f.t.Fatalf("update VM %s: %v", vmName, err)
		}
	}
}

func (f *fixture) attachmentPod(vmName, volume string) *corev1.Pod {
	f.t.Helper()
	p := &corev1.Pod{}
	err := f.c.Get(f.ctx, types.NamespacedName{Namespace: f.ns, Name: render.AttachmentPodName(vmName, volume)}, p)
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		f.t.Fatalf("get attachment pod: %v", err)
	}
	return p
}

func (f *fixture) waitAttachmentPod(vmName, volume string) *corev1.Pod {
	f.t.Helper()
	var p *corev1.Pod
	testenv.Eventually(f.t, timeout, "the attachment pod of volume "+volume, func() (bool, string) {
		p = f.attachmentPod(vmName, volume)
		return p != nil && p.DeletionTimestamp == nil, fmt.Sprint(f.vm(vmName).Status.VolumeStatus)
	})
	return p
}

func (f *fixture) waitVolume(vmName, volume string, phase vmpodv1.VolumePhase, reason string) vmpodv1.VolumeStatus {
	f.t.Helper()
	var s *vmpodv1.VolumeStatus
	testenv.Eventually(f.t, timeout, fmt.Sprintf("volume %s %s (%s)", volume, phase, reason), func() (bool, string) {
		s = volumeStatus(f.vm(vmName), volume)
		return s != nil && s.Phase == phase && s.Reason == reason, fmt.Sprintf("%+v", s)
	})
	return *s
}
