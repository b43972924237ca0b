// Integration tests of containerd-shim-vmpod-v2 through a real containerd 2.4 (the test
// bed of hack/containerd.sh): CRI with crictl, plain containerd with ctr.
package shim_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmpod/vmpod/integration/testenv"
)

func sh(script string) []string { return []string{"sh", "-c", script} }

// inspect returns a container's CRI status.
func inspect(t *testing.T, id string) (state string, exitCode int) {
	t.Helper()
	var v struct {
		Status struct {
			State    string `json:"state"`
			ExitCode int    `json:"exitCode"`
		} `json:"status"`
	}
	if err := json.Unmarshal([]byte(testenv.Crictl(t, "inspect", id)), &v); err != nil {
		t.Fatal(err)
	}
	return v.Status.State, v.Status.ExitCode
}

func waitState(t *testing.T, id, want string, within time.Duration) (time.Duration, int) {
	t.Helper()
	start := time.Now()
	for {
		state, code := inspect(t, id)
		if state == want {
			return time.Since(start), code
		}
		if time.Since(start) > within {
			t.Fatalf("container %s is %s after %v, want %s", id, state, within, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func waitLog(t *testing.T, id, want string) string {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, _ := testenv.Cmd("crictl", "logs", id)
		if strings.Contains(out, want) {
			return out
		}
		if time.Now().After(deadline) {
			t.Fatalf("container %s log lacks %q after 30s: %q", id, want, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestCtrRunRm(t *testing.T) {
	testenv.RequireTestbed(t)
	out, err := ctrRun(t, nil, "echo", "hi")
	if err != nil || out != "hi\n" {
		t.Fatalf("ctr run printed %q, %v; want \"hi\\n\"", out, err)
	}
}

func TestCRIFlow(t *testing.T) {
	testenv.RequireTestbed(t)
	pod := testenv.RunPod(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: "flow"}, Hostname: "flow-pod"})
	id := pod.Container(testenv.ContainerConfig{
		Metadata: testenv.Metadata{Name: "ticker"},
		Command:  sh(`echo started; echo to-stderr >&2; i=0; while true; do echo tick $i; i=$((i+1)); sleep 1; done`),
	})
	if state, _ := inspect(t, id); state != "CONTAINER_RUNNING" {
		t.Fatalf("container is %s", state)
	}
	logs := waitLog(t, id, "tick 1")
	if !strings.Contains(logs, "started") {
		t.Fatalf("logs %q", logs)
	}
	// crictl prints the stderr stream on its own stderr
	if errLog, _ := exec.Command("crictl", "logs", "--stream", "stderr", id).CombinedOutput(); !strings.Contains(string(errLog), "to-stderr") {
		t.Errorf("stderr log %q", errLog)
	}

	out := testenv.Crictl(t, "exec", "-s", id, "sh", "-c", "echo exec-ok; uname -r; hostname")
	lines := strings.Fields(out)
	if len(lines) < 3 || lines[0] != "exec-ok" || !strings.HasSuffix(lines[1], "-vmpod") || lines[2] != "flow-pod" {
		t.Fatalf("exec output %q: want exec-ok, the guest kernel, the pod's hostname", out)
	}
	if _, err := testenv.Cmd("crictl", "exec", "-s", id, "sh", "-c", "exit 7"); err == nil || !strings.Contains(err.Error(), "7") {
		t.Fatalf("exec of exit 7: %v, want exit code 7", err)
	}

	// attach: a second container reads stdin; its output shows up through attach.
	cat := pod.Container(testenv.ContainerConfig{
		Metadata: testenv.Metadata{Name: "cat"}, Command: []string{"cat"}, Stdin: true, StdinOnce: true,
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	attach := exec.CommandContext(ctx, "crictl", "attach", "-i", cat)
	attach.Stdin = strings.NewReader("hello through attach\n")
	attachOut, err := attach.Output()
	if err != nil || !strings.Contains(string(attachOut), "hello through attach") {
		t.Fatalf("attach: %v, output %q", err, attachOut)
	}
	if d, code := waitState(t, cat, "CONTAINER_EXITED", 30*time.Second); code != 0 {
		t.Fatalf("cat exited %d after %v, want 0 once its stdin closed", code, d)
	}

	testenv.Crictl(t, "stop", id)
	if state, code := inspect(t, id); state != "CONTAINER_EXITED" || code != 128+int(syscall.SIGTERM) && code != 128+int(syscall.SIGKILL) {
		t.Fatalf("after stop: %s, exit %d", state, code)
	}
	testenv.Crictl(t, "rm", id)
	if _, err := testenv.Cmd("crictl", "inspect", id); err == nil {
		t.Fatal("removed container still inspectable")
	}
}

func TestTwoContainersShareEmptyDir(t *testing.T) {
	testenv.RequireTestbed(t)
	vol := t.TempDir()
	pod := testenv.RunPod(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: "share"}})
	mounts := []testenv.Mount{{ContainerPath: "/data", HostPath: vol}}
	writer := pod.Container(testenv.ContainerConfig{
		Metadata: testenv.Metadata{Name: "writer"}, Mounts: mounts,
		Command: sh(`echo from-writer > /data/note; sleep 1000`),
	})
	reader := pod.Container(testenv.ContainerConfig{
		Metadata: testenv.Metadata{Name: "reader"}, Mounts: mounts,
		Command: sh(`while [ ! -f /data/note ]; do sleep 0.1; done; cat /data/note; echo reader-to-host > /data/back; sleep 1000`),
	})
	waitLog(t, reader, "from-writer")
	deadline := time.Now().Add(10 * time.Second)
	for {
		if b, err := os.ReadFile(filepath.Join(vol, "back")); err == nil && string(b) == "reader-to-host\n" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the host never saw the container's write to the shared volume")
		}
		time.Sleep(50 * time.Millisecond)
	}
	_ = writer
}

func TestRestartContainerInPod(t *testing.T) {
	testenv.RequireTestbed(t)
	pod := testenv.RunPod(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: "restart"}})
	first := pod.Container(testenv.ContainerConfig{Metadata: testenv.Metadata{Name: "job"}, Command: sh("echo attempt-0; exit 3")})
	if _, code := waitState(t, first, "CONTAINER_EXITED", 30*time.Second); code != 3 {
		t.Fatalf("first run exited %d, want 3", code)
	}
	testenv.Crictl(t, "rm", first)
	second := pod.Container(testenv.ContainerConfig{Metadata: testenv.Metadata{Name: "job", Attempt: 1}, Command: sh("echo attempt-1; exit 0")})
	if _, code := waitState(t, second, "CONTAINER_EXITED", 30*time.Second); code != 0 {
		t.Fatalf("restarted container exited %d", code)
	}
	waitLog(t, second, "attempt-1")
}

func TestKillQEMUIsSeenAsExit(t *testing.T) {
	testenv.RequireTestbed(t)
	pod := testenv.RunPod(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: "killqemu"}})
	id := pod.Container(testenv.ContainerConfig{Metadata: testenv.Metadata{Name: "sleeper"}, Command: []string{"sleep", "1000"}})
	if err := syscall.Kill(testenv.QEMUPid(t, pod.ID), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	d, code := waitState(t, id, "CONTAINER_EXITED", 5*time.Second)
	t.Logf("containerd saw the exit %v after QEMU died", d)
	// ~0.1 s as a rule. A shim that exits under the container's task delete (the
	// sandbox's Shutdown arriving while that delete still stops the VM) shows here as
	// containerd's retry after its 1 s back-off.
	if d > time.Second {
		t.Errorf("containerd saw the exit %v after QEMU died, want within 1s", d)
	}
	if code != 137 {
		t.Errorf("exit code %d, want 137", code)
	}
	// RunPod's cleanup removes the pod and checks nothing is left.
}

func TestKillShimTakesQEMUWithIt(t *testing.T) {
	testenv.RequireTestbed(t)
	pod := testenv.RunPod(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: "killshim"}})
	id := pod.Container(testenv.ContainerConfig{Metadata: testenv.Metadata{Name: "sleeper"}, Command: []string{"sleep", "1000"}})
	qemu := testenv.QEMUPid(t, pod.ID)
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", qemu))
	if err != nil {
		t.Fatal(err)
	}
	var shimPid int
	if f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:])); len(f) > 1 {
		fmt.Sscan(f[1], &shimPid) // fields after the comm: state, ppid, ...
	}
	if shimPid <= 1 {
		t.Fatalf("QEMU's parent is %d, want the shim", shimPid)
	}
	if err := syscall.Kill(shimPid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(testenv.LiveProcessesMentioning(testenv.PodStateDir(t, pod.ID))) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("QEMU/virtiofsd survive the shim: %v", testenv.LiveProcessesMentioning(testenv.PodStateDir(t, pod.ID)))
		}
		time.Sleep(50 * time.Millisecond)
	}
	waitState(t, id, "CONTAINER_EXITED", 10*time.Second)
	// RunPod's cleanup: containerd's `shim delete` must leave no mount, dir or socket.
}

