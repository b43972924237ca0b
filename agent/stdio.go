package agent

import (
	"fmt"
	"io"
	"os"
	"os/exec"

	"github.com/containerd/console"
	runc "github.com/containerd/go-runc"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
	"github.com/vmpod/vmpod/agent/stream"
)

// stdio prepares a process's standard streams before runc starts it: pipes for the streams
// the host will attach, /dev/null for the rest, or a pty that runc hands back through a
// console socket.
type stdio struct {
	req *agentv1.Stdio

	pipes   *pipeIO      // without a terminal
	console *runc.Socket // with a terminal, for runc to send the pty master through
	master  *os.File     // with a terminal the agent opened itself (nsExec)
}

func newStdio(req *agentv1.Stdio, uid, gid int) (*stdio, error) {
	if req == nil {
		req = &agentv1.Stdio{}
	}
	s := &stdio{req: req}
	var err error
	if req.Terminal {
		s.console, err = runc.NewTempConsoleSocket()
		if err != nil {
			return nil, fmt.Errorf("console socket: %w", err)
		}
		return s, nil
	}
	s.pipes, err = newPipeIO(req, uid, gid)
	if err != nil {
		return nil, err
	}
	return s, nil
}

// attach moves the agent's ends into p once runc has started the process. For a terminal
// it receives the pty master runc sent and applies the requested size.
func (s *stdio) attach(p *process) error {
	if s.req.Terminal {
		var master console.Console
		var err error
		if s.master != nil {
			master, err = console.ConsoleFromFile(s.master) // the agent's own (nsExec)
		} else {
			master, err = s.console.ReceiveMaster() // runc's
		}
		if err != nil {
			return fmt.Errorf("pty master: %w", err)
		}
		s.master = nil // p owns it now
		p.pty = master
		if s.req.Width > 0 && s.req.Height > 0 {
			if err := p.resize(s.req.Width, s.req.Height); err != nil {
				return err
			}
		}
		p.stdout = stream.NewOutput(0)
		go p.stdout.Pump(master)
		if s.req.Stdin {
			// ^D at the start of a line is end-of-file for a terminal's reader; closing
			// the master instead would hang up the whole session.
			p.stdin = stream.NewInput(master, func() error { _, err := master.Write([]byte{4}); return err })
		}
		return nil
	}
	pi := s.pipes
	if pi.parentIn != nil {
		p.stdin = stream.NewInput(pi.parentIn, nil)
		pi.parentIn = nil
	}
	if pi.parentOut != nil {
		p.stdout = stream.NewOutput(0)
		go pumpAndClose(p.stdout, pi.parentOut)
		pi.parentOut = nil
	}
	if pi.parentErr != nil {
		p.stderr = stream.NewOutput(0)
		go pumpAndClose(p.stderr, pi.parentErr)
		pi.parentErr = nil
	}
	return nil
}

func pumpAndClose(o *stream.Output, f *os.File) {
	o.Pump(f)
	_ = f.Close()
}

// close releases whatever attach did not take (all of it, if runc failed).
func (s *stdio) close() {
	if s.console != nil {
		_ = s.console.Close()
	}
	if s.master != nil {
		_ = s.master.Close()
	}
	if s.pipes != nil {
		_ = s.pipes.Close()
	}
}

// runcIO is what runc's own stdio should be: the child ends of the pipes, or nothing for
// a terminal (runc then reports its errors through its captured output).
func (s *stdio) runcIO() runc.IO {
	if s.pipes == nil {
		return nil
	}
	return s.pipes
}

// pipeIO implements runc.IO with the streams of an agentv1.Stdio request.
type pipeIO struct {
	child                          [3]*os.File // stdin, stdout, stderr as runc passes them on
	parentIn, parentOut, parentErr *os.File
}

var _ runc.StartCloser = (*pipeIO)(nil)

func newPipeIO(req *agentv1.Stdio, uid, gid int) (_ *pipeIO, err error) {
	p := &pipeIO{}
	defer func() {
		if err != nil {
			_ = p.Close()
		}
	}()
	for i, want := range []bool{req.Stdin, req.Stdout, req.Stderr} {
		if !want {
			// Each stream gets its own /dev/null: runc's child must not share a file
			// the agent closes.
			if p.child[i], err = os.OpenFile(os.DevNull, os.O_RDWR, 0); err != nil {
				return nil, err
			}
			continue
		}
		r, w, err := os.Pipe()
		if err != nil {
			return nil, fmt.Errorf("stdio pipe: %w", err)
		}
		child, parent := w, r
		if i == 0 {
			child, parent = r, w
		}
		p.child[i] = child
		switch i {
		case 0:
			p.parentIn = parent
		case 1:
			p.parentOut = parent
		case 2:
			p.parentErr = parent
		}
		// A process that is not root must be able to reopen /proc/self/fd/N
		// (e.g. `echo > /dev/stdout`), which checks the pipe's owner.
		if err := child.Chown(uid, gid); err != nil {
			return nil, fmt.Errorf("stdio pipe chown %d:%d: %w", uid, gid, err)
		}
	}
	return p, nil
}

func (p *pipeIO) Set(cmd *exec.Cmd) {
	cmd.Stdin, cmd.Stdout, cmd.Stderr = p.child[0], p.child[1], p.child[2]
}

// CloseAfterStart closes the child ends: the process holds its own copies now, and the
// agent's reads must see EOF when the process's last copy closes.
func (p *pipeIO) CloseAfterStart() error {
	for i, f := range p.child {
		if f != nil {
			_ = f.Close()
			p.child[i] = nil
		}
	}
	return nil
}

func (p *pipeIO) Close() error {
	_ = p.CloseAfterStart()
	for _, f := range []*os.File{p.parentIn, p.parentOut, p.parentErr} {
		if f != nil {
			_ = f.Close()
		}
	}
	p.parentIn, p.parentOut, p.parentErr = nil, nil, nil
	return nil
}

func (p *pipeIO) Stdin() io.WriteCloser { return p.parentIn }
func (p *pipeIO) Stdout() io.ReadCloser { return p.parentOut }
func (p *pipeIO) Stderr() io.ReadCloser { return p.parentErr }
