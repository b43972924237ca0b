package vmuser

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
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

// A child that inherited the lock keeps the uid taken after the leaser let go of it: a
// QEMU outliving its shim must not share its uid with the next VM.
func TestInheritedLockKeepsTheUID(t *testing.T) {
	p := Pool{Dir: t.TempDir(), First: 7000, Count: 1}
	l, err := p.Lease("vm")
	if err != nil {
		t.Fatal(err)
	}
	child := exec.Command("sleep", "60")
	child.ExtraFiles = []*os.File{l.File()}
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = child.Process.Kill(); _ = child.Wait() }()
	if err := l.Release(); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Lease("next"); !errors.Is(err, ErrExhausted) {
		t.Fatalf("uid leased again while a process holding its lock lives: %v", err)
	}
	_ = child.Process.Kill()
	_ = child.Wait()
	if l, err := p.Lease("next"); err != nil || l.UID != 7000 {
		t.Fatalf("after the holder died: %v, %v", l, err)
	}
}

func TestConcurrentLeasesDiffer(t *testing.T) {
	p := Pool{Dir: t.TempDir(), First: 9000, Count: 16}
	var mu sync.Mutex
	seen := map[uint32]bool{}
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
			if seen[l.UID] {
				t.Errorf("uid %d leased twice", l.UID)
			}
			seen[l.UID] = true
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
