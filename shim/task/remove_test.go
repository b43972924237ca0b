package task

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/events"
	"github.com/containerd/containerd/v2/pkg/shutdown"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"

	"github.com/vmpod/vmpod/runtime"
	"github.com/vmpod/vmpod/runtime/pod"
)

// fakePod stands in for a pod's VM below the task layer: removing a container ends its
// init, whose exit the fake reports exitDelay later (as the agent's exit notice can
// arrive after the remove call returned). Methods the test does not reach are left to
// the embedded nil interface.
type fakePod struct {
	pod.Pod
	init      *fakeProcess
	exitDelay time.Duration // < 0: the exit is never reported
	done      chan struct{}
	stopping  chan struct{} // non-nil: Stop signals here, then waits for release
	release   chan struct{}
	removes   []error // what successive RemoveContainer calls return (then nil)
}

func (f *fakePod) RemoveContainer(ctx context.Context, id string, force bool) error {
	if len(f.removes) > 0 {
		err := f.removes[0]
		f.removes = f.removes[1:]
		return err
	}
	if f.exitDelay >= 0 {
		time.AfterFunc(f.exitDelay, func() { close(f.init.exited) })
	}
	return nil
}
func (f *fakePod) Done() <-chan struct{} { return f.done }
func (f *fakePod) Stop(ctx context.Context) error {
	if f.stopping != nil {
		f.stopping <- struct{}{}
		<-f.release
	}
	return nil
}

type fakeProcess struct {
	pod.Process
	exited chan struct{}
	output chan struct{}
}

func (f *fakeProcess) Pid() uint32                 { return 4242 }
func (f *fakeProcess) OutputDone() <-chan struct{} { return f.output }
func (f *fakeProcess) Wait(ctx context.Context) (runtime.Exit, error) {
	select {
	case <-f.exited:
		return runtime.Exit{Status: 137, ExitedAt: time.Now()}, nil
	case <-ctx.Done():
		return runtime.Exit{}, ctx.Err()
	}
}

// recorder is containerd's event service as the shim sees it.
type recorder struct {
	mu     sync.Mutex
	topics []string
}

func (r *recorder) Publish(ctx context.Context, topic string, event events.Event) error {
	if _, err := typeurl.MarshalAny(event); err != nil {
		return fmt.Errorf("event %T: %w", event, err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.topics = append(r.topics, topic)
	return nil
}

func (r *recorder) Close() error { return nil }

func (r *recorder) published() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.topics...)
}

// fixture is a shim service over a fake pod, with one container whose init is the pod's.
type fixture struct {
	ctx context.Context
	sd  shutdown.Service
	rec *recorder
	s   *service
	c   *container
}

func newFixture(t *testing.T, fp *fakePod, id string) fixture {
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	ctx, sd := shutdown.WithShutdown(ctx)
	t.Cleanup(sd.Shutdown)
	rec := &recorder{}
	s := &service{ctx: ctx, namespace: "test", events: newEventQueue(ctx, rec, sd), shutdown: sd, pod: fp, containers: map[string]*container{}}
	c := &container{id: id, mounted: new(atomic.Bool), execs: map[string]*process{}}
	c.init = newProcess(id, "", stdioPaths{})
	c.init.io, c.init.rt, c.init.pid = &hostIO{}, fp.init, fp.init.Pid()
	s.containers[id] = c
	return fixture{ctx, sd, rec, s, c}
}

// A created, never started container removed directly (Delete without a Kill first):
// its init's exit is published before TaskDelete when it comes in time, and never after.
func TestRemovingACreatedInitOrdersItsExit(t *testing.T) {
	defer func(d time.Duration) { createdExitWait = d }(createdExitWait)
	createdExitWait = 300 * time.Millisecond
	cases := map[string]struct {
		exitDelay time.Duration
		want      []string
	}{
		"exit at once":          {0, []string{"/tasks/exit", "/tasks/delete"}},
		"exit after the remove": {50 * time.Millisecond, []string{"/tasks/exit", "/tasks/delete"}},
		"exit after the wait":   {time.Second, []string{"/tasks/delete"}},
		"exit never reported":   {-1, []string{"/tasks/delete"}},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			rt := &fakeProcess{exited: make(chan struct{}), output: make(chan struct{})}
			close(rt.output)
			fx := newFixture(t, &fakePod{init: rt, exitDelay: tc.exitDelay, done: make(chan struct{})}, "c1")
			ctx, rec, s, c := fx.ctx, fx.rec, fx.s, fx.c
			go s.handleExit(c, c.init)

			if _, err := s.remove(ctx, c, ""); err != nil {
				t.Fatal(err)
			}
			// whatever the exit handler does later must not follow the delete
			time.Sleep(max(tc.exitDelay, 0) + 300*time.Millisecond)
			if got := rec.published(); fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Errorf("published %v, want %v", got, tc.want)
			}
			if _, ok := s.containers["c1"]; ok {
				t.Error("the container is still known after its removal")
			}
		})
	}
}

