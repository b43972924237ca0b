package qmptest

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Command is a command the fake server received.
type Command struct {
	Execute   string          `json:"execute"`
	Arguments json.RawMessage `json:"arguments,omitempty"`
	ID        json.RawMessage `json:"id,omitempty"`
	// Files are the descriptors passed with the command (SCM_RIGHTS). The
	// server closes them when the test ends.
	Files []*os.File `json:"-"`
}

// Server is a fake QMP server on a unix socket that accepts one client. It greets
// and answers qmp_capabilities by itself; every later command is handed to the
// test (Next), which scripts the answer (Reply, ReplyError, Event, WriteLine,
// Hangup) in any order and interleaving it likes.
type Server struct {
	// Path is the socket to Dial.
	Path string

	t        testing.TB
	ln       *net.UnixListener
	greet    bool
	caps     []string
	commands chan Command
	accepted chan struct{}
	gone     chan struct{} // closed when the client connection has ended

	mu      sync.Mutex
	conn    *net.UnixConn
	files   []*os.File // received, not yet attached to a command
	allFDs  []*os.File
	writeMu sync.Mutex
}

// Option configures a Server.
type Option func(*Server)

// WithoutGreeting makes the server accept connections but never greet, like a QEMU
// whose monitor is busy with another client.
func WithoutGreeting() Option { return func(s *Server) { s.greet = false } }

// AtPath makes the server listen on path instead of a fresh temporary socket.
func AtPath(path string) Option { return func(s *Server) { s.Path = path } }

// WithCapabilities sets the capabilities the greeting offers (default: "oob",
// which fd passing requires).
func WithCapabilities(caps ...string) Option { return func(s *Server) { s.caps = caps } }

// NewServer starts a fake QMP server; it stops when the test ends.
func NewServer(t testing.TB, opts ...Option) *Server {
	t.Helper()
	// A short directory: t.TempDir() under a long test name can exceed the
	// 107 bytes a unix socket path may have.
	dir, err := os.MkdirTemp("", "qmptest")
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{
		Path:     filepath.Join(dir, "qmp.sock"),
		t:        t,
		greet:    true,
		caps:     []string{"oob"},
		commands: make(chan Command, 100),
		accepted: make(chan struct{}),
		gone:     make(chan struct{}),
	}
	for _, o := range opts {
		o(s)
	}
	s.ln, err = net.ListenUnix("unix", &net.UnixAddr{Name: s.Path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	go s.serve()
	t.Cleanup(func() {
		s.ln.Close()
		s.Hangup()
		s.mu.Lock()
		for _, f := range s.allFDs {
			f.Close()
		}
		s.mu.Unlock()
		os.RemoveAll(dir)
	})
	return s
}

func (s *Server) serve() {
	conn, err := s.ln.AcceptUnix()
	if err != nil {
		return
	}
	s.mu.Lock()
	s.conn = conn
	s.mu.Unlock()
	close(s.accepted)
	if !s.greet {
		io.Copy(io.Discard, conn)
		close(s.gone)
		return
	}
	s.send(map[string]any{"QMP": map[string]any{
		"version":      map[string]any{"qemu": map[string]int{"major": 7, "minor": 2, "micro": 22}, "package": "qmptest"},
		"capabilities": s.caps,
	}})
	pr, pw := io.Pipe()
	go s.readMessages(conn, pw)
	dec := json.NewDecoder(pr)
	for {
		var c Command
		if err := dec.Decode(&c); err != nil {
			close(s.commands)
			close(s.gone)
			return
		}
		s.mu.Lock()
		c.Files, s.files = s.files, nil
		s.mu.Unlock()
		if c.Execute == "qmp_capabilities" {
			s.Reply(c, struct{}{})
			continue
		}
		s.commands <- c
	}
}

// readMessages copies the byte stream to w, collecting passed descriptors. It
// queues them before writing the bytes they came with, so the decoder attaches
// them to the right command.
func (s *Server) readMessages(conn *net.UnixConn, w *io.PipeWriter) {
	buf := make([]byte, 64<<10)
	oob := make([]byte, unix.CmsgSpace(4*16))
	for {
		n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
		if oobn > 0 {
			s.collectFiles(oob[:oobn])
		}
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			w.CloseWithError(err)
			return
		}
	}
}

func (s *Server) collectFiles(oob []byte) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, m := range msgs {
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			f := os.NewFile(uintptr(fd), fmt.Sprintf("passed-fd-%d", fd))
			s.files = append(s.files, f)
			s.allFDs = append(s.allFDs, f)
		}
	}
}

