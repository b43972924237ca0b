package network

import (
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Constructors of the netlink values a netns dump gives.

func attrs(index int, name, mac string, up bool) netlink.LinkAttrs {
	a := netlink.LinkAttrs{Index: index, Name: name, MTU: 1500, EncapType: "ether"}
	if mac != "" {
		hw, err := net.ParseMAC(mac)
		if err != nil {
			panic(err)
		}
		a.HardwareAddr = hw
	}
	if up {
		a.Flags = net.FlagUp
	}
	return a
}

func lo() netlink.Link {
	a := attrs(1, "lo", "00:00:00:00:00:00", true)
	a.Flags |= net.FlagLoopback
	a.EncapType = "loopback"
	return &netlink.Device{LinkAttrs: a}
}

func veth(index int, name, mac string) netlink.Link {
	return &netlink.Veth{LinkAttrs: attrs(index, name, mac, true)}
}

// addr is an address with its host bits ("10.0.0.2/24"), as netlink reports it.
func addr(cidr string) netlink.Addr {
	ip, n, err := net.ParseCIDR(cidr)
	if err != nil {
		panic(err)
	}
	return netlink.Addr{IPNet: &net.IPNet{IP: ip, Mask: n.Mask}}
}

func cidr(s string) *net.IPNet {
	_, n, err := net.ParseCIDR(s)
	if err != nil {
		panic(err)
	}
	return n
}

// route is a static main-table unicast route; change fields for the other kinds.
func route(link int, dst, gw string) netlink.Route {
	r := netlink.Route{LinkIndex: link, Dst: cidr(dst), Table: unix.RT_TABLE_MAIN, Type: unix.RTN_UNICAST, Protocol: unix.RTPROT_BOOT}
	if gw != "" {
		r.Gw = net.ParseIP(gw)
	}
	return r
}

// podSnapshot is what a CNI bridge leaves: lo, a tunnel fallback device, eth0 with
// dual-stack addresses, the kernel's and CNI's routes.
func podSnapshot() snapshot {
	tunl0 := &netlink.Iptun{LinkAttrs: attrs(2, "tunl0", "", false)}
	tunl0.LinkAttrs.EncapType = "ipip"
	return snapshot{
		links: []netlink.Link{veth(3, "eth0", "0a:58:0a:63:00:02"), lo(), tunl0},
		addrs: map[int][]netlink.Addr{
			1: {addr("127.0.0.1/8"), addr("::1/128")},
			3: {addr("10.99.0.2/24"), addr("fd00:99::2/64"), addr("fe80::858:aff:fe63:2/64")},
		},
		routes: []netlink.Route{
			func() netlink.Route {
				r := route(3, "10.99.0.0/24", "")
				r.Protocol = unix.RTPROT_KERNEL
				return r
			}(),
			func() netlink.Route { r := route(1, "127.0.0.0/8", ""); r.Table = unix.RT_TABLE_LOCAL; return r }(),
			route(3, "0.0.0.0/0", "10.99.0.1"),
			route(3, "::/0", "fd00:99::1"),
			route(3, "192.0.2.0/24", "10.99.0.1"),
		},
	}
}

func TestBuildPlanOfACNIBridgePod(t *testing.T) {
	plan, err := buildPlan("/run/netns/pod", podSnapshot())
	if err != nil {
		t.Fatal(err)
	}
	if len(plan.Interfaces) != 1 {
		t.Fatalf("interfaces %+v, want eth0 only", plan.Interfaces)
	}
	got := plan.Interfaces[0]
	wantAddrs := []netip.Prefix{netip.MustParsePrefix("10.99.0.2/24"), netip.MustParsePrefix("fd00:99::2/64")}
	if got.Name != "eth0" || got.Index != 3 || got.Kind != "veth" || got.MAC.String() != "0a:58:0a:63:00:02" ||
		got.MTU != 1500 || got.Tap != "tap0_eth0" || !slices.Equal(got.Addresses, wantAddrs) {
		t.Errorf("interface %+v: want eth0 #3 veth 0a:58:0a:63:00:02 MTU 1500 tap0_eth0 %v", got, wantAddrs)
	}
	if len(plan.Skipped) != 1 || plan.Skipped[0].What != "link tunl0" || !strings.Contains(plan.Skipped[0].Why, "not an Ethernet link") {
		t.Errorf("skipped %v: want only tunl0, as not Ethernet", plan.Skipped)
	}
	wantRoutes := []Route{
		{Destination: netip.MustParsePrefix("0.0.0.0/0"), Gateway: netip.MustParseAddr("10.99.0.1"), Device: "eth0"},
		{Destination: netip.MustParsePrefix("::/0"), Gateway: netip.MustParseAddr("fd00:99::1"), Device: "eth0"},
		{Destination: netip.MustParsePrefix("192.0.2.0/24"), Gateway: netip.MustParseAddr("10.99.0.1"), Device: "eth0"},
	}
	if !slices.Equal(plan.Routes, wantRoutes) {
		t.Errorf("routes\n %+v\nwant\n %+v", plan.Routes, wantRoutes)
	}
}

func TestGuestConfigOfAPlan(t *testing.T) {
	plan, err := buildPlan("/run/netns/pod", podSnapshot())
	if err != nil {
		t.Fatal(err)
	}
	ifaces := plan.GuestInterfaces()
	if len(ifaces) != 1 {
		t.Fatalf("%d guest interfaces", len(ifaces))
	}
	gi := ifaces[0]
	if gi.Mac != "0a:58:0a:63:00:02" || gi.Name != "eth0" || gi.Mtu != 1500 ||
		!slices.Equal(gi.Addresses, []string{"10.99.0.2/24", "fd00:99::2/64"}) {
		t.Errorf("guest interface %v", gi)
	}
	var routes []string
	for _, r := range plan.GuestRoutes() {
		routes = append(routes, r.Destination+"|"+r.Gateway+"|"+r.Device+"|"+r.Source)
	}
	want := []string{"0.0.0.0/0|10.99.0.1|eth0|", "::/0|fd00:99::1|eth0|", "192.0.2.0/24|10.99.0.1|eth0|"}
	if !slices.Equal(routes, want) {
		t.Errorf("guest routes %q, want %q", routes, want)
	}
}

// Multus: interfaces in ifindex order whatever order the dump had, each with its tap.
func TestBuildPlanKeepsInterfacesInIndexOrder(t *testing.T) {
	snap := snapshot{links: []netlink.Link{
		&netlink.Macvlan{LinkAttrs: attrs(9, "net2", "02:00:00:00:00:09", true)},
		veth(3, "eth0", "02:00:00:00:00:03"),
		&netlink.Vlan{LinkAttrs: attrs(5, "net1", "02:00:00:00:00:05", true)},
		lo(),
	}}
	plan, err := buildPlan("/ns", snap)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, i := range plan.Interfaces {
		got = append(got, i.Name+"/"+i.Kind+"/"+i.Tap)
	}
	want := []string{"eth0/veth/tap0_eth0", "net1/vlan/tap1_net1", "net2/macvlan/tap2_net2"}
	if !slices.Equal(got, want) {
		t.Errorf("interfaces %q, want %q", got, want)
	}
}

func TestBuildPlanRejects(t *testing.T) {
	zeroMAC := veth(3, "eth0", "00:00:00:00:00:00")
	tinyMTU := veth(3, "eth0", "02:00:00:00:00:03")
	tinyMTU.Attrs().MTU = 60
	cases := []struct {
		name string
		snap snapshot
		want string
	}{
		{"only lo", snapshot{links: []netlink.Link{lo()}}, "no usable interface (want an Ethernet link that is up, such as CNI's veth); the netns has only lo"},
		{"down veth", snapshot{links: []netlink.Link{lo(), &netlink.Veth{LinkAttrs: attrs(3, "eth0", "02:00:00:00:00:03", false)}}},
			"no usable interface (want an Ethernet link that is up, such as CNI's veth); skipped: link eth0: down"},
		{"bridge", snapshot{links: []netlink.Link{veth(3, "eth0", "02:00:00:00:00:03"), &netlink.Bridge{LinkAttrs: attrs(4, "cni0", "02:00:00:00:00:04", true)}}},
			"link cni0: type bridge is not supported"},
		{"plumbed already", snapshot{links: []netlink.Link{veth(3, "eth0", "02:00:00:00:00:03"), &netlink.Tuntap{LinkAttrs: attrs(4, "tap0_eth0", "02:00:00:00:00:04", true)}}},
			"link tap0_eth0: a tap is already up in the netns"},
		{"tap name taken", snapshot{links: []netlink.Link{veth(3, "eth0", "02:00:00:00:00:03"), &netlink.Dummy{LinkAttrs: attrs(4, "tap0_eth0", "02:00:00:00:00:04", false)}}},
			"link eth0: tap name tap0_eth0 is taken by a dummy link (ifindex 4)"},
		{"zero MAC", snapshot{links: []netlink.Link{zeroMAC}}, `link eth0: hardware address "00:00:00:00:00:00" is not a usable Ethernet MAC`},
		{"MTU", snapshot{links: []netlink.Link{tinyMTU}}, "link eth0: MTU 60 is below the IPv4 minimum of 68"},
		{"multipath", snapshot{
			links: []netlink.Link{veth(3, "eth0", "02:00:00:00:00:03")},
			routes: []netlink.Route{func() netlink.Route {
				r := route(0, "0.0.0.0/0", "")
				r.MultiPath = []*netlink.NexthopInfo{{LinkIndex: 3}}
				return r
			}()},
		}, "route 0.0.0.0/0 table 254: multipath routes are not supported"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := buildPlan("/ns", c.snap)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %v, want it to contain %q", err, c.want)
			}
		})
	}
}

