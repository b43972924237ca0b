// Package cluster holds the end-to-end tests against a real Kubernetes cluster
// (hack/cluster.sh: kube-apiserver, scheduler, controller-manager, and two nodes with
// kubelet, kube-proxy and containerd with runc and vmpod): what users do with kubectl.
package cluster

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/vmpod/vmpod/integration/testenv"
)

const (
	runcNode = "vmpod-n3" // runc only
	busybox  = "docker.io/library/busybox:latest"
)

// vmpodNodes are labelled vmpod.dev/runtime=true by hack/cluster.sh.
var vmpodNodes = []string{"vmpod-n1", "vmpod-n2"}

// nodeNumber is the i of node vmpod-n<i>, for testenv.Cluster's per-node helpers.
func nodeNumber(t *testing.T, name string) int {
	t.Helper()
	var i int
	if _, err := fmt.Sscanf(name, "vmpod-n%d", &i); err != nil {
		t.Fatalf("node name %q: %v", name, err)
	}
	return i
}

// TestRuntimeClassDeployment: a Deployment with runtimeClassName vmpod, as a user writes
// it, runs in VMs on the labelled node; a Service reaches it from a runc pod on the other
// node; logs, exec, port-forward and both probe kinds work; deleting it leaves the node
// without a sandbox.
func TestRuntimeClassDeployment(t *testing.T) {
	c := testenv.RequireCluster(t)
	ns := c.Namespace(t)
	ctx := testenv.Context(t, 5*time.Minute)

	labels := map[string]string{"app": "web"}
	dep := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: appsv1.DeploymentSpec{
			Replicas: ptr.To[int32](1),
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{
					RuntimeClassName:              ptr.To("vmpod"),
					TerminationGracePeriodSeconds: ptr.To[int64](5),
					Containers: []corev1.Container{{
						Name:  "web",
						Image: busybox,
						// the page is the kernel release the container sees: the guest's
						Command: []string{"sh", "-c", "mkdir -p /www && uname -r > /www/index.html && echo web started && exec httpd -f -p 8080 -h /www"},
						Ports:   []corev1.ContainerPort{{ContainerPort: 8080}},
						ReadinessProbe: &corev1.Probe{
							ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/", Port: intstr.FromInt32(8080)}},
							PeriodSeconds: 1,
						},
						LivenessProbe: &corev1.Probe{
							ProbeHandler:   corev1.ProbeHandler{Exec: &corev1.ExecAction{Command: []string{"test", "-s", "/www/index.html"}}},
							PeriodSeconds:  2,
							TimeoutSeconds: 10,
							// the file exists only once the shell wrote it
							InitialDelaySeconds: 5,
						},
						Resources: corev1.ResourceRequirements{Limits: corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("256Mi")}},
					}},
				},
			},
		},
	}
	if _, err := c.Client.AppsV1().Deployments(ns).Create(ctx, dep, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create deployment: %v", err)
	}
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec:       corev1.ServiceSpec{Selector: labels, Ports: []corev1.ServicePort{{Port: 80, TargetPort: intstr.FromInt32(8080)}}},
	}
	svc, err := c.Client.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create service: %v", err)
	}

	pod := waitDeploymentPod(t, c, ns, "app=web")
	if !slices.Contains(vmpodNodes, pod.Spec.NodeName) {
		t.Errorf("vmpod pod scheduled on %s, want one of the labelled nodes %v", pod.Spec.NodeName, vmpodNodes)
	}
	// RuntimeClass admission copies the class's overhead into the pod; the scheduler
	// charges it (TestRuntimeClassOverheadCharged)
	if got := pod.Spec.Overhead.Memory(); got.Cmp(resource.MustParse("128Mi")) != 0 {
		t.Errorf("pod overhead memory = %s, want the RuntimeClass's 128Mi", got)
	}

	hostKernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	guestKernel := strings.TrimSpace(c.Kubectl(t, "exec", "-n", ns, pod.Name, "--", "uname", "-r"))
	if guestKernel == "" || guestKernel == strings.TrimSpace(string(hostKernel)) || !strings.Contains(guestKernel, "vmpod") {
		t.Errorf("kubectl exec uname -r = %q: want the vmpod guest kernel, not the host's %q", guestKernel, strings.TrimSpace(string(hostKernel)))
	}
	testenv.WaitFor(t, "kubectl logs to show the container's output", func() bool {
		out, _ := c.KubectlErr("logs", "-n", ns, pod.Name)
		return strings.Contains(out, "web started")
	})

	// a runc pod on the other node reaches the VM through the Service (kube-proxy on that
	// node, pod routes between the nodes)
	client := runcClient(t, c, ns)
	var page string
	testenv.WaitFor(t, "the Service to answer from the runc pod on "+runcNode, func() bool {
		page, _ = c.KubectlErr("exec", "-n", ns, client, "--", "sh", "-c",
			fmt.Sprintf("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 %s 80", svc.Spec.ClusterIP))
		return strings.Contains(page, guestKernel)
	})

	// kubectl port-forward: API server -> kubelet -> containerd's stream server -> the pod
	if got := portForwardGet(t, c, ns, pod.Name, 8080); strings.TrimSpace(got) != guestKernel {
		t.Errorf("port-forward GET / = %q, want %q", got, guestKernel)
	}

	// the exec liveness probe ran (through CRI ExecSync into the guest) without failing
	time.Sleep(3 * time.Second)
	if p, _ := c.Client.CoreV1().Pods(ns).Get(ctx, pod.Name, metav1.GetOptions{}); p == nil || p.Status.ContainerStatuses[0].RestartCount != 0 {
		t.Errorf("container restarted: the exec liveness probe failed\n%s", c.Events(t, ns, pod.Name))
	}

	// delete: the pod goes within its grace period; its sandbox stops and its VM with it
	// (the kubelet removes stopped sandboxes later, in its garbage collection)
	sandbox := strings.TrimSpace(c.NodeCrictl(t, nodeNumber(t, pod.Spec.NodeName), "pods", "--namespace", ns, "--label", "app=web", "-q"))
	if sandbox == "" || len(testenv.LiveProcessesMentioning(sandbox)) == 0 {
		t.Fatalf("no sandbox with a live VM for the pod on %s (sandbox %q)", pod.Spec.NodeName, sandbox)
	}
	if err := c.Client.AppsV1().Deployments(ns).Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
		t.Fatalf("delete deployment: %v", err)
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		pods, err := c.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app=web"})
		if err == nil && len(pods.Items) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pods of the deleted deployment still there after 60s")
		}
		time.Sleep(250 * time.Millisecond)
	}
	testenv.WaitFor(t, "the pod's sandbox to stop and its VM to exit", func() bool {
		ready := c.NodeCrictl(t, 1, "pods", "--namespace", ns, "--state", "ready", "-q")
		return strings.TrimSpace(ready) == "" && len(testenv.LiveProcessesMentioning(sandbox)) == 0
	})
}

