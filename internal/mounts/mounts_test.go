package mounts

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestUnescape(t *testing.T) {
	for in, want := range map[string]string{
		`/plain`:         "/plain",
		`/a\040b`:        "/a b",
		`/tab\011x\134y`: "/tab\tx\\y",
		`/short\04`:      `/short\04`,
		`/not-octal\09x`: `/not-octal\09x`,
		`/end\040`:       "/end ",
	} {
		if got := unescape(in); got != want {
			t.Errorf("unescape(%q) = %q, want %q", in, got, want)
		}
	}
}

func requireRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting needs root")
	}
}

func tmpfs(t *testing.T, dir string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(dir, unix.MNT_DETACH) })
}

// A tree with a nested and a stacked mount goes entirely; one a process keeps busy (its
// working directory) is detached and named; the process keeps its view.
func TestUnmountTreeDetachesWhatIsBusy(t *testing.T) {
	requireRoot(t)
	root := t.TempDir()
	top := filepath.Join(root, "rootfs")
	tmpfs(t, top)
	tmpfs(t, filepath.Join(top, "sub"))
	tmpfs(t, filepath.Join(top, "sub")) // stacked
	tmpfs(t, filepath.Join(top, "busy"))
	if err := os.WriteFile(filepath.Join(top, "busy", "f"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	holder := exec.Command("sh", "-c", "read line; cat f")
	holder.Dir = filepath.Join(top, "busy")
	stdin, _ := holder.StdinPipe()
	out := &strings.Builder{}
	holder.Stdout = out
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = holder.Process.Kill(); _ = holder.Wait() })

	below, err := Below(top)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{filepath.Join(top, "sub"), filepath.Join(top, "busy")}; !slices.Equal(below, want) {
		t.Fatalf("Below = %v, want %v", below, want)
	}
	detached, err := UnmountTree(top)
	if err != nil {
		t.Fatalf("UnmountTree: %v", err)
	}
	if want := []string{filepath.Join(top, "busy")}; !slices.Equal(detached, want) {
		t.Errorf("detached %v, want %v", detached, want)
	}
	if left, _ := Under(root); len(left) > 0 {
		t.Errorf("left mounted: %v", left)
	}
	_, _ = stdin.Write([]byte("\n"))
	if err := holder.Wait(); err != nil || out.String() != "x" {
		t.Errorf("the holder lost its view of the detached mount: %v, read %q", err, out.String())
	}
	// Idempotent: nothing is mounted any more.
	if detached, err := UnmountTree(top); err != nil || len(detached) > 0 {
		t.Errorf("second UnmountTree: %v, %v", detached, err)
	}
}

// A directory reached through a symlink is matched by its resolved path, as mountinfo
// names it; a missing one has nothing mounted.
func TestThroughASymlink(t *testing.T) {
	requireRoot(t)
	root := t.TempDir()
	real := filepath.Join(root, "real")
	tmpfs(t, filepath.Join(real, "sub"))
	link := filepath.Join(root, "link")
	if err := os.Symlink(real, link); err != nil {
		t.Fatal(err)
	}
	if below, err := Below(link); err != nil || !slices.Equal(below, []string{filepath.Join(real, "sub")}) {
		t.Fatalf("Below(link) = %v, %v", below, err)
	}
	if _, err := UnmountTree(link); err != nil {
		t.Fatal(err)
	}
	if left, _ := Under(real); len(left) > 0 {
		t.Errorf("left mounted: %v", left)
	}
	if got, err := Under(filepath.Join(root, "absent")); err != nil || got != nil {
		t.Errorf("Under(absent) = %v, %v", got, err)
	}
}
