package network_test

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/vmpod/vmpod/integration/testenv"
	"github.com/vmpod/vmpod/runtime/network"
)

// The netns stack answers until Plumb, stops seeing traffic while the mirror is in place
// (the frames go to the tap, which no VM reads here), and answers again after Teardown;
// the netns is destroyable afterwards.
func TestPlumbRedirectsAndTeardownRestores(t *testing.T) {
	testenv.Require(t)
	pn := newPodNet(t, eth0)
	pod := addrOf(eth0.PodAddr) + ":9000"
	pn.Listen(pn.Pod, pod)
	if err := pn.Dial(pn.Node, pod, 5*time.Second); err != nil {
		t.Fatalf("before Plumb the netns itself must answer: %v", err)
	}

	plan, err := network.Inspect(pn.PodPath())
	if err != nil {
		t.Fatal(err)
	}
	checkPlan(t, plan, pn.link(pn.Pod, "eth0"))

	plumbing, err := network.Plumb(plan)
	if err != nil {
		t.Fatal(err)
	}
	checkPlumbed(t, pn, plumbing)
	if err := pn.Dial(pn.Node, pod, time.Second); err == nil {
		t.Fatal("after Plumb the netns stack still answered: its traffic is not redirected to the tap")
	}

	if err := plumbing.Teardown(); err != nil {
		t.Fatalf("teardown: %v", err)
	}
	pn.AssertNoPlumbing()
	if err := pn.Dial(pn.Node, pod, 5*time.Second); err != nil {
		t.Fatalf("after Teardown the netns must answer again: %v", err)
	}
	if err := plumbing.Teardown(); err != nil {
		t.Fatalf("second teardown: %v", err)
	}
	pn.DeletePodNetnsAndWait("eth0")
}

func checkPlan(t *testing.T, plan *network.Plan, veth netlink.Link) {
	t.Helper()
	if len(plan.Interfaces) != 1 {
		t.Fatalf("plan has %d interfaces, want 1: %+v", len(plan.Interfaces), plan.Interfaces)
	}
	got := plan.Interfaces[0]
	want := []netip.Prefix{netip.MustParsePrefix(eth0.PodAddr), netip.MustParsePrefix(eth0.PodAddr6)}
	if got.Name != "eth0" || got.Kind != "veth" || got.MAC.String() != veth.Attrs().HardwareAddr.String() ||
		got.MTU != eth0.MTU || got.Tap != "tap0_eth0" || !slices.Equal(got.Addresses, want) {
		t.Errorf("interface %+v: want eth0, veth, MAC %s, MTU %d, tap0_eth0, addresses %v (no link-local)",
			got, veth.Attrs().HardwareAddr, eth0.MTU, want)
	}
	var routes []string
	for _, r := range plan.GuestRoutes() {
		routes = append(routes, r.Destination+" via "+r.Gateway+" dev "+r.Device)
	}
	wantRoutes := []string{
		"0.0.0.0/0 via 10.99.0.1 dev eth0",
		"192.0.2.0/24 via 10.99.0.1 dev eth0",
		"::/0 via fd00:99::1 dev eth0",
	}
	slices.Sort(routes)
	if !slices.Equal(routes, wantRoutes) {
		t.Errorf("guest routes %q, want %q", routes, wantRoutes)
	}
}

