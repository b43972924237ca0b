// Package podexec runs commands in pods and attaches to them through the API server, as
// kubectl does: the controller's pause/unpause and kubectl-vmpod's console and guest info
// are all "an exec the shim answers" (docs/design/102-state-change-requests.md).
package podexec

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/url"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/httpstream"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/remotecommand"
)

// Executor streams a pods/exec or pods/attach URL over WebSocket, and over SPDY only when
// the API server refuses the WebSocket upgrade, as kubectl does: falling back on any error
// would run a failed command twice.
func Executor(config *rest.Config, u *url.URL) (remotecommand.Executor, error) {
	ws, err := remotecommand.NewWebSocketExecutor(config, "GET", u.String())
	if err != nil {
		return nil, err
	}
	spdy, err := remotecommand.NewSPDYExecutor(config, "POST", u)
	if err != nil {
		return nil, err
	}
	return remotecommand.NewFallbackExecutor(ws, spdy, func(err error) bool {
		return httpstream.IsUpgradeFailure(err) || httpstream.IsHTTPSProxyError(err)
	})
}

// Client runs commands in containers of the cluster's pods.
type Client struct {
	config *rest.Config
	rest   rest.Interface
}

// New returns a Client for the cluster config points at.
func New(config *rest.Config) (*Client, error) {
	c := rest.CopyConfig(config)
	c.APIPath = "/api"
	c.GroupVersion = &corev1.SchemeGroupVersion
	c.NegotiatedSerializer = scheme.Codecs.WithoutConversion()
	rc, err := rest.RESTClientFor(c)
	if err != nil {
		return nil, fmt.Errorf("exec client: %w", err)
	}
	return &Client{config: config, rest: rc}, nil
}

// URL is a pod's subresource (exec, attach, portforward) with its options, for Executor or
// a port-forward dialer.
func (c *Client) URL(namespace, pod, subresource string, opts runtime.Object) *url.URL {
	req := c.rest.Post().Resource("pods").Namespace(namespace).Name(pod).SubResource(subresource)
	if opts != nil {
		req = req.VersionedParams(opts, scheme.ParameterCodec)
	}
	return req.URL()
}

// Config is the cluster's client configuration.
func (c *Client) Config() *rest.Config { return c.config }

// Stream runs command in a container of a pod with stdin (nil: none), copying its stdout
// to stdout as it comes; an error carries its stderr.
func (c *Client) Stream(ctx context.Context, namespace, pod, container string, command []string, stdin io.Reader, stdout io.Writer) error {
	u := c.URL(namespace, pod, "exec", &corev1.PodExecOptions{Container: container, Command: command, Stdin: stdin != nil, Stdout: true, Stderr: true})
	exec, err := Executor(c.config, u)
	if err != nil {
		return fmt.Errorf("exec in %s/%s: %w", namespace, pod, err)
	}
	var stderr bytes.Buffer
	if err := exec.StreamWithContext(ctx, remotecommand.StreamOptions{Stdin: stdin, Stdout: stdout, Stderr: &stderr}); err != nil {
		return fmt.Errorf("exec %s in %s/%s: %w: %s", strings.Join(command, " "), namespace, pod, err, strings.TrimSpace(stderr.String()))
	}
	return nil
}

// Exec runs command in a container of a pod and returns its stdout; an error carries its
// stderr.
func (c *Client) Exec(ctx context.Context, namespace, pod, container string, command []string) (string, error) {
	u := c.URL(namespace, pod, "exec", &corev1.PodExecOptions{Container: container, Command: command, Stdout: true, Stderr: true})
	exec, err := Executor(c.config, u)
	if err != nil {
		return "", fmt.Errorf("exec in %s/%s: %w", namespace, pod, err)
	}
	var stdout, stderr bytes.Buffer
	if err := exec.StreamWithContext(ctx, remotecommand.StreamOptions{Stdout: &stdout, Stderr: &stderr}); err != nil {
		return stdout.String(), fmt.Errorf("exec %s in %s/%s: %w: %s", strings.Join(command, " "), namespace, pod, err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}