// containerd runs `shim delete` in a container's bundle whenever its connection to the
// shim closes — after every container's removal too, the pod's shim serving on — and the
// delete took a dial that missed containerd's 100 ms on a loaded node for a dead shim: it
// tore the pod's VM down under its other containers (CI, TestContainerChurn: an exec
// killed, the next creates refused). Here the delete runs by hand in a copy of a live
// container's bundle whose recorded address nobody serves — a shim the delete cannot
// reach — and the pod carries on: its shim holds the VM's owner lock.
func TestShimDeleteLeavesALivePod(t *testing.T) {
	testenv.RequireTestbed(t)
	pod := testenv.RunPod(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: "spared"}})
	id := pod.Container(testenv.ContainerConfig{Metadata: testenv.Metadata{Name: "sleeper"}, Command: []string{"sleep", "1000"}})
	shim := testenv.ShimPid(t, pod.ID)
	exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", shim))
	if err != nil {
		t.Fatal(err)
	}
	sandboxBundle, err := os.Readlink(fmt.Sprintf("/proc/%d/cwd", shim)) // containerd starts it there
	if err != nil {
		t.Fatal(err)
	}
	bundle, copied := filepath.Join(filepath.Dir(sandboxBundle), id), t.TempDir()
	record, err := os.ReadFile(filepath.Join(bundle, "vmpod-pod.json")) // names the pod's VM
	if err != nil {
		t.Fatal(err)
	}
	var bootstrap map[string]any
	if b, err := os.ReadFile(filepath.Join(bundle, "bootstrap.json")); err != nil {
		t.Fatal(err)
	} else if err := json.Unmarshal(b, &bootstrap); err != nil {
		t.Fatal(err)
	}
	bootstrap["address"] = "unix://" + filepath.Join(copied, "unreachable.sock")
	b, err := json.Marshal(bootstrap)
	if err != nil {
		t.Fatal(err)
	}
	for name, content := range map[string][]byte{"vmpod-pod.json": record, "bootstrap.json": b} {
		if err := os.WriteFile(filepath.Join(copied, name), content, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	del := exec.Command(exe, "-namespace", "k8s.io", "-id", id, "delete")
	del.Dir = copied
	if out, err := del.CombinedOutput(); err != nil {
		t.Fatalf("shim delete: %v: %s", err, out)
	}
	if out := testenv.Crictl(t, "exec", "-s", id, "echo", "still-here"); out != "still-here" {
		t.Errorf("exec after the shim delete: %q", out)
	}
	// a second container still joins the pod: its shim's socket was left
	second := pod.Container(testenv.ContainerConfig{Metadata: testenv.Metadata{Name: "second"}, Command: []string{"sleep", "1000"}})
	if out := testenv.Crictl(t, "exec", "-s", second, "echo", "joined"); out != "joined" {
		t.Errorf("exec in a container created after the shim delete: %q", out)
	}
}

// containerd restarted (as a node upgrade does) while 10 pods run: every pod's shim and VM
// carry on, and through the new containerd each container can still be exec'd into,
// keeps logging, can be stopped, and each pod removed without leftovers.
func TestContainerdRestartKeepsPods(t *testing.T) {
	testenv.RequireTestbed(t)
	const pods = 10
	ids := make([]string, pods)
	for i := range ids {
		pod := testenv.RunPod(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: fmt.Sprintf("survivor-%d", i)}})
		ids[i] = pod.Container(testenv.ContainerConfig{Metadata: testenv.Metadata{Name: "ticker"},
			Command: sh(`i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.5; done`)})
	}
	ticks := func(id string) int { return strings.Count(testenv.Crictl(t, "logs", id), "tick-") }
	before := make([]int, pods)
	for i, id := range ids {
		before[i] = ticks(id)
	}
	if _, err := testenv.Cmd(filepath.Join(os.Getenv(testenv.EnvRoot), "hack/containerd.sh"), "restart"); err != nil {
		t.Fatal(err)
	}
	for i, id := range ids {
		if out := testenv.Crictl(t, "exec", "-s", id, "echo", "after-restart"); out != "after-restart" {
			t.Errorf("pod %d: exec after containerd restart: %q", i, out)
		}
		testenv.WaitForWithin(t, 20*time.Second, fmt.Sprintf("pod %d logging after the restart", i), func() bool { return ticks(id) > before[i]+2 })
		testenv.Crictl(t, "stop", id)
		if _, code := waitState(t, id, "CONTAINER_EXITED", 30*time.Second); code != 137 && code != 143 {
			t.Errorf("pod %d: exit %d after stop, want 137 or 143", i, code)
		}
	}
}

