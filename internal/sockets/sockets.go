// Package sockets tells whether a process serves a unix socket, the question `shim delete`
// and a dead VM's cleanup ask before they remove one.
package sockets

import (
	"errors"
	"net"
	"syscall"
	"time"
)

// dialTimeout bounds Served's dial: a listening unix socket answers a connect at once (or
// turns it away), so this is only time for a loaded node to schedule the dial.
const dialTimeout = 5 * time.Second

// Served says whether a process may be serving the unix socket at path: only a refused
// connection (a socket file nobody listens on) or a missing socket mean nobody does. A
// listener too busy to take the connection now — its backlog full, or the dial late on a
// loaded node (containerd's shim.CanConnect allows it 100 ms) — is alive, and whoever
// asks must not tear down what it serves.
func Served(path string) bool {
	conn, err := net.DialTimeout("unix", path, dialTimeout)
	if err == nil {
		_ = conn.Close()
		return true
	}
	return !errors.Is(err, syscall.ECONNREFUSED) && !errors.Is(err, syscall.ENOENT)
}
