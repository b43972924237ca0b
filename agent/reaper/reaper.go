// Package reaper collects the exit status of every child of the guest agent.
//
// The agent is PID 1: runc's container inits and exec'd processes are re-parented to it
// when runc exits, so it must reap with wait4(-1) and hand each exit to whoever waits for
// that pid. That collides with os/exec, whose Cmd.Wait reaps its own child, so the reaper
// also implements go-runc's ProcessMonitor: runc invocations start under the reaper's lock
// and receive their exit from it.
//
// A container process's pid is only known after runc has written its pid file, and the
// process may already have exited by then; such exits are kept (briefly) until claimed.
package reaper

import (
	"errors"
	"os"
	"os/exec"
	"os/signal"
	"sync"
	"time"

	runc "github.com/containerd/go-runc"
	"golang.org/x/sys/unix"
)

// unclaimedTTL bounds how long an exit nobody asked for is kept. Claims follow a runc
// call that has just returned, so seconds would do; orphans re-parented to PID 1 are the
// ones that are never claimed.
const unclaimedTTL = time.Minute

// Exit is one reaped process.
type Exit = runc.Exit

// Reaper is safe for concurrent use. Use New once per process.
type Reaper struct {
	mu        sync.Mutex
	waiters   map[int]chan Exit
	unclaimed map[int]Exit
}

var _ runc.ProcessMonitor = (*Reaper)(nil)

// New starts reaping on SIGCHLD.
func New() *Reaper {
	r := &Reaper{waiters: map[int]chan Exit{}, unclaimed: map[int]Exit{}}
	sigs := make(chan os.Signal, 32)
	signal.Notify(sigs, unix.SIGCHLD)
	go func() {
		for range sigs {
			r.reapAll()
		}
	}()
	return r
}

func (r *Reaper) reapAll() {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if pid <= 0 || err != nil {
			return
		}
		r.deliver(Exit{Pid: pid, Status: ExitStatus(ws), Timestamp: time.Now()})
	}
}

// ExitStatus is the exit code, or 128+signal for a process killed by a signal (the shell
// and containerd convention).
func ExitStatus(ws unix.WaitStatus) int {
	if ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ws.ExitStatus()
}

func (r *Reaper) deliver(e Exit) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if ch, ok := r.waiters[e.Pid]; ok {
		delete(r.waiters, e.Pid)
		ch <- e
		return
	}
	now := time.Now()
	for pid, old := range r.unclaimed {
		if now.Sub(old.Timestamp) > unclaimedTTL {
			delete(r.unclaimed, pid)
		}
	}
	r.unclaimed[e.Pid] = e
}

// Claim returns a channel that receives pid's exit, including one reaped before the call.
func (r *Reaper) Claim(pid int) <-chan Exit {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.claimLocked(pid)
}

func (r *Reaper) claimLocked(pid int) chan Exit {
	ch := make(chan Exit, 1)
	if e, ok := r.unclaimed[pid]; ok {
		delete(r.unclaimed, pid)
		ch <- e
		return ch
	}
	r.waiters[pid] = ch
	return ch
}

// Start starts c and claims its exit. The lock makes the claim precede any reap of c.
func (r *Reaper) Start(c *exec.Cmd) (chan Exit, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := c.Start(); err != nil {
		return nil, err
	}
	return r.claimLocked(c.Process.Pid), nil
}

// StartLocked is Start; the agent never sets a parent-death signal, which is what go-runc
// locks the OS thread for.
func (r *Reaper) StartLocked(c *exec.Cmd) (chan Exit, error) { return r.Start(c) }

// Wait returns c's exit status once reaped, then lets os/exec finish copying c's output
// (its own wait fails with ECHILD, which is expected: the process is already reaped).
func (r *Reaper) Wait(c *exec.Cmd, ec chan Exit) (int, error) {
	e := <-ec
	_ = c.Wait()
	return e.Status, nil
}
