package pod

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/vmpod/vmpod/api/vmspec"
	"github.com/vmpod/vmpod/runtime/cloudinit"
	"github.com/vmpod/vmpod/runtime/qga"
)

// userKeys are SSH public keys for one guest account.
type userKeys struct {
	user string
	keys []string
}

// Bounds of handing keys over through the guest agent: the agent answers tens of seconds
// into a boot under TCG, and an account cloud-init creates appears later still. Once the
// keys are in, the Secret volumes are read again every keySyncPeriod: the kubelet updates
// a Secret volume in place (within its sync period, about a minute) when the Secret changes.
const (
	keyRetryFirst = time.Second
	keyRetryMax   = 10 * time.Second
	keyAgentPing  = time.Second
	keySyncPeriod = 10 * time.Second
)

// accessCredentials reads the keys of each access credential from its Secret volume: those
// cloud-init's meta-data carries, and those the guest agent adds per user. Errors name the
// credential. A Secret without keys is an error when the VM starts (a credential that
// gives nothing is a mistake); later, with emptyOK, it is a Secret whose keys were all
// taken back.
func accessCredentials(creds []vmspec.AccessCredential, spec *specs.Spec, emptyOK bool) (noCloud []string, agent []userKeys, err error) {
	for i, c := range creds {
		keys, err := cloudinit.PublicKeys(c.SecretVolume, spec)
		if emptyOK && errors.Is(err, cloudinit.ErrNoPublicKey) {
			keys, err = nil, nil
		}
		if err != nil {
			return nil, nil, fmt.Errorf("accessCredentials[%d] (secretVolume %s): %w", i, c.SecretVolume, err)
		}
		switch c.Propagation {
		case vmspec.PropagateGuestAgent:
			for _, u := range c.Users {
				// one call per user, whatever the credentials naming it
				i := slices.IndexFunc(agent, func(k userKeys) bool { return k.user == u })
				if i < 0 {
					agent = append(agent, userKeys{user: u})
					i = len(agent) - 1
				}
				agent[i].keys = append(agent[i].keys, keys...)
			}
		default:
			noCloud = append(noCloud, keys...)
		}
	}
	return noCloud, agent, nil
}

// syncKeysThroughAgent keeps each user's authorized_keys in line with the guest-agent
// credentials' Secret volumes for as long as the VM runs. read gives the keys as the
// volumes hold them now; it is called again every period. The shim writes each key with
// the comment "vmpod:<the key's comment>" (managedKey): that mark, kept in the guest's own
// file, is how it tells the lines it manages from the guest users' and cloud-init's, across
// VM and shim restarts alike. For each user whose keys changed (and for every user on the
// first round): the file is read (guest-ssh-get-authorized-keys), missing keys are added,
// then marked lines the Secret no longer holds are removed. Unmarked lines are never
// touched. Until the agent answers and the accounts exist it retries with backoff; a
// Secret that stops parsing keeps the guest's keys as they are and says why once; an agent
// without the commands is told once in the log.
func (c *computeVM) syncKeysThroughAgent(ctx context.Context, read func() ([]userKeys, error), period time.Duration) {
	lg := log.G(ctx).WithField("pod", c.pod.id)
	synced := map[string][]string{}  // per user, the Secret keys the file was last brought in line with
	unsupported := map[string]bool{} // users whose agent lacks the commands
	lastErr := map[string]string{}
	note := func(key string, err error, format string, args ...any) {
		if msg := err.Error(); lastErr[key] != msg {
			lastErr[key] = msg
			lg.WithError(err).Infof(format, args...)
		}
	}
	delay := keyRetryFirst
	for {
		select {
		case <-c.exited:
			return
		case <-time.After(delay):
		}
		want, err := read()
		if err != nil {
			note("read", err, "guest agent: the access credentials' Secret volumes do not parse; the guest keeps its keys")
			delay = period
			continue
		}
		var todo []userKeys
		for _, u := range want {
			if prev, ok := synced[u.user]; !unsupported[u.user] && (!ok || !slices.Equal(prev, u.keys)) {
				todo = append(todo, u)
			}
		}
		if len(todo) == 0 {
			delay = period
			continue
		}
		// one short ping a round: while the agent is not up, the key calls would each hold
		// the agent (one call at a time) for their whole timeout, ahead of execs
		pingCtx, cancel := context.WithTimeout(ctx, keyAgentPing)
		err = c.agent.Ping(pingCtx)
		cancel()
		if err != nil {
			note("", err, "guest agent: not answering yet; SSH keys wait for it")
			delay = min(2*delay, keyRetryMax)
			continue
		}
		done := true
		for _, u := range todo {
			added, removed, err := c.syncUserKeys(ctx, u)
			var agentErr *qga.Error
			switch {
			case err == nil:
				synced[u.user] = u.keys
				if added+removed > 0 {
					lg.Infof("guest agent: SSH public keys of %s: %d added, %d removed", u.user, added, removed)
				}
			case errors.As(err, &agentErr) && agentErr.Class == "CommandNotFound":
				unsupported[u.user] = true
				lg.WithError(err).Warnf("guest agent cannot manage SSH keys (too old, or the command is disabled): %s's keys are not kept", u.user)
			default:
				note(u.user, err, "guest agent: SSH keys of %s not updated yet; retrying", u.user)
				done = false
			}
		}
		if done {
			delay = period
		} else {
			delay = min(2*delay, keyRetryMax)
		}
	}
}

