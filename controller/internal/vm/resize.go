package vm

import (
	"context"
	"encoding/json"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/vmpod/vmpod/api/vmspec"
	"github.com/vmpod/vmpod/controller/internal/render"
)

// +kubebuilder:rbac:groups="",resources=pods/resize,verbs=patch

// resize gives the running pod of a VM that can grow (cpu.maxSockets, memory.maxGuest)
// the compute container's cpu and memory its spec now renders, through the pods/resize
// subresource: the kubelet admits the new size against the node, and the shim hot-plugs
// vCPUs and memory as the container's limits change (docs/design/208). A change beyond
// the room changes the pod's shape, and RestartRequired says so instead.
func (r *run) resize(ctx context.Context) error {
	if !r.podRunning() || r.blocked != nil {
		return nil
	}
	want, err := r.renderedPod()
	if err != nil {
		return nil // the status says why the spec does not render
	}
	res := render.Resize(r.pod, want)
	if res == nil {
		r.resizeNotes()
		return nil
	}
	patch, err := json.Marshal(map[string]any{"spec": map[string]any{"containers": []any{
		map[string]any{"name": vmspec.ComputeContainer, "resources": res}}}})
	if err != nil {
		return fmt.Errorf("resize pod %s: %w", r.pod.Name, err)
	}
	if err := r.Client.SubResource("resize").Patch(ctx, r.pod, ctrl.RawPatch(types.StrategicMergePatchType, patch)); err != nil {
		r.event(corev1.EventTypeWarning, "ResizeFailed", "Resize", "pod %s: %v", r.pod.Name, err)
		return fmt.Errorf("resize pod %s: %w", r.pod.Name, err)
	}
	r.event(corev1.EventTypeNormal, "Resizing", "Resize", "pod %s: cpu %s, memory %s",
		r.pod.Name, res.Limits.Cpu(), res.Limits.Memory())
	return nil
}

// resizeNotes tells why the kubelet has not applied a resize yet: the node has no room
// for it (pending), or the runtime failed it (in progress, error). The event recorder
// folds repeats into a series.
func (r *run) resizeNotes() {
	for _, c := range r.pod.Status.Conditions {
		switch {
		case c.Type == corev1.PodResizePending && c.Status == corev1.ConditionTrue:
			r.event(corev1.EventTypeWarning, "ResizePending", "Resize", "pod %s: %s: %s", r.pod.Name, c.Reason, c.Message)
		case c.Type == corev1.PodResizeInProgress && c.Status == corev1.ConditionTrue && c.Reason == corev1.PodReasonError:
			r.event(corev1.EventTypeWarning, "ResizeFailed", "Resize", "pod %s: %s", r.pod.Name, c.Message)
		}
	}
}