func TestUnknownAnnotationIsRejected(t *testing.T) {
	testenv.RequireTestbed(t)
	cfg := testenv.PodConfig{
		Metadata:    testenv.Metadata{Name: "badannot", UID: fmt.Sprint(time.Now().UnixNano()), Namespace: "vmpod-test"},
		Annotations: map[string]string{"vmpod.dev/kernel-cmdline": "init=/bin/sh"},
		Linux:       map[string]any{},
	}
	_, err := testenv.Cmd("crictl", "runp", "--runtime", "vmpod", testenv.WriteJSON(t, "pod.json", cfg))
	if err == nil || !strings.Contains(err.Error(), "vmpod.dev/kernel-cmdline") {
		t.Fatalf("runp with an unknown vmpod annotation: %v, want an error naming it", err)
	}
	assertNoPodVMs(t)
}

func TestQEMUDyingDuringCreate(t *testing.T) {
	testenv.RequireTestbed(t)
	// A config whose "QEMU" exits at once, used through ctr (CRI's config is fixed).
	b, err := os.ReadFile(os.Getenv(testenv.EnvVmpodConfig))
	if err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(t.TempDir(), "config.toml")
	bad := strings.Replace(string(b), "[hypervisor]", "[hypervisor]\nqemu = \"/bin/false\"", 1)
	if err := os.WriteFile(cfg, []byte(bad), 0o644); err != nil {
		t.Fatal(err)
	}
	id := fmt.Sprintf("qemudies-%d", time.Now().UnixNano())
	_, err = testenv.Cmd("ctr", "run", "--rm", "--runtime", "io.containerd.vmpod.v2", "--runtime-config-path", cfg,
		ctrImage(t), id, "true")
	if err == nil || !strings.Contains(err.Error(), "QEMU exited") {
		t.Fatalf("ctr run with a QEMU that dies: %v, want an error saying QEMU exited", err)
	}
	testenv.AssertPodGone(t, id)
	_, _ = testenv.Cmd("ctr", "containers", "rm", id)
}

