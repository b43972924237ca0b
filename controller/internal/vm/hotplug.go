package vm

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/vmpod/vmpod/api/vmspec"
	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
	"github.com/vmpod/vmpod/controller/internal/render"
)

// hotplugRetry is how soon a failed attach or detach is tried again.
const hotplugRetry = 10 * time.Second

// hotplugExecWait bounds one attach or detach exec: a detach waits for the guest to let
// the disk go (the shim gives it two minutes).
const hotplugExecWait = 3 * time.Minute

// hotplug brings the running VM's hot-plugged disks in line with its hotpluggable
// volumes (docs/design/204): for each one, an attachment pod mounts the PVC on the VM
// pod's node, and an exec the shim answers (vmspec.AttachDiskCommand) plugs the disk in
// from that pod's volume; a volume gone from the spec is unplugged the same way, then
// its attachment pod deleted. status.volumeStatus records each one's way. It returns how
// soon to look again (0: when something changes).
func (r *run) hotplug(ctx context.Context) (time.Duration, error) {
	running := r.podRunning() && r.wantRunning
	pods := &corev1.PodList{}
	if err := r.Client.List(ctx, pods, ctrl.InNamespace(r.vm.Namespace), ctrl.MatchingLabels{render.VMNameLabel: r.vm.Name}, ctrl.HasLabels{render.HotplugVolumeLabel}); err != nil {
		return 0, fmt.Errorf("list attachment pods: %w", err)
	}
	attachment := map[string]*corev1.Pod{}
	stale := map[string]bool{} // attachment pods' names still taken by an earlier VM pod's
	for i := range pods.Items {
		p := &pods.Items[i]
		if running && metav1.IsControlledBy(p, r.pod) && p.Labels[vmspec.AttachmentForLabel] == string(r.pod.UID) {
			attachment[p.Labels[render.HotplugVolumeLabel]] = p
			continue
		}
		// an earlier VM pod's, or this one's whose VM does not run (any more): it goes
		// once no QEMU can have its disk open
		stale[p.Name] = true
		gone, err := r.qemuGone(ctx, p)
		if err != nil {
			return 0, err
		}
		if gone {
			if err := r.releaseAttachmentPod(ctx, p); err != nil {
				return 0, err
			}
		}
	}
	if !running {
		r.status.VolumeStatus = nil
		return 0, nil
	}
	src := r.expanded
	if src == nil {
		src = r.vm
	}
	wanted, err := render.HotplugVolumes(src)
	if err != nil {
		r.event(corev1.EventTypeWarning, "InvalidSpec", "HotplugVolume", "%v", err)
		wanted = nil // what is attached is detached: the spec no longer says what it wants
	}
	old := map[string]vmpodv1.VolumeStatus{}
	for _, s := range r.status.VolumeStatus {
		if s.PodUID == "" || s.PodUID == r.pod.UID {
			old[s.Name] = s
		}
	}

	var retry time.Duration
	var next []vmpodv1.VolumeStatus
	for _, hv := range wanted {
		s, again, err := r.attach(ctx, hv, attachment[hv.Name], old[hv.Name], stale[render.AttachmentPodName(r.vm.Name, hv.Name)])
		if err != nil {
			return 0, err
		}
		retry = soonest(retry, again)
		next = append(next, s)
	}
	// volumes no longer wanted: by their status, or by an attachment pod the status lost
	unwanted := map[string]bool{}
	for name := range old {
		unwanted[name] = true
	}
	for name := range attachment {
		unwanted[name] = true
	}
	for name := range unwanted {
		if slices.ContainsFunc(wanted, func(hv render.HotplugVolume) bool { return hv.Name == name }) {
			continue
		}
		was, ok := old[name]
		if !ok {
			was = vmpodv1.VolumeStatus{Name: name, Phase: vmpodv1.VolumeDetaching, AttachmentPod: attachment[name].Name}
		}
		s, again, err := r.detach(ctx, was, attachment[name])
		if err != nil {
			return 0, err
		}
		retry = soonest(retry, again)
		if s != nil {
			next = append(next, *s)
		}
	}
	slices.SortFunc(next, func(a, b vmpodv1.VolumeStatus) int { return cmp.Compare(a.Name, b.Name) })
	r.status.VolumeStatus = next
	return retry, nil
}

