// Package qga is the guest layer of VM pods: a client of the QEMU guest agent
// (qemu-guest-agent, the "org.qemu.guest_agent.0" virtio-serial port) that a VM pod's own
// operating system runs. vmpod asks it to ping, to run commands (CRI exec), and for the
// guest's OS, hostname and addresses.
//
// The protocol is QMP-like JSON, one command and one reply at a time, on a byte stream
// with no connection boundaries: the agent may have been restarted, or have half-read an
// earlier command, and replies to commands a previous client sent may still be in the
// pipe. So every session starts (and every failed call is followed) by a resync: a 0xFF
// byte that resets the agent's parser, then guest-sync-delimited with a fresh id, whose
// reply the agent prefixes with 0xFF; everything before the reply with that id is
// dropped.
package qga

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// PortName is the virtio-serial port name qemu-guest-agent opens in the guest.
const PortName = "org.qemu.guest_agent.0"

// DefaultTimeout bounds a call whose context has no deadline.
const DefaultTimeout = 10 * time.Second

// maxReply bounds one reply line. guest-exec-status carries up to 16 MiB of each of stdout
// and stderr (the agent's own cap), in base64: 2 × 16 MiB × 4/3, and some JSON.
const maxReply = 48 << 20

// ErrNoAgent: nothing answered a resync in time: the guest has no agent running (not
// installed, not started yet, or the guest is not up).
var ErrNoAgent = errors.New("the QEMU guest agent did not answer (is qemu-guest-agent installed and running in the guest?)")

// Error is the agent's error reply to a command.
type Error struct {
	Command string
	Class   string
	Desc    string
}

func (e *Error) Error() string {
	return fmt.Sprintf("guest agent %s: %s (%s)", e.Command, e.Desc, e.Class)
}

// ReplyError is a reply vmpod cannot use: malformed JSON, a missing or wrongly typed
// field. It names the command and the field.
type ReplyError struct {
	Command string
	Field   string
	Problem string
}

func (e *ReplyError) Error() string {
	if e.Field == "" {
		return fmt.Sprintf("guest agent %s: bad reply: %s", e.Command, e.Problem)
	}
	return fmt.Sprintf("guest agent %s: bad reply: %s: %s", e.Command, e.Field, e.Problem)
}

// Dialer connects to the host end of the agent's port.
type Dialer func(ctx context.Context) (net.Conn, error)

// Client talks to one guest's agent. It is safe for concurrent use; calls go one at a time.
type Client struct {
	dial Dialer

	mu     sync.Mutex
	conn   net.Conn
	r      *bufio.Reader
	synced bool
	nextID uint64
	closed bool
}

// New is a client that connects (and reconnects after a broken connection) with dial.
func New(dial Dialer) *Client {
	return &Client{dial: dial, nextID: uint64(time.Now().UnixNano()) & 0x7fffffff}
}

// Close drops the connection; later calls fail.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	return c.dropLocked()
}

func (c *Client) dropLocked() error {
	c.synced = false
	if c.conn == nil {
		return nil
	}
	err := c.conn.Close()
	c.conn, c.r = nil, nil
	return err
}

// call runs command with args and decodes its "return" into out (nil: ignore it).
func (c *Client) call(ctx context.Context, command string, args, out any) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultTimeout)
		defer cancel()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return fmt.Errorf("guest agent %s: client closed", command)
	}
	if err := c.ensureSyncedLocked(ctx); err != nil {
		return fmt.Errorf("guest agent %s: %w", command, err)
	}
	raw, err := c.roundTripLocked(ctx, command, args)
	if err != nil {
		c.synced = false // what is in the pipe now is unknown
		return err
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(raw, out); err != nil {
		return &ReplyError{Command: command, Problem: err.Error()}
	}
	return nil
}