func TestBadConfigNamesTheKey(t *testing.T) {
	testenv.RequireTestbed(t)
	cfg := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(cfg, []byte("[hypervisor]\nkernal = \"/boot/x\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	id := fmt.Sprintf("badcfg-%d", time.Now().UnixNano())
	_, err := testenv.Cmd("ctr", "run", "--rm", "--runtime", "io.containerd.vmpod.v2", "--runtime-config-path", cfg,
		ctrImage(t), id, "true")
	if err == nil || !strings.Contains(err.Error(), "kernal") {
		t.Fatalf("ctr run with a misspelled config key: %v, want an error naming it", err)
	}
	_, _ = testenv.Cmd("ctr", "containers", "rm", id)
	assertNoPodVMs(t)
}

// assertNoPodVMs: no QEMU of the test bed is running once every test pod is gone.
func assertNoPodVMs(t *testing.T) {
	t.Helper()
	dir := filepath.Dir(testenv.PodStateDir(t, "x"))
	for _, p := range testenv.LiveProcessesMentioning(dir + "/") {
		if strings.Contains(p, "qemu-system") {
			t.Errorf("leak: %s", p)
		}
	}
}

// webServer runs busybox httpd in a pod and returns the pod's IP.
func webServer(t *testing.T, cfg testenv.PodConfig) (*testenv.Pod, string) {
	t.Helper()
	pod := testenv.RunPod(t, cfg)
	pod.Container(testenv.ContainerConfig{
		Metadata: testenv.Metadata{Name: "web"},
		Command:  sh(`mkdir -p /www && echo "served by $(uname -r)" > /www/index.html && httpd -f -p 8080 -h /www`),
	})
	var v struct {
		Status struct {
			Network struct {
				IP string `json:"ip"`
			} `json:"network"`
		} `json:"status"`
	}
	if err := json.Unmarshal([]byte(testenv.Crictl(t, "inspectp", pod.ID)), &v); err != nil || v.Status.Network.IP == "" {
		t.Fatalf("pod IP: %v (%+v)", err, v)
	}
	// Serving: tests that follow may do what gives up at the first refusal (port-forward).
	fetch(t, "http://"+net.JoinHostPort(v.Status.Network.IP, "8080")+"/")
	return pod, v.Status.Network.IP
}

// fetch GETs url until the guest's web server answers, for at most 30s.
func fetch(t *testing.T, url string) string {
	t.Helper()
	client := &http.Client{Timeout: 3 * time.Second}
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := client.Get(url)
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			return string(b)
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET %s: %v", url, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func TestPodIPAnswersFromHost(t *testing.T) {
	testenv.RequireTestbed(t)
	_, ip := webServer(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: "podip"}})
	// The answer names the guest kernel: the VM answered, not the pod's netns.
	if body := fetch(t, "http://"+net.JoinHostPort(ip, "8080")+"/"); !strings.Contains(body, "-vmpod") {
		t.Fatalf("pod IP %s answered %q, want the guest's page", ip, body)
	}
}