// attach moves one wanted volume along: its PVC, its attachment pod, the plug. stale: an
// earlier VM pod's attachment pod still has this one's name.
func (r *run) attach(ctx context.Context, hv render.HotplugVolume, pod *corev1.Pod, was vmpodv1.VolumeStatus, stale bool) (vmpodv1.VolumeStatus, time.Duration, error) {
	s := vmpodv1.VolumeStatus{Name: hv.Name, Phase: vmpodv1.VolumePending}
	if pod != nil {
		s.AttachmentPod = pod.Name
	}
	if was.Phase == vmpodv1.VolumeReady && was.PodUID == r.pod.UID && pod != nil && pod.DeletionTimestamp == nil {
		return was, 0, nil
	}
	v := r.volume(hv.Name)
	claim, blocked, err := r.claim(ctx, v)
	if err != nil {
		return s, 0, err
	}
	if blocked != nil {
		s.Reason, s.Message = blocked.reason, blocked.message
		return s, 0, nil // the PVC and DataVolume watches bring us back
	}
	switch {
	case pod == nil && stale:
		s.Reason, s.Message = "AttachmentPodTerminating", "waiting for the attachment pod of the VM's previous pod to go"
		return s, 0, nil // its deletion brings us back
	case pod == nil:
		p := render.AttachmentPod(r.vm, r.pod, hv, claim, r.Render)
		switch err := r.Client.Create(ctx, p); {
		case apierrors.IsAlreadyExists(err):
			s.Reason, s.Message = "AttachmentPodNameTaken", fmt.Sprintf("pod %s exists and is not this VM's attachment pod for volume %s", p.Name, hv.Name)
			return s, r.Backoff.Max, nil
		case err != nil:
			s.Reason, s.Message = "FailedCreate", fmt.Sprintf("create attachment pod %s: %v", p.Name, err)
			r.event(corev1.EventTypeWarning, "FailedCreate", "HotplugVolume", "%s", s.Message)
			return s, hotplugRetry, nil
		}
		log.FromContext(ctx).Info("created attachment pod", "pod", p.Name, "volume", hv.Name)
		r.event(corev1.EventTypeNormal, "SuccessfulCreate", "HotplugVolume", "created attachment pod %s for volume %s", p.Name, hv.Name)
		s.AttachmentPod, s.Reason, s.Message = p.Name, "AttachmentPodCreated", "waiting for the attachment pod to mount the volume on node "+r.pod.Spec.NodeName
		return s, 0, nil
	case pod.DeletionTimestamp != nil, pod.Status.Phase == corev1.PodFailed, pod.Status.Phase == corev1.PodSucceeded:
		// going (deleted by someone, evicted) or ended: the disk comes out before the
		// kubelet may unmount its volume (the finalizer holds it), and a new attachment
		// pod brings it back
		if out, again, err := r.detach(ctx, vmpodv1.VolumeStatus{Name: hv.Name, Phase: vmpodv1.VolumeDetaching, AttachmentPod: pod.Name}, pod); err != nil || out != nil {
			if out != nil {
				s = *out
			}
			return s, again, err
		}
		s.Reason, s.Message = "AttachmentPodTerminating", fmt.Sprintf("attachment pod %s is going: the disk is out until a new one mounts the volume", pod.Name)
		return s, 0, nil
	case pod.Status.Phase != corev1.PodRunning:
		s.Reason, s.Message = "AttachmentPodNotRunning", fmt.Sprintf("attachment pod %s is %s", pod.Name, pod.Status.Phase)
		return s, 0, nil
	}
	s.Phase = vmpodv1.VolumeAttachedToNode
	if r.paused() {
		s.Reason, s.Message = "Paused", "the disk is plugged in once the VM is unpaused"
		return s, 0, nil
	}
	if r.Exec == nil {
		s.Reason, s.Message = "NoPodExec", "the controller runs without pod exec: it cannot plug disks in"
		return s, 0, nil
	}
	disk, err := json.Marshal(render.HotplugDisk(hv, claim, pod))
	if err != nil {
		return s, 0, fmt.Errorf("volume %s: %w", hv.Name, err)
	}
	execCtx, cancel := context.WithTimeout(ctx, hotplugExecWait)
	defer cancel()
	if _, err := r.Exec.Exec(execCtx, r.pod.Namespace, r.pod.Name, vmspec.ComputeContainer, []string{vmspec.AttachDiskCommand, string(disk)}); err != nil {
		s.Reason, s.Message = "FailedAttach", err.Error()
		r.event(corev1.EventTypeWarning, "FailedAttach", "HotplugVolume", "volume %s: %v", hv.Name, err)
		return s, hotplugRetry, nil
	}
	log.FromContext(ctx).Info("volume attached", "volume", hv.Name, "pod", r.pod.Name)
	if was.Phase != vmpodv1.VolumeReady || was.PodUID != r.pod.UID {
		r.event(corev1.EventTypeNormal, "VolumeAttached", "HotplugVolume", "volume %s attached to the VM in pod %s (disk serial %s)", hv.Name, r.pod.Name, hv.Name)
	}
	s.Phase, s.PodUID = vmpodv1.VolumeReady, r.pod.UID
	return s, 0, nil
}

