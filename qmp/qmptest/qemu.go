package qmptest

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"testing"
	"time"
)

// IntegrationEnv is the environment variable that enables tests against real QEMU.
const IntegrationEnv = "VMPOD_INTEGRATION"

// QEMUBinary is the emulator the integration tests run.
const QEMUBinary = "qemu-system-x86_64"

// RequireIntegration skips t unless VMPOD_INTEGRATION=1 and the test runs as root
// (taps, network namespaces, vhost-user). With the variable set, a missing QEMU
// fails the test rather than skipping it.
func RequireIntegration(t testing.TB) {
	t.Helper()
	if os.Getenv(IntegrationEnv) != "1" {
		t.Skipf("starts real QEMU (TCG); set %s=1 to run it", IntegrationEnv)
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: it creates taps and network namespaces and passes fds to QEMU")
	}
	if _, err := exec.LookPath(QEMUBinary); err != nil {
		t.Fatalf("%s=1 but %s is not installed: %v", IntegrationEnv, QEMUBinary, err)
	}
}

// TempDir is a scratch directory removed when the test ends. Unlike t.TempDir its
// path is short enough for unix sockets (107 bytes) under any test name.
func TempDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "vmpod-qemu")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// QEMU is a running qemu-system-x86_64.
type QEMU struct {
	Cmd    *exec.Cmd
	stderr lockedBuffer
	exited chan struct{}
	err    error // Wait's result, valid once exited is closed
}

// Start runs QEMU with args (extraFiles become fds 3, 4, ... in QEMU). When the
// test ends QEMU is killed if it still runs, reaped, and checked to be gone.
func Start(t testing.TB, args []string, extraFiles ...*os.File) *QEMU {
	t.Helper()
	q := &QEMU{exited: make(chan struct{})}
	q.Cmd = exec.Command(QEMUBinary, args...)
	q.Cmd.Stdout = &q.stderr
	q.Cmd.Stderr = &q.stderr
	q.Cmd.ExtraFiles = extraFiles
	q.Cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := q.Cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", QEMUBinary, err)
	}
	go func() {
		q.err = q.Cmd.Wait()
		close(q.exited)
	}()
	t.Cleanup(func() {
		q.Cmd.Process.Kill()
		<-q.exited
		// Reaped processes are gone; anything else is a leak.
		if err := syscall.Kill(q.Cmd.Process.Pid, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("QEMU pid %d still exists after the test (kill 0: %v)", q.Cmd.Process.Pid, err)
		}
		if t.Failed() {
			t.Logf("QEMU output:\n%s", q.Output())
		}
	})
	return q
}

// Exited is closed once QEMU has exited and been reaped.
func (q *QEMU) Exited() <-chan struct{} { return q.exited }

// WaitExit waits up to d for QEMU to exit and returns Wait's error.
func (q *QEMU) WaitExit(t testing.TB, d time.Duration) error {
	t.Helper()
	select {
	case <-q.exited:
		return q.err
	case <-time.After(d):
		t.Fatalf("QEMU still running after %v", d)
		return nil
	}
}

// Output is what QEMU wrote to stdout and stderr so far.
func (q *QEMU) Output() string { return q.stderr.String() }

type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
