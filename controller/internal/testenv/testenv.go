// Package testenv runs the controller's tests against a real kube-apiserver and etcd
// (controller-runtime's envtest) with vmpod's CRDs and RuntimeClass installed. The binaries
// come from KUBEBUILDER_ASSETS, which hack/kube-assets.sh builds and prints; without it
// the tests skip and say so.
//
// One control plane serves a whole test package: call Get from each test and Stop from
// TestMain.
package testenv

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	kruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
	"github.com/vmpod/vmpod/controller/internal/render"
	"github.com/vmpod/vmpod/controller/manager"
)

// SkipReason is why the envtest suites skip without KUBEBUILDER_ASSETS.
const SkipReason = "KUBEBUILDER_ASSETS is not set, so there is no kube-apiserver+etcd to test against: " +
	"export KUBEBUILDER_ASSETS=$(hack/kube-assets.sh)"

// Env is a running control plane.
type Env struct {
	Config *rest.Config
	Client client.Client
	Scheme *kruntime.Scheme
	// Root is the repository root.
	Root string
	env  *envtest.Environment
}

var shared struct {
	once sync.Once
	env  *Env
	err  error
}

// Get returns the package's control plane, starting it on first use, or skips t.
func Get(t testing.TB) *Env {
	t.Helper()
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		t.Skip(SkipReason)
	}
	shared.once.Do(func() { shared.env, shared.err = start() })
	if shared.err != nil {
		t.Fatalf("start envtest: %v", shared.err)
	}
	return shared.env
}

// Stop stops the control plane if Get started one.
func Stop() {
	if binaries.dir != "" {
		os.RemoveAll(binaries.dir)
	}
	if shared.env == nil {
		return
	}
	if err := shared.env.env.Stop(); err != nil {
		fmt.Fprintf(os.Stderr, "testenv: stop: %v\n", err)
	}
}

func start() (*Env, error) {
	root, err := repoRoot()
	if err != nil {
		return nil, err
	}
	scheme := kruntime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		return nil, fmt.Errorf("add client-go types to scheme: %w", err)
	}
	if err := vmpodv1.AddToScheme(scheme); err != nil {
		return nil, fmt.Errorf("add vmpod.dev types to scheme: %w", err)
	}
	env := &envtest.Environment{
		CRDDirectoryPaths:     []string{filepath.Join(root, "config", "crd", "bases")},
		ErrorIfCRDPathMissing: true,
		Scheme:                scheme,
		// two shared cores: a cold apiserver start can take well over the default 20s
		ControlPlaneStartTimeout: 90 * time.Second,
		ControlPlaneStopTimeout:  30 * time.Second,
	}
	t0 := time.Now()
	cfg, err := env.Start()
	if err != nil {
		return nil, fmt.Errorf("start kube-apiserver and etcd from %s: %w", os.Getenv("KUBEBUILDER_ASSETS"), err)
	}
	fmt.Fprintf(os.Stderr, "testenv: kube-apiserver+etcd up in %s\n", time.Since(t0).Round(time.Millisecond))
	c, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		return nil, errors.Join(fmt.Errorf("client: %w", err), env.Stop())
	}
	e := &Env{Config: cfg, Client: c, Scheme: scheme, Root: root, env: env}
	// VM pods name RuntimeClass vmpod; its admission plugin rejects pods whose class is missing.
	if err := e.ApplyFile(context.Background(), filepath.Join(root, "runtimeclass", "runtimeclass.yaml")); err != nil {
		return nil, errors.Join(err, env.Stop())
	}
	return e, nil
}

// ApplyFile creates every object of a multi-document YAML file.
func (e *Env) ApplyFile(ctx context.Context, path string) error {
	objs, err := ReadObjects(path)
	if err != nil {
		return err
	}
	for _, o := range objs {
		if err := e.Client.Create(ctx, o); err != nil {
			return fmt.Errorf("create %s %s from %s: %w", o.GetKind(), o.GetName(), path, err)
		}
	}
	return nil
}

// Namespace creates a fresh namespace for one test.
func (e *Env) Namespace(t testing.TB) string {
	t.Helper()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "test-"}}
	if err := e.Client.Create(context.Background(), ns); err != nil {
		t.Fatalf("create namespace: %v", err)
	}
	return ns.Name
}

// KubeconfigFile writes a kubeconfig for the control plane (for programs the tests run).
func (e *Env) KubeconfigFile(t testing.TB) string {
	t.Helper()
	user, err := e.env.AddUser(envtest.User{Name: "test-admin", Groups: []string{"system:masters"}}, nil)
	if err != nil {
		t.Fatalf("add envtest user: %v", err)
	}
	kc, err := user.KubeConfig()
	if err != nil {
		t.Fatalf("kubeconfig: %v", err)
	}
	path := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(path, kc, 0o600); err != nil {
		t.Fatalf("write kubeconfig: %v", err)
	}
	return path
}

func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("testenv: no go.mod above the working directory")
		}
		dir = parent
	}
}

// ReadObjects decodes a multi-document YAML (or JSON) file into unstructured objects.
func ReadObjects(path string) ([]*unstructured.Unstructured, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	defer f.Close()
	var objs []*unstructured.Unstructured
	dec := utilyaml.NewYAMLOrJSONDecoder(f, 4096)
	for i := 0; ; i++ {
		o := &unstructured.Unstructured{}
		if err := dec.Decode(&o.Object); errors.Is(err, io.EOF) {
			return objs, nil
		} else if err != nil {
			return nil, fmt.Errorf("%s document %d: %w", path, i, err)
		}
		if len(o.Object) > 0 {
			objs = append(objs, o)
		}
	}
}

