package qga

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"time"
)

// Ping answers when the agent runs (guest-ping): KubeVirt's guestAgentPing probe.
func (c *Client) Ping(ctx context.Context) error { return c.call(ctx, "guest-ping", nil, nil) }

// Info is the agent's version and the commands it has (guest-info).
type Info struct {
	Version  string    `json:"version"`
	Commands []Command `json:"supported_commands"`
}

// Command is one command the agent knows.
type Command struct {
	Name    string `json:"name"`
	Enabled bool   `json:"enabled"`
}

// Supports says whether the agent has command enabled.
func (i Info) Supports(command string) bool {
	for _, c := range i.Commands {
		if c.Name == command {
			return c.Enabled
		}
	}
	return false
}

// Info runs guest-info.
func (c *Client) Info(ctx context.Context) (Info, error) {
	var info Info
	if err := c.call(ctx, "guest-info", nil, &info); err != nil {
		return Info{}, err
	}
	if info.Version == "" {
		return Info{}, &ReplyError{Command: "guest-info", Field: "version", Problem: "missing"}
	}
	return info, nil
}

// OSInfo is the guest OS as the agent reports it (guest-get-osinfo, from os-release).
type OSInfo struct {
	ID            string `json:"id"`
	Name          string `json:"name"`
	PrettyName    string `json:"pretty-name"`
	Version       string `json:"version"`
	VersionID     string `json:"version-id"`
	KernelRelease string `json:"kernel-release"`
	Machine       string `json:"machine"`
}

// OSInfo runs guest-get-osinfo.
func (c *Client) OSInfo(ctx context.Context) (OSInfo, error) {
	var os OSInfo
	err := c.call(ctx, "guest-get-osinfo", nil, &os)
	return os, err
}

// HostName runs guest-get-host-name.
func (c *Client) HostName(ctx context.Context) (string, error) {
	var h struct {
		HostName string `json:"host-name"`
	}
	if err := c.call(ctx, "guest-get-host-name", nil, &h); err != nil {
		return "", err
	}
	return h.HostName, nil
}

// AddAuthorizedKeys runs guest-ssh-add-authorized-keys: user's ~/.ssh/authorized_keys
// gets keys it lacks (the agent creates the file with the owner and modes sshd wants); the
// keys already there stay (no "reset", which older agents do not know). The agent refuses a
// user it does not know; the Error says so.
func (c *Client) AddAuthorizedKeys(ctx context.Context, user string, keys []string) error {
	return c.call(ctx, "guest-ssh-add-authorized-keys", userKeys{user, keys}, nil)
}

// userKeys are the arguments of guest-ssh-add- and -remove-authorized-keys.
type userKeys struct {
	Username string   `json:"username"`
	Keys     []string `json:"keys"`
}

// AuthorizedKeys runs guest-ssh-get-authorized-keys: the key lines of user's
// ~/.ssh/authorized_keys (not its comments or blank lines), none if it has no such file.
func (c *Client) AuthorizedKeys(ctx context.Context, user string) ([]string, error) {
	var out struct {
		Keys []string `json:"keys"`
	}
	if err := c.call(ctx, "guest-ssh-get-authorized-keys", struct {
		Username string `json:"username"`
	}{user}, &out); err != nil {
		return nil, err
	}
	return out.Keys, nil
}

// RemoveAuthorizedKeys runs guest-ssh-remove-authorized-keys: keys leave user's
// ~/.ssh/authorized_keys; the other lines stay, and a key that is not there is no error.
func (c *Client) RemoveAuthorizedKeys(ctx context.Context, user string, keys []string) error {
	return c.call(ctx, "guest-ssh-remove-authorized-keys", userKeys{user, keys}, nil)
}

// Interface is a guest NIC and its addresses (guest-network-get-interfaces).
type Interface struct {
	Name string
	MAC  net.HardwareAddr // nil for interfaces without one (lo)
	IPs  []net.IPNet
}

// Interfaces runs guest-network-get-interfaces. Every address is checked: a reply
// with an unparsable address or prefix is an error naming it.
func (c *Client) Interfaces(ctx context.Context) ([]Interface, error) {
	const cmd = "guest-network-get-interfaces"
	var raw []struct {
		Name string `json:"name"`
		MAC  string `json:"hardware-address"`
		IPs  []struct {
			Type    string `json:"ip-address-type"`
			Address string `json:"ip-address"`
			Prefix  int    `json:"prefix"`
		} `json:"ip-addresses"`
	}
	if err := c.call(ctx, cmd, nil, &raw); err != nil {
		return nil, err
	}
	out := make([]Interface, 0, len(raw))
	for i, r := range raw {
		field := fmt.Sprintf("[%d]", i)
		if r.Name == "" {
			return nil, &ReplyError{Command: cmd, Field: field + ".name", Problem: "missing"}
		}
		iface := Interface{Name: r.Name}
		if r.MAC != "" {
			mac, err := net.ParseMAC(r.MAC)
			if err != nil {
				return nil, &ReplyError{Command: cmd, Field: field + ".hardware-address", Problem: err.Error()}
			}
			iface.MAC = mac
		}
		for j, a := range r.IPs {
			f := fmt.Sprintf("%s.ip-addresses[%d]", field, j)
			ip := net.ParseIP(a.Address)
			bits := 32
			if ip == nil || (a.Type == "ipv4") != (ip.To4() != nil) {
				return nil, &ReplyError{Command: cmd, Field: f + ".ip-address", Problem: fmt.Sprintf("%q is not an %s address", a.Address, a.Type)}
			}
			if ip.To4() == nil {
				bits = 128
			} else {
				ip = ip.To4()
			}
			if a.Prefix < 0 || a.Prefix > bits {
				return nil, &ReplyError{Command: cmd, Field: f + ".prefix", Problem: fmt.Sprintf("%d is not a prefix length", a.Prefix)}
			}
			iface.IPs = append(iface.IPs, net.IPNet{IP: ip, Mask: net.CIDRMask(a.Prefix, bits)})
		}
		out = append(out, iface)
	}
	return out, nil
}