func TestHostPort(t *testing.T) {
	testenv.RequireTestbed(t)
	webServer(t, testenv.PodConfig{
		Metadata:     testenv.Metadata{Name: "hostport"},
		PortMappings: []testenv.PortMapping{{ContainerPort: 8080, HostPort: 12090, HostIP: "127.0.0.1"}},
	})
	if body := fetch(t, "http://127.0.0.1:12090/"); !strings.Contains(body, "-vmpod") {
		t.Fatalf("hostPort answered %q, want the guest's page", body)
	}
}

func TestMissingNetnsIsRejected(t *testing.T) {
	testenv.RequireTestbed(t)
	id := fmt.Sprintf("nonetns-%d", time.Now().UnixNano())
	_, err := testenv.Cmd("ctr", "run", "--rm", "--runtime", "io.containerd.vmpod.v2",
		"--runtime-config-path", os.Getenv(testenv.EnvVmpodConfig),
		"--with-ns", "network:/run/vmpod-no-such-netns", ctrImage(t), id, "true")
	if err == nil || !strings.Contains(err.Error(), "vmpod-no-such-netns") {
		t.Fatalf("ctr run in a missing netns: %v, want an error naming it", err)
	}
	testenv.AssertPodGone(t, id)
	_, _ = testenv.Cmd("ctr", "containers", "rm", id)
}

