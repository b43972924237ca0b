// Package stream holds a process's stdio between its pipes (or pty) and the host's reads
// and writes, addressed by byte offset.
//
// The host reads with long polls that name the next offset it wants; everything before
// that offset is acknowledged and freed. A reply lost with a dropped channel session is
// therefore simply asked for again, and no output is lost or duplicated. Stdin writes
// carry their offset too, so a repeated write is not delivered twice.
package stream

import (
	"context"
	"fmt"
	"io"
	"sync"

	"github.com/containerd/errdefs"
)

// DefaultLimit is how much unacknowledged output an Output keeps before it stops reading
// the process's pipe, so that a host that does not read blocks the writer as a full pipe
// would, instead of growing guest memory.
const DefaultLimit = 1 << 20

// DefaultReadSize bounds one read reply when the host does not say.
const DefaultReadSize = 256 << 10

// ErrBadOffset is returned for an offset past what the stream has produced.
var ErrBadOffset = fmt.Errorf("stream: offset beyond the end of the stream: %w", errdefs.ErrInvalidArgument)

// Output is one output stream (stdout or stderr).
type Output struct {
	mu      sync.Mutex
	base    uint64 // stream offset of buf[0]
	buf     []byte // produced, not yet acknowledged
	eof     bool
	limit   int
	changed chan struct{} // closed and replaced whenever buf or eof changes
}

// NewOutput returns an empty stream that holds at most limit unacknowledged bytes
// (DefaultLimit if limit <= 0).
func NewOutput(limit int) *Output {
	if limit <= 0 {
		limit = DefaultLimit
	}
	return &Output{limit: limit, changed: make(chan struct{})}
}

// signalLocked wakes every waiter; o.mu is held.
func (o *Output) signalLocked() {
	close(o.changed)
	o.changed = make(chan struct{})
}

// Pump copies r into the stream until r ends, then marks the end of the stream. A pty
// master reports the end of its last writer as EIO.
func (o *Output) Pump(r io.Reader) {
	chunk := make([]byte, 32<<10)
	for {
		if !o.waitForRoom() {
			return
		}
		n, err := r.Read(chunk)
		if n > 0 {
			o.mu.Lock()
			o.buf = append(o.buf, chunk[:n]...)
			o.signalLocked()
			o.mu.Unlock()
		}
		if err != nil {
			// EOF (pipe) and EIO (pty master after its last slave closed) are the normal
			// end. Any other error ends the stream too: the exit status tells the rest.
			o.CloseWithEOF()
			return
		}
	}
}

// waitForRoom blocks while the stream is full; false if the stream was closed.
func (o *Output) waitForRoom() bool {
	for {
		o.mu.Lock()
		if o.eof {
			o.mu.Unlock()
			return false
		}
		if len(o.buf) < o.limit {
			o.mu.Unlock()
			return true
		}
		ch := o.changed
		o.mu.Unlock()
		<-ch
	}
}

// CloseWithEOF ends the stream: readers get what is buffered, then EOF. Used when the
// writer is gone and when a container is removed with output still unread.
func (o *Output) CloseWithEOF() {
	o.mu.Lock()
	defer o.mu.Unlock()
	if !o.eof {
		o.eof = true
		o.signalLocked()
	}
}

// Read acknowledges everything before offset and returns up to max bytes from there,
// waiting until there is data, the stream ended, or ctx is done. start is the offset of
// data[0]: equal to offset unless data before it was dropped (never, while the host
// acknowledges through offsets). eof says no data follows data.
func (o *Output) Read(ctx context.Context, offset uint64, max int) (start uint64, data []byte, eof bool, err error) {
	if max <= 0 {
		max = DefaultReadSize
	}
	for {
		o.mu.Lock()
		end := o.base + uint64(len(o.buf))
		if offset > end {
			o.mu.Unlock()
			return 0, nil, false, fmt.Errorf("%w: offset %d, stream at %d", ErrBadOffset, offset, end)
		}
		if offset > o.base {
			o.buf = o.buf[offset-o.base:]
			o.base = offset
			if len(o.buf) == 0 {
				o.buf = nil // let a large drained buffer go
			}
			o.signalLocked() // room for the pump
		}
		if len(o.buf) > 0 || o.eof {
			n := min(len(o.buf), max)
			data = append([]byte(nil), o.buf[:n]...)
			start, eof = o.base, o.eof && n == len(o.buf)
			o.mu.Unlock()
			return start, data, eof, nil
		}
		ch := o.changed
		o.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return 0, nil, false, ctx.Err()
		}
	}
}
