package network_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
	"github.com/vmpod/vmpod/integration/testenv"
	"github.com/vmpod/vmpod/runtime"
	"github.com/vmpod/vmpod/runtime/network"
	"github.com/vmpod/vmpod/runtime/vmpodagent"
)

// pod is a booted pod: its netns plumbed into a VM whose guest was set up as the shim
// would do it.
type pod struct {
	*podNet
	plan     *network.Plan
	plumbing *network.Plumbing
	vm       *vmpodagent.Guest
}

// bootPod inspects and plumbs the pod netns, boots a VM with the taps, and sends the
// plan's interfaces and routes with SetupSandbox.
func bootPod(t *testing.T, pn *podNet, name string) *pod {
	t.Helper()
	plan, plumbing := pn.Plumb()
	cfg := testenv.VMConfig(t, name)
	cfg.NICs = plumbing.NICs()
	vm := testenv.StartVM(t, cfg)
	err := vm.Agent().SetupSandbox(testenv.Context(t, time.Minute), &agentv1.SetupSandboxRequest{
		Hostname:          name,
		HostTimeUnixNanos: time.Now().UnixNano(),
		Interfaces:        plan.GuestInterfaces(),
		Routes:            plan.GuestRoutes(),
	})
	if err != nil {
		t.Fatalf("SetupSandbox: %v", err)
	}
	return &pod{podNet: pn, plan: plan, plumbing: plumbing, vm: vm}
}

// container is a busybox container in the pod's VM; its network is the guest's.
type container struct {
	id     string
	proc   *vmpodagent.Process
	output *testenv.Buffer // stdout and stderr
}

// startContainer runs script with sh in a busybox container whose rootfs is an overlay
// prepared by prepare (nil: none).
func (p *pod) startContainer(t *testing.T, id, script string, prepare func(rootfs string)) *container {
	t.Helper()
	ctx := testenv.Context(t, time.Minute)
	rootfs := testenv.OverlayRootfs(t, testenv.BusyboxRootfs(t))
	if prepare != nil {
		prepare(rootfs)
	}
	out := &testenv.Buffer{}
	proc, err := p.vm.CreateContainer(ctx, id, rootfs, testenv.Spec("sh", "-c", script), runtime.Stdio{Stdout: out, Stderr: out})
	if err != nil {
		t.Fatalf("create %s: %v", id, err)
	}
	t.Cleanup(func() { p.removeContainer(t, id) })
	if err := p.vm.Agent().StartContainer(ctx, id); err != nil {
		t.Fatalf("start %s: %v", id, err)
	}
	return &container{id: id, proc: proc, output: out}
}

func (p *pod) removeContainer(t *testing.T, id string) {
	select {
	case <-p.vm.Done():
		return // the VM is gone, and the container with it
	default:
	}
	if err := p.vm.RemoveContainer(context.Background(), id, true); err != nil && !errdefs.IsNotFound(err) {
		t.Errorf("remove %s: %v", id, err)
	}
}

// waitOutput waits until the container printed marker, and fails with its output if it
// exits or takes too long first.
func (c *container) waitOutput(t *testing.T, marker string) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !strings.Contains(c.output.String(), marker) {
		if time.Now().After(deadline) {
			t.Fatalf("container %s did not print %q in 1m; output:\n%s", c.id, marker, c.output)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// run runs script in a new container to completion and returns its output.
func (p *pod) run(t *testing.T, id, script string) string {
	t.Helper()
	c := p.startContainer(t, id, script, nil)
	exit, err := testenv.WaitOutput(testenv.Context(t, time.Minute), c.proc)
	if err != nil || exit.Status != 0 {
		t.Fatalf("container %s: exit %d, %v; output:\n%s", id, exit.Status, err, c.output)
	}
	p.removeContainer(t, id)
	return c.output.String()
}

// httpClientIn is an HTTP client whose connections are made from netns ns.
func httpClientIn(ns string) *http.Client {
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		var conn net.Conn
		err := inNetns(ns, func() (err error) {
			conn, err = (&net.Dialer{}).DialContext(ctx, network, addr)
			return err
		})
		return conn, err
	}
	return &http.Client{
		Transport: &http.Transport{DialContext: dial, DisableKeepAlives: true},
		Timeout:   2 * time.Minute,
	}
}

// get fetches url from netns ns, retrying for up to patience while the server is not
// there yet (a guest address still tentative, httpd not listening yet).
func get(t *testing.T, ns, url string, patience time.Duration) []byte {
	t.Helper()
	client := httpClientIn(ns)
	deadline := time.Now().Add(patience)
	for {
		body, err := getOnce(client, url)
		if err == nil {
			return body
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET %s from netns %s: %v", url, ns, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func getOnce(client *http.Client, url string) ([]byte, error) {
	resp, err := client.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("status %s", resp.Status)
	}
	return body, nil
}

// busybox runs a busybox applet of the test rootfs on the host, in netns ns (the host
// has no ping; chroot makes the dynamic busybox find its libraries).
func busybox(t *testing.T, ns string, args ...string) (string, error) {
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns, "chroot", testenv.BusyboxRootfs(t)}, args...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}