// detach unplugs a volume's disk (idempotent in the shim: also when the status never saw
// it attached — an attach whose answer was lost may have plugged it), then lets its
// attachment pod go. It returns the volume's status while it is still on its way out, nil
// once it is out.
func (r *run) detach(ctx context.Context, was vmpodv1.VolumeStatus, pod *corev1.Pod) (*vmpodv1.VolumeStatus, time.Duration, error) {
	s := was
	s.Phase = vmpodv1.VolumeDetaching
	if r.paused() {
		s.Reason, s.Message = "Paused", "the disk is unplugged once the VM is unpaused"
		return &s, 0, nil
	}
	if r.Exec == nil {
		s.Reason, s.Message = "NoPodExec", "the controller runs without pod exec: it cannot unplug disks"
		return &s, 0, nil
	}
	execCtx, cancel := context.WithTimeout(ctx, hotplugExecWait)
	defer cancel()
	if _, err := r.Exec.Exec(execCtx, r.pod.Namespace, r.pod.Name, vmspec.ComputeContainer, []string{vmspec.DetachDiskCommand, was.Name}); err != nil {
		s.Reason, s.Message = "FailedDetach", err.Error()
		r.event(corev1.EventTypeWarning, "FailedDetach", "HotplugVolume", "volume %s: %v", was.Name, err)
		return &s, hotplugRetry, nil
	}
	log.FromContext(ctx).Info("volume detached", "volume", was.Name, "pod", r.pod.Name)
	if was.Phase == vmpodv1.VolumeReady || was.Phase == vmpodv1.VolumeDetaching && was.PodUID != "" {
		r.event(corev1.EventTypeNormal, "VolumeDetached", "HotplugVolume", "volume %s detached from the VM in pod %s", was.Name, r.pod.Name)
	}
	if pod != nil {
		if err := r.releaseAttachmentPod(ctx, pod); err != nil {
			return nil, 0, err
		}
	}
	return nil, 0, nil
}

// qemuGone says whether the VM pod that attachment pod p lends its volume to has no QEMU
// any more that could have the disk open: it is gone (none of its name and UID), or has
// ended. That pod is the VM's, an earlier one of the VM's still powering off, or a
// migration's target, which plugs the disk before the guest arrives.
func (r *run) qemuGone(ctx context.Context, p *corev1.Pod) (bool, error) {
	if owner := metav1.GetControllerOf(p); r.pod != nil && owner != nil && owner.UID == r.pod.UID {
		return finished(r.pod), nil
	}
	return ownerQEMUGone(ctx, r.APIReader, p)
}