func TestRoutesTheGuestGets(t *testing.T) {
	eth0 := Interface{Name: "eth0", Index: 3}
	net1 := Interface{Name: "net1", Index: 4}
	links := []netlink.Link{lo(), veth(3, "eth0", "02:00:00:00:00:03"), veth(4, "net1", "02:00:00:00:00:04"), veth(7, "other", "02:00:00:00:00:07")}
	with := func(r netlink.Route, f func(*netlink.Route)) netlink.Route { f(&r); return r }

	routes := []netlink.Route{
		// Calico style: the default gateway is reachable through an on-link host route.
		route(3, "0.0.0.0/0", "169.254.1.1"),
		route(3, "169.254.1.1/32", ""),
		// onlink flag: becomes an on-link host route plus the gateway route.
		with(route(4, "10.20.0.0/16", "172.31.0.1"), func(r *netlink.Route) { r.Flags = int(netlink.FLAG_ONLINK) }),
		// a second default route with a higher metric loses.
		with(route(4, "0.0.0.0/0", "10.98.0.1"), func(r *netlink.Route) { r.Priority = 100 }),
		// skipped, each with its reason
		with(route(3, "10.50.0.0/16", "169.254.1.1"), func(r *netlink.Route) { r.Table = 100 }),
		with(route(3, "2001:db8::/64", "fe80::1"), func(r *netlink.Route) { r.Protocol = unix.RTPROT_RA }),
		with(route(3, "198.51.100.0/24", ""), func(r *netlink.Route) { r.Type = unix.RTN_UNREACHABLE }),
		route(7, "203.0.113.0/24", ""),
		// left out silently
		with(route(3, "fe80::/64", ""), func(r *netlink.Route) { r.Protocol = unix.RTPROT_KERNEL }),
		with(route(1, "127.0.0.0/8", ""), func(r *netlink.Route) { r.Table = unix.RT_TABLE_LOCAL }),
		// a source address, and a default route with Dst left nil (older netlink)
		with(route(4, "10.30.0.0/16", "10.98.0.1"), func(r *netlink.Route) { r.Src = net.ParseIP("10.98.0.2") }),
		{LinkIndex: 3, Gw: net.ParseIP("fd00::1"), Family: unix.AF_INET6, Table: unix.RT_TABLE_MAIN, Type: unix.RTN_UNICAST, Protocol: unix.RTPROT_BOOT},
	}
	got, skipped, err := podRoutes(routes, []Interface{eth0, net1}, links)
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, r := range got {
		lines = append(lines, r.Destination.String()+" via "+r.Gateway.String()+" src "+r.Source.String()+" dev "+r.Device)
	}
	want := []string{
		// on-link first, in input order
		"169.254.1.1/32 via invalid IP src invalid IP dev eth0",
		"172.31.0.1/32 via invalid IP src invalid IP dev net1",
		"0.0.0.0/0 via 169.254.1.1 src invalid IP dev eth0",
		"10.20.0.0/16 via 172.31.0.1 src invalid IP dev net1",
		"10.30.0.0/16 via 10.98.0.1 src 10.98.0.2 dev net1",
		"::/0 via fd00::1 src invalid IP dev eth0",
	}
	if !slices.Equal(lines, want) {
		t.Errorf("routes:\n  %s\nwant:\n  %s", strings.Join(lines, "\n  "), strings.Join(want, "\n  "))
	}
	var whys []string
	for _, s := range skipped {
		whys = append(whys, s.String())
	}
	wantSkipped := []string{
		"route 10.50.0.0/16 table 100: policy routing tables are not carried to the guest",
		"route 2001:db8::/64 table 254: learned from router advertisements, which reach the guest too",
		"route 198.51.100.0/24 table 254: route type 7: only unicast routes are carried",
		"route 203.0.113.0/24 table 254: goes out of other, which is not a pod interface",
		"route 0.0.0.0/0 dev net1 metric 100: a route to the same destination has a lower metric (0); the guest gets one route per destination",
	}
	if !slices.Equal(whys, wantSkipped) {
		t.Errorf("skipped:\n  %s\nwant:\n  %s", strings.Join(whys, "\n  "), strings.Join(wantSkipped, "\n  "))
	}
}

// The lower metric wins whichever comes first.
func TestLowestMetricWinsInEitherOrder(t *testing.T) {
	low := Route{Destination: netip.MustParsePrefix("0.0.0.0/0"), Device: "eth0", Metric: 10}
	high := Route{Destination: netip.MustParsePrefix("0.0.0.0/0"), Device: "net1", Metric: 20}
	for _, in := range [][]Route{{low, high}, {high, low}} {
		out, skipped := lowestMetricPerDestination(in)
		if len(out) != 1 || out[0] != low || len(skipped) != 1 || !strings.Contains(skipped[0].What, "dev net1 metric 20") {
			t.Errorf("from %v: kept %v, skipped %v; want eth0's route kept", in, out, skipped)
		}
	}
}
