package pod

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/vmpod/vmpod/api/vmspec"
	"github.com/vmpod/vmpod/runtime/qga"
)

// keyAgent answers guest-sync-delimited, guest-ping and the guest-ssh-*-authorized-keys
// commands like qemu-guest-agent, over each user's authorized_keys as a list of lines: an
// account exists only once created is closed, as when cloud-init creates it seconds into
// the boot.
type keyAgent struct {
	created            chan struct{}
	createAfterRefusal bool
	mu                 sync.Mutex
	files              map[string][]string // user: authorized_keys lines
	tries              int
}

func newKeyAgent(createAfterRefusal bool) *keyAgent {
	return &keyAgent{created: make(chan struct{}), createAfterRefusal: createAfterRefusal, files: map[string][]string{}}
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
			case "guest-ssh-get-authorized-keys":
				a.mu.Lock()
				lines, ok := a.files[req.Arguments.Username]
				a.mu.Unlock()
				if !ok { // qemu-guest-agent cannot read a file that is not there
					out = "{\"error\": {\"class\": \"GenericError\", \"desc\": \"failed to read\"}}\n"
					break
				}
				b, _ := json.Marshal(map[string]any{"return": map[string]any{"keys": lines}})
				out = string(b) + "\n"
			case "guest-ssh-add-authorized-keys", "guest-ssh-remove-authorized-keys":
				a.mu.Lock()
				a.tries++
				select {
				case <-a.created:
					u := req.Arguments.Username
					for _, k := range req.Arguments.Keys {
						if req.Execute == "guest-ssh-add-authorized-keys" && !slices.Contains(a.files[u], k) {
							a.files[u] = append(a.files[u], k)
						} else if req.Execute == "guest-ssh-remove-authorized-keys" {
							a.files[u] = slices.DeleteFunc(a.files[u], func(l string) bool { return l == k })
						}
					}
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

// file is a copy of user's authorized_keys.
func (a *keyAgent) file(user string) []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.files[user])
}

// secretKeys stands in for the Secret volumes: what read returns can be changed.
type secretKeys struct {
	mu   sync.Mutex
	keys []userKeys
	err  error
}

func (s *secretKeys) set(keys []userKeys, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.keys, s.err = keys, err
}

func (s *secretKeys) read() ([]userKeys, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.keys, s.err
}

func waitFile(t *testing.T, a *keyAgent, user string, want []string) {
	t.Helper()
	for deadline := time.Now().Add(10 * keyRetryFirst); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if got := a.file(user); slices.Equal(got, want) {
			return
		}
	}
	t.Fatalf("authorized_keys of %s = %q, want %q", user, a.file(user), want)
}

func TestSyncKeysWaitsForTheAccount(t *testing.T) {
	a := newKeyAgent(true)
	c := &computeVM{pod: &vmPod{id: "p"}, agent: qga.New(a.dial), exited: make(chan struct{})}
	defer c.agent.Close()
	done := make(chan struct{})
	secret := &secretKeys{keys: []userKeys{{user: "vmpod", keys: []string{"ssh-ed25519 AAAA a"}}}}
	go func() { c.syncKeysThroughAgent(context.Background(), secret.read, time.Hour); close(done) }()
	waitFile(t, a, "vmpod", []string{"ssh-ed25519 AAAA vmpod:a"})
	a.mu.Lock()
	if a.tries < 2 {
		t.Errorf("%d tries, want a retry after the refusal", a.tries)
	}
	a.mu.Unlock()

	// a VM that exits ends the loop
	close(c.exited)
	select {
	case <-done:
	case <-time.After(keyRetryMax):
		t.Fatal("the key loop goes on after the VM exited")
	}
}

// Keys follow the Secret: a new key is added, a key the Secret dropped is removed, and
// lines the shim did not write stay, even one holding the same key as the Secret. A
// Secret that stops parsing changes nothing.
func TestSyncKeysFollowsTheSecret(t *testing.T) {
	a := newKeyAgent(false)
	close(a.created)
	a.files["vmpod"] = []string{"ssh-ed25519 AAAA own", "ssh-ed25519 AAAA a laptop"} // the user's, and cloud-init's copy of a
	c := &computeVM{pod: &vmPod{id: "p"}, agent: qga.New(a.dial), exited: make(chan struct{})}
	defer c.agent.Close()
	secret := &secretKeys{keys: []userKeys{{user: "vmpod", keys: []string{"ssh-ed25519 AAAA a laptop"}}, {user: "ops", keys: []string{`from="10.0.0.0/8" ssh-rsa AAAA o`}}}}
	done := make(chan struct{})
	go func() { c.syncKeysThroughAgent(context.Background(), secret.read, 20*time.Millisecond); close(done) }()
	defer func() { close(c.exited); <-done }()
	waitFile(t, a, "vmpod", []string{"ssh-ed25519 AAAA own", "ssh-ed25519 AAAA a laptop", "ssh-ed25519 AAAA vmpod:a laptop"})
	waitFile(t, a, "ops", []string{`from="10.0.0.0/8" ssh-rsa AAAA vmpod:o`}) // created by the add

	secret.set([]userKeys{{user: "vmpod", keys: []string{"ssh-ed25519 BBBB b"}}, {user: "ops"}}, nil) // a rotated, ops' key gone
	waitFile(t, a, "vmpod", []string{"ssh-ed25519 AAAA own", "ssh-ed25519 AAAA a laptop", "ssh-ed25519 BBBB vmpod:b"})
	waitFile(t, a, "ops", nil)

	secret.set(nil, errors.New("ops line 1: not an SSH public key"))
	time.Sleep(100 * time.Millisecond) // five periods
	if got := a.file("vmpod"); !slices.Equal(got, []string{"ssh-ed25519 AAAA own", "ssh-ed25519 AAAA a laptop", "ssh-ed25519 BBBB vmpod:b"}) {
		t.Errorf("a Secret that does not parse changed the keys: %q", got)
	}
}

