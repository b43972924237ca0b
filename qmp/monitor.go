package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	goqemu "github.com/digitalocean/go-qemu/qmp"
)

// DefaultCommandTimeout bounds a command whose context has no deadline. QEMU answers
// commands from its main loop in milliseconds, even under TCG; one that takes this
// long means QEMU is wedged.
const DefaultCommandTimeout = 30 * time.Second

// requestQueueLen is how many calls may wait for the owner goroutine without
// blocking their callers.
const requestQueueLen = 64

var (
	errConnectionClosed = errors.New("QEMU closed the connection")
	errClosedByCaller   = errors.New("Close was called")
)

// Monitor is a QMP connection to one QEMU process. Its methods are safe for
// concurrent use; commands are sent one at a time, in the order they were queued.
type Monitor struct {
	sock     *goqemu.SocketMonitor
	version  string
	canPass  bool // the banner advertised "oob", which go-qemu requires for fd passing
	requests chan *request
	nextID   atomic.Uint64
	wg       sync.WaitGroup

	done      chan struct{} // closed by shutdown
	closeOnce sync.Once
	closeErr  error // why the monitor closed; written before done is closed

	subsMu sync.Mutex
	subs   map[*Subscription]struct{} // nil once closed
}

func newMonitor(sock *goqemu.SocketMonitor) *Monitor {
	m := &Monitor{
		sock:     sock,
		requests: make(chan *request, requestQueueLen),
		done:     make(chan struct{}),
		subs:     make(map[*Subscription]struct{}),
	}
	if sock.Version != nil {
		m.version = sock.Version.String()
	}
	for _, c := range sock.Capabilities {
		if c == "oob" {
			m.canPass = true
		}
	}
	// go-qemu only forwards events once Events has been called; what QEMU sent
	// between the handshake and this call is lost, but nobody could have
	// subscribed to it yet.
	events, _ := sock.Events(context.Background())
	m.wg.Add(2)
	go m.serve()
	go m.drainEvents(events)
	return m
}

// Version is QEMU's version from the QMP greeting, e.g. "7.2.22".
func (m *Monitor) Version() string { return m.version }

// Done is closed when the monitor has closed: QEMU went away or Close was called.
func (m *Monitor) Done() <-chan struct{} { return m.done }

// Err is nil while the monitor is open; afterwards it says why it closed and
// matches ErrClosed.
func (m *Monitor) Err() error {
	select {
	case <-m.done:
		return m.closedErr()
	default:
		return nil
	}
}

// Close closes the connection, fails pending calls and subscriptions with ErrClosed
// and waits for the monitor's goroutines to exit. It does not stop QEMU.
func (m *Monitor) Close() error {
	m.shutdown(errClosedByCaller)
	m.wg.Wait()
	return nil
}

func (m *Monitor) closedErr() error {
	return fmt.Errorf("%w: %w", ErrClosed, m.closeErr)
}

// shutdown closes the monitor once, for the first cause reported.
func (m *Monitor) shutdown(cause error) {
	m.closeOnce.Do(func() {
		m.closeErr = cause
		close(m.done)
		// Disconnect closes the socket, which ends go-qemu's reader; it then drains
		// the reply stream until the reader has exited. The event goroutine keeps
		// draining events meanwhile, so the reader cannot block on either channel.
		m.sock.Disconnect()
		m.endSubscriptions(m.closedErr())
	})
}

// request states: whoever moves a request out of pending owns its file.
const (
	pending int32 = iota
	sent
	abandoned
)

type request struct {
	ctx     context.Context
	command string
	id      string
	payload []byte
	file    *os.File // a duplicate owned by the request, closed after use
	state   atomic.Int32
	reply   chan result // capacity 1: the owner never waits for the caller
}

type result struct {
	ret json.RawMessage
	err error
}

func (r *request) closeFile() {
	if r.file != nil {
		r.file.Close()
	}
}

// serve is the owner goroutine: the only one that talks to go-qemu.
func (m *Monitor) serve() {
	defer m.wg.Done()
	for {
		select {
		case <-m.done:
			return
		case req := <-m.requests:
			// A caller that gave up before its turn has abandoned the request;
			// sending it anyway would act on QEMU behind the caller's back.
			if req.ctx.Err() != nil || !req.state.CompareAndSwap(pending, sent) {
				continue
			}
			raw, err := m.sock.RunWithFile(req.payload, req.file)
			req.closeFile()
			res, fatal := m.interpret(req, raw, err)
			req.reply <- res
			if fatal != nil {
				m.shutdown(fatal)
				return
			}
		}
	}
}

// interpret turns go-qemu's answer into a result. fatal is set when the connection
// can no longer be trusted, and says why.
func (m *Monitor) interpret(req *request, raw []byte, err error) (res result, fatal error) {
	if err != nil {
		if cause := transportFailure(err); cause != nil {
			return result{err: fmt.Errorf("%w: %w", ErrClosed, cause)}, cause
		}
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			return result{err: &ReplyError{Source: req.command + " reply", Field: te.Field, Problem: te.Error()}}, nil
		}
		return result{err: &CommandError{Command: req.command, Desc: err.Error()}}, nil
	}
	var reply struct {
		ID     json.RawMessage `json:"id"`
		Return json.RawMessage `json:"return"`
	}
	if err := json.Unmarshal(raw, &reply); err != nil {
		return result{err: &ReplyError{Source: req.command + " reply", Field: "return", Problem: err.Error()}}, nil
	}
	if string(reply.ID) != strconv.Quote(req.id) {
		// Replies come in order; a foreign id means this reply stream is out of
		// step with the commands and every later answer would be misattributed.
		cause := fmt.Errorf("reply id %s does not match command id %q: stream out of step", reply.ID, req.id)
		return result{err: fmt.Errorf("%w: %w", ErrClosed, cause)}, cause
	}
	if len(reply.Return) == 0 {
		return result{err: &ReplyError{Source: req.command + " reply", Field: "return", Problem: "missing"}}, nil
	}
	return result{ret: reply.Return}, nil
}

