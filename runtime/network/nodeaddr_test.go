package network

import (
	"net"
	"os"
	"runtime"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// The node's address is its default route's source; without a default route, the first
// address of a link that is up; without either, an error. In a network namespace of its
// own, as a test node is.
func TestNodeAddress(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("a network namespace and its links need root")
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	host, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer host.Close()
	ns, err := netns.New() // and the thread is in it
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	defer netns.Set(host)

	if a, err := NodeAddress(); err == nil || !strings.Contains(err.Error(), "no IPv4 address") {
		t.Errorf("no address at all: %v, %v", a, err)
	}
	link := func(name, cidr string) netlink.Link {
		t.Helper()
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "p"}); err != nil {
			t.Fatal(err)
		}
		if peer, err := netlink.LinkByName(name + "p"); err != nil || netlink.LinkSetUp(peer) != nil {
			t.Fatalf("peer of %s: %v", name, err)
		}
		l, err := netlink.LinkByName(name)
		if err != nil {
			t.Fatal(err)
		}
		addr, _ := netlink.ParseAddr(cidr)
		if err := netlink.AddrAdd(l, addr); err != nil {
			t.Fatal(err)
		}
		if err := netlink.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
		return l
	}
	link("first0", "10.80.0.2/24")
	if a, err := NodeAddress(); err != nil || a.String() != "10.80.0.2" {
		t.Errorf("without a default route: %v, %v; want the link's 10.80.0.2", a, err)
	}
	second := link("second0", "10.81.0.2/24")
	if err := netlink.RouteAdd(&netlink.Route{LinkIndex: second.Attrs().Index, Gw: net.ParseIP("10.81.0.1")}); err != nil {
		t.Fatal(err)
	}
	if a, err := NodeAddress(); err != nil || a.String() != "10.81.0.2" {
		t.Errorf("with a default route: %v, %v; want its source 10.81.0.2", a, err)
	}
}
