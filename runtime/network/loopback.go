package network

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// LoopbackRedirect makes TCP connections to 127.0.0.1 made inside a pod netns arrive at one
// listener of the shim, which learns each connection's original port.
//
// containerd serves a CRI port-forward by dialling localhost:<port> inside the pod's
// netns. For a VM pod nothing listens there: the pod's localhost is the guest's. An
// iptables REDIRECT in the netns sends every such connection (but those to the listener's
// own port) to this listener; the shim carries it through the agent to the guest's
// loopback (docs/design/006-port-forward.md).
type LoopbackRedirect struct {
	netnsPath string
	listener  *net.TCPListener
	rule      []string
}

// RedirectLoopback sets the redirect up in the netns at netnsPath.
func RedirectLoopback(netnsPath string) (_ *LoopbackRedirect, retErr error) {
	pn, err := openNetns(netnsPath)
	if err != nil {
		return nil, fmt.Errorf("network: netns %s: %w", netnsPath, err)
	}
	defer pn.close()
	var l net.Listener
	if err := inNetns(pn.ns, func() error {
		var err error
		// The socket belongs to the netns it was created in, whatever thread uses it later.
		l, err = net.Listen("tcp4", "127.0.0.1:0")
		return err
	}); err != nil {
		return nil, fmt.Errorf("network: netns %s: port-forward listener: %w", netnsPath, err)
	}
	defer func() {
		if retErr != nil {
			_ = l.Close()
		}
	}()
	port := strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
	rule := []string{"OUTPUT", "-o", "lo", "-p", "tcp", "-d", "127.0.0.1", "!", "--dport", port, "-j", "REDIRECT", "--to-ports", port}
	r := &LoopbackRedirect{netnsPath: netnsPath, listener: l.(*net.TCPListener), rule: rule}
	if err := r.iptables("-A"); err != nil {
		return nil, err
	}
	return r, nil
}

func (r *LoopbackRedirect) iptables(op string) error { return iptables(r.netnsPath, "nat", op, r.rule) }

// Accept waits for the next redirected connection and returns it with the port it was
// meant for.
func (r *LoopbackRedirect) Accept() (net.Conn, uint32, error) {
	conn, err := r.listener.AcceptTCP()
	if err != nil {
		return nil, 0, err
	}
	port, err := originalPort(conn)
	if err != nil {
		_ = conn.Close()
		return nil, 0, fmt.Errorf("network: port-forward: original destination: %w", err)
	}
	return conn, port, nil
}

// originalPort reads the destination the REDIRECT rewrote (SO_ORIGINAL_DST, a sockaddr_in).
func originalPort(conn *net.TCPConn) (uint32, error) {
	raw, err := conn.SyscallConn()
	if err != nil {
		return 0, err
	}
	var port uint32
	var sockErr error
	err = raw.Control(func(fd uintptr) {
		// The IPv6 mreq getter is the x/sys way to read 16+ raw bytes of a sockopt.
		mreq, err := unix.GetsockoptIPv6Mreq(int(fd), unix.IPPROTO_IP, unix.SO_ORIGINAL_DST)
		if err != nil {
			sockErr = err
			return
		}
		port = uint32(mreq.Multiaddr[2])<<8 | uint32(mreq.Multiaddr[3])
	})
	return port, errors.Join(err, sockErr)
}

// Serve hands each redirected connection to handle, in a goroutine of its own, until
// Close. Accept errors other than the close are logged by logf and skipped.
func (r *LoopbackRedirect) Serve(handle func(conn net.Conn, port uint32), logf func(error)) {
	for {
		conn, port, err := r.Accept()
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			logf(err)
			continue
		}
		go handle(conn, port)
	}
}

// Close removes the rule and closes the listener; Accept then fails with net.ErrClosed.
func (r *LoopbackRedirect) Close() error {
	var err error
	// A netns already deleted took the rule with it.
	if _, statErr := os.Stat(r.netnsPath); statErr == nil {
		err = r.iptables("-D")
	}
	return errors.Join(err, r.listener.Close())
}