// WaitConnected waits until a client has connected.
func (s *Server) WaitConnected() {
	s.t.Helper()
	select {
	case <-s.accepted:
	case <-time.After(5 * time.Second):
		s.t.Fatal("qmptest: no client connected within 5s")
	}
}

// Disconnected is closed once the client has closed its connection (or Hangup was
// called) and the server has read everything it sent.
func (s *Server) Disconnected() <-chan struct{} { return s.gone }

// Commands delivers the commands the client sends, for a goroutine that answers
// them (Next and Expect fail the test, so they belong to the test's goroutine).
func (s *Server) Commands() <-chan Command { return s.commands }

// Next returns the next command the client sent, failing the test if none arrives
// within 5 seconds or the connection ends first.
func (s *Server) Next() Command {
	s.t.Helper()
	select {
	case c, ok := <-s.commands:
		if !ok {
			s.t.Fatal("qmptest: connection ended while waiting for a command")
		}
		return c
	case <-time.After(5 * time.Second):
		s.t.Fatal("qmptest: no command within 5s")
	}
	return Command{}
}

// Expect is Next, failing the test unless the command is named execute.
func (s *Server) Expect(execute string) Command {
	s.t.Helper()
	c := s.Next()
	if c.Execute != execute {
		s.t.Fatalf("qmptest: got command %q (arguments %s), want %q", c.Execute, c.Arguments, execute)
	}
	return c
}

// NoCommand fails the test if a command arrives within d.
func (s *Server) NoCommand(d time.Duration) {
	s.t.Helper()
	select {
	case c, ok := <-s.commands:
		if ok {
			s.t.Fatalf("qmptest: unexpected command %q (arguments %s)", c.Execute, c.Arguments)
		}
	case <-time.After(d):
	}
}

// Reply answers c successfully with ret as its "return" member.
func (s *Server) Reply(c Command, ret any) {
	s.send(map[string]any{"return": ret, "id": c.ID})
}

// ReplyError answers c with a QMP error.
func (s *Server) ReplyError(c Command, class, desc string) {
	s.send(map[string]any{"error": map[string]string{"class": class, "desc": desc}, "id": c.ID})
}

// Event sends an event with the given data (nil for none).
func (s *Server) Event(name string, data any) {
	now := time.Now()
	msg := map[string]any{
		"event":     name,
		"timestamp": map[string]int64{"seconds": now.Unix(), "microseconds": int64(now.Nanosecond() / 1000)},
	}
	if data != nil {
		msg["data"] = data
	}
	s.send(msg)
}

// WriteLine writes line and a newline verbatim: for malformed replies.
func (s *Server) WriteLine(line string) {
	s.write([]byte(line + "\n"))
}

// Hangup closes the client connection, as a QEMU that exits does.
func (s *Server) Hangup() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn != nil {
		s.conn.Close()
	}
}

func (s *Server) send(v any) {
	b, err := json.Marshal(v)
	if err != nil {
		panic(fmt.Sprintf("qmptest: %v", err)) // the test passed something unencodable
	}
	s.write(append(b, '\n'))
}

func (s *Server) write(b []byte) {
	s.mu.Lock()
	conn := s.conn
	s.mu.Unlock()
	if conn == nil {
		return
	}
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	conn.Write(b) // a client that has gone is the test's business, seen on its side
}