// ensureSyncedLocked connects if needed and resynchronises the stream.
func (c *Client) ensureSyncedLocked(ctx context.Context) error {
	if c.synced {
		return nil
	}
	if c.conn == nil {
		conn, err := c.dial(ctx)
		if err != nil {
			return fmt.Errorf("connect: %w", err)
		}
		c.conn, c.r = conn, bufio.NewReaderSize(conn, 64<<10)
	}
	stop := c.deadline(ctx)
	defer stop()
	c.nextID++
	id := c.nextID
	req, _ := json.Marshal(request{Execute: "guest-sync-delimited", Arguments: map[string]uint64{"id": id}})
	// 0xFF first: the agent's parser drops whatever partial command it holds.
	if _, err := c.conn.Write(append([]byte{0xff}, append(req, '\n')...)); err != nil {
		_ = c.dropLocked()
		return c.ioErr(ctx, err)
	}
	for {
		// The reply to this sync comes after a 0xFF; stale replies come before it.
		if _, err := c.r.ReadSlice(0xff); err != nil && !errors.Is(err, bufio.ErrBufferFull) {
			_ = c.dropLocked()
			return c.ioErr(ctx, err)
		} else if errors.Is(err, bufio.ErrBufferFull) {
			continue
		}
		line, err := c.readLine()
		if err != nil {
			_ = c.dropLocked()
			return c.ioErr(ctx, err)
		}
		var rep struct {
			Return *uint64 `json:"return"`
		}
		if json.Unmarshal(line, &rep) == nil && rep.Return != nil && *rep.Return == id {
			c.synced = true
			return nil
		}
		// an older sync's reply: keep looking for ours
	}
}

type request struct {
	Execute   string `json:"execute"`
	Arguments any    `json:"arguments,omitempty"`
}

// roundTripLocked sends one command and returns its reply's "return" value.
func (c *Client) roundTripLocked(ctx context.Context, command string, args any) (json.RawMessage, error) {
	req, err := json.Marshal(request{Execute: command, Arguments: args})
	if err != nil {
		return nil, fmt.Errorf("guest agent %s: encode: %w", command, err)
	}
	stop := c.deadline(ctx)
	defer stop()
	// the agent answered the sync just now: silence from here on is a slow command, not
	// a missing agent
	if _, err := c.conn.Write(append(req, '\n')); err != nil {
		_ = c.dropLocked()
		return nil, fmt.Errorf("guest agent %s: %w", command, c.callErr(ctx, err))
	}
	line, err := c.readLine()
	if err != nil {
		_ = c.dropLocked()
		return nil, fmt.Errorf("guest agent %s: %w", command, c.callErr(ctx, err))
	}
	var rep struct {
		Return json.RawMessage `json:"return"`
		Error  *struct {
			Class string `json:"class"`
			Desc  string `json:"desc"`
		} `json:"error"`
	}
	if err := json.Unmarshal(line, &rep); err != nil {
		return nil, &ReplyError{Command: command, Problem: fmt.Sprintf("not JSON: %v", err)}
	}
	switch {
	case rep.Error != nil:
		return nil, &Error{Command: command, Class: rep.Error.Class, Desc: rep.Error.Desc}
	case rep.Return == nil:
		return nil, &ReplyError{Command: command, Field: "return", Problem: "missing"}
	}
	return rep.Return, nil
}

// readLine reads one reply line, without its newline; blank lines are skipped.
func (c *Client) readLine() ([]byte, error) {
	var buf []byte
	for {
		part, err := c.r.ReadSlice('\n')
		buf = append(buf, part...)
		if len(buf) > maxReply {
			return nil, fmt.Errorf("reply longer than %d bytes", maxReply)
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			continue
		}
		if err != nil {
			return nil, err
		}
		if line := bytes.TrimSpace(buf); len(line) > 0 {
			return line, nil
		}
		buf = buf[:0]
	}
}

// deadline applies ctx's deadline to the connection, and cancels blocked I/O when ctx
// ends; stop undoes both.
func (c *Client) deadline(ctx context.Context) (stop func()) {
	conn := c.conn
	if d, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(d)
	}
	done, exited := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(exited)
		select {
		case <-ctx.Done():
			_ = conn.SetDeadline(time.Unix(1, 0))
		case <-done:
		}
	}()
	return func() {
		close(done)
		<-exited // a late deadline in the past must not land after the reset below
		_ = conn.SetDeadline(time.Time{})
	}
}

// callErr is ioErr for a command after a successful sync: a timeout is the caller's
// deadline passing while the command runs.
func (c *Client) callErr(ctx context.Context, err error) error {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		if ctx.Err() != nil {
			return fmt.Errorf("no reply: %w", ctx.Err())
		}
		return fmt.Errorf("no reply: %w", context.DeadlineExceeded)
	}
	return c.ioErr(ctx, err)
}

// ioErr turns a timeout while waiting for the agent into ErrNoAgent (or ctx's error when
// the caller gave up), and anything else into itself.
func (c *Client) ioErr(ctx context.Context, err error) error {
	if ctx.Err() != nil && !errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return ctx.Err()
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, context.DeadlineExceeded) {
		return ErrNoAgent
	}
	if errors.Is(err, io.EOF) {
		return fmt.Errorf("connection closed (QEMU gone?): %w", err)
	}
	return err
}
