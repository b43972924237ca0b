package testenv

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/rand"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

// EnvCluster names the run dir of the test cluster hack/cluster.sh started (its `env`
// command exports it, with KUBECONFIG and kubectl on PATH).
const EnvCluster = "VMPOD_CLUSTER"

// Cluster is the running test cluster: a client for the API, kubectl for what users do.
type Cluster struct {
	Client     kubernetes.Interface
	Kubeconfig string
	Run        string // hack/cluster.sh's run dir
}

// RequireCluster skips unless hack/cluster.sh's cluster is up, and returns it.
func RequireCluster(t testing.TB) *Cluster {
	t.Helper()
	run := os.Getenv(EnvCluster)
	if run == "" {
		t.Skipf("cluster test: needs the test cluster: hack/cluster.sh start; eval \"$(hack/cluster.sh env)\" (make test does)")
	}
	kc := os.Getenv("KUBECONFIG")
	cfg, err := clientcmd.BuildConfigFromFlags("", kc)
	if err != nil {
		t.Fatalf("KUBECONFIG %q: %v", kc, err)
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatalf("client for %s: %v", cfg.Host, err)
	}
	return &Cluster{Client: client, Kubeconfig: kc, Run: run}
}

// Kubectl runs kubectl and returns its stdout, failing the test on an error.
func (c *Cluster) Kubectl(t testing.TB, args ...string) string {
	t.Helper()
	out, err := c.KubectlErr(args...)
	if err != nil {
		t.Fatalf("kubectl %s: %v", strings.Join(args, " "), err)
	}
	return out
}

// KubectlErr runs kubectl; the error carries its stderr.
func (c *Cluster) KubectlErr(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := c.Command(ctx, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("%w: %s", err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}

// withKubeconfig adds --kubeconfig after the command and its arguments but before a "--"
// (what follows is the exec'd command's): kubectl hands everything after a plugin's name
// (vmpod) to the plugin and refuses flags before it.
func (c *Cluster) withKubeconfig(args []string) []string {
	i := slices.Index(args, "--")
	if i < 0 {
		i = len(args)
	}
	return slices.Concat(args[:i], []string{"--kubeconfig", c.Kubeconfig}, args[i:])
}

// Command is an exec.Cmd of kubectl with the cluster's kubeconfig.
func (c *Cluster) Command(ctx context.Context, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "kubectl", c.withKubeconfig(args)...)
}

// Namespace creates a namespace for the test and deletes it (and waits for its pods to go)
// when the test ends.
func (c *Cluster) Namespace(t testing.TB) string {
	t.Helper()
	name := "e2e-" + rand.String(6)
	ctx := Context(t, time.Minute)
	if _, err := c.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("namespace %s: %v", name, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if err := c.Client.CoreV1().Namespaces().Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
			t.Errorf("deleting namespace %s: %v", name, err)
			return
		}
		for ctx.Err() == nil {
			pods, err := c.Client.CoreV1().Pods(name).List(ctx, metav1.ListOptions{})
			if err == nil && len(pods.Items) == 0 {
				return
			}
			time.Sleep(500 * time.Millisecond)
		}
		t.Errorf("namespace %s: pods still there after 2 min", name)
	})
	return name
}

// WaitPod polls the pod until cond holds, failing the test after d with the pod's state
// and events.
func (c *Cluster) WaitPod(t testing.TB, ns, name string, d time.Duration, what string, cond func(*corev1.Pod) bool) *corev1.Pod {
	t.Helper()
	ctx := Context(t, d)
	var last *corev1.Pod
	for {
		p, err := c.Client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		if err == nil {
			last = p
			if cond(p) {
				return p
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("pod %s/%s: not %s after %s: phase %v, conditions %+v\nevents:\n%s", ns, name, what, d,
				phase(last), conditions(last), c.Events(t, ns, name))
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func phase(p *corev1.Pod) string {
	if p == nil {
		return "(never read)"
	}
	return string(p.Status.Phase)
}

func conditions(p *corev1.Pod) []string {
	if p == nil {
		return nil
	}
	var out []string
	for _, c := range p.Status.Conditions {
		out = append(out, fmt.Sprintf("%s=%s(%s)", c.Type, c.Status, c.Message))
	}
	return out
}

// PodReady is true when the pod's Ready condition is.
func PodReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// Events lists the events about an object, a line each.
func (c *Cluster) Events(t testing.TB, ns, name string) string {
	ev, err := c.Client.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{FieldSelector: "involvedObject.name=" + name})
	if err != nil {
		return "(events: " + err.Error() + ")"
	}
	var b strings.Builder
	for _, e := range ev.Items {
		fmt.Fprintf(&b, "  %s %s: %s\n", e.Type, e.Reason, e.Message)
	}
	return b.String()
}

// NodeCrictl runs crictl against the containerd of a cluster node (1-based, as
// hack/cluster.sh numbers them).
func (c *Cluster) NodeCrictl(t testing.TB, node int, args ...string) string {
	t.Helper()
	sock := filepath.Join(c.Run, fmt.Sprintf("n%d", node), "containerd.sock")
	cmd := exec.Command("crictl", append([]string{"--runtime-endpoint", "unix://" + sock, "--image-endpoint", "unix://" + sock}, args...)...)
	// not the test bed's crictl settings, which make test exports
	cmd.Env = slices.DeleteFunc(os.Environ(), func(kv string) bool {
		return strings.HasPrefix(kv, "CRI_CONFIG_FILE=") || strings.HasPrefix(kv, "CONTAINER_RUNTIME_ENDPOINT=") || strings.HasPrefix(kv, "IMAGE_SERVICE_ENDPOINT=")
	})
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("crictl on node %d %v: %v: %s", node, args, err, stderr.String())
	}
	return string(out)
}
