package stream

import (
	"fmt"
	"io"
	"sync"

	"github.com/containerd/errdefs"
)

// ErrStdinClosed is returned for writes after CloseStdin.
var ErrStdinClosed = fmt.Errorf("stream: stdin is closed: %w", errdefs.ErrFailedPrecondition)

// Input is a process's stdin.
type Input struct {
	w io.WriteCloser
	// closeFn ends the stream for the process: closing the pipe, or for a terminal
	// sending EOT, since closing a pty master would hang up the session instead.
	closeFn func() error

	mu     sync.Mutex // serialises writes, so offsets stay exact
	offset uint64     // bytes taken so far

	closeOnce sync.Once
	closeErr  error
	closed    chan struct{}
}

// NewInput wraps w. closeFn, if not nil, replaces w.Close as the way to end the stream.
func NewInput(w io.WriteCloser, closeFn func() error) *Input {
	if closeFn == nil {
		closeFn = w.Close
	}
	return &Input{w: w, closeFn: closeFn, closed: make(chan struct{})}
}

// Write delivers data, which starts at stream offset offset; the bytes of data the input
// already took are skipped. It returns the offset after the last byte taken. A write
// blocks while the process does not read, like a full pipe.
func (in *Input) Write(offset uint64, data []byte) (uint64, error) {
	in.mu.Lock()
	defer in.mu.Unlock()
	select {
	case <-in.closed:
		return in.offset, ErrStdinClosed
	default:
	}
	if offset > in.offset {
		return in.offset, fmt.Errorf("%w: write at %d, stdin at %d", ErrBadOffset, offset, in.offset)
	}
	if skip := in.offset - offset; skip < uint64(len(data)) {
		n, err := in.w.Write(data[skip:])
		in.offset += uint64(n)
		if err != nil {
			return in.offset, fmt.Errorf("stream: write stdin: %w", err)
		}
	}
	return in.offset, nil
}

// Close ends stdin once; later calls return the first result. It does not wait for a
// write in progress (closing the pipe is what unblocks it).
func (in *Input) Close() error {
	in.closeOnce.Do(func() {
		close(in.closed)
		in.closeErr = in.closeFn()
	})
	return in.closeErr
}