// ownerQEMUGone is qemuGone for any attachment pod p, read from reader.
func ownerQEMUGone(ctx context.Context, reader ctrl.Reader, p *corev1.Pod) (bool, error) {
	owner := metav1.GetControllerOf(p)
	if owner == nil {
		return true, nil
	}
	vmPod := &corev1.Pod{}
	err := reader.Get(ctx, types.NamespacedName{Namespace: p.Namespace, Name: owner.Name}, vmPod)
	switch {
	case apierrors.IsNotFound(err):
		return true, nil
	case err != nil:
		return false, fmt.Errorf("attachment pod %s: its VM pod %s: %w", p.Name, owner.Name, err)
	}
	return vmPod.UID != owner.UID || finished(vmPod), nil
}

// releaseAttachmentPod lets attachment pod p go: its finalizer (which holds the kubelet
// from unmounting the volume while a VM may use it) removed, and p deleted.
func (r *run) releaseAttachmentPod(ctx context.Context, p *corev1.Pod) error {
	return releaseAttachmentPod(ctx, r.Client, p)
}

func releaseAttachmentPod(ctx context.Context, c ctrl.Client, p *corev1.Pod) error {
	if controllerutil.ContainsFinalizer(p, render.AttachmentFinalizer) {
		patch := ctrl.MergeFrom(p.DeepCopy())
		controllerutil.RemoveFinalizer(p, render.AttachmentFinalizer)
		if err := c.Patch(ctx, p, patch); ctrl.IgnoreNotFound(err) != nil {
			return fmt.Errorf("release attachment pod %s: %w", p.Name, err)
		}
	}
	if p.DeletionTimestamp != nil {
		return nil
	}
	uid := p.UID
	if err := c.Delete(ctx, p, ctrl.Preconditions{UID: &uid}); ctrl.IgnoreNotFound(err) != nil {
		return fmt.Errorf("delete attachment pod %s: %w", p.Name, err)
	}
	log.FromContext(ctx).Info("deleted attachment pod", "pod", p.Name)
	return nil
}

// releaseOrphanAttachmentPods lets go the attachment pods of a VM that is gone, once the
// VM pod they lend to is gone too (its deletion brings the VM's key back here).
func releaseOrphanAttachmentPods(ctx context.Context, c ctrl.Client, reader ctrl.Reader, key types.NamespacedName) error {
	pods := &corev1.PodList{}
	if err := c.List(ctx, pods, ctrl.InNamespace(key.Namespace), ctrl.MatchingLabels{render.VMNameLabel: key.Name}, ctrl.HasLabels{render.HotplugVolumeLabel}); err != nil {
		return fmt.Errorf("list attachment pods: %w", err)
	}
	for i := range pods.Items {
		p := &pods.Items[i]
		if gone, err := ownerQEMUGone(ctx, reader, p); err != nil || !gone {
			if err != nil {
				return err
			}
			continue // its QEMU may still have the disk open
		}
		if err := releaseAttachmentPod(ctx, c, p); err != nil {
			return err
		}
	}
	return nil
}

// volume is the VM's volume of that name (one HotplugVolumes found).
func (r *run) volume(name string) *vmpodv1.Volume {
	for i := range r.vm.Spec.Template.Spec.Volumes {
		if v := &r.vm.Spec.Template.Spec.Volumes[i]; v.Name == name {
			return v
		}
	}
	return nil
}

// podRunning is whether the VM's pod runs its VM: hot-plugged disks go into its guest.
func (r *run) podRunning() bool {
	return r.pod != nil && r.pod.UID != "" && r.pod.DeletionTimestamp == nil &&
		r.pod.Status.Phase == corev1.PodRunning && r.pod.Spec.NodeName != ""
}

// soonest is the nearer of two requeue delays, 0 meaning none.
func soonest(a, b time.Duration) time.Duration {
	if a == 0 || (b != 0 && b < a) {
		return b
	}
	return a
}
