package migration

// A container pod's migration (spec.podName, docs/design/212): the guest with its
// containers moves into a new pod made from the source's spec, which then takes the
// source's place with its owners and Services.

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math"
	"strconv"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/retry"
	ctrl "sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/vmpod/vmpod/api/annotations"
	"github.com/vmpod/vmpod/api/vmspec"
	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
	"github.com/vmpod/vmpod/controller/internal/render"
)

// DeletionCostAnnotation ranks a ReplicaSet's pods for deletion (lowest first): the
// source pod gets the lowest there is before the target joins its owner, so an owner that
// counts one pod too many deletes the source, never the guest's new pod.
const DeletionCostAnnotation = "controller.kubernetes.io/pod-deletion-cost"

// podPoll spaces the passes of a container pod's migration while it waits on its pods:
// the controller's cache holds only VM pods (manager.go), so no watch wakes it.
const podPoll = 2 * time.Second

// podSource is the container pod a migration names, or why it cannot move now. Pods
// outside the controller's cache are read from the API server.
func (r *Reconciler) podSource(ctx context.Context, m *vmpodv1.VirtualMachineMigration) (*corev1.Pod, string, error) {
	pod := &corev1.Pod{}
	if err := r.APIReader.Get(ctx, types.NamespacedName{Namespace: m.Namespace, Name: m.Spec.PodName}, pod); err != nil {
		if apierrors.IsNotFound(err) {
			return nil, fmt.Sprintf("spec.podName: pod %s not found", m.Spec.PodName), nil
		}
		return nil, "", err
	}
	switch {
	case pod.Labels[render.VMNameLabel] != "" || pod.Annotations[vmspec.Annotation] != "":
		return nil, fmt.Sprintf("spec.podName: pod %s is VirtualMachine %s's: migrate the VM (spec.vmName)", pod.Name, pod.Labels[render.VMNameLabel]), nil
	case pod.Labels[Label] != "":
		return nil, fmt.Sprintf("spec.podName: pod %s is the target of migration %s", pod.Name, pod.Labels[Label]), nil
	case pod.Spec.RuntimeClassName == nil:
		return nil, fmt.Sprintf("spec.podName: pod %s has no runtimeClassName: it runs in no VM", pod.Name), nil
	case pod.DeletionTimestamp != nil || pod.Status.Phase != corev1.PodRunning:
		return nil, fmt.Sprintf("pod %s is not running (%s)", pod.Name, pod.Status.Phase), nil
	case pod.Spec.NodeName == "":
		return nil, fmt.Sprintf("pod %s has no node", pod.Name), nil
	}
	if name, state := notRunning(pod); name != "" {
		return nil, fmt.Sprintf("pod %s: container %s is %s: a pod moves with all its containers running", pod.Name, name, state), nil
	}
	return pod, "", nil
}

// notRunning names a container of the pod's spec that does not run, and how it is.
func notRunning(pod *corev1.Pod) (name, state string) {
	for _, c := range pod.Spec.Containers {
		st := containerStatus(pod, c.Name)
		switch {
		case st == nil:
			return c.Name, "not reported"
		case st.State.Terminated != nil:
			t := st.State.Terminated
			return c.Name, fmt.Sprintf("terminated (exit %d, %s%s)", t.ExitCode, t.Reason, messageOf(t.Message))
		case st.State.Running == nil:
			return c.Name, "waiting"
		}
	}
	return "", ""
}

func containerStatus(pod *corev1.Pod, name string) *corev1.ContainerStatus {
	for i := range pod.Status.ContainerStatuses {
		if pod.Status.ContainerStatuses[i].Name == name {
			return &pod.Status.ContainerStatuses[i]
		}
	}
	return nil
}

func messageOf(m string) string {
	if m == "" {
		return ""
	}
	return ": " + m
}

