package testenv

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmpod/vmpod/runtime/nodeconfig"
	"github.com/vmpod/vmpod/runtime/vmm"
)

// The test bed (hack/containerd.sh) exports these for its clients.
const (
	EnvRuntimeEndpoint = "CONTAINER_RUNTIME_ENDPOINT"
	EnvVmpodConfig     = "VMPOD_CONFIG"
	EnvBusyboxImage    = "VMPOD_TESTBED_BUSYBOX"
	EnvHostsDir        = "VMPOD_TESTBED_HOSTS_DIR"
	EnvContainerdLog   = "VMPOD_TESTBED_CONTAINERD_LOG"
	EnvShimSockets     = "VMPOD_TESTBED_SHIM_SOCKETS"
	EnvContainerdAddr  = "CONTAINERD_ADDRESS"
	EnvRoot            = "VMPOD_ROOT"
)

// RequireTestbed skips unless the private containerd with the vmpod runtime is up.
func RequireTestbed(t testing.TB) {
	t.Helper()
	Require(t)
	if os.Getenv(EnvRuntimeEndpoint) == "" || os.Getenv(EnvVmpodConfig) == "" {
		t.Skipf("containerd test: needs the test bed (make test starts it; by hand: hack/containerd.sh start && eval \"$(hack/containerd.sh env)\") and %s", EnvVmpodConfig)
	}
}

// Cmd runs a test-bed client (crictl, ctr) and returns its stdout; stderr is in the error.
func Cmd(name string, args ...string) (string, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil {
		return stdout.String(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(filterNoise(stderr.String())))
	}
	return stdout.String(), nil
}

// filterNoise drops the warnings every crictl/ctr call prints on this host.
func filterNoise(s string) string {
	var keep []string
	for l := range strings.Lines(s) {
		if strings.Contains(l, "cgroup_parent is not set") || strings.Contains(l, "DEPRECATION") {
			continue
		}
		keep = append(keep, l)
	}
	return strings.Join(keep, "")
}

// Crictl runs crictl and fails the test on error.
func Crictl(t testing.TB, args ...string) string {
	t.Helper()
	out, err := Cmd("crictl", args...)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(out)
}

// PodConfig is crictl's pod sandbox config, as much of it as the tests use.
type PodConfig struct {
	Metadata     Metadata          `json:"metadata"`
	Hostname     string            `json:"hostname,omitempty"`
	Labels       map[string]string `json:"labels,omitempty"`
	LogDirectory string            `json:"log_directory,omitempty"`
	Annotations  map[string]string `json:"annotations,omitempty"`
	PortMappings []PortMapping     `json:"port_mappings,omitempty"`
	Linux        map[string]any    `json:"linux"`
}

// Metadata names a pod or container.
type Metadata struct {
	Name      string `json:"name"`
	Namespace string `json:"namespace,omitempty"`
	UID       string `json:"uid,omitempty"`
	Attempt   uint32 `json:"attempt,omitempty"`
}

// PortMapping is a hostPort.
type PortMapping struct {
	Protocol      int    `json:"protocol,omitempty"`
	ContainerPort int    `json:"container_port"`
	HostPort      int    `json:"host_port"`
	HostIP        string `json:"host_ip,omitempty"`
}

// ContainerConfig is crictl's container config, as much of it as the tests use.
type ContainerConfig struct {
	Metadata  Metadata          `json:"metadata"`
	Image     map[string]string `json:"image"`
	Command   []string          `json:"command,omitempty"`
	Args      []string          `json:"args,omitempty"`
	LogPath   string            `json:"log_path,omitempty"`
	Stdin     bool              `json:"stdin,omitempty"`
	StdinOnce bool              `json:"stdin_once,omitempty"`
	Tty       bool              `json:"tty,omitempty"`
	// StopSignal is CRI's Signal enum (runtime.v1.Signal), not a signal number.
	StopSignal int            `json:"stop_signal,omitempty"`
	Mounts     []Mount        `json:"mounts,omitempty"`
	Devices    []Device       `json:"devices,omitempty"`
	Linux      map[string]any `json:"linux"`
}

// Mount is a host path, or an image (an image volume), in a container.
type Mount struct {
	ContainerPath string     `json:"container_path"`
	HostPath      string     `json:"host_path,omitempty"`
	Readonly      bool       `json:"readonly,omitempty"`
	Image         *ImageSpec `json:"image,omitempty"`
}

// ImageSpec names an image.
type ImageSpec struct {
	Image string `json:"image"`
}

// Device is a host device node in a container.
type Device struct {
	ContainerPath string `json:"container_path"`
	HostPath      string `json:"host_path"`
	Permissions   string `json:"permissions"`
}

