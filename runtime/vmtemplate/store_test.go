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
// its age, and removes the others' files but their locks.
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
		for _, ext := range []string{".state", ".ram"} {
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

// Only a state file with its RAM is a template; clean removes a half one (a crash between
// the two renames or removals) and a dead maker's temporary files.
func TestHalfTemplates(t *testing.T) {
	s := &Store{Dir: t.TempDir()}
	if saved := s.openSaved("k"); saved != nil {
		t.Errorf("no files: %v; want nothing", saved)
	}
	write := func(p string) {
		if err := os.WriteFile(p, nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(s.statePath("k"))
	write(filepath.Join(s.Dir, "k.tmp-123"))
	if saved := s.openSaved("k"); saved != nil {
		t.Errorf("a state without RAM: %v; want no template", saved)
	}
	s.clean("k")
	for _, p := range []string{s.statePath("k"), filepath.Join(s.Dir, "k.tmp-123")} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s is left (%v)", p, err)
		}
	}
	write(s.statePath("k"))
	write(s.ramPath("k"))
	saved := s.openSaved("k")
	if saved == nil {
		t.Fatal("a whole template was not opened")
	}
	saved.State.Close()
	saved.RAM.Close()
	s.clean("k")
	if saved := s.openSaved("k"); saved == nil {
		t.Error("clean removed a whole template")
	} else {
		saved.State.Close()
		saved.RAM.Close()
	}
}

// The store's directory becomes guests' memory: one others may enter is refused.
func TestCheckDir(t *testing.T) {
	s := &Store{Dir: filepath.Join(t.TempDir(), "templates")}
	if err := s.checkDir(); err != nil {
		t.Fatalf("a fresh directory: %v", err)
	}
	if err := os.Chmod(s.Dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := s.checkDir(); err == nil {
		t.Error("a directory others may enter was accepted")
	}
	link := filepath.Join(t.TempDir(), "link")
	if err := os.Symlink(t.TempDir(), link); err != nil {
		t.Fatal(err)
	}
	if err := (&Store{Dir: link}).checkDir(); err == nil {
		t.Error("a symbolic link was accepted")
	}
}