// StartManager runs vmpod-controller's manager, watching only namespace ns, until the test
// ends. Metrics and probes are off; restarts back off by backoff.
func (e *Env) StartManager(t testing.TB, ns string, configure func(*manager.Options)) {
	t.Helper()
	e.StartManagerAs(t, e.Config, ns, configure)
}

// StartManagerAs is StartManager with the manager's API identity given by cfg.
func (e *Env) StartManagerAs(t testing.TB, cfg *rest.Config, ns string, configure func(*manager.Options)) {
	t.Helper()
	o := manager.DefaultOptions()
	o.MetricsAddr, o.ProbeAddr = "0", "0"
	o.Namespace = ns
	o.SkipNameValidation = true
	o.ImporterImage = "vmpod-importer:test"
	if configure != nil {
		configure(&o)
	}
	ctx, cancel := context.WithCancel(context.Background())
	mgr, err := manager.New(ctx, cfg, o)
	if err != nil {
		cancel()
		t.Fatalf("new manager: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("manager: %v", err)
		}
	})
}

// Eventually polls cond every 50ms until it returns true, failing the test with the last
// description cond gave after timeout.
func Eventually(t testing.TB, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	last := ""
	for {
		ok, desc := cond()
		if ok {
			return
		}
		if desc != "" {
			last = desc
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s; last: %s", timeout, what, last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ServiceAccountKubeconfig writes a kubeconfig that authenticates as a ServiceAccount with a
// token from the TokenRequest API, so a program the test runs has exactly the RBAC
// permissions it would have in its pod.
func (e *Env) ServiceAccountKubeconfig(t testing.TB, ns, name string) string {
	t.Helper()
	token := e.ServiceAccountConfig(t, ns, name).BearerToken
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["envtest"] = &clientcmdapi.Cluster{Server: e.Config.Host, CertificateAuthorityData: e.Config.CAData}
	cfg.AuthInfos[name] = &clientcmdapi.AuthInfo{Token: token}
	cfg.Contexts["sa"] = &clientcmdapi.Context{Cluster: "envtest", AuthInfo: name, Namespace: ns}
	cfg.CurrentContext = "sa"
	path := filepath.Join(t.TempDir(), "kubeconfig")
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		t.Fatalf("write kubeconfig: %v", err)
	}
	return path
}

// ServiceAccountConfig is a client config that authenticates as a ServiceAccount (a token
// from the TokenRequest API), so RBAC applies as it would in the ServiceAccount's pod.
func (e *Env) ServiceAccountConfig(t testing.TB, ns, name string) *rest.Config {
	t.Helper()
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	tr := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: ptr.To[int64](3600)}}
	if err := e.Client.SubResource("token").Create(context.Background(), sa, tr); err != nil {
		t.Fatalf("token for ServiceAccount %s/%s: %v", ns, name, err)
	}
	return &rest.Config{Host: e.Config.Host, TLSClientConfig: rest.TLSClientConfig{CAData: e.Config.CAData}, BearerToken: tr.Status.Token}
}

var binaries struct {
	sync.Mutex
	dir   string
	built map[string]string
}

// Binary builds a main package of this module (e.g. "./cmd/vmpod-importer") once per test
// process and returns the executable's path.
func (e *Env) Binary(t testing.TB, pkg string) string {
	t.Helper()
	binaries.Lock()
	defer binaries.Unlock()
	if p, ok := binaries.built[pkg]; ok {
		return p
	}
	if binaries.dir == "" {
		dir, err := os.MkdirTemp("", "vmpod-testbin-")
		if err != nil {
			t.Fatal(err)
		}
		binaries.dir, binaries.built = dir, map[string]string{}
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	out := filepath.Join(binaries.dir, filepath.Base(pkg))
	cmd := exec.Command(goBin, "build", "-o", out, pkg)
	cmd.Dir = e.Root
	t0 := time.Now()
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, b)
	}
	t.Logf("built %s in %s", pkg, time.Since(t0).Round(time.Millisecond))
	binaries.built[pkg] = out
	return out
}

// Main runs a test package whose tests use Get, and stops the control plane after them.
func Main(m *testing.M) {
	code := m.Run()
	Stop()
	os.Exit(code)
}

// VMPod returns the pod of VM ns/vmName, or nil if it has none.
func (e *Env) VMPod(t testing.TB, ns, vmName string) *corev1.Pod {
	t.Helper()
	p := &corev1.Pod{}
	err := e.Client.Get(context.Background(), types.NamespacedName{Namespace: ns, Name: render.PodName(vmName)}, p)
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		t.Fatalf("get the pod of VM %s: %v", vmName, err)
	}
	return p
}

// WaitVMPod waits for a pod of VM ns/vmName that is not being deleted and whose UID is
// not `not` (a replacement); describe says what the VM is doing, for the failure message.
func (e *Env) WaitVMPod(t testing.TB, ns, vmName string, not types.UID, timeout time.Duration, describe func() string) *corev1.Pod {
	t.Helper()
	var p *corev1.Pod
	Eventually(t, timeout, "a new pod for VM "+vmName, func() (bool, string) {
		p = e.VMPod(t, ns, vmName)
		return p != nil && p.UID != not && p.DeletionTimestamp == nil, describe()
	})
	return p
}

// WaitNoVMPod waits until VM ns/vmName has no pod.
func (e *Env) WaitNoVMPod(t testing.TB, ns, vmName string, timeout time.Duration) {
	t.Helper()
	Eventually(t, timeout, "VM "+vmName+" to have no pod", func() (bool, string) {
		return e.VMPod(t, ns, vmName) == nil, "the pod is still there"
	})
}