// WriteJSON writes v to a file in the test's temp dir and returns its path.
func WriteJSON(t testing.TB, name string, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// Pod is a pod sandbox run through CRI.
type Pod struct {
	ID      string
	Config  string // path of its config file
	Handler string // its runtime handler: vmpod or runc
	t       testing.TB
	removed bool // by the test, through Remove
}

// Remove stops and removes the pod as the kubelet does (StopPodSandbox, then
// RemovePodSandbox), within timeout each, and returns each call's error (the removal is
// not tried after a failed stop). Once both succeed the test's cleanup only checks that
// nothing of the pod is left.
func (p *Pod) Remove(timeout time.Duration) (stopErr, removeErr error) {
	t := fmt.Sprintf("%ds", int(timeout.Seconds()))
	if _, stopErr = Cmd("crictl", "--timeout", t, "stopp", p.ID); stopErr != nil {
		return stopErr, errors.New("not tried after the stop failed")
	}
	if _, removeErr = Cmd("crictl", "--timeout", t, "rmp", p.ID); removeErr == nil {
		p.removed = true
	}
	return nil, removeErr
}

// RunPod runs a pod with the vmpod handler and removes it (and checks it left nothing)
// when the test ends.
func RunPod(t testing.TB, cfg PodConfig) *Pod {
	t.Helper()
	return RunPodWith(t, "vmpod", cfg)
}

// Handlers are the test bed's runtime handlers, for a test that holds vmpod to what runc
// does.
var Handlers = []string{"runc", "vmpod"}

// RunPodWith is RunPod with another runtime handler (runc: the behaviour vmpod is held to).
func RunPodWith(t testing.TB, handler string, cfg PodConfig) *Pod {
	t.Helper()
	if cfg.Metadata.UID == "" {
		cfg.Metadata.UID = fmt.Sprintf("%s-%d", cfg.Metadata.Name, time.Now().UnixNano())
	}
	if cfg.Metadata.Namespace == "" {
		cfg.Metadata.Namespace = "vmpod-test"
	}
	if cfg.LogDirectory == "" {
		cfg.LogDirectory = t.TempDir()
	}
	if cfg.Linux == nil {
		cfg.Linux = map[string]any{}
	}
	path := WriteJSON(t, "pod.json", cfg)
	id := Crictl(t, "runp", "--runtime", handler, path)
	p := &Pod{ID: id, Config: path, Handler: handler, t: t}
	t.Cleanup(func() {
		if p.removed {
			AssertPodGone(t, id)
			return
		}
		_, _ = Cmd("crictl", "stopp", id)
		// After a shim died, containerd cleans up after it asynchronously and refuses the
		// sandbox's task delete ("ttrpc: closed") until done; the kubelet retries, so do we.
		for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(500 * time.Millisecond) {
			_, err := Cmd("crictl", "rmp", id)
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("remove pod: %v", err)
				break
			}
		}
		AssertPodGone(t, id)
	})
	return p
}

// IP is the pod's IP address, as CRI reports it.
func (p *Pod) IP() string {
	p.t.Helper()
	var v struct {
		Status struct {
			Network struct {
				IP string `json:"ip"`
			} `json:"network"`
		} `json:"status"`
	}
	if err := json.Unmarshal([]byte(Crictl(p.t, "inspectp", p.ID)), &v); err != nil || v.Status.Network.IP == "" {
		p.t.Fatalf("pod %s: no IP (%v)", p.ID, err)
	}
	return v.Status.Network.IP
}

