package qga

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fakeAgent answers like qemu-guest-agent on the far end of a pipe: reply(cmd, args)
// returns the "return" value, an error (class, desc), or nothing (no answer).
type fakeAgent struct {
	t     *testing.T
	reply func(cmd string, args json.RawMessage) (ret any, errClass string, silent bool)
	// before is written ahead of the sync reply, as stale output from an earlier client
	before string
	dials  atomic.Int32
}

func (f *fakeAgent) dial(ctx context.Context) (net.Conn, error) {
	f.dials.Add(1)
	host, guest := net.Pipe()
	go f.serve(guest)
	return host, nil
}

func (f *fakeAgent) serve(conn net.Conn) {
	defer conn.Close()
	r := bufio.NewReader(conn)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		line = strings.TrimLeft(line, "\xff")
		var req struct {
			Execute   string          `json:"execute"`
			Arguments json.RawMessage `json:"arguments"`
		}
		if err := json.Unmarshal([]byte(line), &req); err != nil {
			f.t.Errorf("fake agent: bad request %q: %v", line, err)
			return
		}
		var out []byte
		if req.Execute == "guest-sync-delimited" {
			var a struct{ ID uint64 }
			_ = json.Unmarshal(req.Arguments, &a)
			if f.reply != nil {
				if _, _, silent := f.reply(req.Execute, req.Arguments); silent {
					continue
				}
			}
			out = fmt.Appendf([]byte(f.before), "\xff{\"return\": %d}\n", a.ID)
			f.before = ""
		} else {
			ret, class, silent := f.reply(req.Execute, req.Arguments)
			if silent {
				continue
			}
			if class != "" {
				out, _ = json.Marshal(map[string]any{"error": map[string]string{"class": class, "desc": "it failed"}})
			} else {
				out, _ = json.Marshal(map[string]any{"return": ret})
			}
			out = append(out, '\n')
		}
		if _, err := conn.Write(out); err != nil {
			return
		}
	}
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	t.Cleanup(cancel)
	return c
}

func TestPingSkipsStaleReplies(t *testing.T) {
	f := &fakeAgent{t: t, before: "{\"return\": {}}\n\xff{\"return\": 7}\n", reply: func(cmd string, _ json.RawMessage) (any, string, bool) {
		return map[string]any{}, "", false
	}}
	c := New(f.dial)
	defer c.Close()
	if err := c.Ping(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if err := c.Ping(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if n := f.dials.Load(); n != 1 {
		t.Fatalf("%d dials, want 1 (one session)", n)
	}
}

func TestNoAgent(t *testing.T) {
	f := &fakeAgent{t: t, reply: func(string, json.RawMessage) (any, string, bool) { return nil, "", true }}
	c := New(f.dial)
	defer c.Close()
	cx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	err := c.Ping(cx)
	if !errors.Is(err, ErrNoAgent) {
		t.Fatalf("got %v, want ErrNoAgent", err)
	}
	if !strings.Contains(err.Error(), "guest-ping") {
		t.Fatalf("error %q does not name the command", err)
	}
}

func TestExecAndStatus(t *testing.T) {
	b64 := func(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }
	var polls atomic.Int32
	f := &fakeAgent{t: t, reply: func(cmd string, args json.RawMessage) (any, string, bool) {
		switch cmd {
		case "guest-exec":
			var a struct {
				Path    string   `json:"path"`
				Arg     []string `json:"arg"`
				Input   string   `json:"input-data"`
				Capture bool     `json:"capture-output"`
			}
			_ = json.Unmarshal(args, &a)
			if a.Path != "cat" || len(a.Arg) != 1 || a.Arg[0] != "/f" || !a.Capture || a.Input != b64("in") {
				t.Errorf("guest-exec args %s", args)
			}
			return map[string]int{"pid": 42}, "", false
		case "guest-exec-status":
			if polls.Add(1) < 3 {
				return map[string]bool{"exited": false}, "", false
			}
			return map[string]any{"exited": true, "exitcode": 3, "out-data": b64("hello\n"), "err-data": b64("oops")}, "", false
		}
		return nil, "CommandNotFound", false
	}}
	c := New(f.dial)
	defer c.Close()
	st, err := c.Run(ctx(t), ExecRequest{Path: "cat", Args: []string{"/f"}, Input: []byte("in")})
	if err != nil {
		t.Fatal(err)
	}
	if st.Status != 3 || string(st.Stdout) != "hello\n" || string(st.Stderr) != "oops" {
		t.Fatalf("got %+v", st)
	}
	if _, err := c.OSInfo(ctx(t)); !IsCommandNotFound(err) {
		t.Fatalf("unknown command: got %v", err)
	}
}

func TestBadReplies(t *testing.T) {
	cases := []struct {
		name  string
		reply any
		call  func(*Client) error
		want  string
	}{
		{"exec without pid", map[string]any{}, func(c *Client) error { _, err := c.Exec(context.Background(), ExecRequest{Path: "x"}); return err }, "pid: missing"},
		{"status without exited", map[string]any{}, func(c *Client) error { _, err := c.ExecStatus(context.Background(), 1); return err }, "exited: missing"},
		{"status with bad base64", map[string]any{"exited": true, "exitcode": 0, "out-data": "%%%"}, func(c *Client) error { _, err := c.ExecStatus(context.Background(), 1); return err }, "out-data: not base64"},
		{"exited without code", map[string]any{"exited": true}, func(c *Client) error { _, err := c.ExecStatus(context.Background(), 1); return err }, "exitcode"},
		{"bad address", []map[string]any{{"name": "eth0", "ip-addresses": []map[string]any{{"ip-address-type": "ipv4", "ip-address": "10.0.0.999", "prefix": 24}}}},
			func(c *Client) error { _, err := c.Interfaces(context.Background()); return err }, "[0].ip-addresses[0].ip-address"},
		{"bad prefix", []map[string]any{{"name": "eth0", "ip-addresses": []map[string]any{{"ip-address-type": "ipv4", "ip-address": "10.0.0.9", "prefix": 33}}}},
			func(c *Client) error { _, err := c.Interfaces(context.Background()); return err }, "prefix"},
		{"wrong type", "a string", func(c *Client) error { _, err := c.Info(context.Background()); return err }, "bad reply"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := &fakeAgent{t: t, reply: func(string, json.RawMessage) (any, string, bool) { return tc.reply, "", false }}
			c := New(f.dial)
			defer c.Close()
			err := tc.call(c)
			var re *ReplyError
			if !errors.As(err, &re) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want a ReplyError naming %q", err, tc.want)
			}
		})
	}
}