// podUnmovable says why a container pod cannot move to another node whatever the moment,
// or "": what the shims refuse too (docs/design/212), said before a target pod is made.
func podUnmovable(pod *corev1.Pod) string {
	for _, o := range pod.OwnerReferences {
		if o.Controller == nil || !*o.Controller {
			continue
		}
		switch o.Kind {
		case "StatefulSet": // (apps/v1)
			return fmt.Sprintf("pod %s is StatefulSet %s's: its name is its identity, and a moved pod has another", pod.Name, o.Name)
		case "DaemonSet":
			return fmt.Sprintf("pod %s is DaemonSet %s's: it belongs on its node", pod.Name, o.Name)
		}
	}
	switch {
	case len(pod.Spec.InitContainers) > 0:
		return fmt.Sprintf("pod %s: spec.initContainers: a pod with init containers cannot move yet (the target's kubelet would run them again)", pod.Name)
	case len(pod.Spec.EphemeralContainers) > 0:
		return fmt.Sprintf("pod %s: spec.ephemeralContainers: a pod with ephemeral containers cannot move", pod.Name)
	case pod.Spec.HostNetwork:
		return fmt.Sprintf("pod %s: spec.hostNetwork: the node's network does not move", pod.Name)
	}
	for _, c := range pod.Spec.Containers {
		if c.Stdin {
			return fmt.Sprintf("pod %s: container %s: stdin: a container reading the kubelet's stdin cannot move", pod.Name, c.Name)
		}
	}
	for _, v := range pod.Spec.Volumes {
		switch {
		case v.EmptyDir != nil, v.ConfigMap != nil, v.Secret != nil, v.Projected != nil, v.DownwardAPI != nil:
		default:
			return fmt.Sprintf("pod %s: volume %s: only emptyDir, configMap, secret, projected and downwardAPI volumes move with a container pod (an emptyDir's files travel; the target's kubelet writes the others)",
				pod.Name, v.Name)
		}
	}
	return ""
}

// containerTarget is a container pod's target: the source's spec on no node, kept off
// the source's, with none of the source's labels and owners (no Service or owner counts
// it while it waits for the guest), annotated with the source's UID for its shim, and its
// liveness and startup probes held off (probeHold) until the guest may have come: before
// that they fail, and the kubelet would stop the containers the guest is coming into.
func containerTarget(m *vmpodv1.VirtualMachineMigration, source *corev1.Pod, hold int32) *corev1.Pod {
	t := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{
		Name:        TargetPodName(source.Name, m.UID),
		Namespace:   source.Namespace,
		Labels:      map[string]string{Label: m.Name},
		Annotations: maps.Clone(source.Annotations),
	}, Spec: *source.Spec.DeepCopy()}
	if t.Annotations == nil {
		t.Annotations = map[string]string{}
	}
	delete(t.Annotations, DeletionCostAnnotation)
	t.Annotations[annotations.MigrationTarget] = string(source.UID)
	t.Spec.NodeName = ""
	admitted(&t.Spec)
	if prev := source.Annotations[AwayFromAnnotation]; prev != "" {
		dropAwayFrom(&t.Spec, prev)
	}
	awayFrom(&t.Spec, source.Spec.NodeName)
	t.Annotations[AwayFromAnnotation] = source.Spec.NodeName
	for i := range t.Spec.Containers {
		c := &t.Spec.Containers[i]
		for _, p := range []*corev1.Probe{c.LivenessProbe, c.StartupProbe} {
			if p != nil && p.InitialDelaySeconds < hold {
				p.InitialDelaySeconds = hold
			}
		}
	}
	return t
}

// probeHold is how long a target's liveness and startup probes wait: the target's start
// (wait) and the migration's completion timeout for the pod's memory (its containers'
// limits, or requests, at least 1 GiB: the guest is at least that of the sum). A target
// probed no earlier is past its migration, whichever way it went; until then the
// kubelet does not restart a wedged container in it, the price of not holding probes
// back in the shim.
func probeHold(spec *corev1.PodSpec, perGiB int, wait time.Duration) int32 {
	var mem resource.Quantity
	for _, c := range spec.Containers {
		if q, ok := c.Resources.Limits[corev1.ResourceMemory]; ok {
			mem.Add(q)
		} else if q, ok := c.Resources.Requests[corev1.ResourceMemory]; ok {
			mem.Add(q)
		}
	}
	gib := max(1, (mem.Value()+(1<<30)-1)>>30)
	s := int64(wait.Seconds()) + gib*int64(perGiB)
	return int32(min(s, math.MaxInt32))
}

