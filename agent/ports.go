package agent

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"sync"
	"time"

	"github.com/containerd/errdefs"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
	"github.com/vmpod/vmpod/agent/stream"
)

// portDialTimeout bounds the connect to a guest port; loopback answers at once or refuses.
const portDialTimeout = 5 * time.Second

// ports are the port-forward connections to the guest's loopback: the pod's localhost,
// which is where `kubectl port-forward` must arrive.
type ports struct {
	mu    sync.Mutex
	next  uint64
	conns map[uint64]*portConn
}

type portConn struct {
	conn *net.TCPConn
	in   *stream.Input  // host → guest
	out  *stream.Output // guest → host
}

func (p *ports) open(ctx context.Context, port uint32) (uint64, error) {
	if port == 0 || port > 65535 {
		return 0, invalidf("port %d: out of range", port)
	}
	d := net.Dialer{Timeout: portDialTimeout}
	c, err := d.DialContext(ctx, "tcp4", net.JoinHostPort("127.0.0.1", strconv.Itoa(int(port))))
	if err != nil {
		// The usual loopback dual-stack fallback: a service may listen on ::1 only.
		if c, err = d.DialContext(ctx, "tcp6", net.JoinHostPort("::1", strconv.Itoa(int(port)))); err != nil {
			return 0, fmt.Errorf("port %d: %w: %w", port, err, errdefs.ErrUnavailable)
		}
	}
	tcp := c.(*net.TCPConn)
	pc := &portConn{conn: tcp, out: stream.NewOutput(0)}
	pc.in = stream.NewInput(tcp, tcp.CloseWrite)
	go func() {
		pc.out.Pump(tcp)
	}()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.conns == nil {
		p.conns = map[uint64]*portConn{}
	}
	p.next++
	p.conns[p.next] = pc
	return p.next, nil
}

func (p *ports) get(id uint64) (*portConn, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	pc, ok := p.conns[id]
	if !ok {
		return nil, fmt.Errorf("port connection %d: %w", id, errdefs.ErrNotFound)
	}
	return pc, nil
}

func (p *ports) close(id uint64, writeOnly bool) error {
	pc, err := p.get(id)
	if err != nil {
		return err
	}
	if writeOnly {
		return pc.in.Close()
	}
	p.mu.Lock()
	delete(p.conns, id)
	p.mu.Unlock()
	pc.out.CloseWithEOF()
	return pc.conn.Close()
}

func (s *service) OpenPort(ctx context.Context, req *agentv1.OpenPortRequest) (*agentv1.OpenPortResponse, error) {
	id, err := s.ports.open(ctx, req.Port)
	if err != nil {
		return nil, err
	}
	return &agentv1.OpenPortResponse{ConnectionId: id}, nil
}

func (s *service) ReadPort(ctx context.Context, req *agentv1.PortStreamRequest) (*agentv1.ReadStreamResponse, error) {
	pc, err := s.ports.get(req.ConnectionId)
	if err != nil {
		return nil, err
	}
	start, data, eof, err := pc.out.Read(ctx, req.Offset, int(req.MaxBytes))
	if err != nil {
		return nil, err
	}
	return &agentv1.ReadStreamResponse{Offset: start, Data: data, Eof: eof}, nil
}

func (s *service) WritePort(_ context.Context, req *agentv1.WritePortRequest) (*agentv1.WriteStdinResponse, error) {
	pc, err := s.ports.get(req.ConnectionId)
	if err != nil {
		return nil, err
	}
	off, err := pc.in.Write(req.Offset, req.Data)
	return &agentv1.WriteStdinResponse{Offset: off}, err
}

func (s *service) ClosePort(_ context.Context, req *agentv1.ClosePortRequest) (*agentv1.Empty, error) {
	return empty, s.ports.close(req.ConnectionId, req.WriteOnly)
}
