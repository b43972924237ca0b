package vmtemplate

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// trim keeps the maxStates most recently used templates, and the one just made whatever
// its age, with each removed template's files.
func TestTrimRemovesTheLeastRecentlyUsed(t *testing.T) {
	s := &Store{Dir: t.TempDir()}
	now := time.Now()
	key := func(i int) string { return fmt.Sprintf("k%02d", i) }
	for i := range maxStates + 3 {
		for _, p := range []string{s.statePath(key(i)), s.ramPath(key(i)), s.lockPath(key(i))} {
			if err := os.WriteFile(p, nil, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		// k00 is the oldest, k10 the newest
		at := now.Add(time.Duration(i-100) * time.Minute)
		if err := os.Chtimes(s.statePath(key(i)), at, at); err != nil {
			t.Fatal(err)
		}
	}
	s.trim(key(0)) // just made, yet the oldest
	var left []string
	entries, _ := os.ReadDir(s.Dir)
	for _, e := range entries {
		left = append(left, e.Name())
	}
	for _, gone := range []string{key(1), key(2), key(3)} {
		for _, ext := range []string{".state", ".ram", ".lock"} {
			if slices.Contains(left, gone+ext) {
				t.Errorf("%s%s is left: %v", gone, ext, left)
			}
		}
	}
	for _, kept := range []string{key(0), key(4), key(maxStates + 2)} {
		if !slices.Contains(left, kept+".state") || !slices.Contains(left, kept+".ram") {
			t.Errorf("%s was removed: %v", kept, left)
		}
	}
	if states, _ := filepath.Glob(filepath.Join(s.Dir, "*.state")); len(states) != maxStates {
		t.Errorf("%d templates left, want %d", len(states), maxStates)
	}
}

// A state file without its RAM is an error, not a template; no state file is no template.
func TestOpenSaved(t *testing.T) {
	s := &Store{Dir: t.TempDir()}
	if saved, err := s.openSaved("k"); saved != nil || err != nil {
		t.Errorf("no files: %v, %v; want nothing", saved, err)
	}
	if err := os.WriteFile(s.statePath("k"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if saved, err := s.openSaved("k"); saved != nil || err == nil {
		t.Errorf("a state without RAM: %v, %v; want an error", saved, err)
	}
	if err := os.WriteFile(s.ramPath("k"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	saved, err := s.openSaved("k")
	if err != nil || saved == nil {
		t.Fatalf("a whole template: %v, %v", saved, err)
	}
	saved.State.Close()
	saved.RAM.Close()
}
