package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
)

// GetFD passes file to QEMU under name (getfd, SCM_RIGHTS), for a later command
// that refers to it, such as a tap netdev's FD. QEMU keeps its own copy: the caller
// may close file once GetFD returns. A name that is already in use is replaced.
func (m *Monitor) GetFD(ctx context.Context, name string, file *os.File) error {
	if file == nil {
		return fmt.Errorf("qmp: getfd %s: no file", name)
	}
	if _, err := m.call(ctx, "getfd", fdnameArgs{name}, file); err != nil {
		return commandFailed("getfd", name, err)
	}
	return nil
}

type fdnameArgs struct {
	FDName string `json:"fdname"`
}

// CloseFD closes a descriptor passed with GetFD that no command has consumed
// (closefd). netdev_add consumes the descriptors it names.
func (m *Monitor) CloseFD(ctx context.Context, name string) error {
	return m.run(ctx, "closefd", name, fdnameArgs{name}, nil)
}

// TapNetdev is a tap network backend for netdev_add. Exactly one of FDs (names
// passed with GetFD, one per queue) and Ifname (an existing tap QEMU opens itself)
// is set.
type TapNetdev struct {
	ID     string
	FDs    []string
	Ifname string
	Queues int  // with Ifname: queue pairs to open; 0 means 1
	Vhost  bool // vhost-net in the kernel; needs /dev/vhost-net
}

// MarshalJSON renders the QAPI Netdev union for a tap.
func (n TapNetdev) MarshalJSON() ([]byte, error) {
	args := struct {
		Type       string `json:"type"`
		ID         string `json:"id"`
		FD         string `json:"fd,omitempty"`
		FDs        string `json:"fds,omitempty"`
		Ifname     string `json:"ifname,omitempty"`
		Script     string `json:"script,omitempty"`
		Downscript string `json:"downscript,omitempty"`
		Queues     int    `json:"queues,omitempty"`
		Vhost      bool   `json:"vhost"`
	}{Type: "tap", ID: n.ID, Vhost: n.Vhost}
	switch {
	case len(n.FDs) > 0 && n.Ifname != "":
		return nil, errors.New("tap netdev: both FDs and Ifname are set")
	case len(n.FDs) == 1:
		args.FD = n.FDs[0]
	case len(n.FDs) > 1:
		args.FDs = strings.Join(n.FDs, ":")
	case n.Ifname != "":
		args.Ifname, args.Script, args.Downscript = n.Ifname, "no", "no"
		if n.Queues > 1 {
			args.Queues = n.Queues
		}
	default:
		return nil, errors.New("tap netdev: neither FDs nor Ifname is set")
	}
	return json.Marshal(args)
}

// NetdevAddTap adds a tap network backend (netdev_add).
func (m *Monitor) NetdevAddTap(ctx context.Context, n TapNetdev) error {
	return m.run(ctx, "netdev_add", n.ID, n, nil)
}

// NetdevDel removes a network backend that no device uses any more (netdev_del).
func (m *Monitor) NetdevDel(ctx context.Context, id string) error {
	return m.run(ctx, "netdev_del", id, idArgs{id}, nil)
}

// AddClient hands QEMU a connection for one of its display servers (add_client): fdName
// was passed with GetFD, and protocol is "vnc" (or "spice", "@dbus-display"). With
// skipAuth the client skips the server's authentication, which the caller did already:
// the connection is one it accepted and vouches for.
func (m *Monitor) AddClient(ctx context.Context, protocol, fdName string, skipAuth bool) error {
	args := struct {
		Protocol string `json:"protocol"`
		FDName   string `json:"fdname"`
		SkipAuth bool   `json:"skipauth"`
	}{protocol, fdName, skipAuth}
	return m.run(ctx, "add_client", fdName, args, nil)
}

// ChardevAddSocketFD adds a socket character device on a connection passed with GetFD
// as fdName (chardev-add): QEMU takes the descriptor as connected, the way a vhost-user
// device's backend is given to a QEMU that may not reach the daemon's socket path.
func (m *Monitor) ChardevAddSocketFD(ctx context.Context, id, fdName string) error {
	type str struct {
		Str string `json:"str"`
	}
	type addr struct {
		Type string `json:"type"`
		Data str    `json:"data"`
	}
	type socket struct {
		Addr   addr `json:"addr"`
		Server bool `json:"server"`
	}
	type backend struct {
		Type string `json:"type"`
		Data socket `json:"data"`
	}
	args := struct {
		ID      string  `json:"id"`
		Backend backend `json:"backend"`
	}{id, backend{Type: "socket", Data: socket{Addr: addr{Type: "fd", Data: str{fdName}}}}}
	return m.run(ctx, "chardev-add", id, args, nil)
}

// ChardevRemove removes a character device no device uses any more (chardev-remove).
func (m *Monitor) ChardevRemove(ctx context.Context, id string) error {
	return m.run(ctx, "chardev-remove", id, idArgs{id}, nil)
}
