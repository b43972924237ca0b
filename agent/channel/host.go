package channel

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"
)

// Handshake timing: HELLO is repeated with backoff because a HELLO can be swallowed by the
// tail of a frame the guest was reading when the previous host went away.
const (
	helloFirstRetry = 25 * time.Millisecond
	helloMaxRetry   = 500 * time.Millisecond
)

// Conn is the host end of one session. It is a net.Conn: Read returns the payload of the
// session's DATA frames and Write sends DATA frames.
type Conn struct {
	raw     net.Conn
	session uint32

	rmu     sync.Mutex
	fr      *frameReader
	pending []byte

	wmu  sync.Mutex
	wbuf []byte
}

var _ net.Conn = (*Conn)(nil)

// Client starts a new session on raw (a connection to QEMU's chardev socket for the
// agent's port) and returns once the agent has accepted it. On error raw is left open;
// the caller owns it.
func Client(ctx context.Context, raw net.Conn) (*Conn, error) {
	session, err := newSessionID()
	if err != nil {
		return nil, err
	}
	c := &Conn{raw: raw, session: session, fr: newFrameReader(raw)}
	hello := appendFrame(nil, frameHello, session, nil)
	retry := helloFirstRetry
	for {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("channel: agent did not answer session %08x: %w", session, err)
		}
		if _, err := raw.Write(hello); err != nil {
			return nil, fmt.Errorf("channel: send HELLO: %w", err)
		}
		deadline := time.Now().Add(retry)
		if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
			deadline = d
		}
		welcomed, err := c.awaitWelcome(deadline)
		if err != nil {
			return nil, err
		}
		if welcomed {
			if err := raw.SetReadDeadline(time.Time{}); err != nil {
				return nil, err
			}
			return c, nil
		}
		retry = min(2*retry, helloMaxRetry)
	}
}

// awaitWelcome reads frames until this session's WELCOME or the deadline. Frames of other
// sessions (a previous host's late replies) are dropped.
func (c *Conn) awaitWelcome(deadline time.Time) (bool, error) {
	if err := c.raw.SetReadDeadline(deadline); err != nil {
		return false, err
	}
	for {
		h, _, err := c.fr.next()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return false, nil
		}
		if err != nil {
			return false, fmt.Errorf("channel: wait for WELCOME: %w", err)
		}
		if h.typ == frameWelcome && h.session == c.session {
			return true, nil
		}
	}
}

func newSessionID() (uint32, error) {
	var b [4]byte
	for {
		if _, err := rand.Read(b[:]); err != nil {
			return 0, fmt.Errorf("channel: session id: %w", err)
		}
		if id := binary.LittleEndian.Uint32(b[:]); id != 0 {
			return id, nil
		}
	}
}

// Session is the session number, for logs.
func (c *Conn) Session() uint32 { return c.session }

func (c *Conn) Read(p []byte) (int, error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	for len(c.pending) == 0 {
		h, payload, err := c.fr.next()
		if err != nil {
			return 0, err
		}
		if h.typ == frameData && h.session == c.session {
			// payload stays valid until the next c.fr.next(), which only runs once
			// pending is consumed.
			c.pending = payload
		}
	}
	n := copy(p, c.pending)
	c.pending = c.pending[n:]
	return n, nil
}

func (c *Conn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return writeFrames(c.raw, &c.wbuf, c.session, p)
}

// writeFrames sends p as DATA frames of session in one write per MaxPayload chunk.
func writeFrames(w interface{ Write([]byte) (int, error) }, buf *[]byte, session uint32, p []byte) (int, error) {
	written := 0
	for len(p) > 0 {
		chunk := p[:min(len(p), MaxPayload)]
		*buf = appendFrame((*buf)[:0], frameData, session, chunk)
		if _, err := w.Write(*buf); err != nil {
			return written, err
		}
		written += len(chunk)
		p = p[len(chunk):]
	}
	return written, nil
}

func (c *Conn) Close() error                       { return c.raw.Close() }
func (c *Conn) LocalAddr() net.Addr                { return c.raw.LocalAddr() }
func (c *Conn) RemoteAddr() net.Addr               { return c.raw.RemoteAddr() }
func (c *Conn) SetDeadline(t time.Time) error      { return c.raw.SetDeadline(t) }
func (c *Conn) SetReadDeadline(t time.Time) error  { return c.raw.SetReadDeadline(t) }
func (c *Conn) SetWriteDeadline(t time.Time) error { return c.raw.SetWriteDeadline(t) }