// checkPlumbed inspects the kernel's state: the tap is a non-persistent vnet_hdr tap with
// the veth's MTU, up, without IPv6 addresses, and each side's ingress redirects to the other.
func checkPlumbed(t *testing.T, pn *podNet, plumbing *network.Plumbing) {
	t.Helper()
	h := pn.handle(pn.Pod)
	veth, tapLink := pn.link(pn.Pod, "eth0"), pn.link(pn.Pod, "tap0_eth0")
	tap, ok := tapLink.(*netlink.Tuntap)
	if !ok {
		t.Fatalf("tap0_eth0 is a %s, want tuntap", tapLink.Type())
	}
	if tap.Mode != netlink.TUNTAP_MODE_TAP || tap.Flags&netlink.TUNTAP_VNET_HDR == 0 || tap.Flags&netlink.TUNTAP_NO_PI == 0 || !tap.NonPersist {
		t.Errorf("tap mode %v flags %v non-persist %v: want a non-persistent tap with vnet_hdr and no_pi", tap.Mode, tap.Flags, tap.NonPersist)
	}
	if tap.Attrs().MTU != eth0.MTU || tap.Attrs().Flags&unix.IFF_UP == 0 {
		t.Errorf("tap MTU %d flags %v: want MTU %d and up", tap.Attrs().MTU, tap.Attrs().Flags, eth0.MTU)
	}
	if addrs, _ := h.AddrList(tap, netlink.FAMILY_ALL); len(addrs) > 0 {
		t.Errorf("tap has addresses %v: it would talk to the guest itself", addrs)
	}
	checkRedirect(t, h, veth, tap.Attrs().Index)
	checkRedirect(t, h, tap, veth.Attrs().Index)

	nics := plumbing.NICs()
	if len(nics) != 1 || nics[0].MAC != veth.Attrs().HardwareAddr.String() || nics[0].Tap == nil {
		t.Fatalf("NICs %+v: want one with MAC %s", nics, veth.Attrs().HardwareAddr)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(nics[0].Tap.Fd()), &st); err != nil {
		t.Errorf("tap file: %v", err)
	}
	if fds := tunDescriptors(); len(fds) != 1 {
		t.Errorf("open /dev/net/tun descriptors: %v, want exactly the NIC's", fds)
	}
}

// checkRedirect: link has an ingress qdisc with one u32 filter redirecting to ifindex to.
func checkRedirect(t *testing.T, h *netlink.Handle, link netlink.Link, to int) {
	t.Helper()
	name := link.Attrs().Name
	qdiscs, err := h.QdiscList(link)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(qdiscs, func(q netlink.Qdisc) bool { _, ok := q.(*netlink.Ingress); return ok }) {
		t.Errorf("%s: no ingress qdisc in %v", name, qdiscs)
	}
	filters, err := h.FilterList(link, netlink.HANDLE_MIN_INGRESS)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range filters {
		u32, ok := f.(*netlink.U32)
		if !ok {
			continue
		}
		for _, a := range u32.Actions {
			if m, ok := a.(*netlink.MirredAction); ok && m.Ifindex == to && m.MirredAction == netlink.TCA_EGRESS_REDIR {
				return
			}
		}
	}
	t.Errorf("%s: no u32 filter with a mirred egress redirect to ifindex %d in %+v", name, to, filters)
}

// The plan's tap name is taken before Inspect: Inspect says so. Taken between Inspect and
// Plumb: TUNSETIFF with IFF_TUN_EXCL fails instead of attaching to the other tap, and the
// other tap is left alone.
func TestTapNameCollision(t *testing.T) {
	testenv.Require(t)
	pn := newPodNet(t, eth0)

	plan, err := network.Inspect(pn.PodPath())
	if err != nil {
		t.Fatal(err)
	}
	ipCmd(t, "-n", pn.Pod, "tuntap", "add", "tap0_eth0", "mode", "tap")

	_, err = network.Plumb(plan)
	if err == nil || !strings.Contains(err.Error(), "tap0_eth0") || !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("Plumb with the tap name taken: %v, want an error naming tap0_eth0", err)
	}
	if _, err := pn.handle(pn.Pod).LinkByName("tap0_eth0"); err != nil {
		t.Fatalf("the other tap was removed: %v", err)
	}
	if fds := tunDescriptors(); len(fds) > 0 {
		t.Errorf("leak: /dev/net/tun descriptors %v", fds)
	}
	qdiscs, _ := pn.handle(pn.Pod).QdiscList(pn.link(pn.Pod, "eth0"))
	for _, q := range qdiscs {
		if _, ok := q.(*netlink.Ingress); ok {
			t.Error("leak: ingress qdisc on eth0")
		}
	}

	ipCmd(t, "-n", pn.Pod, "link", "set", "tap0_eth0", "up")
	_, err = network.Inspect(pn.PodPath())
	if err == nil || !strings.Contains(err.Error(), "tap0_eth0") {
		t.Fatalf("Inspect with a tap in the netns: %v, want an error naming tap0_eth0", err)
	}
}

