package vmpodagent

import (
	"context"
	"crypto/rand"
	"fmt"
	"time"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/qmp"
	"github.com/vmpod/vmpod/runtime/vmm"
)

// restoreEntropy is how many random bytes a restored guest's kernel is reseeded with.
const restoreEntropy = 64

// CheckTemplate reports why the machine cannot be a template's, or nil.
func (c Config) CheckTemplate() error { return c.machineConfig().CheckTemplate() }

// TemplateKey is the template key (vmm.Config.TemplateKey) of the machine Boot starts.
func (c Config) TemplateKey() (string, error) { return c.machineConfig().TemplateKey() }

// SaveState saves a template guest (vmm.Config.Template, booted without RestoreFrom)
// into to, and leaves the machine stopped for good: the caller stops it. The agent
// connection is closed first, so that each restore finds the agent waiting for a new
// session.
func (g *Guest) SaveState(ctx context.Context, to vmm.SavedTemplate) (qmp.MigrationInfo, error) {
	_ = g.agent.close()
	return g.m.SaveTemplate(ctx, to)
}

// restored makes a guest restored from a template its own: the kernel's random number
// generator reseeded from the host (every restore of a state starts with the same pool),
// its clock set (it went on from the template's), and the shared directory, plugged after
// the restore, mounted.
func (g *Guest) restored(ctx context.Context) error {
	req := &agentv1.SetupSandboxRequest{Entropy: make([]byte, restoreEntropy), HostTimeUnixNanos: time.Now().UnixNano()}
	if _, err := rand.Read(req.Entropy); err != nil {
		return fmt.Errorf("entropy for the guest: %w", err)
	}
	if g.cfg.machineConfig().SharedFS == machine.VirtioFS {
		req.Share = "virtiofs:" + vmm.ShareTag
	}
	return g.agent.SetupSandbox(ctx, req)
}
