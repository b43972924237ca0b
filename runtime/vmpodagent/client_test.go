package vmpodagent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/ttrpc"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
)

// fakeStreams is one connection's view of a guest's stdout: the guest's bytes, and a
// connection that can be closed under a read in flight.
type fakeStreams struct {
	agentv1.AgentService
	data   []byte
	closed chan struct{}
	reads  chan struct{} // one value per read that reached the fake
}

func (f *fakeStreams) ReadStdout(ctx context.Context, req *agentv1.ReadStreamRequest) (*agentv1.ReadStreamResponse, error) {
	f.reads <- struct{}{}
	if req.Offset >= uint64(len(f.data)) {
		select { // a long poll: nothing new until the connection goes
		case <-f.closed:
			return nil, ttrpc.ErrClosed
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	end := min(req.Offset+3, uint64(len(f.data)))
	return &agentv1.ReadStreamResponse{Offset: req.Offset, Data: f.data[req.Offset:end], Eof: end == uint64(len(f.data)) && f.closed == nil}, nil
}

type closer struct {
	once sync.Once
	c    chan struct{}
}

func (c *closer) Close() error { c.once.Do(func() { close(c.c) }); return nil }

// A stream read in flight when its connection is replaced goes on, on the next one, from
// the offset it had reached: nothing lost, nothing twice.
func TestStreamResumesOnTheNextConnection(t *testing.T) {
	a := newClient("t", time.Second, nil)
	first := &closer{c: make(chan struct{})}
	conn1 := &fakeStreams{data: []byte("hello, "), closed: first.c, reads: make(chan struct{}, 100)}
	a.install(conn1, first)

	var out bytes.Buffer
	done := make(chan error, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	go func() {
		done <- copyFromGuest(ctx, &out, func(ctx context.Context, offset uint64) (resp *agentv1.ReadStreamResponse, err error) {
			err = a.resume(ctx, func(rpc agentv1.AgentService) error {
				resp, err = rpc.ReadStdout(ctx, &agentv1.ReadStreamRequest{Offset: offset})
				return err
			})
			return resp, err
		}, nil)
	}()
	// three reads deliver "hello, "; the fourth waits for more
	for range 4 {
		<-conn1.reads
	}
	// the second connection has the whole stream, which then ends
	conn2 := &fakeStreams{data: []byte("hello, world"), reads: make(chan struct{}, 100)}
	a.install(conn2, &closer{c: make(chan struct{})})
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if out.String() != "hello, world" {
		t.Errorf("host got %q, want %q", out.String(), "hello, world")
	}
}

// Only a closed connection is retried; a failed call is the caller's, and a closed
// connection nobody replaces ends with the context or the guest.
func TestResumeRetriesOnlyAClosedConnection(t *testing.T) {
	gone := make(chan struct{})
	a := newClient("t", time.Second, gone)
	a.install(&fakeStreams{}, nil)
	calls := 0
	failed := fmt.Errorf("the guest said no")
	if err := a.resume(context.Background(), func(agentv1.AgentService) error { calls++; return failed }); !errors.Is(err, failed) || calls != 1 {
		t.Errorf("resume of a failing call: %v after %d calls, want the call's error after 1", err, calls)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	calls = 0
	if err := a.resume(ctx, func(agentv1.AgentService) error { calls++; return ttrpc.ErrClosed }); !errors.Is(err, ttrpc.ErrClosed) || calls != 1 {
		t.Errorf("resume with no new connection: %v after %d calls, want ttrpc.ErrClosed after 1", err, calls)
	}
	close(gone)
	calls = 0
	if err := a.resume(context.Background(), func(agentv1.AgentService) error { calls++; return ttrpc.ErrClosed }); !errors.Is(err, ttrpc.ErrClosed) || calls != 1 {
		t.Errorf("resume once the guest is gone: %v after %d calls, want ttrpc.ErrClosed after 1", err, calls)
	}
}

// A guest still on its way (Await) has no agent session: every call fails at once,
// FailedPrecondition, saying so, and makes none.
func TestCallsBeforeTheGuestArrivedAreRefused(t *testing.T) {
	a := newClient("t", time.Second, make(chan struct{}))
	if _, err := a.Ping(context.Background()); !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "has not arrived") {
		t.Errorf("ping: %v, want FailedPrecondition: the guest has not arrived", err)
	}
	calls := 0
	if err := a.resume(context.Background(), func(agentv1.AgentService) error { calls++; return nil }); !errdefs.IsFailedPrecondition(err) || calls != 0 {
		t.Errorf("resume: %v after %d calls, want FailedPrecondition after none", err, calls)
	}
}

// A copy that starts where another reader stopped (a migration's source) asks the guest
// from there, and records how far it wrote: the next reader's start.
func TestCopyFromGuestGoesOnWhereAnotherStopped(t *testing.T) {
	stream := []byte("written at the source|written at the target")
	read := func(_ context.Context, offset uint64) (*agentv1.ReadStreamResponse, error) {
		end := min(offset+8, uint64(len(stream)))
		return &agentv1.ReadStreamResponse{Offset: offset, Data: stream[offset:end], Eof: end == uint64(len(stream))}, nil
	}
	var pos atomic.Uint64
	pos.Store(uint64(len("written at the source|")))
	var out bytes.Buffer
	if err := copyFromGuest(context.Background(), &out, read, &pos); err != nil {
		t.Fatal(err)
	}
	if out.String() != "written at the target" || pos.Load() != uint64(len(stream)) {
		t.Errorf("copied %q up to %d, want the rest from where the other stopped, to %d", out.String(), pos.Load(), len(stream))
	}
}
