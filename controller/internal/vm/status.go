package vm

import (
	"context"
	"fmt"
	"slices"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/log"

	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
	"github.com/vmpod/vmpod/controller/internal/render"
)

// ensureDataVolumes creates the VM's templated DataVolumes that do not exist yet.
func (r *run) ensureDataVolumes(ctx context.Context) error {
	for _, t := range r.vm.Spec.DataVolumeTemplates {
		dv := &vmpodv1.DataVolume{}
		err := r.Client.Get(ctx, types.NamespacedName{Namespace: r.vm.Namespace, Name: t.Metadata.Name}, dv)
		if !apierrors.IsNotFound(err) {
			if err != nil {
				return fmt.Errorf("get DataVolume %s: %w", t.Metadata.Name, err)
			}
			continue
		}
		dv = &vmpodv1.DataVolume{
			ObjectMeta: metav1.ObjectMeta{Name: t.Metadata.Name, Namespace: r.vm.Namespace,
				Labels: t.Metadata.Labels, Annotations: t.Metadata.Annotations,
				OwnerReferences: []metav1.OwnerReference{*metav1.NewControllerRef(r.vm, vmpodv1.GroupVersion.WithKind("VirtualMachine"))}},
			Spec: *t.Spec.DeepCopy(),
		}
		if err := r.Client.Create(ctx, dv); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("create DataVolume %s: %w", dv.Name, err)
		}
		log.FromContext(ctx).Info("created DataVolume", "dataVolume", dv.Name)
		r.event(corev1.EventTypeNormal, "SuccessfulDataVolumeCreate", "CreateDataVolume", "created DataVolume %s", dv.Name)
	}
	return nil
}

// claims looks up the PVC of every dataVolume and persistentVolumeClaim volume. A volume
// that is not ready (a DataVolume still importing, a missing PVC) sets r.blocked instead:
// the VM waits, and the watch on DataVolumes and PVCs brings it back.
func (r *run) claims(ctx context.Context) (map[string]render.Claim, error) {
	claims := map[string]render.Claim{}
	for i := range r.vm.Spec.Template.Spec.Volumes {
		v := &r.vm.Spec.Template.Spec.Volumes[i]
		if render.ClaimName(v) == "" || v.Hotpluggable() {
			continue // a hotpluggable volume waits for its PVC without holding the VM back
		}
		c, blocked, err := r.claim(ctx, v)
		if err != nil || blocked != nil {
			r.blocked = blocked
			return nil, err
		}
		claims[render.ClaimName(v)] = c
	}
	return claims, nil
}

// claim looks up the PVC of volume v. It is usable once it exists and a DataVolume that
// fills it has Succeeded; else the blocker says why not.
func (r *run) claim(ctx context.Context, v *vmpodv1.Volume) (render.Claim, *blocker, error) {
	name := render.ClaimName(v)
	if v.DataVolume != nil {
		if blocked, err := r.dataVolumeBlocker(ctx, name); err != nil || blocked != nil {
			return render.Claim{}, blocked, err
		}
	}
	pvc := &corev1.PersistentVolumeClaim{}
	err := r.Client.Get(ctx, types.NamespacedName{Namespace: r.vm.Namespace, Name: name}, pvc)
	switch {
	case apierrors.IsNotFound(err):
		return render.Claim{}, &blocker{vmpodv1.StatusPvcNotFound, "PVCNotFound", fmt.Sprintf("PVC %s of volume %s not found", name, v.Name), true}, nil
	case err != nil:
		return render.Claim{}, nil, fmt.Errorf("get PVC %s: %w", name, err)
	}
	// A PVC a DataVolume fills is usable only once the DataVolume has Succeeded, also
	// when the VM names the PVC directly: never boot from a half-written disk.
	if owner := metav1.GetControllerOf(pvc); owner != nil && owner.Kind == "DataVolume" && v.DataVolume == nil {
		if blocked, err := r.dataVolumeBlocker(ctx, owner.Name); err != nil || blocked != nil {
			return render.Claim{}, blocked, err
		}
	}
	return render.Claim{Block: pvc.Spec.VolumeMode != nil && *pvc.Spec.VolumeMode == corev1.PersistentVolumeBlock}, nil, nil
}