// A key dropped from the Secret while the VM was down goes on its next start: the mark in
// the guest's file says the shim put it there.
func TestSyncKeysRemovesWhatAnEarlierRunAdded(t *testing.T) {
	a := newKeyAgent(false)
	close(a.created)
	a.files["vmpod"] = []string{"ssh-ed25519 AAAA own", "ssh-ed25519 OLD0 vmpod:revoked", "ssh-ed25519 KEEP vmpod:kept"}
	c := &computeVM{pod: &vmPod{id: "p"}, agent: qga.New(a.dial), exited: make(chan struct{})}
	defer c.agent.Close()
	secret := &secretKeys{keys: []userKeys{{user: "vmpod", keys: []string{"ssh-ed25519 KEEP kept"}}}}
	done := make(chan struct{})
	go func() { c.syncKeysThroughAgent(context.Background(), secret.read, time.Hour); close(done) }()
	defer func() { close(c.exited); <-done }()
	waitFile(t, a, "vmpod", []string{"ssh-ed25519 AAAA own", "ssh-ed25519 KEEP vmpod:kept"})
}

func TestManagedKey(t *testing.T) {
	for _, tc := range []struct{ key, managed string }{
		{"ssh-ed25519 AAAA", "ssh-ed25519 AAAA vmpod:"},
		{"ssh-ed25519 AAAA alice@laptop  home", "ssh-ed25519 AAAA vmpod:alice@laptop  home"},
		{`command="echo  hi",no-pty ssh-rsa BBBB ops`, `command="echo  hi",no-pty ssh-rsa BBBB vmpod:ops`},
	} {
		if got := managedKey(tc.key); got != tc.managed {
			t.Errorf("managedKey(%q) = %q, want %q", tc.key, got, tc.managed)
		}
		if isManaged(tc.key) || !isManaged(tc.managed) {
			t.Errorf("isManaged(%q), isManaged(%q) = %v, %v", tc.key, tc.managed, isManaged(tc.key), isManaged(tc.managed))
		}
	}
	if isManaged("# vmpod: a comment line") || isManaged("ssh-ed25519") {
		t.Error("a line without a key is managed")
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
	}, spec, false)
	if err != nil {
		t.Fatal(err)
	}
	want := []userKeys{{"root", []string{"ssh-ed25519 AAAAC3Nz team", "ssh-rsa AAAAB3Nz ops"}}, {"fedora", []string{"ssh-ed25519 AAAAC3Nz team"}}}
	if !reflect.DeepEqual(agent, want) || !reflect.DeepEqual(noCloud, []string{"ssh-ed25519 AAAAC3Nz all"}) {
		t.Errorf("agent keys %+v, noCloud %q; want %+v and the noCloud key", agent, noCloud, want)
	}
	if _, _, err := accessCredentials([]vmspec.AccessCredential{{SecretVolume: "missing"}}, spec, true); err == nil ||
		!strings.Contains(err.Error(), "accessCredentials[0] (secretVolume missing): the compute container has no volume mounted at /vmpod/volumes/missing") {
		t.Errorf("missing volume: %v", err)
	}
	// a Secret whose keys were all taken back: refused at start, no keys once running
	empty := t.TempDir()
	spec.Mounts = append(spec.Mounts, specs.Mount{Destination: vmspec.VolumeMountPath("empty"), Source: empty, Type: "bind"})
	creds := []vmspec.AccessCredential{{SecretVolume: "empty", Propagation: vmspec.PropagateGuestAgent, Users: []string{"root"}}}
	if _, _, err := accessCredentials(creds, spec, false); err == nil || !strings.Contains(err.Error(), "holds no SSH public key") {
		t.Errorf("an empty Secret at start: %v", err)
	}
	if _, agent, err := accessCredentials(creds, spec, true); err != nil || !reflect.DeepEqual(agent, []userKeys{{user: "root"}}) {
		t.Errorf("an empty Secret later: %+v, %v; want root with no keys", agent, err)
	}
}
