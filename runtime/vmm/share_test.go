package vmm

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A share made at a place (a migration's target taking the source's) sits there, is
// found there, and later shares take numbers above it: none lands on another's path.
func TestShareAtAPlace(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("skipped: bind mounts need root")
	}
	dir := t.TempDir()
	s, err := newSharedDir(filepath.Join(dir, "shared"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.close(); err != nil {
			t.Error(err)
		}
	})
	src := t.TempDir()
	rel, err := s.shareAt(src, "c1/rootfs", 7, false, false)
	if err != nil || rel != "7/c1/rootfs" {
		t.Fatalf("shareAt 7: %q, %v", rel, err)
	}
	if place, ok := s.place("c1/rootfs"); !ok || place != 7 {
		t.Errorf("place: %d %v, want 7", place, ok)
	}
	if _, ok := s.place("c2/rootfs"); ok {
		t.Error("place of a name not shared: found")
	}
	next, err := s.share(src, "c2/rootfs", false)
	if err != nil || next != "8/c2/rootfs" {
		t.Errorf("the next share: %q, %v, want 8/c2/rootfs", next, err)
	}
	if _, err := s.shareAt(src, "c1/rootfs", 9, false, false); err == nil || !strings.Contains(err.Error(), "already shared") {
		t.Errorf("the same name again: %v", err)
	}
	// a lower place than the last is taken as given (the source's numbering)
	if rel, err := s.shareAt(src, "c3/mounts/0", 2, true, false); err != nil || rel != "2/c3/mounts/0" {
		t.Errorf("shareAt 2: %q, %v", rel, err)
	}
	if rel, err := s.share(src, "c4/rootfs", false); err != nil || rel != "9/c4/rootfs" {
		t.Errorf("a share after a lower place: %q, %v, want 9/c4/rootfs", rel, err)
	}
}