// dataVolumeBlocker is nil when the DataVolume has Succeeded; otherwise it says why not.
func (r *run) dataVolumeBlocker(ctx context.Context, name string) (*blocker, error) {
	dv := &vmpodv1.DataVolume{}
	err := r.Client.Get(ctx, types.NamespacedName{Namespace: r.vm.Namespace, Name: name}, dv)
	switch {
	case apierrors.IsNotFound(err):
		return &blocker{vmpodv1.StatusDataVolumeError, "DataVolumeNotFound", fmt.Sprintf("DataVolume %s not found", name), true}, nil
	case err != nil:
		return nil, fmt.Errorf("get DataVolume %s: %w", name, err)
	}
	switch dv.Status.Phase {
	case vmpodv1.PhaseSucceeded:
		return nil, nil
	case vmpodv1.PhaseFailed:
		msg := fmt.Sprintf("DataVolume %s failed", name)
		if c := meta.FindStatusCondition(dv.Status.Conditions, vmpodv1.DVReady); c != nil {
			msg += ": " + c.Reason + ": " + c.Message
		}
		return &blocker{vmpodv1.StatusDataVolumeError, "DataVolumeFailed", msg, true}, nil
	default:
		return &blocker{vmpodv1.StatusProvisioning, "DataVolumeNotReady",
			fmt.Sprintf("waiting for DataVolume %s (%s %s)", name, dv.Status.Phase, dv.Status.Progress), false}, nil
	}
}

// fillStatus derives the status from the pod and what this pass found.
func (r *run) fillStatus() {
	s := &r.status
	s.ObservedGeneration = r.vm.Generation
	s.PrintableStatus = r.printableStatus()
	s.Created, s.Ready = r.pod != nil, false
	s.PodName, s.PodUID, s.NodeName, s.IPs = "", "", "", nil
	if p := r.pod; p != nil {
		s.PodName, s.PodUID, s.NodeName = p.Name, p.UID, p.Spec.NodeName
		for _, ip := range p.Status.PodIPs {
			s.IPs = append(s.IPs, ip.IP)
		}
		s.Ready = p.DeletionTimestamp == nil && podReady(p)
	}
	if r.vm.Spec.RunStrategy == vmpodv1.RunStrategyHalted {
		s.StartFailure = nil
	}

	ready := metav1.Condition{Type: vmpodv1.VMReady, Status: metav1.ConditionFalse, Reason: "PodNotReady", Message: "the pod is not Ready"}
	switch {
	case r.pod == nil && r.blocked != nil:
		ready.Reason, ready.Message = r.blocked.reason, "the VM has no pod: "+r.blocked.message
	case r.pod == nil:
		ready.Reason, ready.Message = "NoPod", "the VM has no pod"
	case s.Ready:
		ready.Status, ready.Reason, ready.Message = metav1.ConditionTrue, "PodReady", "pod "+r.pod.Name+" is Ready"
	default:
		// say why the pod waits where a user looks first: no node fits, an image cannot be pulled
		if c := unschedulable(r.pod); c != nil {
			ready.Reason, ready.Message = "PodUnschedulable", "pod "+r.pod.Name+" cannot be scheduled: "+c.Message
		}
	}
	r.setCondition(ready)

	failure := metav1.Condition{Type: vmpodv1.VMFailure, Status: metav1.ConditionFalse, Reason: "NoFailure"}
	if b := r.blocked; b != nil && b.failure {
		failure.Status, failure.Reason, failure.Message = metav1.ConditionTrue, b.reason, b.message
	}
	r.setCondition(failure)

	if r.usesDataVolumes() {
		dvs := metav1.Condition{Type: vmpodv1.VMDataVolumesReady, Status: metav1.ConditionTrue, Reason: "AllSucceeded"}
		if b := r.blocked; b != nil && (b.status == vmpodv1.StatusProvisioning || b.status == vmpodv1.StatusDataVolumeError) {
			dvs.Status, dvs.Reason, dvs.Message = metav1.ConditionFalse, b.reason, b.message
		}
		r.setCondition(dvs)
	}

	restart := metav1.Condition{Type: vmpodv1.VMRestartRequired, Status: metav1.ConditionFalse, Reason: "UpToDate"}
	if r.pod != nil && r.pod.DeletionTimestamp == nil && !finished(r.pod) && r.blocked == nil {
		if want, err := r.renderedPod(); err == nil && render.TemplateHash(want) != render.TemplateHash(r.pod) {
			restart.Status, restart.Reason = metav1.ConditionTrue, "TemplateChanged"
			restart.Message = "the template changed after the pod was created; restart the VM to apply it"
		} else if err == nil && render.BelowBoot(r.pod, want) {
			restart.Status, restart.Reason = metav1.ConditionTrue, "BelowBootSize"
			restart.Message = "the VM's sockets or memory went below what it booted with; restart the VM to apply it"
		}
	}
	r.setCondition(restart)
	r.setCondition(r.pausedCondition())
}

