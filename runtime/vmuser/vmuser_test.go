package vmuser

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
)

func TestLeasesAreExclusiveAndReused(t *testing.T) {
	p := Pool{Dir: t.TempDir(), First: 5000, Count: 3}
	var leases []*Lease
	for i := 0; i < 3; i++ {
		l, err := p.Lease("vm" + string(rune('a'+i)))
		if err != nil {
			t.Fatal(err)
		}
		if want := uint32(5000 + i); l.UID != want || l.GID() != want {
			t.Fatalf("lease %d: uid %d gid %d, want %d", i, l.UID, l.GID(), want)
		}
		leases = append(leases, l)
	}
	if _, err := p.Lease("vmd"); !errors.Is(err, ErrExhausted) {
		t.Fatalf("a fourth lease from three uids: %v, want ErrExhausted", err)
	}
	b, _ := os.ReadFile(filepath.Join(p.Dir, "5001"))
	if string(b) != "vmb\n" {
		t.Errorf("lock file of 5001 records %q", b)
	}
	if held, err := p.Held("vmb"); err != nil || len(held) != 1 || held[0] != 5001 {
		t.Errorf("Held(vmb) = %v, %v; want [5001]", held, err)
	}
	if err := leases[1].Release(); err != nil {
		t.Fatal(err)
	}
	if held, err := p.Held("vmb"); err != nil || len(held) != 0 {
		t.Errorf("Held(vmb) after its release = %v, %v; want none", held, err)
	}
	l, err := p.Lease("vme")
	if err != nil || l.UID != 5001 {
		t.Fatalf("after a release: %v, %v; want uid 5001 again", l, err)
	}
}

// A uid some process still runs as is not leased, lock or no lock: a QEMU that outlived
// its shim, or one that unlocked its lease, must not share its uid with the next VM.
func TestUIDInUseIsSkipped(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to run a process as another uid")
	}
	p := Pool{Dir: t.TempDir(), First: 0x7FFDFF00, Count: 2}
	child := exec.Command("sleep", "60")
	child.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: p.First, Gid: p.First, Groups: []uint32{}}}
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = child.Process.Kill(); _ = child.Wait() }()
	l, err := p.Lease("vm")
	if err != nil || l.UID != p.First+1 {
		t.Fatalf("with uid %d in use: %v, %v; want uid %d", p.First, l, err, p.First+1)
	}
	// held to the end: a lease nothing refers to any more closes its file at GC, and with
	// it the lock (measured: this test's second lease then got it, now and then)
	defer l.Release()
	if _, err := p.Lease("next"); !errors.Is(err, ErrExhausted) {
		t.Fatalf("a lease while one uid is leased and the other in use: %v", err)
	}
	_ = child.Process.Kill()
	_ = child.Wait()
	if l, err := p.Lease("next"); err != nil || l.UID != p.First {
		t.Fatalf("after the process died: %v, %v", l, err)
	}
}

func TestConcurrentLeasesDiffer(t *testing.T) {
	p := Pool{Dir: t.TempDir(), First: 9000, Count: 16}
	var mu sync.Mutex
	seen := map[uint32]*Lease{} // held to the end: a dropped lease's file closes at GC
	var wg sync.WaitGroup
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l, err := p.Lease("vm")
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			defer mu.Unlock()
			if seen[l.UID] != nil {
				t.Errorf("uid %d leased twice", l.UID)
			}
			seen[l.UID] = l
		}()
	}
	wg.Wait()
}

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		p    Pool
		want string
	}{
		{Pool{Dir: "rel", First: 1, Count: 1}, "not an absolute path"},
		{Pool{Dir: "/x", First: 0, Count: 1}, "uid 0 is root"},
		{Pool{Dir: "/x", First: 1, Count: 0}, "must both be positive"},
		{Pool{Dir: "/x", First: 1<<32 - 10, Count: 20}, "past the last valid uid"},
		{Pool{Dir: "/x", First: 60000, Count: 10000}, "nobody"},
	} {
		err := tc.p.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want %q", tc.p, err, tc.want)
		}
		if _, err := tc.p.Lease("vm"); err == nil {
			t.Errorf("%+v: leased from an invalid pool", tc.p)
		}
	}
	if err := (Pool{Dir: "/x", First: DefaultFirst, Count: DefaultCount}).Validate(); err != nil {
		t.Error(err)
	}
}

