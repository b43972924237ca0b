package channel

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/containerd/ttrpc"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
)

// fakePort behaves like the guest device of a virtio-serial port: reads return io.EOF
// while no host is attached, and bytes the guest writes while detached are dropped
// (QEMU's socket chardev discards them).
type fakePort struct {
	mu       sync.Mutex
	attached net.Conn
}

func newFakePort() *fakePort { return &fakePort{} }

// listen starts a Listener on port that is closed, and detached, when the test ends.
func listen(t *testing.T, port *fakePort) *Listener {
	l := Listen(port, t.Logf)
	t.Cleanup(func() {
		_ = l.Close()
		if c := port.conn(); c != nil {
			_ = c.Close()
		}
	})
	return l
}

// attach connects a new host and returns the host's end.
func (p *fakePort) attach() net.Conn {
	host, guest := net.Pipe()
	p.mu.Lock()
	p.attached = guest
	p.mu.Unlock()
	return host
}

func (p *fakePort) conn() net.Conn {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.attached
}

func (p *fakePort) Read(b []byte) (int, error) {
	c := p.conn()
	if c == nil {
		return 0, io.EOF
	}
	n, err := c.Read(b)
	if err != nil {
		p.mu.Lock()
		if p.attached == c {
			p.attached = nil
		}
		p.mu.Unlock()
		return n, io.EOF
	}
	return n, nil
}

func (p *fakePort) Write(b []byte) (int, error) {
	if c := p.conn(); c != nil {
		if _, err := c.Write(b); err == nil {
			return len(b), nil
		}
	}
	return len(b), nil
}

// echoServer accepts sessions and echoes their bytes back.
func echoServer(t *testing.T, l *Listener) {
	t.Helper()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(c, c) }()
		}
	}()
}

func dial(t *testing.T, raw net.Conn) *Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Client(ctx, raw)
	if err != nil {
		t.Fatalf("Client: %v", err)
	}
	return c
}

func roundTrip(t *testing.T, c net.Conn, msg []byte) {
	t.Helper()
	errc := make(chan error, 1)
	go func() { _, err := c.Write(msg); errc <- err }()
	got := make([]byte, len(msg))
	if err := c.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("read echo: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("write: %v", err)
	}
	if !bytes.Equal(got, msg) {
		t.Fatalf("echo mismatch: got %d bytes, want %d", len(got), len(msg))
	}
}

func TestEchoAcrossFrames(t *testing.T) {
	port := newFakePort()
	l := listen(t, port)
	echoServer(t, l)
	c := dial(t, port.attach())
	defer c.Close()

	roundTrip(t, c, []byte("hello"))
	big := make([]byte, 3*MaxPayload+123) // split into four frames
	_, _ = rand.Read(big)
	roundTrip(t, c, big)
}

func TestGarbageBeforeHandshakeIsSkipped(t *testing.T) {
	port := newFakePort()
	l := listen(t, port)
	echoServer(t, l)
	raw := port.attach()
	junk := make([]byte, 5000)
	_, _ = rand.Read(junk)
	junk = append(junk, magic[:]...) // a false start of a header
	if _, err := raw.Write(junk); err != nil {
		t.Fatal(err)
	}
	c := dial(t, raw)
	defer c.Close()
	roundTrip(t, c, []byte("after garbage"))
}

// A frame cut short by a vanished host swallows the start of the next HELLO as its
// payload; the host's HELLO retry must still get through.
func TestTruncatedFrameSwallowsHello(t *testing.T) {
	port := newFakePort()
	l := listen(t, port)
	echoServer(t, l)
	raw := port.attach()
	// The previous host's last bytes precede the new host's (QEMU's chardev delivers in order).
	partial := appendFrame(nil, frameData, 0xdead, make([]byte, 100))[:headerSize+10]
	if _, err := raw.Write(partial); err != nil {
		t.Fatal(err)
	}
	c := dial(t, raw)
	defer c.Close()
	roundTrip(t, c, []byte("resynced"))
}