// ExecStdin runs a command in a container through CRI's streaming Exec (what `kubectl exec
// -i` does) with stdin (nil: an empty one), for at most timeout; an error carries stderr.
func ExecStdin(id string, stdin []byte, timeout time.Duration, args ...string) (string, error) {
	cmd := exec.Command("crictl", append([]string{"exec", "-i", id}, args...)...)
	cmd.Stdin = bytes.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		return "", err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var err error
	select {
	case err = <-done:
	case <-time.After(timeout):
		_ = cmd.Process.Kill()
		<-done
		err = fmt.Errorf("timed out after %v", timeout)
	}
	if err != nil {
		return stdout.String(), fmt.Errorf("crictl exec -i %v: %w: %s", args, err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// Container creates and starts a container in the pod.
func (p *Pod) Container(cfg ContainerConfig) string {
	p.t.Helper()
	id := p.Create(cfg)
	Crictl(p.t, "start", id)
	return id
}

// Create creates a container in the pod and does not start it.
func (p *Pod) Create(cfg ContainerConfig) string {
	p.t.Helper()
	if cfg.Image == nil {
		cfg.Image = map[string]string{"image": BusyboxImage(p.t)}
	}
	if cfg.Linux == nil {
		cfg.Linux = map[string]any{}
	}
	if cfg.LogPath == "" {
		cfg.LogPath = cfg.Metadata.Name + ".log"
	}
	path := WriteJSON(p.t, cfg.Metadata.Name+".json", cfg)
	return Crictl(p.t, "create", p.ID, path, p.Config)
}

// BusyboxImage is the test bed's busybox image, pulled into CRI's namespace.
func BusyboxImage(t testing.TB) string {
	t.Helper()
	img := os.Getenv(EnvBusyboxImage)
	if img == "" {
		t.Fatalf("%s not set", EnvBusyboxImage)
	}
	Crictl(t, "pull", img)
	return img
}

// PodStateDir is where the vmpod runtime keeps a pod's VM state in the test bed.
func PodStateDir(t testing.TB, podID string) string {
	t.Helper()
	b, err := os.ReadFile(os.Getenv(EnvVmpodConfig))
	if err != nil {
		t.Fatalf("read vmpod config: %v", err)
	}
	for l := range strings.Lines(string(b)) {
		if k, v, ok := strings.Cut(l, "="); ok && strings.TrimSpace(k) == "state_dir" {
			return filepath.Join(strings.Trim(strings.TrimSpace(v), `"`), podID)
		}
	}
	t.Fatal("vmpod config has no state_dir")
	return ""
}

// AssertPodGone fails if anything of the pod is left: its shim, live processes naming its
// state dir (QEMU, virtiofsd; zombies are already dead), mounts below it, the dir itself.
// It allows a few seconds: after a shim dies, containerd's `shim delete` cleans up
// asynchronously and may still be at work when RemovePodSandbox returns.
func AssertPodGone(t testing.TB, podID string) {
	t.Helper()
	dir := PodStateDir(t, podID)
	var left []string
	for deadline := time.Now().Add(5 * time.Second); ; {
		left = left[:0]
		if procs := LiveProcessesMentioning(dir); len(procs) > 0 {
			left = append(left, fmt.Sprintf("processes of pod %s: %s", podID, strings.Join(procs, "; ")))
		}
		// containerd forgets a pod's shim once RemovePodSandbox returns: one still running
		// holds the VM's resources and answers a socket nobody will call again
		if shims := liveShimsOf(podID); len(shims) > 0 {
			left = append(left, fmt.Sprintf("shim of pod %s after its removal: %s", podID, strings.Join(shims, "; ")))
		}
		if mounts := MountsUnder(dir); len(mounts) > 0 {
			left = append(left, fmt.Sprintf("mounts of pod %s: %s", podID, strings.Join(mounts, ", ")))
		}
		for _, sock := range shimSocketsOf(podID) {
			if _, err := os.Lstat(sock); err == nil {
				left = append(left, fmt.Sprintf("shim socket of pod %s: %s", podID, sock))
			}
		}
		if _, err := os.Lstat(dir); err == nil {
			left = append(left, fmt.Sprintf("state dir of pod %s: %s", podID, dir))
		}
		if len(left) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	for _, l := range left {
		t.Errorf("leak: %s", l)
	}
}

// shimSocketsOf are where pod podID's shim may listen: containerd names the socket by the
// hash of its own address, the namespace and the pod (pkg/shim.CreateSocketAddress); the
// pod is CRI's (k8s.io) or ctr's (default). None off the test bed.
func shimSocketsOf(podID string) []string {
	dir, addr := os.Getenv(EnvShimSockets), os.Getenv(EnvContainerdAddr)
	if dir == "" || addr == "" {
		return nil
	}
	var socks []string
	for _, ns := range []string{"k8s.io", "default"} {
		sum := sha256.Sum256([]byte(filepath.Join(addr, ns, podID)))
		socks = append(socks, filepath.Join(dir, hex.EncodeToString(sum[:])))
	}
	return socks
}

// ShimPid is the pid of pod podID's running vmpod shim.
func ShimPid(t testing.TB, podID string) int {
	t.Helper()
	shims := liveShimsOf(podID)
	if len(shims) != 1 {
		t.Fatalf("pod %s: want one running shim, found %q", podID, shims)
	}
	pid, _, _ := strings.Cut(shims[0], ":")
	n, err := strconv.Atoi(pid)
	if err != nil {
		t.Fatalf("shim process %q: %v", shims[0], err)
	}
	return n
}

// liveShimsOf lists the running vmpod shims of pod podID (containerd starts a pod's shim
// with -id <sandbox id>).
func liveShimsOf(podID string) []string {
	var shims []string
	for _, p := range LiveProcessesMentioning("-id " + podID) {
		if strings.Contains(p, "containerd-shim-vmpod-v2") {
			shims = append(shims, p)
		}
	}
	return shims
}

// LiveProcessesMentioning is ProcessesMentioning without zombies (dead, not yet reaped).
func LiveProcessesMentioning(s string) []string {
	var live []string
	for _, p := range ProcessesMentioning(s) {
		pid, _, _ := strings.Cut(p, ":")
		stat, err := os.ReadFile(filepath.Join("/proc", pid, "stat"))
		if err == nil {
			if f := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:])); len(f) > 0 && f[0] == "Z" {
				continue
			}
		}
		live = append(live, p)
	}
	return live
}

// QEMUPid finds the QEMU of a pod: by the record in its state dir, since its command
// line names no path (docs/design/014).
func QEMUPid(t testing.TB, podID string) int {
	t.Helper()
	if pid := vmm.QEMUOf(PodStateDir(t, podID)); pid > 0 {
		return pid
	}
	t.Fatalf("no QEMU for pod %s", podID)
	return 0
}

// GuestRAM is the guest RAM a pod's QEMU was given (-m size=) and holds resident in
// its shared memory (RssShmem: a container pod's RAM is a shared memfd), in bytes.
func GuestRAM(t testing.TB, podID string) (size, resident int64) {
	t.Helper()
	pid := QEMUPid(t, podID)
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		t.Fatal(err)
	}
	args := strings.Split(string(cmdline), "\x00")
	for i, a := range args[:len(args)-1] {
		if a != "-m" {
			continue
		}
		for opt := range strings.SplitSeq(args[i+1], ",") {
			if v, ok := strings.CutPrefix(opt, "size="); ok {
				if mib, ok := strings.CutSuffix(v, "M"); ok {
					n, _ := strconv.ParseInt(mib, 10, 64)
					size = n << 20
				}
			}
		}
	}
	if size == 0 {
		t.Fatalf("QEMU %d of pod %s: no -m size=<n>M in %q", pid, podID, args)
	}
	kib, err := StatusKiB(pid, "RssShmem")
	if err != nil {
		t.Fatal(err)
	}
	return size, kib << 10
}

