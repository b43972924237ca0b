package vmpodagent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync/atomic"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
)

const writeChunk = 32 << 10

// errGuestDropped: the guest had to drop output before the host acknowledged it.
var errGuestDropped = errors.New("output dropped by the guest")

// readAt asks the guest for a stream's bytes from offset on (a long poll).
type readAt func(ctx context.Context, offset uint64) (*agentv1.ReadStreamResponse, error)

// writeAt hands the guest data starting at offset and returns the offset after what it took.
type writeAt func(ctx context.Context, offset uint64, data []byte) (uint64, error)

// copyFromGuest copies one guest stream to w until its end. Reads name the next offset
// wanted, which acknowledges everything before it: a reply lost with a channel session
// costs a repeat, not data. A gap (the guest dropped output) is reported after the copy
// goes on. pos, if not nil, holds where the copy starts (another reader, a migration's
// source, had what came before) and, as it goes, how far it has written to w.
func copyFromGuest(ctx context.Context, w io.Writer, read readAt, pos *atomic.Uint64) error {
	var offset uint64
	if pos != nil {
		offset = pos.Load()
	}
	var dropped uint64
	for {
		resp, err := read(ctx, offset)
		if err != nil {
			return err
		}
		if resp.Offset > offset {
			dropped += resp.Offset - offset
		}
		if len(resp.Data) > 0 {
			if _, err := w.Write(resp.Data); err != nil {
				return fmt.Errorf("host writer: %w", err)
			}
		}
		offset = resp.Offset + uint64(len(resp.Data))
		if pos != nil {
			pos.Store(offset)
		}
		if resp.Eof {
			if dropped > 0 {
				return fmt.Errorf("%w: %d bytes", errGuestDropped, dropped)
			}
			return nil
		}
	}
}

// copyToGuest copies r to a guest stream until r ends (nil) or fails (its error). A write
// repeated after a lost reply skips what the guest already took.
func copyToGuest(ctx context.Context, r io.Reader, write writeAt) error {
	buf := make([]byte, writeChunk)
	var offset uint64
	for {
		n, rerr := r.Read(buf)
		for sent := 0; sent < n; {
			next, err := write(ctx, offset, buf[sent:n])
			if err != nil {
				return err
			}
			sent += int(next - offset)
			offset = next
		}
		if errors.Is(rerr, io.EOF) {
			return nil
		}
		if rerr != nil {
			return rerr
		}
	}
}