func TestReconnectStartsNewSession(t *testing.T) {
	port := newFakePort()
	l := listen(t, port)

	sessions := make(chan net.Conn, 4)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			sessions <- c
			go func() { _, _ = io.Copy(c, c) }()
		}
	}()

	first := dial(t, port.attach())
	roundTrip(t, first, []byte("one"))
	old := <-sessions
	_ = first.Close()

	second := dial(t, port.attach())
	defer second.Close()
	roundTrip(t, second, []byte("two"))
	if second.Session() == first.Session() {
		t.Fatalf("reconnect reused session %08x", first.Session())
	}
	// The first session is over in the guest: its writes fail, its reads end.
	if _, err := old.Write([]byte("late")); !errors.Is(err, ErrSessionEnded) {
		t.Fatalf("write on replaced session: got %v, want ErrSessionEnded", err)
	}
	if _, err := old.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Fatalf("read on replaced session: got %v, want EOF", err)
	}
}

// Without a reconnect in between (a host that restarts faster than the guest notices),
// a second HELLO alone must replace the session, and the first session's late frames
// must not reach the new host.
func TestHelloReplacesSessionAndStaleFramesAreDropped(t *testing.T) {
	port := newFakePort()
	l := listen(t, port)
	sessions := make(chan net.Conn, 4)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			sessions <- c
		}
	}()
	raw := port.attach()
	first := dial(t, raw)
	guestFirst := <-sessions

	second := dial(t, raw) // same byte stream, new HELLO
	guestSecond := <-sessions

	// Inject a frame of the first session into the stream, then a real reply.
	go func() {
		stale := appendFrame(nil, frameData, first.Session(), []byte("stale"))
		_, _ = port.Write(stale)
		_, _ = guestSecond.Write([]byte("fresh"))
	}()
	got := make([]byte, 5)
	if _, err := io.ReadFull(second, got); err != nil {
		t.Fatal(err)
	}
	if string(got) != "fresh" {
		t.Fatalf("got %q, want the new session's bytes only", got)
	}
	if _, err := guestFirst.Write([]byte("x")); !errors.Is(err, ErrSessionEnded) {
		t.Fatalf("first session still writable: %v", err)
	}
}

func TestClientGivesUpWhenNobodyAnswers(t *testing.T) {
	host, guest := net.Pipe()
	defer host.Close()
	go func() { _, _ = io.Copy(io.Discard, guest) }() // a port with no agent behind it
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := Client(ctx, host)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v, want deadline exceeded", err)
	}
	if time.Since(start) > 2*time.Second {
		t.Fatalf("Client overran its context by %v", time.Since(start))
	}
}

// ttrpc runs unchanged on a session, and a reconnecting client gets answers again.
func TestTTRPCOverSessions(t *testing.T) {
	port := newFakePort()
	l := listen(t, port)
	server, err := ttrpc.NewServer()
	if err != nil {
		t.Fatal(err)
	}
	agentv1.RegisterAgentService(server, pingOnly{})
	go func() { _ = server.Serve(context.Background(), l) }()
	defer server.Close()

	for i := range 3 {
		c := dial(t, port.attach())
		client := ttrpc.NewClient(c)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		resp, err := agentv1.NewAgentClient(client).Ping(ctx, &agentv1.PingRequest{})
		cancel()
		if err != nil {
			t.Fatalf("connection %d: Ping: %v", i, err)
		}
		if resp.AgentVersion != "test" {
			t.Fatalf("connection %d: got version %q", i, resp.AgentVersion)
		}
		_ = client.Close()
	}
}

type pingOnly struct{ agentv1.AgentService }

func (pingOnly) Ping(context.Context, *agentv1.PingRequest) (*agentv1.PingResponse, error) {
	return &agentv1.PingResponse{AgentVersion: "test"}, nil
}

func FuzzFrameReader(f *testing.F) {
	f.Add(appendFrame(nil, frameData, 7, []byte("payload")))
	f.Add(append([]byte("VMPDjunk"), appendFrame(nil, frameHello, 1, nil)...))
	f.Fuzz(func(t *testing.T, b []byte) {
		fr := newFrameReader(bytes.NewReader(b))
		for {
			h, payload, err := fr.next()
			if err != nil {
				return
			}
			if int(h.length) != len(payload) || h.length > MaxPayload {
				t.Fatalf("frame %v with length %d carries %d bytes", h.typ, h.length, len(payload))
			}
		}
	})
}
