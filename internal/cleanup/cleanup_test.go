package cleanup

import (
	"errors"
	"strings"
	"testing"
)

func TestRunIsLastInFirstOutAndRunsAll(t *testing.T) {
	var s Stack
	var order []string
	s.Add("a", func() error { order = append(order, "a"); return nil })
	s.Add("b", func() error { order = append(order, "b"); return errors.New("boom") })
	s.Add("c", func() error { order = append(order, "c"); return nil })
	err := s.Run()
	if got := strings.Join(order, ""); got != "cba" {
		t.Fatalf("ran %q, want cba", got)
	}
	if err == nil || !strings.Contains(err.Error(), "b: boom") {
		t.Fatalf("got %v, want the failing step named", err)
	}
	if s.Len() != 0 || s.Run() != nil {
		t.Fatal("stack not empty after Run")
	}
}

func TestReleaseKeepsEverything(t *testing.T) {
	var s Stack
	ran := false
	s.Add("x", func() error { ran = true; return nil })
	s.Release()
	if err := s.Run(); err != nil || ran {
		t.Fatalf("released step ran (err %v)", err)
	}
}
