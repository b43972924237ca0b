// Package pidproxy gives a process in a pod's guest a host pid. containerd, the kubelet
// and host tools see a task's pid and act on it: signal it, read /proc/<pid>, build
// namespace paths from it. A guest pid means an unrelated host process there. Each
// container of a container pod gets a proxy instead: a small host process, child of the
// shim and in the pod's cgroup, whose pid is reported. A catchable signal sent to it is
// relayed to the container's init; its death (SIGKILL) kills the init, as SIGKILL to a
// runc container's pid does. docs/design/012.
package pidproxy

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// Binary is the proxy's executable (cmd/vmpod-pid-proxy), installed next to the shim's:
// a binary of its own, because the shim's would initialize containerd's packages in every
// proxy (15 MiB resident instead of about 1).
const Binary = "vmpod-pid-proxy"

// Path is where the shim finds the proxy: next to its own executable.
func Path() (string, error) {
	self, err := os.Executable()
	if err != nil {
		return "", fmt.Errorf("pid proxy: %w", err)
	}
	p := filepath.Join(filepath.Dir(self), Binary)
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("pid proxy: %w (install %s next to the shim)", err, Binary)
	}
	return p, nil
}

// relayed are the signals the proxy passes on; the rest are the Go runtime's own
// (SIGURG preempts goroutines), or mean nothing for a process that stands in (SIGCHLD,
// SIGPIPE).
func relayed(sig syscall.Signal) bool {
	switch sig {
	case syscall.SIGURG, syscall.SIGCHLD, syscall.SIGPIPE:
		return false
	}
	return sig > 0 && sig < 65
}

// readyTimeout bounds a proxy's start (a Go runtime's start: milliseconds).
const readyTimeout = 10 * time.Second

// ready is the byte the proxy writes once its signal handlers are in place: a signal
// before that would have killed it.
const ready = 0

// Main is the proxy process. It writes each signal it receives to stdout, one byte with
// its number, and exits when stdin ends (the shim let go of it) or it is killed.
func Main() {
	sigs := make(chan os.Signal, 64)
	signal.Notify(sigs)
	if _, err := os.Stdout.Write([]byte{ready}); err != nil {
		os.Exit(0)
	}
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}()
	for s := range sigs {
		if sig, ok := s.(syscall.Signal); ok && relayed(sig) {
			if _, err := os.Stdout.Write([]byte{byte(sig)}); err != nil {
				os.Exit(0) // the shim is gone
			}
		}
	}
}

// Proxy is a running proxy process, seen from the shim.
type Proxy struct {
	cmd      *exec.Cmd
	stdin    io.Closer
	signals  chan syscall.Signal
	stopping chan struct{} // closed by Stop: signals are dropped from then on
	exited   chan struct{}
	stopOnce sync.Once
	mu       sync.Mutex
	stopped  bool // Stop ended it; otherwise someone killed it
}

// Start runs a proxy from the binary exe (Path), naming what it stands for in its command
// line. place, if set, adjusts the process attributes before the fork (the pod's cgroup).
func Start(exe, standsFor string, place func(*syscall.SysProcAttr)) (*Proxy, error) {
	cmd := exec.Command(exe, standsFor)
	// A proxy needs one thread and no collector to speak of.
	cmd.Env = append(os.Environ(), "GOMAXPROCS=1", "GOGC=off")
	// No parent-death signal: it follows the thread that forked, not the shim, and a
	// thread of the shim may end (one locked into a netns it could not leave). The proxy
	// ends at its stdin's EOF, which the kernel delivers when the shim dies.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if place != nil {
		place(cmd.SysProcAttr)
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		_ = stdin.Close()
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		_ = stdin.Close()
		return nil, fmt.Errorf("pid proxy for %s: %w", standsFor, err)
	}
	// A proxy that never gets ready is killed, which ends the read.
	slow := time.AfterFunc(readyTimeout, func() { _ = cmd.Process.Kill() })
	var b [1]byte
	_, err = io.ReadFull(stdout, b[:])
	slow.Stop()
	if err != nil || b[0] != ready {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return nil, fmt.Errorf("pid proxy for %s: not ready (%v, %d)", standsFor, err, b[0])
	}
	p := &Proxy{cmd: cmd, stdin: stdin, signals: make(chan syscall.Signal, 16),
		stopping: make(chan struct{}), exited: make(chan struct{})}
	go p.relay(stdout)
	return p, nil
}

func (p *Proxy) relay(stdout io.Reader) {
	buf := make([]byte, 64)
	for {
		n, err := stdout.Read(buf)
		for _, b := range buf[:n] {
			select {
			case p.signals <- syscall.Signal(b):
			case <-p.stopping: // nobody relays any more
			}
		}
		if err != nil {
			break
		}
	}
	_ = p.cmd.Wait()
	close(p.signals)
	close(p.exited)
}

// Pid is the proxy's host pid.
func (p *Proxy) Pid() int { return p.cmd.Process.Pid }

// Signals delivers the signals sent to the proxy, in order; it is closed when the proxy
// has exited.
func (p *Proxy) Signals() <-chan syscall.Signal { return p.signals }

// Exited reports whether the proxy has exited (its pid may name another process now).
func (p *Proxy) Exited() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// Killed reports, once the proxy has exited (Signals closed), whether something other
// than Stop ended it.
func (p *Proxy) Killed() bool {
	<-p.exited
	p.mu.Lock()
	defer p.mu.Unlock()
	return !p.stopped
}

// Stop ends the proxy and waits for it; idempotent.
func (p *Proxy) Stop() {
	p.stopOnce.Do(func() {
		p.mu.Lock()
		p.stopped = true
		p.mu.Unlock()
		close(p.stopping)
		_ = p.stdin.Close()
		_ = p.cmd.Process.Kill() // an error: it is on its way out already
	})
	<-p.exited
}