// ExecRequest is a command to run in the guest (guest-exec). Path is looked up in the
// guest's PATH.
type ExecRequest struct {
	Path  string
	Args  []string
	Env   []string
	Input []byte // the whole of stdin; none: stdin is empty
}

// Exec starts req in the guest with its output captured and returns the guest pid.
func (c *Client) Exec(ctx context.Context, req ExecRequest) (int, error) {
	args := map[string]any{"path": req.Path, "capture-output": true}
	if len(req.Args) > 0 {
		args["arg"] = req.Args
	}
	if len(req.Env) > 0 {
		args["env"] = req.Env
	}
	if len(req.Input) > 0 {
		args["input-data"] = base64.StdEncoding.EncodeToString(req.Input)
	}
	var rep struct {
		Pid *int `json:"pid"`
	}
	if err := c.call(ctx, "guest-exec", args, &rep); err != nil {
		return 0, err
	}
	if rep.Pid == nil || *rep.Pid <= 0 {
		return 0, &ReplyError{Command: "guest-exec", Field: "pid", Problem: "missing or not positive"}
	}
	return *rep.Pid, nil
}

// ExecStatus is what guest-exec-status says of a process.
type ExecStatus struct {
	Exited bool
	// Status is the exit code, or 128+signal for a process killed by a signal.
	Status         int
	Stdout, Stderr []byte
	// Truncated: the agent dropped output beyond its buffer (16 MiB).
	Truncated bool
}

// ExecStatus runs guest-exec-status for pid. Output is returned once: the agent forgets
// an exited process when it has reported it.
func (c *Client) ExecStatus(ctx context.Context, pid int) (ExecStatus, error) {
	const cmd = "guest-exec-status"
	var rep struct {
		Exited       *bool   `json:"exited"`
		ExitCode     *int    `json:"exitcode"`
		Signal       *int    `json:"signal"`
		OutData      *string `json:"out-data"`
		ErrData      *string `json:"err-data"`
		OutTruncated bool    `json:"out-truncated"`
		ErrTruncated bool    `json:"err-truncated"`
	}
	if err := c.call(ctx, cmd, map[string]int{"pid": pid}, &rep); err != nil {
		return ExecStatus{}, err
	}
	if rep.Exited == nil {
		return ExecStatus{}, &ReplyError{Command: cmd, Field: "exited", Problem: "missing"}
	}
	st := ExecStatus{Exited: *rep.Exited, Truncated: rep.OutTruncated || rep.ErrTruncated}
	if !st.Exited {
		return st, nil
	}
	switch {
	case rep.Signal != nil:
		st.Status = 128 + *rep.Signal
	case rep.ExitCode != nil:
		st.Status = *rep.ExitCode
	default:
		return ExecStatus{}, &ReplyError{Command: cmd, Field: "exitcode", Problem: "an exited process has neither exitcode nor signal"}
	}
	for _, d := range []struct {
		field string
		in    *string
		out   *[]byte
	}{{"out-data", rep.OutData, &st.Stdout}, {"err-data", rep.ErrData, &st.Stderr}} {
		if d.in == nil {
			continue
		}
		b, err := base64.StdEncoding.DecodeString(*d.in)
		if err != nil {
			return ExecStatus{}, &ReplyError{Command: cmd, Field: d.field, Problem: "not base64: " + err.Error()}
		}
		*d.out = b
	}
	return st, nil
}

// execPoll is how often Run asks whether the process has exited.
const execPoll = 100 * time.Millisecond

// Run runs req to its end and returns its exit status and output. When ctx ends first,
// the process goes on in the guest (the agent cannot kill it) and Run returns ctx's error.
func (c *Client) Run(ctx context.Context, req ExecRequest) (ExecStatus, error) {
	pid, err := c.Exec(ctx, req)
	if err != nil {
		return ExecStatus{}, err
	}
	for {
		st, err := c.ExecStatus(ctx, pid)
		if err != nil {
			return ExecStatus{}, err
		}
		if st.Exited {
			return st, nil
		}
		select {
		case <-ctx.Done():
			return ExecStatus{}, fmt.Errorf("guest pid %d still running: %w", pid, ctx.Err())
		case <-time.After(execPoll):
		}
	}
}

// IsCommandNotFound says whether err is the agent refusing a command it does not have.
func IsCommandNotFound(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.Class == "CommandNotFound"
}
