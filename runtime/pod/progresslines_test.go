package pod

import (
	"bytes"
	"fmt"
	"sync"
	"testing"
	"time"
)

// stalledClient is an exec's output nobody reads until release is closed.
type stalledClient struct {
	release chan struct{}
	mu      sync.Mutex
	got     bytes.Buffer
}

func (c *stalledClient) Write(b []byte) (int, error) {
	<-c.release
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.got.Write(b)
}

func (c *stalledClient) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.got.String()
}

// A client that stops reading never blocks the migration's reports, and reads the newest
// line, the outcome, once it reads again.
func TestProgressLinesNeverBlockTheMigration(t *testing.T) {
	client := &stalledClient{release: make(chan struct{})}
	lines := newProgressLines(client)
	reported := make(chan struct{})
	go func() {
		defer close(reported)
		for i := range 1000 {
			lines.Put(fmt.Appendf(nil, "progress %d\n", i))
		}
		lines.Put([]byte("outcome\n"))
	}()
	select {
	case <-reported:
	case <-time.After(10 * time.Second):
		t.Fatal("Put blocked behind a client that does not read")
	}
	if lines.Close(50 * time.Millisecond) {
		t.Error("Close said the last line went out to a client that does not read")
	}
	close(client.release)
	select {
	case <-lines.done:
	case <-time.After(10 * time.Second):
		t.Fatal("the writer did not end once the client read again")
	}
	got := client.String()
	if !bytes.HasSuffix([]byte(got), []byte("outcome\n")) {
		t.Errorf("the client read %q, want the outcome last", got)
	}
	if n := bytes.Count([]byte(got), []byte("\n")); n > 3 {
		t.Errorf("the client read %d lines, want the ones between dropped (at most the one in the writer's hands, and the newest)", n)
	}
}

func TestProgressLinesWriteEveryLineToAReadingClient(t *testing.T) {
	var out bytes.Buffer
	lines := newProgressLines(&out)
	lines.Put([]byte("one\n"))
	if !lines.Close(10 * time.Second) {
		t.Fatal("Close timed out on a client that reads")
	}
	if out.String() != "one\n" {
		t.Errorf("wrote %q", out.String())
	}
}
