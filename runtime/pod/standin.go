package pod

import (
	"context"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/vmpod/vmpod/runtime"
)

// exitKilled is the status of a process ended by SIGKILL.
const exitKilled = 128 + int(syscall.SIGKILL)

// standIn is a VM pod's sandbox container: nothing runs for it, the pod's VM belongs to
// the compute container. Its pid is the shim's, a host process that lives exactly as long
// as the pod (`kill -9` of it ends the pod, as killing a pause process would). It exits
// when signalled, as the pause process it stands for does on any terminating signal.
type standIn struct {
	once   sync.Once
	exited chan struct{}
	exit   runtime.Exit
}

func newStandIn() *standIn { return &standIn{exited: make(chan struct{})} }

func (s *standIn) end(status int) {
	s.once.Do(func() {
		s.exit = runtime.Exit{Status: status, ExitedAt: time.Now()}
		close(s.exited)
	})
}

func (s *standIn) Pid() uint32 { return uint32(os.Getpid()) }

func (s *standIn) Wait(ctx context.Context) (runtime.Exit, error) {
	select {
	case <-s.exited:
		return s.exit, nil
	case <-ctx.Done():
		return runtime.Exit{}, ctx.Err()
	}
}

// Signal ends the stand-in for every signal that ends a process by default; the others
// (SIGCHLD, SIGWINCH, SIGURG, SIGCONT, and SIGSTOP, which would stop a pause process but
// cannot stop the shim) change nothing.
func (s *standIn) Signal(ctx context.Context, sig syscall.Signal, all bool) error {
	if endsAProcess(sig) {
		s.end(128 + int(sig))
	}
	return nil
}

// endsAProcess says whether sig ends a process that does not handle it (0 checks only).
// SIGSTOP and SIGTSTP would stop one, which a process of the shim's cannot be.
func endsAProcess(sig syscall.Signal) bool {
	switch sig {
	case syscall.SIGCHLD, syscall.SIGWINCH, syscall.SIGURG, syscall.SIGCONT, syscall.SIGSTOP, syscall.SIGTSTP, 0:
		return false
	}
	return true
}

// OutputDone: a stand-in writes nothing.
func (s *standIn) OutputDone() <-chan struct{} { return s.exited }

func (s *standIn) Resize(context.Context, uint32, uint32) error { return nil }
func (s *standIn) CloseStdin(context.Context) error             { return nil }
func (s *standIn) Remove(context.Context) error                 { return nil }