// podTargetRuns says whether every container of the target pod runs (the placeholders the
// guest's containers come into: the accept waits for all of them), or why it has failed.
func podTargetRuns(target *corev1.Pod) (running bool, failed string) {
	name, state := notRunning(target)
	switch {
	case name == "":
		return target.Status.Phase == corev1.PodRunning, ""
	case containerStatus(target, name) != nil && containerStatus(target, name).State.Terminated != nil:
		return false, fmt.Sprintf("the target pod %s's container %s %s before the guest moved", target.Name, name, state)
	}
	return false, ""
}

// podGuestMoved says where a container pod's guest is when its source's shim cannot (the
// migrate-cancel exec failed). The source's containers keep running after the guest left
// (stand-ins, docs/design/212), so its pod cannot tell: while it is there, the shim is
// asked again (an error, retried); once it is gone, going or ended, the target holds the
// guest if its containers still run, because a target whose guest did not come ends them.
func (r *Reconciler) podGuestMoved(ctx context.Context, m *vmpodv1.VirtualMachineMigration, execErr error) (bool, error) {
	source := &corev1.Pod{}
	err := r.APIReader.Get(ctx, types.NamespacedName{Namespace: m.Namespace, Name: m.Status.SourcePod}, source)
	switch {
	case err == nil && source.DeletionTimestamp == nil && source.Status.Phase != corev1.PodFailed && source.Status.Phase != corev1.PodSucceeded:
		return false, fmt.Errorf("the source pod %s's shim cannot say where the guest is: %w", source.Name, execErr)
	case err != nil && !apierrors.IsNotFound(err):
		return false, err
	}
	target, err := r.targetPod(ctx, m)
	if apierrors.IsNotFound(err) {
		return false, nil
	} else if err != nil {
		return false, err
	}
	running, _ := podTargetRuns(target)
	return running, nil
}

// errTargetGone: the guest moved into a target pod that is gone since.
var errTargetGone = errors.New("the target pod is gone")

// errHandOverWaits: the target is not ready while the source still is; Reconcile asks
// again in podPoll.
var errHandOverWaits = errors.New("the hand-over waits for the target to be ready")

// handOverWait bounds how long a hand-over waits for its target to be ready while the
// source still is (a startup probe held off past the migration, say).
const handOverWait = 2 * time.Minute

