package vm_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/vmpod/vmpod/api/vmspec"
	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
	"github.com/vmpod/vmpod/controller/internal/testenv"
	"github.com/vmpod/vmpod/controller/manager"
)

// recordingExec stands in for pods/exec (no kubelet here): it records what the controller
// ran and fails while fail is set. The shim's side is tested in integration/cluster.
type recordingExec struct {
	mu    sync.Mutex
	calls []string
	fail  error
}

func (e *recordingExec) Exec(_ context.Context, ns, pod, container string, cmd []string) (string, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.calls = append(e.calls, pod+"/"+container+":"+strings.Join(cmd, " "))
	return "", e.fail
}

func (e *recordingExec) ran() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.calls)
}

func TestPauseUnpause(t *testing.T) {
	env := testenv.Get(t)
	ns := env.Namespace(t)
	exec := &recordingExec{}
	env.StartManager(t, ns, func(o *manager.Options) { o.Backoff = fast; o.PodExec = exec })
	f := &fixture{t: t, env: env, c: env.Client, ns: ns, ctx: context.Background()}

	// not running: a pause has nothing to act on and is dropped with a reason
	f.create(f.cirros("p", vmpodv1.RunStrategyHalted))
	f.waitStatus("p", vmpodv1.StatusStopped)
	f.request("p", vmpodv1.StateChangeRequest{Action: vmpodv1.StateChangePause})
	f.waitRequestDone("p")
	f.waitEvent("p", "RequestIgnored")
	if got := exec.ran(); len(got) != 0 {
		t.Fatalf("exec on a stopped VM: %v", got)
	}

	f.setStrategy("p", vmpodv1.RunStrategyAlways)
	pod := f.waitPod("p", "")
	f.kubeletRuns(pod)
	f.waitStatus("p", vmpodv1.StatusRunning)

	// a failing exec keeps the request (retried) and says why
	exec.mu.Lock()
	exec.fail = errors.New("container not found")
	exec.mu.Unlock()
	f.request("p", vmpodv1.StateChangeRequest{Action: vmpodv1.StateChangePause})
	f.waitEvent("p", "FailedPause")
	if _, pending := f.vm("p").Annotations[vmpodv1.StateChangeRequestAnnotation]; !pending {
		t.Fatal("a pause whose exec failed was dropped")
	}
	exec.mu.Lock()
	exec.fail = nil
	exec.mu.Unlock()

	v := f.waitStatus("p", vmpodv1.StatusPaused)
	f.waitRequestDone("p")
	if c := meta.FindStatusCondition(v.Status.Conditions, vmpodv1.VMPaused); c == nil || c.Status != metav1.ConditionTrue {
		t.Errorf("Paused condition = %+v", c)
	}
	if v.Status.PausedPodUID != pod.UID {
		t.Errorf("pausedPodUID = %q, want %q", v.Status.PausedPodUID, pod.UID)
	}
	want := pod.Name + "/" + vmspec.ComputeContainer + ":" + vmspec.PauseCommand
	if got := exec.ran(); got[len(got)-1] != want {
		t.Errorf("exec calls %v, want the last %q", got, want)
	}

	f.request("p", vmpodv1.StateChangeRequest{Action: vmpodv1.StateChangeUnpause})
	v = f.waitStatus("p", vmpodv1.StatusRunning)
	f.waitRequestDone("p")
	if c := meta.FindStatusCondition(v.Status.Conditions, vmpodv1.VMPaused); c == nil || c.Status != metav1.ConditionFalse {
		t.Errorf("Paused condition after unpause = %+v", c)
	}
	if got := exec.ran(); got[len(got)-1] != pod.Name+"/"+vmspec.ComputeContainer+":"+vmspec.UnpauseCommand {
		t.Errorf("exec calls %v, want the last an unpause", got)
	}

	// a pause ends with its pod: the next pod runs unpaused
	f.request("p", vmpodv1.StateChangeRequest{Action: vmpodv1.StateChangePause})
	f.waitStatus("p", vmpodv1.StatusPaused)
	f.kubeletEnds(f.pod("p"), 1)
	next := f.waitPod("p", pod.UID)
	f.kubeletRuns(next)
	v = f.waitStatus("p", vmpodv1.StatusRunning)
	if v.Status.PausedPodUID != "" {
		t.Errorf("pausedPodUID = %q after the paused pod ended", v.Status.PausedPodUID)
	}
}
