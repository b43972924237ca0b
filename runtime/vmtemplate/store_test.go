package vmtemplate

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/vmpod/vmpod/runtime/vmm"
	"github.com/vmpod/vmpod/runtime/vmpodagent"
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
	// a key another process holds is left alone, whatever its age; a key without a state
	// loses what a dead maker left (a temporary file, a lone RAM file) but its lock
	held, _, err := s.lock(key(1), false)
	if err != nil {
		t.Fatal(err)
	}
	defer held()
	for _, f := range []string{"dead.lock", "dead.ram", "dead.tmp-1", "dead.log"} {
		if err := os.WriteFile(filepath.Join(s.Dir, f), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	s.trim(key(0)) // just made, yet the oldest
	var left []string
	entries, _ := os.ReadDir(s.Dir)
	for _, e := range entries {
		left = append(left, e.Name())
	}
	for _, gone := range []string{key(2), key(3), "dead"} {
		for _, ext := range []string{".state", ".ram"} {
			if slices.Contains(left, gone+ext) {
				t.Errorf("%s%s is left: %v", gone, ext, left)
			}
		}
	}
	for _, f := range []string{"dead.tmp-1", "dead.log"} {
		if slices.Contains(left, f) {
			t.Errorf("%s is left: %v", f, left)
		}
	}
	for _, lock := range []string{key(2) + ".lock", "dead.lock"} {
		if !slices.Contains(left, lock) {
			t.Errorf("%s was removed: a lock file replaced under its holder locks nothing", lock)
		}
	}
	for _, kept := range []string{key(0), key(1), key(5), key(maxStates + 2)} {
		if !slices.Contains(left, kept+".state") || !slices.Contains(left, kept+".ram") {
			t.Errorf("%s was removed: %v", kept, left)
		}
	}
	// k01, the oldest after keep but held, stays: one more than maxStates
	if states, _ := filepath.Glob(filepath.Join(s.Dir, "*.state")); len(states) != maxStates+1 {
		t.Errorf("%d templates left, want %d", len(states), maxStates+1)
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

// A template is removed only if it is still the one the refused restore opened, and only
// under its lock.
func TestRemoveTakesOnlyTheRefusedTemplate(t *testing.T) {
	s := &Store{Dir: t.TempDir()}
	write := func() {
		for _, p := range []string{s.statePath("k"), s.ramPath("k")} {
			if err := os.WriteFile(p+".new", nil, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(p+".new", p); err != nil {
				t.Fatal(err)
			}
		}
	}
	write()
	refused := s.openSaved("k")
	defer refused.State.Close()
	defer refused.RAM.Close()
	write() // a new template replaced it meanwhile
	s.remove("k", refused.State)
	if s.openSaved("k") == nil {
		t.Fatal("removed the template that replaced the refused one")
	}
	again := s.openSaved("k")
	defer again.State.Close()
	defer again.RAM.Close()
	unlock, _, err := s.lock("k", false)
	if err != nil {
		t.Fatal(err)
	}
	s.remove("k", again.State) // another holds the lock: left to it
	unlock()
	if s.openSaved("k") == nil {
		t.Fatal("removed under another's lock")
	}
	s.remove("k", again.State)
	for _, p := range []string{s.statePath("k"), s.ramPath("k")} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s is left (%v)", p, err)
		}
	}
}

// After a failed make, the shape's pods boot without trying again for failBackoff.
func TestFailedMakeBacksOff(t *testing.T) {
	s := &Store{Dir: t.TempDir()}
	if err := os.WriteFile(s.failedPath("k"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	// a make would need a machine: open must not try one
	saved, err := s.open(context.Background(), "k", vmpodagent.Config{})
	if saved != nil || err != nil {
		t.Errorf("open within the backoff: %v, %v; want nothing, no error", saved, err)
	}
}

// A machine with more memory than the base restores the template of the base's largest
// doubling that fits it and is plugged up to its own size, when the difference is whole
// virtio-mem blocks and its virtio-mem device has room for it; any other machine
// restores a template of its own size.
func TestTemplateMemory(t *testing.T) {
	for _, tc := range []struct {
		name                  string
		base, mem, max        int
		wantTemplate, wantTop int
	}{
		{"no base", 0, 1024, 2048, 1024, 0},
		{"at the base", 512, 512, 2048, 512, 0},
		{"above the base", 512, 1000, 2048, 512, 1000},
		{"above a doubling", 512, 1088, 2048, 1024, 1088},
		{"above two doublings", 512, 4000, 8192, 2048, 4000},
		{"at a doubling", 512, 2048, 8192, 2048, 0},
		{"at the room's end", 512, 3000, 3000, 2048, 3000},
		{"no room", 512, 1088, 0, 1088, 0},
		{"not whole blocks", 512, 1089, 2049, 1089, 0},
		{"below the base", 1024, 512, 2048, 512, 0},
	} {
		s := &Store{BaseMemoryMiB: tc.base}
		got, top := s.templateMemory(vmm.Config{MemoryMiB: tc.mem, MaxMemoryMiB: tc.max})
		if got != tc.wantTemplate || top != tc.wantTop {
			t.Errorf("%s: template %d MiB, plugged to %d; want %d, %d", tc.name, got, top, tc.wantTemplate, tc.wantTop)
		}
	}
}
