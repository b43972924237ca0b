package task

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// Stdin reaches the reader whatever the timing: containerd may open its end of the FIFO
// after the RPC that opened ours has returned, and CloseIO comes after containerd's last
// write, maybe before the reader has taken it. A reader that never reads does not hold
// CloseIO for longer than stdinDrainWait.
func TestCloseStdinDrainsFirst(t *testing.T) {
	path := filepath.Join(t.TempDir(), "stdin")
	if err := syscall.Mkfifo(path, 0o600); err != nil {
		t.Fatal(err)
	}
	// opened under an RPC's ctx, which ends before containerd opens its end of the FIFO
	rpc, cancel := context.WithCancel(context.Background())
	h, err := openIO(rpc, "c", "ns", stdioPaths{stdin: path})
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	time.Sleep(50 * time.Millisecond)
	var w *os.File
	for deadline := time.Now().Add(5 * time.Second); w == nil; time.Sleep(10 * time.Millisecond) {
		// non-blocking: fails (ENXIO) while no reader has the FIFO open
		if w, err = os.OpenFile(path, os.O_WRONLY|syscall.O_NONBLOCK, 0); err != nil && time.Now().After(deadline) {
			t.Fatalf("nobody reads the FIFO: %v", err)
		}
	}
	payload := bytes.Repeat([]byte("vmpod "), 4096)
	go func() { _, _ = w.Write(payload); _ = w.Close() }()
	closed := make(chan struct{})
	go func() { h.closeStdin(); close(closed) }()
	time.Sleep(100 * time.Millisecond) // the reader comes late
	got, err := io.ReadAll(h.stdin)
	if err != nil || !bytes.Equal(got, payload) {
		t.Errorf("read %d bytes (%v), want all %d", len(got), err, len(payload))
	}
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Fatal("closeStdin did not return after the reader drained the FIFO")
	}

	// nobody reads: CloseIO returns anyway
	path2 := filepath.Join(t.TempDir(), "stdin")
	if err := syscall.Mkfifo(path2, 0o600); err != nil {
		t.Fatal(err)
	}
	h2, err := openIO(context.Background(), "c", "ns", stdioPaths{stdin: path2})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	h2.closeStdin()
	if d := time.Since(start); d > stdinDrainWait+time.Second {
		t.Errorf("closeStdin with no reader took %v", d)
	}
}
