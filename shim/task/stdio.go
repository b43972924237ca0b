package task

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/fifo"

	"github.com/vmpod/vmpod/internal/cleanup"
	"github.com/vmpod/vmpod/runtime"
)

// loggerReadyWait bounds how long a binary:// logger may take to signal it is ready.
const loggerReadyWait = 10 * time.Second

// stdinDrainWait bounds how long CloseIO waits for the stdin reader to take what is left in
// the FIFO: a process that never reads its stdin must not hold the RPC.
const stdinDrainWait = time.Second

// stdioPaths is what containerd asked for: FIFO paths or binary:// / file:// URIs.
type stdioPaths struct {
	stdin, stdout, stderr string
	terminal              bool
}

// hostIO is a process's stdio on the host, opened. Output is closed once the process's
// output has been copied, which is the EOF containerd's readers wait for.
type hostIO struct {
	stdin          *drainingReader
	stdout, stderr io.WriteCloser
	// readEnds of the output FIFOs, held (never read) so a write does not fail while
	// containerd restarts: its data waits in the FIFO for the next containerd's reader
	readEnds     []io.Closer
	logger       *exec.Cmd // a binary:// logging process, if any
	outputClosed sync.Once // at the output's end and at delete, whichever is first
}

// openIO opens stdio as containerd described it. Every opened end is closed again if a
// later one fails.
func openIO(ctx context.Context, containerID, namespace string, p stdioPaths) (_ *hostIO, err error) {
	h := &hostIO{}
	var undo cleanup.Stack
	defer func() {
		if err != nil {
			_ = undo.Run()
		}
	}()
	if p.stdin != "" {
		// Not the RPC's ctx: the FIFO opens (in the background) only once containerd opens
		// its end, which may be after the Exec RPC returned, and a ctx that ends first
		// closes the FIFO unopened (measured: an exec's stdin lost, "reading from a closed
		// fifo"). closeStdin and close end it; containerd's runc shim does the same.
		f, err := fifo.OpenFifo(context.Background(), p.stdin, syscall.O_RDONLY|syscall.O_NONBLOCK, 0)
		if err != nil {
			return nil, fmt.Errorf("stdin %s: %w", p.stdin, err)
		}
		undo.Add("close stdin", f.Close)
		h.stdin = &drainingReader{ReadCloser: f, drained: make(chan struct{})}
	}
	u, err := url.Parse(p.stdout)
	if err != nil {
		return nil, fmt.Errorf("stdout %q: %w", p.stdout, err)
	}
	switch u.Scheme {
	case "", "fifo":
		for _, out := range []struct {
			path string
			dst  *io.WriteCloser
		}{{p.stdout, &h.stdout}, {p.stderr, &h.stderr}} {
			if out.path == "" {
				continue
			}
			f, err := fifo.OpenFifo(ctx, out.path, syscall.O_WRONLY, 0)
			if err != nil {
				return nil, fmt.Errorf("open %s: %w", out.path, err)
			}
			undo.Add("close "+out.path, f.Close)
			*out.dst = f
			// containerd's own shims do the same: without a reader of its own a write while
			// containerd is away fails (EPIPE) and the copy from the guest gives up
			r, err := fifo.OpenFifo(ctx, out.path, syscall.O_RDONLY|syscall.O_NONBLOCK, 0)
			if err != nil {
				return nil, fmt.Errorf("open %s: %w", out.path, err)
			}
			undo.Add("close the read end of "+out.path, r.Close)
			h.readEnds = append(h.readEnds, r)
		}
	case "file":
		f, err := openLogFile(u.Path)
		if err != nil {
			return nil, err
		}
		undo.Add("close "+u.Path, f.Close)
		h.stdout, h.stderr = f, nopCloser{f} // one file, closed once
	case "binary":
		if err := h.startLogger(ctx, u, containerID, namespace, &undo); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("stdout %q: unsupported scheme %q (want a FIFO path, binary:// or file://)", p.stdout, u.Scheme)
	}
	if p.terminal {
		// a terminal's output is one stream
		h.stderr = nil
	}
	return h, nil
}

