package channel

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// disconnectedPoll is how often the guest re-reads a port with no host connected: such a
// port returns EOF at once and poll() reports POLLHUP continuously, so there is no edge
// to wait for.
const disconnectedPoll = 5 * time.Millisecond

// ErrSessionEnded is returned by a guest session after the host started another one or
// went away.
var ErrSessionEnded = errors.New("channel: session ended")

// Listener is the guest end of the port. Accept returns one net.Conn per host session;
// at most one session is live at a time.
type Listener struct {
	port io.ReadWriter
	logf func(format string, args ...any)

	wmu  sync.Mutex // serialises frames on the port
	wbuf []byte

	mu      sync.Mutex
	current *session

	accept chan *session
	done   chan struct{}
	err    error // why done was closed
	closed bool
}

// Listen serves port, whose reads return io.EOF while no host is connected (the blocking
// guest device of a virtio-serial port behaves so). logf receives session changes.
func Listen(port io.ReadWriter, logf func(format string, args ...any)) *Listener {
	if logf == nil {
		logf = func(string, ...any) {}
	}
	l := &Listener{
		port:   port,
		logf:   logf,
		accept: make(chan *session, 1),
		done:   make(chan struct{}),
	}
	go l.readLoop()
	return l
}

func (l *Listener) readLoop() {
	fr := newFrameReader(l.port)
	for {
		h, payload, err := fr.next()
		if l.isClosed() {
			return
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			l.endSession("host disconnected")
			time.Sleep(disconnectedPoll)
			continue
		}
		if err != nil {
			l.fail(fmt.Errorf("channel: read port: %w", err))
			return
		}
		switch h.typ {
		case frameHello:
			l.hello(h.session)
		case frameData:
			if s := l.session(h.session); s != nil {
				s.deliver(payload)
			}
		}
	}
}

// hello starts session id, or repeats WELCOME if id is already the current session
// (the host resends HELLO until it sees an answer).
func (l *Listener) hello(id uint32) {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return
	}
	if l.current == nil || l.current.id != id {
		if l.current != nil {
			l.logf("channel: session %08x replaced by %08x", l.current.id, id)
			l.current.end()
		}
		s := newSession(l, id)
		l.current = s
		// Hand it to Accept; a session nobody accepted yet is stale now.
		select {
		case old := <-l.accept:
			old.end()
		default:
		}
		l.accept <- s
	}
	l.mu.Unlock()
	if err := l.writeFrame(frameWelcome, id, nil); err != nil {
		l.logf("channel: WELCOME %08x: %v", id, err)
	}
}

func (l *Listener) session(id uint32) *session {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.current != nil && l.current.id == id {
		return l.current
	}
	return nil
}

func (l *Listener) endSession(why string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.current != nil {
		l.logf("channel: session %08x ended: %s", l.current.id, why)
		l.current.end()
		l.current = nil
	}
}

func (l *Listener) fail(err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.stop(err)
}

// stop ends the listener; l.mu is held.
func (l *Listener) stop(err error) {
	if l.current != nil {
		l.current.end()
		l.current = nil
	}
	if !l.closed {
		l.closed = true
		l.err = err
		close(l.done)
	}
}

func (l *Listener) isClosed() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.closed
}

func (l *Listener) writeFrame(typ frameType, id uint32, payload []byte) error {
	l.wmu.Lock()
	defer l.wmu.Unlock()
	l.wbuf = appendFrame(l.wbuf[:0], typ, id, payload)
	_, err := l.port.Write(l.wbuf)
	return err
}

// Accept waits for the host to start a session.
func (l *Listener) Accept() (net.Conn, error) {
	select {
	case s := <-l.accept:
		return s, nil
	case <-l.done:
		return nil, l.err
	}
}

// Close ends the current session and makes Accept fail. The goroutine reading the port
// stops after its read in progress returns.
func (l *Listener) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.stop(net.ErrClosed)
	return nil
}
func (l *Listener) Addr() net.Addr { return portAddr("virtio-serial") }

type portAddr string

func (a portAddr) Network() string { return "virtio-serial" }
func (a portAddr) String() string  { return string(a) }

// session is the guest end of one host session.
type session struct {
	l  *Listener
	id uint32

	incoming chan []byte
	pending  []byte
	ended    chan struct{}
	once     sync.Once
}

var _ net.Conn = (*session)(nil)

func newSession(l *Listener, id uint32) *session {
	return &session{l: l, id: id, incoming: make(chan []byte, 64), ended: make(chan struct{})}
}

func (s *session) end() { s.once.Do(func() { close(s.ended) }) }

// deliver queues a copy of payload; it blocks (back-pressure to the host) while the
// server is behind, unless the session ends.
func (s *session) deliver(payload []byte) {
	b := append([]byte(nil), payload...)
	select {
	case s.incoming <- b:
	case <-s.ended:
	}
}

func (s *session) Read(p []byte) (int, error) {
	for len(s.pending) == 0 {
		select {
		case <-s.ended:
			return 0, io.EOF
		case b := <-s.incoming:
			s.pending = b
		}
	}
	n := copy(p, s.pending)
	s.pending = s.pending[n:]
	return n, nil
}

func (s *session) Write(p []byte) (int, error) {
	s.l.wmu.Lock()
	defer s.l.wmu.Unlock()
	select {
	case <-s.ended:
		return 0, ErrSessionEnded
	default:
	}
	return writeFrames(s.l.port, &s.l.wbuf, s.id, p)
}

func (s *session) Close() error                     { s.end(); return nil }
func (s *session) LocalAddr() net.Addr              { return portAddr("guest") }
func (s *session) RemoteAddr() net.Addr             { return portAddr(fmt.Sprintf("host session %08x", s.id)) }
func (s *session) SetDeadline(time.Time) error      { return nil }
func (s *session) SetReadDeadline(time.Time) error  { return nil }
func (s *session) SetWriteDeadline(time.Time) error { return nil }