// TestRuntimeClassScheduling: a vmpod pod pinned to a node without the runtime label is not
// scheduled there (the RuntimeClass's node selector), and says why.
func TestRuntimeClassScheduling(t *testing.T) {
	c := testenv.RequireCluster(t)
	ns := c.Namespace(t)
	ctx := testenv.Context(t, time.Minute)
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "nowhere"},
		Spec: corev1.PodSpec{
			RuntimeClassName: ptr.To("vmpod"),
			NodeSelector:     map[string]string{"kubernetes.io/hostname": runcNode},
			Containers:       []corev1.Container{{Name: "c", Image: busybox, Command: []string{"sleep", "3600"}}},
		},
	}
	if _, err := c.Client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create pod: %v", err)
	}
	p := c.WaitPod(t, ns, "nowhere", 30*time.Second, "reported unschedulable", func(p *corev1.Pod) bool {
		for _, cond := range p.Status.Conditions {
			if cond.Type == corev1.PodScheduled && cond.Reason == corev1.PodReasonUnschedulable {
				return true
			}
		}
		return false
	})
	if p.Spec.NodeName != "" {
		t.Errorf("pod bound to %s", p.Spec.NodeName)
	}
}

// TestRuntimeClassVmpodNext: with hack/qemu-next.sh's QEMU the nodes have a second vmpod
// handler on it (hack/cluster.sh), which RuntimeClass vmpod-next selects: a container pod
// of that class runs in a VM of that QEMU, which can migrate virtio-fs (what moving a
// container pod needs, docs/design/212), while the other classes' pods keep the host's.
func TestRuntimeClassVmpodNext(t *testing.T) {
	c := testenv.RequireCluster(t)
	qemu, _ := testenv.QEMUNext(t)
	ns := c.Namespace(t)
	ctx := testenv.Context(t, 3*time.Minute)
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "next"},
		Spec: corev1.PodSpec{
			RuntimeClassName: ptr.To("vmpod-next"),
			Containers:       []corev1.Container{{Name: "c", Image: busybox, Command: []string{"sleep", "3600"}}},
		},
	}
	if _, err := c.Client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create pod: %v", err)
	}
	before := runningBinary(qemu)
	c.WaitPod(t, ns, "next", 3*time.Minute, "running", func(p *corev1.Pod) bool { return p.Status.Phase == corev1.PodRunning })
	if out := c.Kubectl(t, "-n", ns, "exec", "next", "--", "uname", "-r"); !strings.HasSuffix(strings.TrimSpace(out), "-vmpod") {
		t.Errorf("the pod's kernel: %q, want the vmpod guest's", out)
	}
	// no other test's pod runs on that QEMU: a process of it is this pod's VM
	if n := runningBinary(qemu); n == 0 {
		t.Errorf("no process of %s runs (%d before the pod started): the pod's VM is not on it", qemu, before)
	}
}

// runningBinary counts the processes whose executable is path (a link: where it leads).
func runningBinary(path string) int {
	if real, err := filepath.EvalSymlinks(path); err == nil {
		path = real
	}
	n := 0
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		if exe, err := os.Readlink("/proc/" + e.Name() + "/exe"); err == nil && exe == path {
			n++
		}
	}
	return n
}

