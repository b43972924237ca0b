package reaper

import (
	"os/exec"
	"syscall"
	"testing"
	"time"
)

// One reaper per process, as in the agent: several would reap each other's children.
var testReaper = New()

func waitExit(t *testing.T, ch <-chan Exit) Exit {
	t.Helper()
	select {
	case e := <-ch:
		return e
	case <-time.After(10 * time.Second):
		t.Fatal("no exit delivered")
		return Exit{}
	}
}

func TestStartDeliversExitStatus(t *testing.T) {
	r := testReaper
	cmd := exec.Command("/bin/sh", "-c", "exit 3")
	ch, err := r.Start(cmd)
	if err != nil {
		t.Fatal(err)
	}
	status, err := r.Wait(cmd, ch)
	if err != nil || status != 3 {
		t.Fatalf("got status %d, err %v; want 3", status, err)
	}
}

func TestSignalledProcessIs128PlusSignal(t *testing.T) {
	r := testReaper
	cmd := exec.Command("/bin/sleep", "60")
	ch, err := r.Start(cmd)
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if e := waitExit(t, ch); e.Status != 128+9 {
		t.Fatalf("got %d, want 137", e.Status)
	}
}

// A process whose pid is learned after it exited (runc's pid file) is still claimable.
func TestClaimAfterExit(t *testing.T) {
	r := testReaper
	cmd := exec.Command("/bin/sh", "-c", "exit 7")
	// Started outside the reaper: its exit lands in the unclaimed set.
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	deadline := time.Now().Add(10 * time.Second)
	for {
		r.mu.Lock()
		_, reaped := r.unclaimed[pid]
		r.mu.Unlock()
		if reaped {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("exit never reaped")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if e := waitExit(t, r.Claim(pid)); e.Status != 7 || e.Pid != pid {
		t.Fatalf("got %+v, want pid %d status 7", e, pid)
	}
}
