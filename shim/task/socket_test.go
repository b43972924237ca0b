package task

import (
	"net"
	"os"
	"path/filepath"
	"testing"
)

func TestListeningSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "shim.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	f, err := l.(*net.UnixListener).File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if got := listeningSocket(int(f.Fd())); got != path {
		t.Errorf("listening socket: got %q, want %q", got, path)
	}

	// A connected socket and a plain file are not what the shim serves on.
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	cf, err := c.(*net.UnixConn).File()
	if err != nil {
		t.Fatal(err)
	}
	defer cf.Close()
	if got := listeningSocket(int(cf.Fd())); got != "" {
		t.Errorf("connected socket: got %q, want none", got)
	}
	if got := listeningSocket(int(os.Stdin.Fd())); got != "" {
		t.Errorf("stdin: got %q, want none", got)
	}

	ours, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := removeSocket(path, ours); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Errorf("socket still there after removal: %v", err)
	}
	if err := removeSocket(path, ours); err != nil {
		t.Errorf("removing a socket already gone: %v", err)
	}
	// a newer shim of the pod bound the path meanwhile: its socket stays
	l2, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer l2.Close()
	if err := removeSocket(path, ours); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(path); err != nil {
		t.Errorf("removed another shim's socket: %v", err)
	}
}