// handOver makes the target pod the source's once the guest runs in it, in the order that
// neither leaves the pod's owner a pod short (it would make another) nor lets it delete
// the target. An owner that counts one pod too many deletes a not-ready pod before a
// ready one, and only then the one of lower deletion cost: so the source gets the lowest
// cost, and the target its labels and owners once it is ready or the source is not (its
// probes fail from the move on); then the source is deleted. A target still not ready
// after handOverWait while the source is: the source is deleted first, and its owner's
// replacement, pending, is what it deletes once the target is its. The target's
// migration annotation goes too: a sandbox the kubelet makes again for it must boot. A
// source already gone leaves the target with no owner: whoever deleted it had its owner
// make another.
func (r *Reconciler) handOver(ctx context.Context, m *vmpodv1.VirtualMachineMigration) (*corev1.Pod, error) {
	target := &corev1.Pod{}
	if err := r.APIReader.Get(ctx, types.NamespacedName{Namespace: m.Namespace, Name: m.Status.TargetPod}, target); err != nil {
		if apierrors.IsNotFound(err) {
			return nil, errTargetGone
		}
		return nil, fmt.Errorf("the target pod %s: %w", m.Status.TargetPod, err)
	}
	source := &corev1.Pod{}
	err := r.APIReader.Get(ctx, types.NamespacedName{Namespace: m.Namespace, Name: m.Status.SourcePod}, source)
	found := err == nil
	if err != nil && !apierrors.IsNotFound(err) {
		return nil, fmt.Errorf("the source pod %s: %w", m.Status.SourcePod, err)
	}
	if _, waiting := target.Labels[Label]; !waiting { // handed over by an earlier pass
		return target, r.deleteSource(ctx, source, found)
	}
	deleted := found && source.DeletionTimestamp != nil
	if found && !deleted {
		if source.Annotations[DeletionCostAnnotation] != strconv.Itoa(math.MinInt32) {
			patch := ctrl.MergeFrom(source.DeepCopy())
			if source.Annotations == nil {
				source.Annotations = map[string]string{}
			}
			source.Annotations[DeletionCostAnnotation] = strconv.Itoa(math.MinInt32)
			if err := r.Client.Patch(ctx, source, patch); ctrl.IgnoreNotFound(err) != nil {
				return nil, fmt.Errorf("rank the source pod %s first for deletion: %w", source.Name, err)
			}
		}
		if !podReady(target) && podReady(source) {
			if r.handOverWaited(m.UID) < handOverWait {
				return nil, errHandOverWaits
			}
			log.FromContext(ctx).Info("the target is not ready: the source goes first", "source", source.Name, "target", target.Name)
			r.Recorder.Eventf(target, nil, corev1.EventTypeNormal, "SourceFirst", "Migrate",
				"migration %s: this pod was not ready within %v while the source %s was: the source goes first (its owner may make a replacement, which it deletes again once this pod is its)", m.Name, handOverWait, source.Name)
			if err := r.deleteSource(ctx, source, true); err != nil {
				return nil, err
			}
			deleted = true
		}
	}
	err = retry.RetryOnConflict(retry.DefaultRetry, func() error {
		if err := r.APIReader.Get(ctx, ctrl.ObjectKeyFromObject(target), target); err != nil {
			return err
		}
		labels := map[string]string{}
		if found {
			labels = maps.Clone(source.Labels)
			delete(labels, Label)
			target.OwnerReferences = source.OwnerReferences
		}
		target.Labels = labels // without Label: deleteTarget never takes it now
		delete(target.Annotations, annotations.MigrationTarget)
		return r.Client.Update(ctx, target)
	})
	if apierrors.IsNotFound(err) {
		return nil, errTargetGone
	}
	if err != nil {
		return nil, fmt.Errorf("give the target pod %s the source's labels and owners: %w", m.Status.TargetPod, err)
	}
	if !found {
		log.FromContext(ctx).Info("the source pod was gone before the hand-over: the target has no owner", "source", m.Status.SourcePod, "target", target.Name)
		r.Recorder.Eventf(target, nil, corev1.EventTypeWarning, "SourceGone", "Migrate",
			"migration %s: the source pod %s was gone before the hand-over: %s holds the guest with no owner or labels", m.Name, m.Status.SourcePod, target.Name)
		return target, nil
	}
	if deleted {
		return target, nil
	}
	return target, r.deleteSource(ctx, source, true)
}

// deleteSource deletes the source pod if found.
func (r *Reconciler) deleteSource(ctx context.Context, source *corev1.Pod, found bool) error {
	if !found || source.DeletionTimestamp != nil {
		return nil
	}
	if err := r.Client.Delete(ctx, source); ctrl.IgnoreNotFound(err) != nil {
		return fmt.Errorf("delete the source pod %s: %w", source.Name, err)
	}
	return nil
}

// handOverWaited is how long the migration's hand-over has waited for its target, from
// this process's first try.
func (r *Reconciler) handOverWaited(uid types.UID) time.Duration {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.handOverSince == nil {
		r.handOverSince = map[types.UID]time.Time{}
	}
	since, ok := r.handOverSince[uid]
	if !ok {
		since = time.Now()
		r.handOverSince[uid] = since
	}
	return time.Since(since)
}

// podReady says whether the pod's Ready condition is true.
func podReady(pod *corev1.Pod) bool {
	for _, c := range pod.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}