// TestRuntimeClassOverheadCharged: the scheduler adds the RuntimeClass overhead to a pod's
// requests. A pod asking for just less memory than the emptiest vmpod node has left fits
// without the overhead and must not fit with it.
func TestRuntimeClassOverheadCharged(t *testing.T) {
	c := testenv.RequireCluster(t)
	ns := c.Namespace(t)
	ctx := testenv.Context(t, time.Minute)

	var free resource.Quantity
	for _, name := range vmpodNodes {
		node, err := c.Client.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatalf("node %s: %v", name, err)
		}
		left := node.Status.Allocatable.Memory().DeepCopy()
		pods, err := c.Client.CoreV1().Pods("").List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + name})
		if err != nil {
			t.Fatalf("pods on %s: %v", name, err)
		}
		for _, p := range pods.Items {
			if p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
				continue
			}
			for _, ctr := range p.Spec.Containers {
				left.Sub(*ctr.Resources.Requests.Memory())
			}
			if m, ok := p.Spec.Overhead[corev1.ResourceMemory]; ok {
				left.Sub(m)
			}
		}
		if left.Cmp(free) > 0 {
			free = left
		}
	}
	// 64Mi less than what is free: fits on its own, not with the 128Mi overhead
	request := free.DeepCopy()
	request.Sub(resource.MustParse("64Mi"))
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "big"},
		Spec: corev1.PodSpec{
			RuntimeClassName: ptr.To("vmpod"),
			Containers: []corev1.Container{{Name: "c", Image: busybox, Command: []string{"sleep", "3600"},
				Resources: corev1.ResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceMemory: request}}}},
		},
	}
	if _, err := c.Client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create pod: %v", err)
	}
	c.WaitPod(t, ns, "big", 30*time.Second, "unschedulable for memory", func(p *corev1.Pod) bool {
		for _, cond := range p.Status.Conditions {
			if cond.Type == corev1.PodScheduled && cond.Reason == corev1.PodReasonUnschedulable &&
				strings.Contains(cond.Message, "Insufficient memory") {
				return true
			}
		}
		return false
	})
}

// waitDeploymentPod waits for the one pod matching selector to be Ready and returns it.
func waitDeploymentPod(t *testing.T, c *testenv.Cluster, ns, selector string) *corev1.Pod {
	t.Helper()
	var name string
	testenv.WaitFor(t, "the deployment's pod to be created", func() bool {
		pods, err := c.Client.CoreV1().Pods(ns).List(t.Context(), metav1.ListOptions{LabelSelector: selector})
		if err != nil || len(pods.Items) != 1 {
			return false
		}
		name = pods.Items[0].Name
		return true
	})
	return c.WaitPod(t, ns, name, 3*time.Minute, "Ready", testenv.PodReady)
}

// runcClient starts a runc pod on the runc node and returns its name once it runs.
func runcClient(t *testing.T, c *testenv.Cluster, ns string) string {
	t.Helper()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "client"},
		Spec: corev1.PodSpec{
			NodeName:                      runcNode,
			TerminationGracePeriodSeconds: ptr.To[int64](1),
			Containers:                    []corev1.Container{{Name: "c", Image: busybox, Command: []string{"sleep", "3600"}}},
		},
	}
	if _, err := c.Client.CoreV1().Pods(ns).Create(t.Context(), pod, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create client pod: %v", err)
	}
	c.WaitPod(t, ns, "client", 2*time.Minute, "Running", func(p *corev1.Pod) bool { return p.Status.Phase == corev1.PodRunning })
	return "client"
}

// portForwardGet runs kubectl port-forward to the pod's port and GETs / through it.
func portForwardGet(t *testing.T, c *testenv.Cluster, ns, pod string, port int) string {
	t.Helper()
	return forwardedGet(t, c, "/", "port-forward", "-n", ns, "pod/"+pod, fmt.Sprintf(":%d", port))
}

// forwardedGet runs a kubectl port-forward command (kubectl's or kubectl vmpod's, which
// print the same first line) and GETs path through the local port it reports.
func forwardedGet(t *testing.T, c *testenv.Cluster, path string, args ...string) string {
	t.Helper()
	cmd := c.Command(context.Background(), args...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("kubectl %s: %v", strings.Join(args, " "), err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	// "Forwarding from 127.0.0.1:PORT -> 8080"
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("kubectl %s printed no address: %v", strings.Join(args, " "), err)
	}
	var local int
	if _, err := fmt.Sscanf(line, "Forwarding from 127.0.0.1:%d", &local); err != nil {
		t.Fatalf("kubectl %s: unexpected first line %q", strings.Join(args, " "), line)
	}
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d%s", local, path))
	if err != nil {
		t.Fatalf("GET through port-forward: %v", err)
	}
	defer func() { _ = resp.Body.Close() }()
	body, _ := io.ReadAll(resp.Body)
	return string(body)
}
