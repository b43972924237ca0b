// Package phases records where the time of a long operation goes, step by step: a
// container's create is shim work, and for a pod's first container also the pod network,
// QEMU, the guest's boot and the sandbox's setup. The steps are marked by the layers that
// do them (the timeline rides the context), logged once by the operation's owner, and read
// back by `make bench` to print a pod start's breakdown.
package phases

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"
)

// Step is one named part of an operation and how long it took: the time since the
// previous mark (or the timeline's start).
type Step struct {
	Name string
	Took time.Duration
}

// Timeline is an operation's steps in the order they ended. Its methods are safe on a
// nil *Timeline (they do nothing), so a layer marks whether or not anyone records.
type Timeline struct {
	mu    sync.Mutex
	start time.Time
	last  time.Time
	steps []Step
}

// New starts a timeline now.
func New() *Timeline {
	now := time.Now()
	return &Timeline{start: now, last: now}
}

// Mark ends the step called name: it took the time since the previous mark. A name
// marked again adds to its step (a retried or repeated part).
func (t *Timeline) Mark(name string) {
	if t == nil {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	now := time.Now()
	took := now.Sub(t.last)
	t.last = now
	for i := range t.steps {
		if t.steps[i].Name == name {
			t.steps[i].Took += took
			return
		}
	}
	t.steps = append(t.steps, Step{Name: name, Took: took})
}

// Total is the time from the start to the last mark.
func (t *Timeline) Total() time.Duration {
	if t == nil {
		return 0
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.last.Sub(t.start)
}

// String is "name=took ..." in milliseconds, the form Parse reads back.
func (t *Timeline) String() string {
	if t == nil {
		return ""
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	parts := make([]string, len(t.steps))
	for i, s := range t.steps {
		parts[i] = fmt.Sprintf("%s=%dms", s.Name, s.Took.Milliseconds())
	}
	return strings.Join(parts, " ")
}

// Parse reads String's form back.
func Parse(s string) ([]Step, error) {
	var steps []Step
	for _, f := range strings.Fields(s) {
		name, ms, ok := strings.Cut(f, "=")
		if !ok || name == "" {
			return nil, fmt.Errorf("phases %q: %q is not name=<n>ms", s, f)
		}
		d, err := time.ParseDuration(ms)
		if err != nil || !strings.HasSuffix(ms, "ms") {
			return nil, fmt.Errorf("phases %q: %q is not name=<n>ms", s, f)
		}
		steps = append(steps, Step{Name: name, Took: d})
	}
	return steps, nil
}

type key struct{}

// With returns ctx carrying t, for the layers below to mark their steps on.
func With(ctx context.Context, t *Timeline) context.Context {
	return context.WithValue(ctx, key{}, t)
}

// Mark marks a step on ctx's timeline, if it carries one.
func Mark(ctx context.Context, name string) {
	t, _ := ctx.Value(key{}).(*Timeline)
	t.Mark(name)
}
