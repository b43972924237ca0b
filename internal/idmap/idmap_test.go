package idmap

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vmpod/vmpod/internal/mounts"
)

const root = 0x7FF00000 // a range no test user has

// userns returns a user namespace mapping 0..65535 to root..root+65535, held by a
// process of its own until the test ends.
func userns(t *testing.T) Map {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("ID-mapped mounts need root")
	}
	holder := exec.Command("sleep", "1000")
	ids := []syscall.SysProcIDMap{{ContainerID: 0, HostID: root, Size: 65536}}
	holder.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWUSER, UidMappings: ids, GidMappings: ids}
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = holder.Process.Kill(); _ = holder.Wait() })
	ns, err := os.Open(fmt.Sprintf("/proc/%d/ns/user", holder.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	return Map{Userns: ns, Root: root}
}

func owner(t *testing.T, path string) uint32 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Uid
}

func TestBindShiftsOwners(t *testing.T) {
	m := userns(t)
	src, dst := t.TempDir(), t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "user"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(filepath.Join(src, "user"), 1000, 1000); err != nil {
		t.Fatal(err)
	}
	if err := Bind(src, dst, m, true); err != nil {
		t.Fatal(err)
	}
	defer mounts.Unmount(dst)
	if got := owner(t, dst); got != root {
		t.Errorf("root-owned directory through the map: owner %d, want %d", got, root)
	}
	if got := owner(t, filepath.Join(dst, "user")); got != root+1000 {
		t.Errorf("file of 1000 through the map: owner %d, want %d", got, root+1000)
	}
	if err := os.WriteFile(filepath.Join(dst, "new"), nil, 0o644); err == nil {
		t.Error("a read-only bind took a new file")
	}
}

// Files keep their real owners on disk whatever is done through the overlay: a copy-up of
// a root file stays root's, a file created as root+1000 is 1000's.
func TestOverlayWritesRealOwners(t *testing.T) {
	m := userns(t)
	base := t.TempDir()
	lower1, lower2 := filepath.Join(base, "l1"), filepath.Join(base, "l2")
	snap := filepath.Join(base, "snap")
	upper, work, target := filepath.Join(snap, "fs"), filepath.Join(snap, "work"), filepath.Join(base, "rootfs")
	for _, d := range []string{lower1, lower2, upper, work, target} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(lower1, "etc-file"), []byte("a"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(lower2, "home"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(filepath.Join(lower2, "home"), 1000, 1000); err != nil {
		t.Fatal(err)
	}
	opts := []string{"index=off", "lowerdir=" + lower2 + ":" + lower1, "upperdir=" + upper, "workdir=" + work}
	if err := Overlay(target, opts, m); err != nil {
		t.Fatal(err)
	}
	defer mounts.Unmount(target)
	if got := owner(t, filepath.Join(target, "home")); got != root+1000 {
		t.Errorf("home through the overlay: owner %d, want %d", got, root+1000)
	}
	// a copy-up by host root
	if err := os.WriteFile(filepath.Join(target, "etc-file"), []byte("b"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got := owner(t, filepath.Join(upper, "etc-file")); got != 0 {
		t.Errorf("copied-up root file on disk: owner %d, want 0", got)
	}
	// a file made by the mapped 1000, as virtiofsd makes it for the guest's uid 1000
	home, err := os.Open(filepath.Join(target, "home"))
	if err != nil {
		t.Fatal(err)
	}
	defer home.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with its ids
		_ = unix.Setfsgid(root + 1000)
		_ = unix.Setfsuid(root + 1000)
		fd, err := unix.Openat(int(home.Fd()), "note", unix.O_CREAT|unix.O_WRONLY|unix.O_CLOEXEC, 0o644)
		if err == nil {
			unix.Close(fd)
		}
		errc <- err
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if got := owner(t, filepath.Join(upper, "home", "note")); got != 1000 {
		t.Errorf("file made as %d on disk: owner %d, want 1000", root+1000, got)
	}
	if got := owner(t, filepath.Join(upper, "home")); got != 1000 {
		t.Errorf("copied-up directory of 1000 on disk: owner %d, want 1000", got)
	}
	left, err := filepath.Glob(filepath.Join(base, ".idmap-*"))
	if err != nil || len(left) != 0 {
		t.Errorf("temporary layer mounts left: %v %v", left, err)
	}
}

func TestOverlayRefusesBadOptions(t *testing.T) {
	m := userns(t)
	base := t.TempDir()
	target := filepath.Join(base, "rootfs")
	if err := os.Mkdir(target, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, opts := range map[string][]string{
		"no lowerdir":          {"upperdir=" + base + "/u", "workdir=" + base + "/w"},
		"upper without work":   {"lowerdir=" + base, "upperdir=" + base + "/u"},
		"mapped already":       {"lowerdir=" + base, "uidmap=0:1000:1"},
		"missing lower":        {"lowerdir=" + base + "/nope"},
		"upper and work apart": {"lowerdir=" + base, "upperdir=" + base + "/a/u", "workdir=" + base + "/b/w"},
	} {
		if err := Overlay(target, opts, m); err == nil {
			t.Errorf("%s: mounted", name)
			_, _ = mounts.Unmount(target)
		}
	}
	if left, err := mounts.Under(base); err != nil || len(left) != 0 {
		t.Errorf("mounts left: %v %v", left, err)
	}
	if left, _ := filepath.Glob(filepath.Join(base, ".idmap-*")); len(left) != 0 {
		t.Errorf("temporary directories left: %v", left)
	}
}
