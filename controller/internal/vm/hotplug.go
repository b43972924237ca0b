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
	ctrl "sigs.k8s.io/controller-runtime/pkg/client"
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
	if !r.podRunning() || !r.wantRunning {
		// no guest to plug into: the attachment pods go with their VM pod (owner)
		r.status.VolumeStatus = nil
		return 0, nil
	}
	src := r.expanded
	if src == nil {
		src = r.vm
	}
	wanted, err := render.HotplugVolumes(src)
	if err != nil {
		r.status.VolumeStatus = nil
		r.event(corev1.EventTypeWarning, "InvalidSpec", "HotplugVolume", "%v", err)
		return 0, nil // nothing to do until the spec changes
	}
	pods := &corev1.PodList{}
	if err := r.Client.List(ctx, pods, ctrl.InNamespace(r.vm.Namespace), ctrl.MatchingLabels{render.VMNameLabel: r.vm.Name}, ctrl.HasLabels{render.HotplugVolumeLabel}); err != nil {
		return 0, fmt.Errorf("list attachment pods: %w", err)
	}
	attachment := map[string]*corev1.Pod{}
	stale := map[string]bool{} // attachment pods' names still taken by an earlier VM pod's
	for i := range pods.Items {
		p := &pods.Items[i]
		if metav1.IsControlledBy(p, r.pod) && p.Labels[vmspec.AttachmentForLabel] == string(r.pod.UID) {
			attachment[p.Labels[render.HotplugVolumeLabel]] = p
			continue
		}
		// an earlier VM pod's: the garbage collector takes it with that pod, but its name
		// is this pod's to use now
		stale[p.Name] = true
		if err := r.deleteAttachmentPod(ctx, p); err != nil {
			return 0, err
		}
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
	for _, s := range old {
		if slices.ContainsFunc(wanted, func(hv render.HotplugVolume) bool { return hv.Name == s.Name }) {
			continue
		}
		s, again, err := r.detach(ctx, s, attachment[s.Name])
		if err != nil {
			return 0, err
		}
		retry = soonest(retry, again)
		if s != nil {
			next = append(next, *s)
		}
	}
	// attachment pods of volumes neither wanted nor attached
	for name, p := range attachment {
		if slices.ContainsFunc(next, func(s vmpodv1.VolumeStatus) bool { return s.Name == name }) {
			continue
		}
		if err := r.deleteAttachmentPod(ctx, p); err != nil {
			return 0, err
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
	case pod.DeletionTimestamp != nil:
		s.Reason, s.Message = "AttachmentPodTerminating", "waiting for the old attachment pod to go"
		return s, 0, nil
	case pod.Status.Phase == corev1.PodFailed || pod.Status.Phase == corev1.PodSucceeded:
		return s, 0, r.deleteAttachmentPod(ctx, pod) // its replacement comes next pass
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

// detach unplugs a volume gone from the spec, then deletes its attachment pod. It returns
// the volume's status while it is still on its way out, nil once it is gone.
func (r *run) detach(ctx context.Context, was vmpodv1.VolumeStatus, pod *corev1.Pod) (*vmpodv1.VolumeStatus, time.Duration, error) {
	if was.Phase == vmpodv1.VolumeReady || was.Phase == vmpodv1.VolumeDetaching {
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
		r.event(corev1.EventTypeNormal, "VolumeDetached", "HotplugVolume", "volume %s detached from the VM in pod %s", was.Name, r.pod.Name)
	}
	if pod != nil {
		if err := r.deleteAttachmentPod(ctx, pod); err != nil {
			return nil, 0, err
		}
	}
	return nil, 0, nil
}

func (r *run) deleteAttachmentPod(ctx context.Context, p *corev1.Pod) error {
	if p.DeletionTimestamp != nil {
		return nil
	}
	uid := p.UID
	if err := r.Client.Delete(ctx, p, ctrl.Preconditions{UID: &uid}); ctrl.IgnoreNotFound(err) != nil {
		return fmt.Errorf("delete attachment pod %s: %w", p.Name, err)
	}
	log.FromContext(ctx).Info("deleted attachment pod", "pod", p.Name)
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
