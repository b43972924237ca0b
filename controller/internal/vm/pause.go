package vm

import (
	"bytes"
	"context"
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/httpstream"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/remotecommand"
	"sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/vmpod/vmpod/api/vmspec"
	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
)

// PodExec runs a command in a container of a pod and returns its stdout; an error carries
// its stderr. The kubelet has no pause, so the controller pauses a VM the way a user could:
// an exec the shim answers itself (vmspec.PauseCommand), authorized as pods/exec.
type PodExec interface {
	Exec(ctx context.Context, namespace, pod, container string, command []string) (string, error)
}

// APIExec is PodExec through the API server's pods/exec (WebSocket, falling back to SPDY).
type APIExec struct {
	Config *rest.Config
	client rest.Interface
}

// NewAPIExec returns an APIExec for the cluster Config points at.
func NewAPIExec(config *rest.Config) (*APIExec, error) {
	c, err := rest.RESTClientFor(withCoreV1(config))
	if err != nil {
		return nil, fmt.Errorf("exec client: %w", err)
	}
	return &APIExec{Config: config, client: c}, nil
}

func withCoreV1(config *rest.Config) *rest.Config {
	c := rest.CopyConfig(config)
	c.APIPath = "/api"
	c.GroupVersion = &corev1.SchemeGroupVersion
	c.NegotiatedSerializer = scheme.Codecs.WithoutConversion()
	return c
}

func (e *APIExec) Exec(ctx context.Context, namespace, pod, container string, command []string) (string, error) {
	req := e.client.Post().Resource("pods").Namespace(namespace).Name(pod).SubResource("exec").
		VersionedParams(&corev1.PodExecOptions{Container: container, Command: command, Stdout: true, Stderr: true}, scheme.ParameterCodec)
	ws, err := remotecommand.NewWebSocketExecutor(e.Config, "GET", req.URL().String())
	if err != nil {
		return "", fmt.Errorf("exec in %s/%s: %w", namespace, pod, err)
	}
	spdy, err := remotecommand.NewSPDYExecutor(e.Config, "POST", req.URL())
	if err != nil {
		return "", fmt.Errorf("exec in %s/%s: %w", namespace, pod, err)
	}
	// SPDY only when the API server refuses the WebSocket upgrade, as kubectl does: falling
	// back on any error would run a failed command twice
	exec, err := remotecommand.NewFallbackExecutor(ws, spdy, func(err error) bool {
		return httpstream.IsUpgradeFailure(err) || httpstream.IsHTTPSProxyError(err)
	})
	if err != nil {
		return "", fmt.Errorf("exec in %s/%s: %w", namespace, pod, err)
	}
	var stdout, stderr bytes.Buffer
	if err := exec.StreamWithContext(ctx, remotecommand.StreamOptions{Stdout: &stdout, Stderr: &stderr}); err != nil {
		return stdout.String(), fmt.Errorf("exec %s in %s/%s: %w: %s", strings.Join(command, " "), namespace, pod, err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
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