// What a uid's earlier holder left in the world-writable directories goes before the uid
// is leased again; nobody else's files go, and no link is followed.
func TestLeaseSweepsWhatTheLastHolderLeft(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to make files of another uid")
	}
	tmp, shm, outside := t.TempDir(), t.TempDir(), t.TempDir()
	for _, d := range []string{tmp, shm} {
		if err := os.Chmod(d, 0o1777); err != nil {
			t.Fatal(err)
		}
	}
	p := Pool{Dir: t.TempDir(), First: 0x7FFDFF10, Count: 1, Sweep: []string{tmp, shm, filepath.Join(tmp, "absent")}}
	uid, other := int(p.First), int(p.First)+1
	mk := func(path string, dir bool, owner int, mode os.FileMode) {
		t.Helper()
		var err error
		if dir {
			err = os.Mkdir(path, mode)
		} else {
			err = os.WriteFile(path, []byte("left"), mode)
		}
		if err == nil {
			err = os.Chmod(path, mode) // past the umask
		}
		if err == nil {
			err = os.Lchown(path, owner, owner)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	keep := filepath.Join(outside, "target")
	mk(keep, false, 0, 0o644)
	mk(filepath.Join(tmp, "secret"), false, uid, 0o600)
	mk(filepath.Join(tmp, "tree"), true, uid, 0o700)
	mk(filepath.Join(tmp, "tree", "inner"), false, uid, 0o600)
	mk(filepath.Join(tmp, "others"), false, other, 0o644)
	mk(filepath.Join(tmp, ".X11-unix"), true, 0, 0o1777) // world-writable: entered
	mk(filepath.Join(tmp, ".X11-unix", "X9"), false, uid, 0o600)
	mk(filepath.Join(tmp, ".X11-unix", "X1"), false, 0, 0o600)
	mk(filepath.Join(tmp, "private"), true, 0, 0o755) // not world-writable: not entered
	mk(filepath.Join(tmp, "private", "planted"), false, uid, 0o600)
	mk(filepath.Join(shm, "qemu-ram"), false, uid, 0o600)
	// a link to a world-writable directory elsewhere is not a way out of the swept ones
	elsewhere := filepath.Join(outside, "ww")
	mk(elsewhere, true, 0, 0o1777)
	mk(filepath.Join(elsewhere, "not-swept"), false, uid, 0o600)
	if err := os.Symlink(elsewhere, filepath.Join(tmp, "ww-link")); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(tmp, "link")
	if err := os.Symlink(keep, link); err != nil {
		t.Fatal(err)
	}
	if err := os.Lchown(link, uid, uid); err != nil {
		t.Fatal(err)
	}

	l, err := p.Lease("vm")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Release()
	for _, gone := range []string{"secret", "tree", ".X11-unix/X9", "link"} {
		if _, err := os.Lstat(filepath.Join(tmp, gone)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s is still there after the lease: %v", gone, err)
		}
	}
	if _, err := os.Lstat(filepath.Join(shm, "qemu-ram")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the shared memory file is still there: %v", err)
	}
	for _, kept := range []string{filepath.Join(tmp, "others"), filepath.Join(tmp, ".X11-unix", "X1"),
		filepath.Join(tmp, "private", "planted"), keep, filepath.Join(elsewhere, "not-swept")} {
		if _, err := os.Lstat(kept); err != nil {
			t.Errorf("%s went: %v", kept, err)
		}
	}
}

// A range is leased whole: a process running as any uid of it keeps it from the next
// holder.
func TestRangesAreLeasedWhole(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to run a process as another uid")
	}
	p := Pool{Dir: t.TempDir(), First: 0x7FF00000, Count: 3 * 16, Stride: 16}
	if err := (Pool{Dir: p.Dir, First: p.First, Count: 40, Stride: 16}).Validate(); err == nil {
		t.Error("40 uids in leases of 16 validated")
	}
	if err := (Pool{Dir: p.Dir, First: p.First, Count: 32, Stride: 16, Sweep: []string{"/tmp"}}).Validate(); err == nil {
		t.Error("a sweep of ranges validated")
	}
	a, err := p.Lease("a")
	if err != nil || a.UID != p.First {
		t.Fatalf("first lease: %v, %v", a, err)
	}
	defer a.Release()
	child := exec.Command("sleep", "60")
	inSecond := p.First + 16 + 5
	child.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: inSecond, Gid: inSecond, Groups: []uint32{}}}
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = child.Process.Kill(); _ = child.Wait() }()
	b, err := p.Lease("b")
	if err != nil || b.UID != p.First+32 {
		t.Fatalf("with uid %d in use: %v, %v; want the range from %d", inSecond, b, err, p.First+32)
	}
	defer b.Release()
	if held, err := p.Held("b"); err != nil || len(held) != 1 || held[0] != p.First+32 {
		t.Errorf("Held(b) = %v, %v", held, err)
	}
	if _, err := p.Lease("c"); !errors.Is(err, ErrExhausted) {
		t.Fatalf("a third lease: %v, want ErrExhausted", err)
	}
}