func (r *run) setCondition(c metav1.Condition) {
	c.ObservedGeneration = r.vm.Generation
	meta.SetStatusCondition(&r.status.Conditions, c)
}

// renderedHash is the template hash a pod created now would have.
func (r *run) renderedHash() (string, error) {
	pod, err := r.renderedPod()
	if err != nil {
		return "", err
	}
	return render.TemplateHash(pod), nil
}

// renderedPod is the pod that would be created now for the VM of the existing pod. PVC
// volume modes cannot change under a pod, so they are taken from the pod itself.
func (r *run) renderedPod() (*corev1.Pod, error) {
	claims := map[string]render.Claim{}
	for _, v := range r.pod.Spec.Volumes {
		if v.PersistentVolumeClaim != nil {
			claims[v.PersistentVolumeClaim.ClaimName] = render.Claim{Block: slices.ContainsFunc(r.pod.Spec.Containers[0].VolumeDevices,
				func(d corev1.VolumeDevice) bool { return d.Name == v.Name })}
		}
	}
	if r.expandErr != nil {
		return nil, r.expandErr
	}
	return render.Pod(r.expanded, claims, r.Render)
}

func (r *run) usesDataVolumes() bool {
	return slices.ContainsFunc(r.vm.Spec.Template.Spec.Volumes, func(v vmpodv1.Volume) bool { return v.DataVolume != nil })
}

func (r *run) printableStatus() vmpodv1.PrintableStatus {
	p := r.pod
	switch {
	case r.vm.DeletionTimestamp != nil:
		return vmpodv1.StatusTerminating
	case p != nil && p.DeletionTimestamp != nil:
		return vmpodv1.StatusStopping
	case p != nil && p.Status.Phase == corev1.PodRunning && r.paused():
		return vmpodv1.StatusPaused
	case p != nil && p.Status.Phase == corev1.PodRunning:
		return vmpodv1.StatusRunning
	case p != nil && (p.Status.Phase == corev1.PodPending || p.Status.Phase == ""):
		return pendingStatus(p)
	case p != nil && p.Status.Phase == corev1.PodUnknown:
		return vmpodv1.StatusUnknown
	case r.blocked != nil:
		return r.blocked.status
	}
	if sf := r.status.StartFailure; sf != nil && r.wantRunning && sf.RetryAfterTimestamp != nil && sf.RetryAfterTimestamp.After(r.now) {
		return vmpodv1.StatusCrashLoopBackOff
	}
	switch {
	case p != nil && p.Status.Phase == corev1.PodFailed && !r.wantRunning:
		return vmpodv1.StatusFailed
	case r.wantRunning:
		return vmpodv1.StatusStarting
	}
	return vmpodv1.StatusStopped
}

// pendingStatus tells apart the ways a pod can be stuck before the VM boots.
func pendingStatus(p *corev1.Pod) vmpodv1.PrintableStatus {
	for _, cs := range p.Status.ContainerStatuses {
		if w := cs.State.Waiting; w != nil {
			switch w.Reason {
			case "ErrImagePull":
				return vmpodv1.StatusErrImagePull
			case "ImagePullBackOff":
				return vmpodv1.StatusImagePullBackOff
			}
		}
	}
	if unschedulable(p) != nil {
		return vmpodv1.StatusUnschedulable
	}
	return vmpodv1.StatusStarting
}

// unschedulable is the pod's PodScheduled condition when the scheduler found no node for it.
func unschedulable(p *corev1.Pod) *corev1.PodCondition {
	for i, c := range p.Status.Conditions {
		if c.Type == corev1.PodScheduled && c.Status == corev1.ConditionFalse && c.Reason == corev1.PodReasonUnschedulable {
			return &p.Status.Conditions[i]
		}
	}
	return nil
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}