// kubectl port-forward: containerd dials localhost in the pod's netns; vmpod carries it to
// the guest's loopback.
func TestPortForward(t *testing.T) {
	testenv.RequireTestbed(t)
	pod, _ := webServer(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: "portfwd"}})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var pfOut testenv.Buffer
	pf := exec.CommandContext(ctx, "crictl", "port-forward", pod.ID, "18181:8080")
	pf.Stdout, pf.Stderr = &pfOut, &pfOut
	if err := pf.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cancel(); _ = pf.Wait() }()
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("crictl port-forward said:\n%s", pfOut.String())
		}
	})
	for i := range 3 { // several connections through one forward
		if body := fetch(t, "http://127.0.0.1:18181/"); !strings.Contains(body, "-vmpod") {
			t.Fatalf("connection %d: port-forward answered %q, want the guest's page", i, body)
		}
	}
}

// Two VM pods on the CNI bridge reach each other.
func TestPodToPod(t *testing.T) {
	testenv.RequireTestbed(t)
	_, serverIP := webServer(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: "server"}})
	client := testenv.RunPod(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: "client"}})
	id := client.Container(testenv.ContainerConfig{Metadata: testenv.Metadata{Name: "wget"}, Command: []string{"sleep", "1000"}})
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err := testenv.Cmd("crictl", "exec", "-s", id, "wget", "-q", "-O", "-", "http://"+net.JoinHostPort(serverIP, "8080")+"/")
		if err == nil && strings.Contains(out, "-vmpod") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("pod to pod: %q, %v", out, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// ctrImage pulls the test bed's busybox image into ctr's namespace (CRI's is another)
// and returns its name, so a test that runs alone finds it.
func ctrImage(t *testing.T) string {
	t.Helper()
	img := os.Getenv(testenv.EnvBusyboxImage)
	if _, err := testenv.Cmd("ctr", "images", "pull", "--plain-http", "--hosts-dir", os.Getenv(testenv.EnvHostsDir), img); err != nil {
		t.Fatal(err)
	}
	return img
}

// ctrRun runs a one-off vmpod container through ctr with extra flags and returns ctr's output.
func ctrRun(t *testing.T, flags []string, args ...string) (string, error) {
	t.Helper()
	img := ctrImage(t)
	id := fmt.Sprintf("ctr-%d", time.Now().UnixNano())
	cmd := append([]string{"run", "--rm", "--runtime", "io.containerd.vmpod.v2", "--runtime-config-path", os.Getenv(testenv.EnvVmpodConfig)}, flags...)
	cmd = append(append(cmd, img, id), args...)
	out, err := testenv.Cmd("ctr", cmd...)
	testenv.AssertPodGone(t, id)
	return out, err
}

func TestLogURIFile(t *testing.T) {
	testenv.RequireTestbed(t)
	logFile := filepath.Join(t.TempDir(), "ctr.log")
	if _, err := ctrRun(t, []string{"--log-uri", "file://" + logFile}, "sh", "-c", "echo to-stdout; echo to-stderr >&2"); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(logFile)
	if err != nil || !strings.Contains(string(b), "to-stdout") || !strings.Contains(string(b), "to-stderr") {
		t.Fatalf("log file %q, %v", b, err)
	}
}

// A binary:// logger gets stdout and stderr as fds 3 and 4 and says it is ready by closing
// fd 5, the containerd protocol.
func TestLogURIBinary(t *testing.T) {
	testenv.RequireTestbed(t)
	dir := t.TempDir()
	logger := filepath.Join(dir, "logger.sh")
	script := "#!/bin/sh\nexec 5>&-\ncat <&3 > \"$1.out\" & cat <&4 > \"$1.err\"; wait\n"
	if err := os.WriteFile(logger, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	prefix := filepath.Join(dir, "log")
	if _, err := ctrRun(t, []string{"--log-uri", "binary://" + logger + "?" + prefix}, "sh", "-c", "echo to-stdout; echo to-stderr >&2"); err != nil {
		t.Fatal(err)
	}
	for suffix, want := range map[string]string{".out": "to-stdout\n", ".err": "to-stderr\n"} {
		deadline := time.Now().Add(10 * time.Second)
		for {
			b, _ := os.ReadFile(prefix + suffix)
			if string(b) == want {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("logger wrote %q to %s, want %q", b, suffix, want)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}
