package network

import (
	"encoding/binary"
	"net"
	"net/netip"
	"testing"

	"github.com/insomniacslk/dhcp/dhcpv4"
	"golang.org/x/net/bpf"
)

var guestMAC = net.HardwareAddr{0x0a, 0x58, 0x0a, 0x63, 0x00, 0x07}

func testPlan() *Plan {
	return &Plan{
		Interfaces: []Interface{{Name: "eth0", MAC: guestMAC, MTU: 1450,
			Addresses: []netip.Prefix{netip.MustParsePrefix("fd00::7/64"), netip.MustParsePrefix("10.99.0.7/24")}}},
		Routes: []Route{
			{Destination: netip.MustParsePrefix("10.99.0.0/24"), Device: "eth0"},
			{Destination: netip.MustParsePrefix("0.0.0.0/0"), Gateway: netip.MustParseAddr("10.99.0.1"), Device: "eth0"},
			{Destination: netip.MustParsePrefix("::/0"), Gateway: netip.MustParseAddr("fd00::1"), Device: "eth0"},
		},
	}
}

func request(t *testing.T, typ dhcpv4.MessageType, mac net.HardwareAddr, mods ...dhcpv4.Modifier) *dhcpv4.DHCPv4 {
	t.Helper()
	m, err := dhcpv4.New(append([]dhcpv4.Modifier{dhcpv4.WithHwAddr(mac), dhcpv4.WithMessageType(typ)}, mods...)...)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestLeaseAndReplies(t *testing.T) {
	l, err := testPlan().LeaseFor("eth0", []netip.Addr{netip.MustParseAddr("10.96.0.10"), netip.MustParseAddr("fd00::10")}, []string{"ns.svc.cluster.local", "svc.cluster.local"}, "web-0")
	if err != nil {
		t.Fatal(err)
	}
	if l.Address.String() != "10.99.0.7/24" || l.Gateway.String() != "10.99.0.1" || len(l.Routes) != 0 || len(l.DNS) != 1 || l.ServerAddr != l.Gateway {
		t.Fatalf("lease %+v", l)
	}

	offer, err := reply(request(t, dhcpv4.MessageTypeDiscover, guestMAC), l)
	if err != nil || offer == nil {
		t.Fatalf("offer: %v %v", offer, err)
	}
	if offer.MessageType() != dhcpv4.MessageTypeOffer || offer.YourIPAddr.String() != "10.99.0.7" ||
		net.IP(offer.SubnetMask()).String() != "255.255.255.0" || offer.Router()[0].String() != "10.99.0.1" ||
		offer.DNS()[0].String() != "10.96.0.10" || offer.HostName() != "web-0" || offer.DomainName() != "ns.svc.cluster.local" ||
		offer.ServerIdentifier().String() != "10.99.0.1" || offer.IPAddressLeaseTime(0) != leaseForever*1e9 {
		t.Fatalf("offer:\n%s", offer.Summary())
	}
	if mtu := offer.Options.Get(dhcpv4.OptionInterfaceMTU); binary.BigEndian.Uint16(mtu) != 1450 {
		t.Fatalf("MTU option %v", mtu)
	}

	ack, _ := reply(request(t, dhcpv4.MessageTypeRequest, guestMAC, dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.IPv4(10, 99, 0, 7)))), l)
	if ack.MessageType() != dhcpv4.MessageTypeAck || ack.YourIPAddr.String() != "10.99.0.7" {
		t.Fatalf("ack:\n%s", ack.Summary())
	}
	nak, _ := reply(request(t, dhcpv4.MessageTypeRequest, guestMAC, dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.IPv4(10, 0, 2, 15)))), l)
	if nak.MessageType() != dhcpv4.MessageTypeNak || !nak.YourIPAddr.IsUnspecified() {
		t.Fatalf("a request for another address:\n%s", nak.Summary())
	}
	other := net.HardwareAddr{0x52, 0x54, 0, 0, 0, 1}
	if r, _ := reply(request(t, dhcpv4.MessageTypeDiscover, other), l); r != nil {
		t.Fatalf("answered another MAC:\n%s", r.Summary())
	}
	if r, _ := reply(request(t, dhcpv4.MessageTypeRelease, guestMAC), l); r != nil {
		t.Fatal("answered a RELEASE")
	}
}