func openLogFile(path string) (*os.File, error) {
	if path == "" {
		return nil, errors.New("file:// log URI without a path")
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
	if err != nil {
		return nil, fmt.Errorf("log file: %w", err)
	}
	return f, nil
}

// startLogger runs a binary:// logger the containerd way: stdout and stderr as fds 3 and
// 4, a pipe on fd 5 it closes once ready, CONTAINER_ID and CONTAINER_NAMESPACE set.
func (h *hostIO) startLogger(ctx context.Context, u *url.URL, containerID, namespace string, undo *cleanup.Stack) error {
	outR, outW, err := os.Pipe()
	if err != nil {
		return err
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		_ = outR.Close()
		_ = outW.Close()
		return err
	}
	readyR, readyW, err := os.Pipe()
	if err != nil {
		for _, f := range []*os.File{outR, outW, errR, errW} {
			_ = f.Close()
		}
		return err
	}
	var args []string
	for k, vs := range u.Query() {
		args = append(args, k)
		if len(vs) > 0 && vs[0] != "" {
			args = append(args, vs[0])
		}
	}
	cmd := exec.Command(u.Path, args...)
	cmd.Env = append(os.Environ(), "CONTAINER_ID="+containerID, "CONTAINER_NAMESPACE="+namespace)
	cmd.ExtraFiles = []*os.File{outR, errR, readyW}
	err = cmd.Start()
	// the logger holds its own copies now
	for _, f := range []*os.File{outR, errR, readyW} {
		_ = f.Close()
	}
	if err != nil {
		_ = outW.Close()
		_ = errW.Close()
		_ = readyR.Close()
		return fmt.Errorf("start logger %s: %w", u.Path, err)
	}
	undo.Add("stop logger", func() error { _ = cmd.Process.Kill(); _ = cmd.Wait(); return nil })
	undo.Add("close logger pipes", func() error { _ = outW.Close(); return errW.Close() })
	ready := make(chan error, 1)
	go func() {
		_, err := io.Copy(io.Discard, readyR) // EOF when the logger closes fd 5
		_ = readyR.Close()
		ready <- err
	}()
	select {
	case err := <-ready:
		if err != nil {
			return fmt.Errorf("logger %s: %w", u.Path, err)
		}
	case <-time.After(loggerReadyWait):
		_ = readyR.Close()
		return fmt.Errorf("logger %s: not ready after %v", u.Path, loggerReadyWait)
	case <-ctx.Done():
		_ = readyR.Close()
		return ctx.Err()
	}
	h.stdout, h.stderr, h.logger = outW, errW, cmd
	return nil
}

// stdio is what the runtime pumps to and from the guest process.
func (h *hostIO) stdio(terminal bool) runtime.Stdio {
	s := runtime.Stdio{Terminal: terminal}
	if h.stdin != nil {
		s.Stdin = h.stdin
	}
	if h.stdout != nil {
		s.Stdout = h.stdout
	}
	if h.stderr != nil {
		s.Stderr = h.stderr
	}
	return s
}

// closeOutput ends the output streams, once; a logger exits when it reads their end.
func (h *hostIO) closeOutput() { h.outputClosed.Do(h.closeOutputOnce) }

func (h *hostIO) closeOutputOnce() {
	for _, w := range []io.Closer{h.stdout, h.stderr} {
		if w != nil {
			_ = w.Close()
		}
	}
	for _, r := range h.readEnds {
		_ = r.Close()
	}
	if h.logger != nil {
		done := make(chan struct{})
		go func() { _ = h.logger.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(loggerReadyWait):
			_ = h.logger.Process.Kill()
			<-done
		}
		h.logger = nil
	}
}

// closeStdin ends the stdin FIFO once its reader has drained it: containerd sends CloseIO
// after its last write, and closing the FIFO at once would drop what the reader had not
// read yet (measured: a VM exec's JSON request, lost now and then). Kata's shim waits for
// its stdin copy the same way.
func (h *hostIO) closeStdin() {
	if h.stdin == nil {
		return
	}
	select {
	case <-h.stdin.drained:
	case <-time.After(stdinDrainWait):
	}
	_ = h.stdin.Close()
}

// endStdin closes the stdin FIFO at once: the process is gone, nobody will read it.
func (h *hostIO) endStdin() {
	if h.stdin != nil {
		_ = h.stdin.Close()
	}
}

// drainingReader is the stdin FIFO, noting when a read has reached its end (every writer
// gone and the buffer empty) or failed.
type drainingReader struct {
	io.ReadCloser
	once    sync.Once
	drained chan struct{}
}

func (r *drainingReader) Read(p []byte) (int, error) {
	n, err := r.ReadCloser.Read(p)
	if err != nil {
		r.once.Do(func() { close(r.drained) })
	}
	return n, err
}

func (h *hostIO) close() {
	h.endStdin()
	h.closeOutput()
}

type nopCloser struct{ io.Writer }

func (nopCloser) Close() error { return nil }