// StatusKiB is a "<field>: <n> kB" line of /proc/<pid>/status.
func StatusKiB(pid int, field string) (int64, error) {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for l := range strings.Lines(string(status)) {
		if v, ok := strings.CutPrefix(l, field+":"); ok {
			return strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		}
	}
	return 0, fmt.Errorf("process %d: no %s in its status", pid, field)
}

// WithNodeConfig runs start with lines added to the node config the vmpod shim reads at
// each pod's start, and the config's own content back once start returned (or the test
// ended): lines before the first table header go into [hypervisor], tables after it
// ("[timeouts]\nboot = ...") at the end. They must set what the config leaves unset.
func WithNodeConfig(t testing.TB, lines string, start func()) {
	t.Helper()
	path := os.Getenv(EnvVmpodConfig)
	orig, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	hypervisor, tables := lines, ""
	if i := strings.Index("\n"+lines, "\n["); i >= 0 {
		hypervisor, tables = lines[:i], lines[i:]
	}
	for line := range strings.Lines(lines) {
		key, _, _ := strings.Cut(strings.TrimSpace(line), " = ")
		if strings.HasPrefix(key, "[") && bytes.Contains(orig, []byte(key)) ||
			!strings.HasPrefix(key, "[") && bytes.Contains(orig, []byte("\n"+key+" ")) {
			t.Fatalf("%s sets %s already: the test sets its own", path, key)
		}
	}
	const section = "[hypervisor]\n"
	if !bytes.Contains(orig, []byte(section)) {
		t.Fatalf("%s has no [hypervisor] section", path)
	}
	changed := bytes.Replace(orig, []byte(section), []byte(section+hypervisor), 1)
	if tables != "" {
		if !bytes.HasSuffix(changed, []byte("\n")) {
			changed = append(changed, '\n')
		}
		changed = append(changed, tables...)
	}
	restore := func() {
		if err := os.WriteFile(path, orig, 0o644); err != nil {
			t.Errorf("restore %s: %v", path, err)
		}
	}
	if err := os.WriteFile(path, changed, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(restore)
	defer restore()
	start()
}

// TemplateConfig is the node config (WithNodeConfig) of vmpod pods restored from
// templates (docs/design/022).
const TemplateConfig = "machine = \"q35\"\ntemplates = true\n"

// TemplateDir is where the test bed's vmpod shim keeps its templates.
func TemplateDir(t testing.TB) string {
	t.Helper()
	cfg, err := nodeconfig.Load(os.Getenv(EnvVmpodConfig))
	if err != nil {
		t.Fatal(err)
	}
	return cfg.TemplateDir()
}
