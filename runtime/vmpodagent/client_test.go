package vmpodagent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/containerd/ttrpc"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
	"github.com/vmpod/vmpod/runtime"
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
		})
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
	a.install(nil, nil)
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

// slowRemove is a guest whose RemoveProcess answers only when released.
type slowRemove struct {
	agentv1.AgentService
	release chan struct{}
	removed chan *agentv1.ProcessRequest
	execs   chan *agentv1.ExecProcessRequest
}

func (f *slowRemove) ExecProcess(ctx context.Context, req *agentv1.ExecProcessRequest) (*agentv1.ExecProcessResponse, error) {
	f.execs <- req
	return &agentv1.ExecProcessResponse{Pid: 8}, nil
}

func (f *slowRemove) RemoveProcess(ctx context.Context, req *agentv1.ProcessRequest) (*agentv1.Empty, error) {
	select {
	case <-f.release:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	f.removed <- req
	return &agentv1.Empty{}, nil
}

// Removing an exec does not wait for the guest (an ExecSync waits for it), and the guest
// is still told to forget that exec, even when the caller's context ends at once.
func TestExecRemoveDoesNotWaitForTheGuest(t *testing.T) {
	a := newClient("t", 10*time.Second, nil)
	guest := &slowRemove{release: make(chan struct{}), removed: make(chan *agentv1.ProcessRequest, 1)}
	a.install(guest, &closer{c: make(chan struct{})})
	p := newProcess(a, "c1", "e1", 7, runtime.Stdio{})
	ctx, cancel := context.WithCancel(context.Background())
	returned := make(chan error, 1)
	go func() { returned <- p.Remove(ctx) }()
	select {
	case err := <-returned:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Remove waited for the guest's answer")
	}
	cancel() // the caller's call is over
	close(guest.release)
	select {
	case req := <-guest.removed:
		if req.ContainerId != "c1" || req.ExecId != "e1" {
			t.Errorf("the guest was told to remove %s/%s, want c1/e1", req.ContainerId, req.ExecId)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the guest was never told to remove the exec")
	}
}

// An exec whose id is used again (ctr exec --exec-id) right after its removal reaches the
// guest only once the guest was told to forget the first: it would find it there.
func TestExecIDUsedAgainWaitsForTheRemoval(t *testing.T) {
	a := newClient("t", 10*time.Second, nil)
	guest := &slowRemove{release: make(chan struct{}), removed: make(chan *agentv1.ProcessRequest, 1),
		execs: make(chan *agentv1.ExecProcessRequest, 2)}
	a.install(guest, &closer{c: make(chan struct{})})
	if err := newProcess(a, "c1", "e1", 7, runtime.Stdio{}).Remove(context.Background()); err != nil {
		t.Fatal(err)
	}
	execErr := make(chan error, 1)
	go func() {
		_, err := a.execProcess(context.Background(), "c1", "e1", &specs.Process{Args: []string{"true"}}, &agentv1.Stdio{})
		execErr <- err
	}()
	select {
	case <-guest.execs:
		t.Fatal("the exec reached the guest before the removal of the one of the same id")
	case <-time.After(200 * time.Millisecond):
	}
	close(guest.release)
	<-guest.removed
	if err := <-execErr; err != nil {
		t.Fatal(err)
	}
	if req := <-guest.execs; req.ContainerId != "c1" || req.ExecId != "e1" {
		t.Errorf("exec %s/%s reached the guest, want c1/e1", req.ContainerId, req.ExecId)
	}
	// another id does not wait
	if _, err := a.execProcess(context.Background(), "c1", "e2", &specs.Process{Args: []string{"true"}}, &agentv1.Stdio{}); err != nil {
		t.Fatal(err)
	}
}
