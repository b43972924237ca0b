package runtime_test

import (
	"testing"
	"time"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/integration/testenv"
	"github.com/vmpod/vmpod/runtime/vmm"
)

// TestMigratedGuestTakesItsNewPodsAddress (issue 12, docs/design/212): a container pod's
// guest is the pod on the wire, and a migration's target pod has an address of its own.
// The guest, moved onto the target's network with its MAC, answers at its old address
// there until told the new pod's (Guest.TakeAddresses); then it answers at the new one
// and no longer at the old. Each machine's tap is on a bridge of its own namespace, the
// two pods' networks.
func TestMigratedGuestTakesItsNewPodsAddress(t *testing.T) {
	testenv.Require(t)
	ctx := testenv.Context(t, 5*time.Minute)
	const mac = "02:00:00:00:21:22"
	source := testenv.NewBridgeNet(t, "10.98.0.1/24")
	// the target pod's network; its bridge also has an address in the source's subnet, so
	// that the guest's old address can be asked for there
	target := testenv.NewBridgeNet(t, "10.97.0.1/24", "10.98.0.100/24")

	cfg := testenv.VMConfig(t, "readdress-src")
	cfg.Type, cfg.SharedFS = machine.Q35, machine.NoSharedFS
	cfg.NICs = []vmm.NIC{{Tap: source.Tap("tap0"), MAC: mac}}
	src := testenv.StartVM(t, cfg)
	if err := src.Agent().SetupSandbox(ctx, &agentv1.SetupSandboxRequest{
		Interfaces: []*agentv1.Interface{{Mac: mac, Name: "eth0", Addresses: []string{"10.98.0.2/24"}}},
		Routes:     []*agentv1.Route{{Gateway: "10.98.0.1"}},
	}); err != nil {
		t.Fatal(err)
	}
	if !source.Answers("10.98.0.2") {
		t.Fatal("the guest does not answer at its address on the source's network")
	}

	dstCfg := testenv.VMConfig(t, "readdress-dst")
	dstCfg.Type, dstCfg.SharedFS = machine.Q35, machine.NoSharedFS
	dstCfg.NICs = []vmm.NIC{{Tap: target.Tap("tap0"), MAC: mac}}
	dst := testenv.MoveContainerVM(t, ctx, src, dstCfg, "", testenv.Overlay{}, nil, vmm.MigrationOptions{MaxBandwidth: 1 << 30}).Guest
	if !target.Answers("10.98.0.2") {
		t.Fatal("the moved guest does not answer at its old address on the target's network: the check below could not fail")
	}
	if err := dst.TakeAddresses(ctx, []*agentv1.Interface{{Mac: mac, Name: "eth0", Addresses: []string{"10.97.0.2/24"}}},
		[]*agentv1.Route{{Gateway: "10.97.0.1"}}); err != nil {
		t.Fatal(err)
	}
	if !target.Answers("10.97.0.2") {
		t.Error("the guest does not answer at its new pod's address")
	}
	if target.Answers("10.98.0.2") {
		t.Error("the guest still answers at the source pod's address")
	}
	if err := dst.Stop(ctx); err != nil {
		t.Error(err)
	}
}
