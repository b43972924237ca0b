package pod

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/vmpod/vmpod/api/vmspec"
	"github.com/vmpod/vmpod/runtime/qga"
)

// keyAgent answers guest-sync-delimited and guest-ssh-add-authorized-keys like
// qemu-guest-agent: an account exists only once created is closed, as when cloud-init
// creates it seconds into the boot.
type keyAgent struct {
	created            chan struct{}
	createAfterRefusal bool
	mu                 sync.Mutex
	added              map[string][]string
	tries              int
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
			case "guest-ping":
				out = "{\"return\": {}}\n"
			case "guest-ssh-add-authorized-keys":
				a.mu.Lock()
				a.tries++
				select {
				case <-a.created:
					a.added[req.Arguments.Username] = req.Arguments.Keys
					out = "{\"return\": {}}\n"
				default:
					out = "{\"error\": {\"class\": \"GenericError\", \"desc\": \"failed to get passwd entry\"}}\n"
					if a.createAfterRefusal {
						close(a.created) // cloud-init creates the account just after
					}
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
	a := &keyAgent{created: make(chan struct{}), createAfterRefusal: true, added: map[string][]string{}}
	c := &computeVM{pod: &vmPod{id: "p"}, agent: qga.New(a.dial), exited: make(chan struct{})}
	defer c.agent.Close()
	done := make(chan struct{})
	keys := []userKeys{{user: "vmpod", keys: []string{"ssh-ed25519 AAAA a"}}}
	go func() { c.addKeysThroughAgent(context.Background(), keys); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * keyRetryFirst):
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

func TestAccessCredentialsOneCallPerUser(t *testing.T) {
	spec := &specs.Spec{}
	for name, key := range map[string]string{"team": "ssh-ed25519 AAAAC3Nz team", "ops": "ssh-rsa AAAAB3Nz ops", "all": "ssh-ed25519 AAAAC3Nz all"} {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, "key"), []byte(key+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		spec.Mounts = append(spec.Mounts, specs.Mount{Destination: vmspec.VolumeMountPath(name), Source: dir, Type: "bind"})
	}
	noCloud, agent, err := accessCredentials([]vmspec.AccessCredential{
		{SecretVolume: "team", Propagation: vmspec.PropagateGuestAgent, Users: []string{"root", "fedora"}},
		{SecretVolume: "ops", Propagation: vmspec.PropagateGuestAgent, Users: []string{"root"}},
		{SecretVolume: "all", Propagation: vmspec.PropagateNoCloud},
	}, spec)
	if err != nil {
		t.Fatal(err)
	}
	want := []userKeys{{"root", []string{"ssh-ed25519 AAAAC3Nz team", "ssh-rsa AAAAB3Nz ops"}}, {"fedora", []string{"ssh-ed25519 AAAAC3Nz team"}}}
	if !reflect.DeepEqual(agent, want) || !reflect.DeepEqual(noCloud, []string{"ssh-ed25519 AAAAC3Nz all"}) {
		t.Errorf("agent keys %+v, noCloud %q; want %+v and the noCloud key", agent, noCloud, want)
	}
	if _, _, err := accessCredentials([]vmspec.AccessCredential{{SecretVolume: "missing"}}, spec); err == nil ||
		!strings.Contains(err.Error(), "accessCredentials[0] (secretVolume missing): the compute container has no volume mounted at /vmpod/volumes/missing") {
		t.Errorf("missing volume: %v", err)
	}
}
