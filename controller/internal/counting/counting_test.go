package counting

import (
	"io"
	"strings"
	"testing"
)

func TestReaderCounts(t *testing.T) {
	r := &Reader{R: strings.NewReader("twelve bytes")}
	done := make(chan struct{})
	go func() { // read concurrently with the copy, as progress reports do
		for {
			select {
			case <-done:
				return
			default:
				_ = r.N()
			}
		}
	}()
	b, err := io.ReadAll(io.LimitReader(r, 5))
	if err != nil || string(b) != "twelv" || r.N() != 5 {
		t.Errorf("read %q (%v), counted %d, want 5", b, err, r.N())
	}
	_, _ = io.ReadAll(r)
	close(done)
	if r.N() != 12 {
		t.Errorf("counted %d, want 12", r.N())
	}
}