// transportFailure recognises go-qemu errors that mean the connection is gone (it
// returns those unwrapped, and QMP error replies as plain errors.New(desc)).
func transportFailure(err error) error {
	var syntax *json.SyntaxError // go-qemu decoding the zero value of its closed reply channel
	var netErr net.Error
	var errno syscall.Errno
	switch {
	case errors.Is(err, bufio.ErrTooLong):
		return errors.New("reply longer than go-qemu's 64 KiB line limit")
	case errors.As(err, &syntax), errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return errConnectionClosed
	case errors.As(err, &netErr), errors.As(err, &errno), errors.Is(err, net.ErrClosed):
		return fmt.Errorf("connection failed: %w", err)
	}
	return nil
}

// call runs one command and returns its "return" member. args is marshalled as the
// command's arguments (nil for none); file, if not nil, is passed with the command
// (SCM_RIGHTS) and may be closed by the caller as soon as call returns.
func (m *Monitor) call(ctx context.Context, command string, args any, file *os.File) (json.RawMessage, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultCommandTimeout)
		defer cancel()
	}
	req := &request{
		ctx:     ctx,
		command: command,
		id:      "vmpod-" + strconv.FormatUint(m.nextID.Add(1), 10),
		reply:   make(chan result, 1),
	}
	payload, err := json.Marshal(struct {
		Execute   string `json:"execute"`
		Arguments any    `json:"arguments,omitempty"`
		ID        string `json:"id"`
	}{command, args, req.id})
	if err != nil {
		return nil, fmt.Errorf("encoding arguments: %w", err)
	}
	req.payload = payload
	if file != nil {
		if !m.canPass {
			return nil, errors.New("QEMU did not offer the oob capability that fd passing needs")
		}
		// The owner may send the command after the caller has returned and closed
		// its file, so the request carries its own duplicate.
		if req.file, err = dupFile(file); err != nil {
			return nil, err
		}
	}
	// Whoever moves the request out of pending owns its file.
	abandon := func() bool {
		if req.state.CompareAndSwap(pending, abandoned) {
			req.closeFile()
			return true
		}
		return false
	}
	select {
	case m.requests <- req:
	case <-ctx.Done():
		abandon()
		return nil, fmt.Errorf("%w: %w", ErrNotSent, ctx.Err())
	case <-m.done:
		abandon()
		return nil, m.closedErr()
	}
	select {
	case res := <-req.reply:
		return res.ret, res.err
	case <-ctx.Done():
		if abandon() {
			return nil, fmt.Errorf("%w: %w", ErrNotSent, ctx.Err())
		}
		return nil, fmt.Errorf("%w: %w", ErrNoReply, ctx.Err())
	case <-m.done:
		select {
		case res := <-req.reply: // answered just before the close
			return res.ret, res.err
		default:
		}
		abandon()
		return nil, m.closedErr()
	}
}

// dupFile duplicates f's descriptor without touching f's blocking mode (which
// f.Fd would switch to blocking).
func dupFile(f *os.File) (*os.File, error) {
	sc, err := f.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("duplicating %s: %w", f.Name(), err)
	}
	var dup int
	var dupErr error
	if err := sc.Control(func(fd uintptr) {
		dup, dupErr = fcntlDupCloexec(int(fd))
	}); err != nil {
		return nil, fmt.Errorf("duplicating %s: %w", f.Name(), err)
	}
	if dupErr != nil {
		return nil, fmt.Errorf("duplicating %s: %w", f.Name(), dupErr)
	}
	return os.NewFile(uintptr(dup), f.Name()), nil
}

// Execute runs any QMP command. args is marshalled as the command's arguments (nil
// for none). reply, if not nil, must point to a struct, slice or value the "return"
// member decodes into, with the strictness of the typed methods: struct fields
// whose json tag lacks omitempty are required.
func (m *Monitor) Execute(ctx context.Context, command string, args any, reply any) error {
	return m.run(ctx, command, "", args, reply)
}

// run is Execute for the typed methods: its errors read
// "qmp: <command> <subject>: ...", where subject names what the command acts on.
func (m *Monitor) run(ctx context.Context, command, subject string, args any, reply any) error {
	ret, err := m.call(ctx, command, args, nil)
	if err == nil && reply != nil {
		err = decodeStrict(command+" reply", "return", ret, reply)
	}
	if err != nil {
		return commandFailed(command, subject, err)
	}
	return nil
}

func commandFailed(command, subject string, err error) error {
	if subject == "" {
		return fmt.Errorf("qmp: %s: %w", command, err)
	}
	return fmt.Errorf("qmp: %s %s: %w", command, subject, err)
}

// idArgs are the arguments of the commands that take only an id.
type idArgs struct {
	ID string `json:"id"`
}
