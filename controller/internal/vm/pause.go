package vm

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/vmpod/vmpod/api/vmspec"
	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
)

// PodExec runs a command in a container of a pod and returns its stdout; an error carries
// its stderr. The kubelet has no pause, so the controller pauses a VM the way a user could:
// an exec the shim answers itself (vmspec.PauseCommand), authorized as pods/exec
// (podexec.Client is the real one).
type PodExec interface {
	Exec(ctx context.Context, namespace, pod, container string, command []string) (string, error)
}

// pause carries out a Pause or Unpause request in the running pod and records the pod it
// paused: the request is done once the shim has answered.
func (r *run) pause(ctx context.Context) error {
	if r.Exec == nil {
		return fmt.Errorf("%s requested but the controller has no pod exec", r.request.Action)
	}
	cmd, reason, verb := vmspec.UnpauseCommand, "Unpaused", "unpaused"
	if r.pauseVM {
		cmd, reason, verb = vmspec.PauseCommand, "Paused", "paused"
	}
	if _, err := r.Exec.Exec(ctx, r.pod.Namespace, r.pod.Name, vmspec.ComputeContainer, []string{cmd}); err != nil {
		r.event(corev1.EventTypeWarning, "Failed"+string(r.request.Action), string(r.request.Action), "%s", err.Error())
		return fmt.Errorf("%s: %w", r.request.Action, err)
	}
	r.status.PausedPodUID = ""
	if r.pauseVM {
		r.status.PausedPodUID = r.pod.UID
	}
	r.requestDone = true
	log.FromContext(ctx).Info("VM "+verb, "pod", r.pod.Name)
	r.event(corev1.EventTypeNormal, reason, string(r.request.Action), "VM %s in pod %s", verb, r.pod.Name)
	return nil
}

// paused is whether the running pod's VM is paused (by a Pause request to this pod).
func (r *run) paused() bool {
	return r.status.PausedPodUID != "" && r.pod != nil && r.pod.UID == r.status.PausedPodUID &&
		r.pod.DeletionTimestamp == nil && !finished(r.pod)
}

// pausedCondition is the Paused condition; a pause ends with its pod.
func (r *run) pausedCondition() metav1.Condition {
	if !r.paused() {
		r.status.PausedPodUID = ""
		return metav1.Condition{Type: vmpodv1.VMPaused, Status: metav1.ConditionFalse, Reason: "NotPaused"}
	}
	return metav1.Condition{Type: vmpodv1.VMPaused, Status: metav1.ConditionTrue, Reason: "PausedByUser",
		Message: "the VM's vCPUs are stopped (kubectl vmpod unpause resumes them)"}
}
