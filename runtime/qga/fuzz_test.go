package qga

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"testing"
	"time"
)

// rawAgent answers every sync properly and every other command with reply, verbatim.
func rawAgent(reply []byte) Dialer {
	return func(ctx context.Context) (net.Conn, error) {
		host, guest := net.Pipe()
		go func() {
			defer guest.Close()
			r := bufio.NewReader(guest)
			for {
				line, err := r.ReadBytes('\n')
				if err != nil {
					return
				}
				var req struct {
					Execute   string
					Arguments struct{ ID uint64 }
				}
				_ = json.Unmarshal(bytes.TrimLeft(line, "\xff"), &req)
				out := append(append([]byte(nil), reply...), '\n')
				if req.Execute == "guest-sync-delimited" {
					out = fmt.Appendf(nil, "\xff{\"return\": %d}\n", req.Arguments.ID)
				}
				if _, err := guest.Write(out); err != nil {
					return
				}
			}
		}()
		return host, nil
	}
}

// FuzzReplies: whatever a guest's agent answers (the guest is not trusted), every
// command returns a value or an error that says the reply was bad (*ReplyError) or the
// command failed (*Error); nothing panics or hangs.
func FuzzReplies(f *testing.F) {
	for _, s := range []string{
		`{"return": {}}`, `{"return": {"version": "7.2.0", "supported_commands": [{"name": "guest-ping", "enabled": true}]}}`,
		`{"return": [{"name": "eth0", "hardware-address": "52:54:00:12:34:56", "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "10.0.2.15", "prefix": 24}]}]}`,
		`{"return": {"exited": true, "exitcode": 0, "out-data": "aGVsbG8K"}}`, `{"return": {"exited": true, "signal": 9, "err-data": "!!"}}`,
		`{"return": {"pid": -1}}`, `{"error": {"class": "GenericError", "desc": "no"}}`, `{"return": null}`, `[]`, `not json`,
		`{"return": {"host-name": 7}}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, reply []byte) {
		// one line: what follows a newline would be a stale reply for the next sync to skip
		reply = bytes.ReplaceAll(reply, []byte("\n"), []byte(" "))
		if len(bytes.TrimSpace(reply)) == 0 {
			t.Skip("a blank line is no reply: the client rightly waits for one")
		}
		c := New(rawAgent(reply))
		defer c.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		calls := map[string]func() error{
			"ping":       func() error { return c.Ping(ctx) },
			"info":       func() error { _, err := c.Info(ctx); return err },
			"osinfo":     func() error { _, err := c.OSInfo(ctx); return err },
			"hostname":   func() error { _, err := c.HostName(ctx); return err },
			"interfaces": func() error { _, err := c.Interfaces(ctx); return err },
			"exec":       func() error { _, err := c.Exec(ctx, ExecRequest{Path: "/bin/true"}); return err },
			"status":     func() error { _, err := c.ExecStatus(ctx, 1); return err },
		}
		for name, call := range calls {
			err := call()
			var re *ReplyError
			var ce *Error
			if err != nil && !errors.As(err, &re) && !errors.As(err, &ce) {
				t.Fatalf("%s with reply %q: %v (%T), want a *ReplyError or *Error", name, reply, err, err)
			}
		}
	})
}
