package pod

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmpod/vmpod/runtime/qga"
)

// keyAgent answers guest-sync-delimited and guest-ssh-add-authorized-keys like
// qemu-guest-agent: an account exists only once created is closed, as when cloud-init
// creates it seconds into the boot.
type keyAgent struct {
	created chan struct{}
	mu      sync.Mutex
	added   map[string][]string
	tries   int
}

func (a *keyAgent) dial(context.Context) (net.Conn, error) {
	host, guest := net.Pipe()
	go func() {
		defer guest.Close()
		r := bufio.NewReader(guest)
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				return
			}
			var req struct {
				Execute   string
				Arguments struct {
					ID       uint64
					Username string
					Keys     []string
				}
			}
			_ = json.Unmarshal([]byte(strings.TrimLeft(line, "\xff")), &req)
			var out string
			switch req.Execute {
			case "guest-sync-delimited":
				out = fmt.Sprintf("\xff{\"return\": %d}\n", req.Arguments.ID)
			case "guest-ssh-add-authorized-keys":
				a.mu.Lock()
				a.tries++
				select {
				case <-a.created:
					a.added[req.Arguments.Username] = req.Arguments.Keys
					out = "{\"return\": {}}\n"
				default:
					out = "{\"error\": {\"class\": \"GenericError\", \"desc\": \"failed to get passwd entry\"}}\n"
				}
				a.mu.Unlock()
			}
			if _, err := guest.Write([]byte(out)); err != nil {
				return
			}
		}
	}()
	return host, nil
}

func TestAddKeysThroughAgentWaitsForTheAccount(t *testing.T) {
	a := &keyAgent{created: make(chan struct{}), added: map[string][]string{}}
	c := &computeVM{pod: &vmPod{id: "p"}, agent: qga.New(a.dial), exited: make(chan struct{})}
	defer c.agent.Close()
	done := make(chan struct{})
	keys := []userKeys{{user: "vmpod", keys: []string{"ssh-ed25519 AAAA a"}}}
	go func() { c.addKeysThroughAgent(context.Background(), keys); close(done) }()

	time.Sleep(keyRetryFirst + 500*time.Millisecond) // one refusal: no account yet
	close(a.created)
	select {
	case <-done:
	case <-time.After(3 * keyRetryFirst * 2):
		t.Fatal("keys not added after the account appeared")
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if got := a.added["vmpod"]; len(got) != 1 || got[0] != "ssh-ed25519 AAAA a" {
		t.Errorf("agent added %q for vmpod", got)
	}
	if a.tries < 2 {
		t.Errorf("%d tries, want a retry after the refusal", a.tries)
	}

	// a VM that exits ends the retries
	b := &keyAgent{created: make(chan struct{}), added: map[string][]string{}}
	c = &computeVM{pod: &vmPod{id: "p"}, agent: qga.New(b.dial), exited: make(chan struct{})}
	defer c.agent.Close()
	done = make(chan struct{})
	go func() { c.addKeysThroughAgent(context.Background(), keys); close(done) }()
	close(c.exited)
	select {
	case <-done:
	case <-time.After(keyRetryMax):
		t.Fatal("retries go on after the VM exited")
	}
}
