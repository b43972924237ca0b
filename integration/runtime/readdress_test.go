package runtime_test

import (
	"os/exec"
	"testing"
	"time"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/integration/testenv"
	"github.com/vmpod/vmpod/qmp/qmptest"
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
	network := func(bridgeCIDRs ...string) *qmptest.Netns {
		ns := qmptest.NewNetns(t)
		ip := func(args ...string) {
			t.Helper()
			if out, err := exec.Command("ip", append([]string{"-n", ns.Name}, args...)...).CombinedOutput(); err != nil {
				t.Fatalf("ip %v: %v: %s", args, err, out)
			}
		}
		ip("link", "add", "br0", "type", "bridge")
		t.Cleanup(func() { _ = exec.Command("ip", "-n", ns.Name, "link", "del", "br0").Run() })
		for _, cidr := range bridgeCIDRs {
			ip("addr", "add", cidr, "dev", "br0")
		}
		ip("link", "set", "br0", "up")
		return ns
	}
	nicOn := func(ns *qmptest.Netns) vmm.NIC {
		tap := ns.OpenTap(t, "tap0")
		for _, args := range [][]string{{"link", "set", "tap0", "master", "br0"}, {"link", "set", "tap0", "up"}} {
			if out, err := exec.Command("ip", append([]string{"-n", ns.Name}, args...)...).CombinedOutput(); err != nil {
				t.Fatalf("ip %v: %v: %s", args, err, out)
			}
		}
		return vmm.NIC{Tap: tap, MAC: mac}
	}
	answers := func(ns *qmptest.Netns, addr string) bool {
		return exec.Command("ip", "netns", "exec", ns.Name, "ping", "-c", "1", "-W", "2", addr).Run() == nil
	}

	source := network("10.98.0.1/24")
	// the target pod's network; its bridge also has an address in the source's subnet, so
	// that the guest's old address can be asked for there
	target := network("10.97.0.1/24", "10.98.0.100/24")

	cfg := testenv.VMConfig(t, "readdress-src")
	cfg.Type, cfg.SharedFS = machine.Q35, machine.NoSharedFS
	cfg.NICs = []vmm.NIC{nicOn(source)}
	src := testenv.StartVM(t, cfg)
	if err := src.Agent().SetupSandbox(ctx, &agentv1.SetupSandboxRequest{
		Interfaces: []*agentv1.Interface{{Mac: mac, Name: "eth0", Addresses: []string{"10.98.0.2/24"}}},
		Routes:     []*agentv1.Route{{Gateway: "10.98.0.1"}},
	}); err != nil {
		t.Fatal(err)
	}
	if !answers(source, "10.98.0.2") {
		t.Fatal("the guest does not answer at its address on the source's network")
	}

	dstCfg := testenv.VMConfig(t, "readdress-dst")
	dstCfg.Type, dstCfg.SharedFS = machine.Q35, machine.NoSharedFS
	dstCfg.NICs = []vmm.NIC{nicOn(target)}
	dst := testenv.MoveContainerVM(t, ctx, src, dstCfg, "", testenv.Overlay{}, nil, vmm.MigrationOptions{MaxBandwidth: 1 << 30}).Guest
	if !answers(target, "10.98.0.2") {
		t.Fatal("the moved guest does not answer at its old address on the target's network: the check below could not fail")
	}
	if err := dst.TakeAddresses(ctx, []*agentv1.Interface{{Mac: mac, Name: "eth0", Addresses: []string{"10.97.0.2/24"}}},
		[]*agentv1.Route{{Gateway: "10.97.0.1"}}); err != nil {
		t.Fatal(err)
	}
	if !answers(target, "10.97.0.2") {
		t.Error("the guest does not answer at its new pod's address")
	}
	if answers(target, "10.98.0.2") {
		t.Error("the guest still answers at the source pod's address")
	}
	if err := dst.Stop(ctx); err != nil {
		t.Error(err)
	}
}
