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