// managedMark starts the comment of every authorized_keys line the shim manages.
const managedMark = "vmpod:"

// managedKey is a Secret's key as the shim writes it: its options, type and data as they
// are, and the comment marked.
func managedKey(key string) string {
	head, comment := splitKey(key)
	return head + " " + managedMark + comment
}

// isManaged says whether an authorized_keys line carries the shim's mark.
func isManaged(line string) bool {
	_, comment := splitKey(line)
	return strings.HasPrefix(comment, managedMark)
}

// splitKey cuts an authorized_keys line after its key data (options, type, base64) from
// the comment that follows; a line without a recognisable key is all head.
func splitKey(line string) (head, comment string) {
	line = strings.TrimSpace(line)
	var fields [][2]int // start and end of each whitespace-separated field
	for i := 0; i < len(line); {
		for i < len(line) && (line[i] == ' ' || line[i] == '\t') {
			i++
		}
		start := i
		for i < len(line) && line[i] != ' ' && line[i] != '\t' {
			i++
		}
		if i > start {
			fields = append(fields, [2]int{start, i})
		}
	}
	for i := 0; i+1 < len(fields); i++ {
		if cloudinit.IsKeyType(line[fields[i][0]:fields[i][1]]) {
			end := fields[i+1][1]
			return line[:end], strings.TrimSpace(line[end:])
		}
	}
	return line, ""
}

// syncUserKeys brings one user's authorized_keys in line with u.keys: adds what is
// missing first (a failing removal must not leave the user locked out), then removes the
// marked lines the Secret no longer holds.
func (c *computeVM) syncUserKeys(ctx context.Context, u userKeys) (added, removed int, err error) {
	callCtx, cancel := context.WithTimeout(ctx, agentCheckWait)
	file, err := c.agent.AuthorizedKeys(callCtx, u.user)
	cancel()
	var agentErr *qga.Error
	switch {
	case errors.As(err, &agentErr) && agentErr.Class != "CommandNotFound":
		// qemu-guest-agent cannot read a file that does not exist yet (an account with no
		// keys) or a user it does not know: add (which creates the file, and is refused
		// for an unknown user), remove nothing this time
		file = nil
	case err != nil:
		return 0, 0, err
	}
	var add, remove []string
	want := map[string]bool{}
	for _, k := range u.keys {
		line := managedKey(k)
		if !want[line] && !slices.Contains(file, line) {
			add = append(add, line)
		}
		want[line] = true
	}
	for _, line := range file {
		if isManaged(line) && !want[line] {
			remove = append(remove, line)
		}
	}
	if len(add) > 0 {
		callCtx, cancel := context.WithTimeout(ctx, agentCheckWait)
		err := c.agent.AddAuthorizedKeys(callCtx, u.user, add)
		cancel()
		if err != nil {
			return 0, 0, err
		}
	}
	if len(remove) > 0 {
		callCtx, cancel := context.WithTimeout(ctx, agentCheckWait)
		err := c.agent.RemoveAuthorizedKeys(callCtx, u.user, remove)
		cancel()
		if err != nil {
			return len(add), 0, err
		}
	}
	return len(add), len(remove), nil
}
