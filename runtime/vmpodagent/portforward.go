package vmpodagent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
)

// forwardPort carries conn to TCP port on the guest's loopback, the pod's localhost, until
// both directions have ended: what `kubectl port-forward` means for a pod.
func (a *Client) forwardPort(ctx context.Context, conn net.Conn, port uint32) error {
	var id uint64
	err := a.call(ctx, fmt.Sprintf("open port %d", port), func(ctx context.Context) error {
		resp, err := a.client().OpenPort(ctx, &agentv1.OpenPortRequest{Port: port})
		if err == nil {
			id = resp.ConnectionId
		}
		return err
	})
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	closePort := func(writeOnly bool) error {
		return a.call(context.WithoutCancel(ctx), fmt.Sprintf("close port %d", port), func(ctx context.Context) error {
			_, err := a.client().ClosePort(ctx, &agentv1.ClosePortRequest{ConnectionId: id, WriteOnly: writeOnly})
			return err
		})
	}
	var wg sync.WaitGroup
	var toHost, toGuest error
	wg.Add(2)
	go func() { // guest → host
		defer wg.Done()
		toHost = copyFromGuest(ctx, conn, func(ctx context.Context, offset uint64) (*agentv1.ReadStreamResponse, error) {
			return a.client().ReadPort(ctx, &agentv1.PortStreamRequest{ConnectionId: id, Offset: offset})
		}, nil)
		if hc, ok := conn.(interface{ CloseWrite() error }); ok {
			_ = hc.CloseWrite()
		} else {
			_ = conn.Close()
		}
	}()
	go func() { // host → guest
		defer wg.Done()
		toGuest = copyToGuest(ctx, conn, func(ctx context.Context, offset uint64, data []byte) (uint64, error) {
			resp, err := a.client().WritePort(ctx, &agentv1.WritePortRequest{ConnectionId: id, Offset: offset, Data: data})
			if err != nil {
				return offset, err
			}
			return resp.Offset, nil
		})
		if toGuest != nil {
			cancel() // the client is gone: stop reading for it
			return
		}
		toGuest = closePort(true)
	}()
	wg.Wait()
	_ = conn.Close()
	err = errors.Join(toHost, toGuest, closePort(false))
	if err != nil {
		return fmt.Errorf("port-forward to %d: %w", port, err)
	}
	return nil
}
