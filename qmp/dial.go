package qmp

import (
	"context"
	"errors"
	"fmt"
	"syscall"
	"time"

	goqemu "github.com/digitalocean/go-qemu/qmp"
)

// DefaultDialTimeout bounds Dial when its context has no deadline. QEMU creates its
// QMP socket within milliseconds of exec, long before the guest boots.
const DefaultDialTimeout = 10 * time.Second

// dialRetryInterval is how often Dial retries while the socket does not exist yet or
// refuses connections.
const dialRetryInterval = 10 * time.Millisecond

// maxSocketPath is the room in sockaddr_un.sun_path, less its terminating NUL.
const maxSocketPath = 107

// Dial connects to the QMP socket of a QEMU started with
// "-chardev socket,id=X,path=socketPath,server=on,wait=off -mon chardev=X,mode=control"
// and completes the greeting and capabilities handshake. While the socket is
// missing or refuses connections (QEMU has just been exec'd) it retries until ctx
// ends, or for DefaultDialTimeout if ctx has no deadline.
//
// QEMU serves one QMP client at a time; a second Dial to the same socket waits
// (within ctx) for the first connection to close.
func Dial(ctx context.Context, socketPath string) (*Monitor, error) {
	if len(socketPath) > maxSocketPath {
		return nil, fmt.Errorf("qmp: dial %s: path longer than %d bytes", socketPath, maxSocketPath)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultDialTimeout)
		defer cancel()
	}
	sock, err := connect(ctx, socketPath)
	if err != nil {
		return nil, fmt.Errorf("qmp: dial %s: %w", socketPath, err)
	}
	if err := handshake(ctx, sock); err != nil {
		return nil, fmt.Errorf("qmp: dial %s: handshake: %w", socketPath, err)
	}
	return newMonitor(sock), nil
}

// connect dials until the socket accepts, retrying only the errors QEMU's start-up
// explains: the socket does not exist yet, or nobody listens on it yet.
func connect(ctx context.Context, path string) (*goqemu.SocketMonitor, error) {
	for {
		timeout := time.Second
		if d, ok := ctx.Deadline(); ok && time.Until(d) < timeout {
			timeout = max(time.Until(d), time.Millisecond)
		}
		sock, err := goqemu.NewSocketMonitor("unix", path, timeout)
		if err == nil {
			return sock, nil
		}
		if !errors.Is(err, syscall.ENOENT) && !errors.Is(err, syscall.ECONNREFUSED) {
			return nil, err
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%w (last attempt: %w)", ctx.Err(), err)
		case <-time.After(dialRetryInterval):
		}
	}
}

// handshake runs go-qemu's Connect (greeting + qmp_capabilities), which has no
// timeout of its own; closing the connection is the only way to unblock it.
func handshake(ctx context.Context, sock *goqemu.SocketMonitor) error {
	done := make(chan error, 1)
	go func() { done <- sock.Connect() }()
	select {
	case err := <-done:
		if err != nil {
			sock.Disconnect()
		}
		return err
	case <-ctx.Done():
	}
	// Prefer a handshake that finished at the same moment: its result has been
	// published, so Disconnect below cannot race with Connect's last writes.
	select {
	case err := <-done:
		if err == nil {
			return nil
		}
		sock.Disconnect()
		return err
	default:
	}
	// Connect is blocked reading the greeting or the capabilities reply. Disconnect
	// closes the socket under it. (go-qemu gives no race-free way to abort Connect:
	// if the handshake completes in the instant between the check above and this
	// call, Disconnect's read of go-qemu's reply channel races with Connect's
	// write of it. The reap below then still closes everything.)
	sock.Disconnect()
	go func() {
		if <-done == nil {
			sock.Disconnect()
		}
	}()
	return ctx.Err()
}
