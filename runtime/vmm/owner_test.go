package vmm

import (
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

func TestSweepOrphansCleansOnlyDeadOwners(t *testing.T) {
	root := t.TempDir()
	mkdir := func(name string) string {
		d := filepath.Join(root, name)
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
		return d
	}
	alive, dead, unowned := mkdir("alive"), mkdir("dead"), mkdir("creating")
	lock, err := lockOwner(alive)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()
	gone, err := lockOwner(dead)
	if err != nil {
		t.Fatal(err)
	}
	_ = gone.Close() // its owner died
	// A helper of the dead VM still runs, naming its directory.
	helper := exec.Command("sh", "-c", "sleep 1000", dead)
	if err := helper.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = helper.Wait(); close(exited) }()
	t.Cleanup(func() { _ = helper.Process.Kill() })

	swept, err := SweepOrphans(root)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(swept, []string{dead}) {
		t.Errorf("swept %q, want only %s", swept, dead)
	}
	select {
	case <-exited:
	case <-time.After(5 * time.Second):
		t.Error("the dead VM's helper still runs")
	}
	for _, d := range []string{alive, unowned} {
		if _, err := os.Stat(d); err != nil {
			t.Errorf("%s: %v, want it left alone", d, err)
		}
	}
	if _, err := os.Stat(dead); !os.IsNotExist(err) {
		t.Errorf("%s: %v, want it removed", dead, err)
	}
	if swept, err := SweepOrphans(filepath.Join(root, "absent")); err != nil || swept != nil {
		t.Errorf("sweep of a missing root: %q, %v", swept, err)
	}
	// `shim delete` asks about one directory: a live owner's is left, whatever the caller
	// concluded about its shim
	if orphan, err := CleanupOrphan(alive); err != nil || orphan {
		t.Errorf("CleanupOrphan of a live owner's directory: %v, %v; want it left", orphan, err)
	}
	if _, err := os.Stat(alive); err != nil {
		t.Errorf("%s: %v, want it left alone", alive, err)
	}
}

func TestNamesPathIsNotFooledBySiblings(t *testing.T) {
	for _, tc := range []struct {
		cmdline string
		want    bool
	}{
		{"qemu\x00-chardev\x00socket,id=qmp,path=/run/vmpod/x/qmp.sock,server=on\x00", true},
		{"sh\x00-c\x00sleep 1000\x00/run/vmpod/x\x00", true},
		{"virtiofsd\x00--shared-dir=/run/vmpod/x", true},
		{"qemu\x00-name\x00guest=x,debug-threads=on\x00-chardev\x00path=/run/vmpod/x2/qmp.sock\x00", false},
		{"vmpod-pid-proxy\x00/run/vmpod/x2/containers/c\x00", false},
		{"vmpod-pid-proxy\x00/run/vmpod/x2/containers/c\x00/run/vmpod/x,y\x00", true},
	} {
		if got := namesPath(tc.cmdline, "/run/vmpod/x"); got != tc.want {
			t.Errorf("namesPath(%q) = %v, want %v", tc.cmdline, got, tc.want)
		}
	}
}

// A dead owner's sockets go with its state directory: one nobody serves is removed, one
// served again (a new shim of the same pod) and a listed path that is no socket stay.
func TestCleanupRemovesDeadOwnerSockets(t *testing.T) {
	root := t.TempDir()
	state := filepath.Join(root, "vm")
	if err := os.Mkdir(state, 0o700); err != nil {
		t.Fatal(err)
	}
	sock := func(name string, serve bool) string {
		path := filepath.Join(root, name)
		l, err := net.Listen("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		if serve {
			t.Cleanup(func() { _ = l.Close() })
		} else {
			l.(*net.UnixListener).SetUnlinkOnClose(false)
			_ = l.Close() // the owner died: the file stays, nobody answers
		}
		return path
	}
	dead, served := sock("dead.sock", false), sock("served.sock", true)
	plain := filepath.Join(root, "plain")
	if err := os.WriteFile(plain, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := recordOwnerSockets(state, []string{dead, served, plain, filepath.Join(root, "absent.sock")}); err != nil {
		t.Fatal(err)
	}
	if err := CleanupState(state); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(dead); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the dead owner's socket is still there (%v)", err)
	}
	for _, keep := range []string{served, plain} {
		if _, err := os.Lstat(keep); err != nil {
			t.Errorf("%s was removed: %v", keep, err)
		}
	}
	if _, err := os.Lstat(state); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("state dir still there (%v)", err)
	}
}
