package phases

import (
	"context"
	"sync"
	"testing"
	"time"
)

func TestStepsAreTheTimeBetweenMarks(t *testing.T) {
	tl := New()
	ctx := With(context.Background(), tl)
	time.Sleep(20 * time.Millisecond)
	Mark(ctx, "a")
	time.Sleep(10 * time.Millisecond)
	Mark(ctx, "b")
	Mark(ctx, "a") // adds to a
	steps, err := Parse(tl.String())
	if err != nil {
		t.Fatal(err)
	}
	if len(steps) != 2 || steps[0].Name != "a" || steps[1].Name != "b" {
		t.Fatalf("steps %+v from %q, want a then b", steps, tl.String())
	}
	if steps[0].Took < 20*time.Millisecond || steps[1].Took < 10*time.Millisecond {
		t.Errorf("steps %+v shorter than the sleeps between the marks", steps)
	}
	var sum time.Duration
	for _, s := range tl.steps {
		sum += s.Took
	}
	if sum != tl.Total() {
		t.Errorf("steps add up to %v, total %v", sum, tl.Total())
	}
}

func TestNoTimelineMarksNothing(t *testing.T) {
	Mark(context.Background(), "x") // no timeline on the context: nothing to do, no panic
	var tl *Timeline
	tl.Mark("x")
	if tl.String() != "" || tl.Total() != 0 {
		t.Fatal("a nil timeline recorded something")
	}
}

func TestParseRefusesOtherForms(t *testing.T) {
	for _, s := range []string{"a", "a=5", "=5ms", "a=5s", "a=xms"} {
		if _, err := Parse(s); err == nil {
			t.Errorf("Parse(%q) accepted it", s)
		}
	}
}

func TestConcurrentMarks(t *testing.T) {
	tl := New()
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 100 {
				tl.Mark("x")
			}
		})
	}
	wg.Wait()
	if steps, _ := Parse(tl.String()); len(steps) != 1 {
		t.Fatalf("steps %+v, want one", steps)
	}
}
