package pod

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// The reason a VM ended goes into an empty termination log only, and never blocks or
// follows a link: the file is the user's.
func TestWriteTerminationMessage(t *testing.T) {
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty")
	own := filepath.Join(dir, "own")
	fifo := filepath.Join(dir, "fifo")
	link := filepath.Join(dir, "link")
	for path, content := range map[string]string{empty: "", own: "my own words\n"} {
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(empty, link); err != nil {
		t.Fatal(err)
	}

	if err := writeTerminationMessage(empty, "GuestPanicked: x"); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(empty); string(b) != "GuestPanicked: x\n" {
		t.Errorf("empty log now %q", b)
	}
	if err := writeTerminationMessage(own, "GuestPanicked: x"); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(own); string(b) != "my own words\n" {
		t.Errorf("the container's own message became %q", b)
	}
	done := make(chan error, 1)
	go func() { done <- writeTerminationMessage(fifo, "x") }()
	select {
	case err := <-done:
		if err == nil {
			t.Error("wrote into a FIFO")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a FIFO without a reader blocked the write")
	}
	if err := writeTerminationMessage(link, "x"); err == nil {
		t.Error("followed a symlink")
	}
	if err := writeTerminationMessage(filepath.Join(dir, "absent"), "x"); err == nil {
		t.Error("created a missing log")
	}
}
