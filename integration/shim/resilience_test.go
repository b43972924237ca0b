package shim_test

// A guest that dies or wedges under its pod (issue 14, resilience): its containers end
// with a reason the kubelet shows, and containerd can always stop and remove the pod.

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmpod/vmpod/integration/testenv"
)

// privileged in the guest's pid namespace: a container that can signal the agent
var guestRoot = map[string]any{"security_context": map[string]any{
	"privileged": true, "namespace_options": map[string]any{"pid": 2}, // NODE
}}

// terminationLog is a host file mounted where the kubelet mounts a container's.
func terminationLog(t *testing.T) (testenv.Mount, string) {
	path := filepath.Join(t.TempDir(), "termination-log")
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	return testenv.Mount{ContainerPath: "/dev/termination-log", HostPath: path}, path
}

func podState(t *testing.T, id string) string {
	t.Helper()
	var v struct {
		Status struct{ State string } `json:"status"`
	}
	if err := json.Unmarshal([]byte(testenv.Crictl(t, "inspectp", id)), &v); err != nil {
		t.Fatal(err)
	}
	return v.Status.State
}

// The agent is the guest's init: when it crashes the guest kernel panics and the VM
// ends. Every container exits (137, as killed), its termination message says so, and the
// sandbox is NOTREADY.
func TestAgentCrashEndsThePodWithAReason(t *testing.T) {
	testenv.RequireTestbed(t)
	pod := testenv.RunPod(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: "agent-crash"}, Linux: guestRoot})
	mount, termLog := terminationLog(t)
	app := pod.Container(testenv.ContainerConfig{Metadata: testenv.Metadata{Name: "app"},
		Command: []string{"sleep", "3600"}, Mounts: []testenv.Mount{mount}})
	crasher := pod.Container(testenv.ContainerConfig{Metadata: testenv.Metadata{Name: "crasher"},
		Command: sh(`sleep 0.5; kill -QUIT 1; sleep 60`), Linux: guestRoot}) // Go dumps and exits at SIGQUIT

	_, code := waitState(t, app, "CONTAINER_EXITED", 60*time.Second)
	if code != 137 {
		t.Errorf("app: exit %d after the guest died, want 137", code)
	}
	if _, code := waitState(t, crasher, "CONTAINER_EXITED", 10*time.Second); code != 137 {
		t.Errorf("crasher: exit %d after the guest died, want 137", code)
	}
	b, err := os.ReadFile(termLog)
	if err != nil {
		t.Fatal(err)
	}
	msg := string(b)
	for _, want := range []string{"GuestPanicked: Kernel panic - not syncing: Attempted to kill init!", "vmpod's agent: it died"} {
		if !strings.Contains(msg, want) {
			t.Errorf("termination message %q, want it to contain %q", msg, want)
		}
	}
	testenv.WaitForWithin(t, 10*time.Second, "the sandbox NOTREADY", func() bool { return podState(t, pod.ID) == "SANDBOX_NOTREADY" })
}

// A wedged container must not keep containerd from stopping it: the stop signal stays
// queued, the SIGKILL after the grace period ends it (137), and its pod can be stopped and
// removed. runc: the container's process stopped (SIGSTOP); vmpod: the whole VM stopped,
// which vmpod kills at the SIGKILL, saying why in the termination message.
func TestWedgedContainerCanBeStopped(t *testing.T) {
	eachHandler(t, "wedged", func(t *testing.T, pod *testenv.Pod) {
		mount, termLog := terminationLog(t)
		app := pod.Container(testenv.ContainerConfig{Metadata: testenv.Metadata{Name: "app"},
			Command: []string{"sleep", "3600"}, Mounts: []testenv.Mount{mount}})
		wedged := infoPid(t, "inspect", app)
		if pod.Handler == "vmpod" {
			wedged = testenv.QEMUPid(t, pod.ID)
		}
		if err := syscall.Kill(wedged, syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", wedged))
		t.Cleanup(func() { // unless it is gone and its pid another process's
			if now, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", wedged)); string(now) == string(cmdline) {
				_ = syscall.Kill(wedged, syscall.SIGCONT)
			}
		})
		if pod.Handler == "vmpod" {
			// an exec into a wedged guest fails within its timeout
			if out, err := testenv.Cmd("crictl", "--timeout", "20s", "exec", "-s", "--timeout", "3", app, "true"); err == nil {
				t.Errorf("exec into a wedged guest succeeded: %s", out)
			}
		}
		start := time.Now()
		if out, err := testenv.Cmd("crictl", "--timeout", "90s", "stop", "--timeout", "2", app); err != nil {
			t.Fatalf("stop a wedged container: %v: %s", err, out)
		}
		t.Logf("stopped in %v", time.Since(start).Round(time.Millisecond))
		if state, code := inspect(t, app); state != "CONTAINER_EXITED" || code != 137 {
			t.Errorf("after the stop: %s, exit %d; want exited 137", state, code)
		}
		if pod.Handler == "vmpod" {
			b, _ := os.ReadFile(termLog)
			if !strings.HasPrefix(string(b), "GuestUnresponsive: the guest did not take a SIGKILL") {
				t.Errorf("termination message %q, want the wedged guest's", b)
			}
		}
		if stopErr, rmErr := pod.Remove(60 * time.Second); stopErr != nil || rmErr != nil {
			t.Errorf("remove the pod: stop: %v; remove: %v", stopErr, rmErr)
		}
	})
}