// Calico-style: a /32 address and a link-local gateway reachable only by an on-link route.
func TestClasslessRoutes(t *testing.T) {
	p := &Plan{
		Interfaces: []Interface{{Name: "eth0", MAC: guestMAC, MTU: 1500, Addresses: []netip.Prefix{netip.MustParsePrefix("192.168.5.9/32")}}},
		Routes: []Route{
			{Destination: netip.MustParsePrefix("169.254.1.1/32"), Device: "eth0"},
			{Destination: netip.MustParsePrefix("0.0.0.0/0"), Gateway: netip.MustParseAddr("169.254.1.1"), Device: "eth0"},
		},
	}
	l, err := p.LeaseFor("eth0", nil, nil, "")
	if err != nil {
		t.Fatal(err)
	}
	offer, _ := reply(request(t, dhcpv4.MessageTypeDiscover, guestMAC), l)
	routes := offer.ClasslessStaticRoute()
	if len(routes) != 2 || routes[0].String() != "route to 169.254.1.1/32 via 0.0.0.0" || routes[1].String() != "route to 0.0.0.0/0 via 169.254.1.1" {
		t.Fatalf("classless routes %v", routes)
	}
	if _, err := (&Plan{Interfaces: []Interface{{Name: "eth0", Addresses: []netip.Prefix{netip.MustParsePrefix("fd00::1/64")}}}}).LeaseFor("eth0", nil, nil, ""); err == nil {
		t.Fatal("leased an IPv6-only interface")
	}
}

func TestFrames(t *testing.T) {
	l, _ := testPlan().LeaseFor("eth0", nil, nil, "")
	disc := request(t, dhcpv4.MessageTypeDiscover, guestMAC, dhcpv4.WithBroadcast(true))
	// the guest's frame: the server's reply frame format with the ports turned around
	frame := dhcpFrame(disc, guestMAC, net.HardwareAddr{1, 2, 3, 4, 5, 6}, true)
	binary.BigEndian.PutUint16(frame[34:36], dhcpv4.ClientPort)
	binary.BigEndian.PutUint16(frame[36:38], dhcpv4.ServerPort)
	got, from, ok := parseDHCPFrame(frame)
	if !ok || from.String() != guestMAC.String() || got.TransactionID != disc.TransactionID {
		t.Fatalf("parse: ok %v from %v", ok, from)
	}
	if _, _, ok := parseDHCPFrame(frame[:40]); ok {
		t.Fatal("parsed a truncated frame")
	}
	offer, _ := reply(got, l)
	out := dhcpFrame(offer, net.HardwareAddr{2, 0, 0, 0, 0, 1}, from, got.IsBroadcast())
	if net.HardwareAddr(out[0:6]).String() != "ff:ff:ff:ff:ff:ff" || net.IP(out[30:34]).String() != "255.255.255.255" ||
		binary.BigEndian.Uint16(out[36:38]) != dhcpv4.ClientPort || checksum(out[14:34]) != 0 {
		t.Fatalf("reply frame header % x", out[:42])
	}
	back, err := dhcpv4.FromBytes(out[42:])
	if err != nil || back.MessageType() != dhcpv4.MessageTypeOffer {
		t.Fatalf("reply payload: %v", err)
	}
}

func TestDHCPFilter(t *testing.T) {
	vm, err := bpf.NewVM(dhcpFilter)
	if err != nil {
		t.Fatal(err)
	}
	disc := request(t, dhcpv4.MessageTypeDiscover, guestMAC)
	toServer := dhcpFrame(disc, guestMAC, net.HardwareAddr{1, 2, 3, 4, 5, 6}, true)
	binary.BigEndian.PutUint16(toServer[34:36], dhcpv4.ClientPort)
	binary.BigEndian.PutUint16(toServer[36:38], dhcpv4.ServerPort)
	toClient := dhcpFrame(disc, guestMAC, net.HardwareAddr{1, 2, 3, 4, 5, 6}, true) // port 67 -> 68
	fragment := append([]byte(nil), toServer...)
	fragment[14+7] = 1 // fragment offset 8
	arp := append([]byte(nil), toServer...)
	binary.BigEndian.PutUint16(arp[12:14], 0x0806)
	tcp := append([]byte(nil), toServer...)
	tcp[14+9] = 6
	for name, c := range map[string]struct {
		frame []byte
		pass  bool
	}{"request": {toServer, true}, "reply": {toClient, false}, "fragment": {fragment, false}, "ARP": {arp, false}, "TCP to 67": {tcp, false}} {
		n, err := vm.Run(c.frame)
		if err != nil || (n > 0) != c.pass {
			t.Errorf("%s: filter returned %d, %v; want pass %v", name, n, err, c.pass)
		}
	}
}
