package pod

import (
	"context"
	"errors"
	"fmt"
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
// into a boot under TCG, and an account cloud-init creates appears later still.
const (
	keyRetryFirst = time.Second
	keyRetryMax   = 10 * time.Second
	keyAgentPing  = time.Second
)

// accessCredentials reads the keys of each access credential from its Secret volume: those
// cloud-init's meta-data carries, and those the guest agent adds per user. Errors name the
// credential.
func accessCredentials(creds []vmspec.AccessCredential, spec *specs.Spec) (noCloud []string, agent []userKeys, err error) {
	for i, c := range creds {
		keys, err := cloudinit.PublicKeys(c.SecretVolume, spec)
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

// addKeysThroughAgent adds each user's keys with guest-ssh-add-authorized-keys, retrying
// (with backoff) until the agent answers and the account exists, or the VM is gone. An
// agent without the command is told once in the log: the keys cannot reach that guest.
func (c *computeVM) addKeysThroughAgent(ctx context.Context, todo []userKeys) {
	lg := log.G(ctx).WithField("pod", c.pod.id)
	delay := keyRetryFirst
	lastErr := map[string]string{}
	for len(todo) > 0 {
		select {
		case <-c.exited:
			return
		case <-time.After(delay):
		}
		// one short ping a round: while the agent is not up, the key calls would each hold
		// the agent (one call at a time) for their whole timeout, ahead of execs
		pingCtx, cancel := context.WithTimeout(ctx, keyAgentPing)
		err := c.agent.Ping(pingCtx)
		cancel()
		if err != nil {
			if msg := err.Error(); lastErr[""] != msg {
				lastErr[""] = msg
				lg.WithError(err).Info("guest agent: not answering yet; SSH keys wait for it")
			}
			delay = min(2*delay, keyRetryMax)
			continue
		}
		var left []userKeys
		for _, k := range todo {
			callCtx, cancel := context.WithTimeout(ctx, agentCheckWait)
			err := c.agent.AddAuthorizedKeys(callCtx, k.user, k.keys)
			cancel()
			var agentErr *qga.Error
			switch {
			case err == nil:
				lg.Infof("guest agent: %d SSH public keys added for %s", len(k.keys), k.user)
			case errors.As(err, &agentErr) && agentErr.Class == "CommandNotFound":
				lg.WithError(err).Warnf("guest agent cannot add SSH keys (too old?): %s gets none", k.user)
			default:
				if msg := err.Error(); lastErr[k.user] != msg {
					lastErr[k.user] = msg
					lg.WithError(err).Infof("guest agent: SSH keys for %s not added yet; retrying", k.user)
				}
				left = append(left, k)
			}
		}
		todo = left
		delay = min(2*delay, keyRetryMax)
	}
}
