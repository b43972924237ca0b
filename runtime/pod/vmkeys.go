package pod

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
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
// credentials' Secret volumes for as long as the VM runs: read gives the keys as the
// volumes hold them now, read again every period; a key that appears is added (guest-ssh-add-authorized-keys), a
// key this loop added that the Secret no longer holds is removed
// (guest-ssh-remove-authorized-keys). Keys it did not add (the guest's users', cloud-init's)
// are never removed. Until the agent answers and the accounts exist it retries with
// backoff; a Secret that stops parsing keeps the keys as they are, and says why once. An
// agent without the commands is told once in the log: the keys cannot reach that guest.
func (c *computeVM) syncKeysThroughAgent(ctx context.Context, read func() ([]userKeys, error), period time.Duration) {
	lg := log.G(ctx).WithField("pod", c.pod.id)
	applied := map[string][]string{} // per user, the keys this loop has added and not removed
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
		changes := keyChanges(want, applied, unsupported)
		if len(changes) == 0 {
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
		for _, ch := range changes {
			err := c.applyKeyChange(ctx, ch)
			var agentErr *qga.Error
			switch {
			case err == nil:
				applied[ch.user] = ch.want
				lg.Infof("guest agent: SSH public keys of %s: %d added, %d removed", ch.user, len(ch.add), len(ch.remove))
			case errors.As(err, &agentErr) && agentErr.Class == "CommandNotFound":
				unsupported[ch.user] = true
				lg.WithError(err).Warnf("guest agent cannot manage SSH keys (too old?): %s gets none", ch.user)
			default:
				note(ch.user, err, "guest agent: SSH keys of %s not updated yet; retrying", ch.user)
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

// keyChange is what one user's authorized_keys needs: keys to add and keys to remove, to
// hold want (of what vmpod manages).
type keyChange struct {
	user        string
	add, remove []string
	want        []string
}

// keyChanges compares the keys the Secrets hold with those applied, user by user.
func keyChanges(want []userKeys, applied map[string][]string, skip map[string]bool) []keyChange {
	wanted := map[string][]string{}
	for _, u := range want {
		wanted[u.user] = u.keys
	}
	users := slices.Sorted(maps.Keys(wanted))
	for u := range applied {
		if _, ok := wanted[u]; !ok {
			users = append(users, u)
		}
	}
	var out []keyChange
	for _, u := range users {
		if skip[u] {
			continue
		}
		ch := keyChange{user: u, want: wanted[u]}
		for _, k := range ch.want {
			if !slices.Contains(applied[u], k) && !slices.Contains(ch.add, k) {
				ch.add = append(ch.add, k)
			}
		}
		for _, k := range applied[u] {
			if !slices.Contains(ch.want, k) {
				ch.remove = append(ch.remove, k)
			}
		}
		if len(ch.add) > 0 || len(ch.remove) > 0 {
			out = append(out, ch)
		}
	}
	return out
}

func (c *computeVM) applyKeyChange(ctx context.Context, ch keyChange) error {
	if len(ch.remove) > 0 {
		callCtx, cancel := context.WithTimeout(ctx, agentCheckWait)
		err := c.agent.RemoveAuthorizedKeys(callCtx, ch.user, ch.remove)
		cancel()
		if err != nil {
			return err
		}
	}
	if len(ch.add) > 0 {
		callCtx, cancel := context.WithTimeout(ctx, agentCheckWait)
		defer cancel()
		return c.agent.AddAuthorizedKeys(callCtx, ch.user, ch.add)
	}
	return nil
}