// containerd sends Shutdown after every task delete. The sandbox's can come while the
// last container's Delete is still stopping the VM: the shim must not exit under that
// Delete (containerd would see "ttrpc: closed" and retry against a dead shim), and the
// Shutdown after the last Delete must end it.
func TestShutdownWaitsForTheLastDelete(t *testing.T) {
	rt := &fakeProcess{exited: make(chan struct{}), output: make(chan struct{})}
	close(rt.output)
	close(rt.exited)
	fp := &fakePod{init: rt, exitDelay: -1, done: make(chan struct{}), stopping: make(chan struct{}), release: make(chan struct{})}
	fx := newFixture(t, fp, "app")
	ctx, sd, s, c := fx.ctx, fx.sd, fx.s, fx.c
	c.init.state = stateStopped

	removed := make(chan error, 1)
	go func() { _, err := s.remove(ctx, c, ""); removed <- err }()
	<-fp.stopping // the app is out of the map; its Delete is stopping the VM
	if _, err := s.Shutdown(ctx, nil); err != nil {
		t.Fatal(err)
	}
	select { // Shutdown ends the shim asynchronously
	case <-sd.Done():
		t.Fatal("the shim shut down while the last container's Delete was still answering")
	case <-time.After(200 * time.Millisecond):
	}
	close(fp.release)
	if err := <-removed; err != nil {
		t.Fatal(err)
	}
	if _, err := s.Shutdown(ctx, nil); err != nil {
		t.Fatal(err)
	}
	select {
	case <-sd.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the Shutdown after the last Delete did not end the shim")
	}
}

// A Delete that removed the container from the guest and then failed (a share that would
// not go) is finished by containerd's retry, which the pod answers NotFound: the retry
// must not fail on it, or the container stays known, the shim ignores every Shutdown and
// outlives its pod with the VM (issue 13 item 7).
func TestRetriedDeleteFinishesTheRemoval(t *testing.T) {
	rt := &fakeProcess{exited: make(chan struct{}), output: make(chan struct{})}
	close(rt.output)
	close(rt.exited)
	fp := &fakePod{init: rt, exitDelay: -1, done: make(chan struct{}), removes: []error{
		errors.New("pod p: container app: unshare rootfs: device or resource busy"),
		fmt.Errorf("pod p: container app: %w", errdefs.ErrNotFound),
	}}
	fx := newFixture(t, fp, "app")
	ctx, sd, rec, s, c := fx.ctx, fx.sd, fx.rec, fx.s, fx.c
	c.init.state = stateStopped

	if _, err := s.remove(ctx, c, ""); err == nil {
		t.Fatal("the first Delete hid its failure")
	}
	if _, ok := s.containers["app"]; !ok {
		t.Fatal("a failed Delete forgot the container: containerd's retry would find nothing to finish")
	}
	if _, err := s.remove(ctx, c, ""); err != nil {
		t.Fatalf("the retried Delete: %v", err)
	}
	if _, ok := s.containers["app"]; ok {
		t.Error("the container is still known after the retried Delete")
	}
	// events go out asynchronously, from a queue of their own
	for deadline := time.Now().Add(5 * time.Second); len(rec.published()) == 0 && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	if got := rec.published(); fmt.Sprint(got) != "[/tasks/delete]" {
		t.Errorf("published %v, want one TaskDelete", got)
	}
	if _, err := s.Shutdown(ctx, nil); err != nil {
		t.Fatal(err)
	}
	select {
	case <-sd.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the Shutdown after the retried Delete did not end the shim")
	}
}