func TestSignalExit(t *testing.T) {
	f := &fakeAgent{t: t, reply: func(string, json.RawMessage) (any, string, bool) {
		return map[string]any{"exited": true, "signal": 9}, "", false
	}}
	c := New(f.dial)
	defer c.Close()
	st, err := c.ExecStatus(ctx(t), 5)
	if err != nil || st.Status != 137 {
		t.Fatalf("got %+v, %v; want status 137", st, err)
	}
}

func TestInterfaces(t *testing.T) {
	f := &fakeAgent{t: t, reply: func(string, json.RawMessage) (any, string, bool) {
		return []map[string]any{
			{"name": "lo", "ip-addresses": []map[string]any{{"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8}}},
			{"name": "eth0", "hardware-address": "52:54:00:12:34:56", "ip-addresses": []map[string]any{
				{"ip-address-type": "ipv4", "ip-address": "10.99.0.7", "prefix": 24},
				{"ip-address-type": "ipv6", "ip-address": "fe80::1", "prefix": 64}}},
		}, "", false
	}}
	c := New(f.dial)
	defer c.Close()
	ifs, err := c.Interfaces(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(ifs) != 2 || ifs[1].MAC.String() != "52:54:00:12:34:56" || ifs[1].IPs[0].String() != "10.99.0.7/24" || ifs[1].IPs[1].String() != "fe80::1/64" {
		t.Fatalf("got %+v", ifs)
	}
}

// A broken connection is redialed on the next call; concurrent callers take turns.
func TestReconnectAndConcurrency(t *testing.T) {
	var conns sync.Map
	f := &fakeAgent{t: t, reply: func(string, json.RawMessage) (any, string, bool) { return map[string]any{}, "", false }}
	dial := func(ctx context.Context) (net.Conn, error) {
		c, err := f.dial(ctx)
		conns.Store(c, true)
		return c, err
	}
	c := New(dial)
	defer c.Close()
	if err := c.Ping(ctx(t)); err != nil {
		t.Fatal(err)
	}
	conns.Range(func(k, _ any) bool { _ = k.(net.Conn).Close(); return true })
	if err := c.Ping(ctx(t)); err == nil {
		t.Fatal("ping on a closed connection succeeded")
	}
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := c.Ping(ctx(t)); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if n := f.dials.Load(); n != 2 {
		t.Fatalf("%d dials, want 2", n)
	}
}

func TestAddAuthorizedKeys(t *testing.T) {
	var got []string
	f := &fakeAgent{t: t, reply: func(cmd string, args json.RawMessage) (any, string, bool) {
		if cmd != "guest-sync-delimited" {
			got = append(got, cmd+" "+string(args))
		}
		if strings.Contains(string(args), `"username":"nobody-here"`) {
			return nil, "GenericError", false
		}
		return map[string]any{}, "", false
	}}
	c := New(f.dial)
	defer c.Close()
	if err := c.AddAuthorizedKeys(ctx(t), "vmpod", []string{"ssh-ed25519 AAAA a", "ssh-rsa BBBB b"}); err != nil {
		t.Fatal(err)
	}
	want := `guest-ssh-add-authorized-keys {"username":"vmpod","keys":["ssh-ed25519 AAAA a","ssh-rsa BBBB b"]}`
	if len(got) != 1 || got[0] != want {
		t.Fatalf("agent got %q, want %q", got, want)
	}
	var agentErr *Error
	if err := c.AddAuthorizedKeys(ctx(t), "nobody-here", []string{"ssh-ed25519 AAAA a"}); !errors.As(err, &agentErr) || agentErr.Command != "guest-ssh-add-authorized-keys" {
		t.Fatalf("unknown user: got %v, want the agent's error", err)
	}
}
