package sockets

import (
	"net"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// Served decides whether `shim delete` tears a pod down: only a socket nobody listens on,
// or no socket, means its shim is gone. A shim too busy to accept at once is alive.
func TestServed(t *testing.T) {
	dir := t.TempDir()
	serving := filepath.Join(dir, "serving.sock")
	l, err := net.Listen("unix", serving)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if !Served(serving) {
		t.Error("a listening socket: want served")
	}

	stale := filepath.Join(dir, "stale.sock")
	gone, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	gone.(*net.UnixListener).SetUnlinkOnClose(false)
	_ = gone.Close()
	if Served(stale) {
		t.Error("a socket nobody listens on: want not served")
	}
	if Served(filepath.Join(dir, "missing.sock")) {
		t.Error("no socket: want not served")
	}

	// a shim that accepts nothing for now: its backlog full, a connect fails at once
	busy := filepath.Join(dir, "busy.sock")
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: busy}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	var refused error
	for range 16 { // fill the backlog until the kernel turns a connect away
		c, err := net.Dial("unix", busy)
		if err != nil {
			refused = err
			break
		}
		defer c.Close()
	}
	if refused == nil {
		t.Fatal("the backlog never filled")
	}
	t.Logf("a connect to the full backlog: %v", refused)
	if !Served(busy) {
		t.Error("a shim whose backlog is full: want served")
	}
}
