package network_test

import (
	"context"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/vmpod/vmpod/integration/testenv"
)

// A plumbed netns followed for changes: a network attached later (multus' dynamic
// networks: CNI ADD on the live pod) is signalled, found by Rescan with the routes out of
// it, and plumbed by Add as Plumb would; its link deleted (CNI DEL), Rescan reports it
// gone and Remove takes its tap and filters away. The plumbing's own taps are never pod
// interfaces. docs/design/205.
func TestRescanAddRemove(t *testing.T) {
	testenv.Require(t)
	pn := newPodNet(t, eth0)
	_, plumbing := pn.Plumb()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	changes, err := plumbing.Watch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if added, removed, err := plumbing.Rescan(); err != nil || len(added.Interfaces) != 0 || len(removed) != 0 {
		t.Fatalf("Rescan of an unchanged netns: %+v, %v, %v", added, removed, err)
	}

	pn.addNetwork(1, net1)
	select {
	case <-changes:
	case <-time.After(5 * time.Second):
		t.Fatal("no change signalled for a link added to the netns")
	}
	added, removed, err := plumbing.Rescan()
	if err != nil || len(removed) != 0 || len(added.Interfaces) != 1 || added.Interfaces[0].Name != "net1" {
		t.Fatalf("Rescan after net1 came: %+v, removed %v, %v", added, removed, err)
	}
	if iface := added.Interfaces[0]; iface.Tap == "" || !slices.ContainsFunc(iface.Addresses, func(a netip.Prefix) bool { return a.String() == net1.PodAddr }) {
		t.Errorf("net1 as found: %+v", iface)
	}
	for _, r := range added.Routes {
		if r.Device != "net1" {
			t.Errorf("a route of the added plan goes out of %s: %+v", r.Device, r)
		}
	}
	nic, err := plumbing.Add(added.Interfaces[0])
	if err != nil || nic.Tap == nil || nic.MAC != pn.link(pn.Pod, "net1").Attrs().HardwareAddr.String() {
		t.Fatalf("Add net1: %+v, %v", nic, err)
	}
	if !plumbing.Hotplugged("net1") || plumbing.Hotplugged("eth0") {
		t.Error("Hotplugged: want net1 (Add) and not eth0 (Plumb)")
	}
	tapLink := pn.link(pn.Pod, added.Interfaces[0].Tap)
	checkRedirect(t, pn.handle(pn.Pod), pn.link(pn.Pod, "net1"), tapLink.Attrs().Index)
	if again, removed, err := plumbing.Rescan(); err != nil || len(again.Interfaces) != 0 || len(removed) != 0 {
		t.Fatalf("Rescan after Add (its tap is up in the netns now): %+v, %v, %v", again, removed, err)
	}
	if _, err := plumbing.Add(added.Interfaces[0]); err == nil {
		t.Error("Add of net1 twice succeeded")
	}

	ipCmd(t, "-n", pn.Node, "link", "del", pn.hostVeth["net1"]) // the pod end goes with it
	if _, removed, err := plumbing.Rescan(); err != nil || !slices.Equal(removed, []string{"net1"}) {
		t.Fatalf("Rescan after net1 went: removed %v, %v", removed, err)
	}
	if err := plumbing.Remove("net1"); err != nil {
		t.Fatal(err)
	}
	if err := plumbing.Remove("eth0"); err == nil {
		t.Error("Remove of eth0, which Plumb made, succeeded")
	}
	if err := plumbing.Teardown(); err != nil {
		t.Fatal(err)
	}
	pn.AssertNoPlumbing()
}