// A failure at the second interface undoes the first one completely and leaves what was
// there before (another tool's ingress qdisc) in place.
func TestPlumbFailureHalfWayLeavesNothing(t *testing.T) {
	testenv.Require(t)
	pn := newPodNet(t, eth0, net1)
	tcCmd(t, "-n", pn.Pod, "qdisc", "add", "dev", "net1", "ingress")

	plan, err := network.Inspect(pn.PodPath())
	if err != nil {
		t.Fatal(err)
	}
	if len(plan.Interfaces) != 2 || plan.Interfaces[0].Name != "eth0" || plan.Interfaces[1].Name != "net1" {
		t.Fatalf("plan interfaces %+v: want eth0, net1", plan.Interfaces)
	}
	_, err = network.Plumb(plan)
	if err == nil || !strings.Contains(err.Error(), "link net1") || !strings.Contains(err.Error(), "ingress qdisc") {
		t.Fatalf("Plumb: %v, want an error naming net1's ingress qdisc", err)
	}
	pn.AssertNoPlumbing("net1")
	qdiscs, _ := pn.handle(pn.Pod).QdiscList(pn.link(pn.Pod, "net1"))
	if !slices.ContainsFunc(qdiscs, func(q netlink.Qdisc) bool { _, ok := q.(*netlink.Ingress); return ok }) {
		t.Error("the ingress qdisc that was on net1 before Plumb is gone: Plumb removed what it did not create")
	}
}

// Teardown deletes a tap even while another process (QEMU) still holds a descriptor of it.
func TestTeardownWhileTapIsStillOpen(t *testing.T) {
	testenv.Require(t)
	pn := newPodNet(t, eth0)
	_, plumbing := pn.Plumb()
	qemuCopy, err := unix.Dup(int(plumbing.NICs()[0].Tap.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(qemuCopy)
	if err := plumbing.Teardown(); err != nil {
		t.Fatal(err)
	}
	if _, err := pn.handle(pn.Pod).LinkByName("tap0_eth0"); err == nil {
		t.Fatal("tap still there after Teardown")
	}
	_ = unix.Close(qemuCopy)
	pn.AssertNoPlumbing()
}

func TestInspectRejectsNetnsWithoutPodInterface(t *testing.T) {
	testenv.Require(t)
	cases := []struct {
		name  string
		setup func(pn *podNet)
		want  []string
	}{
		{"only lo", func(*podNet) {}, []string{"no usable interface", "only lo"}},
		{"veth down", func(pn *podNet) {
			ipCmd(pn.t, "-n", pn.Pod, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
		}, []string{"no usable interface", "link eth0: down", "link peer0: down"}},
		{"bridge up", func(pn *podNet) {
			ipCmd(pn.t, "-n", pn.Pod, "link", "add", "cni0", "type", "bridge")
			ipCmd(pn.t, "-n", pn.Pod, "link", "set", "cni0", "up")
		}, []string{"link cni0", "type bridge is not supported"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			pn := newPodNet(t)
			tc.setup(pn)
			_, err := network.Inspect(pn.PodPath())
			if err == nil {
				t.Fatal("Inspect succeeded")
			}
			for _, w := range append(tc.want, pn.PodPath()) {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
			pn.AssertNoPlumbing()
		})
	}
}

// A plan made before the netns changed is refused, naming the link, before anything is
// created.
func TestPlumbRefusesAStalePlan(t *testing.T) {
	testenv.Require(t)
	pn := newPodNet(t, eth0)
	plan, err := network.Inspect(pn.PodPath())
	if err != nil {
		t.Fatal(err)
	}
	ipCmd(t, "-n", pn.Pod, "link", "set", "eth0", "down")
	ipCmd(t, "-n", pn.Pod, "link", "set", "eth0", "address", "02:00:00:00:00:99")
	_, err = network.Plumb(plan)
	if err == nil || !strings.Contains(err.Error(), "link eth0: changed since Inspect") || !strings.Contains(err.Error(), "02:00:00:00:00:99") {
		t.Fatalf("Plumb with a stale plan: %v, want an error naming eth0's new MAC", err)
	}
	pn.AssertNoPlumbing()
}
