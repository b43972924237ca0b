package network

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
)

// NodeAddress is the node's IPv4 address in the caller's network namespace (the host's,
// or a test node's): the source address of its default route, or, without one, the first
// global address of a link that is up. Another node reaches the node's services there.
func NodeAddress() (netip.Addr, error) {
	// the route to TEST-NET-1, never a local address: the default route's, if there is one
	if got, err := netlink.RouteGet(net.IPv4(192, 0, 2, 1)); err == nil && len(got) > 0 {
		if a, ok := netip.AddrFromSlice(got[0].Src.To4()); ok && a.IsGlobalUnicast() {
			return a, nil
		}
	}
	links, err := netlink.LinkList()
	if err != nil {
		return netip.Addr{}, fmt.Errorf("node address: links: %w", err)
	}
	for _, l := range links {
		if l.Attrs().Flags&net.FlagUp == 0 || l.Attrs().Flags&net.FlagLoopback != 0 {
			continue
		}
		addrs, err := netlink.AddrList(l, netlink.FAMILY_V4)
		if err != nil {
			continue
		}
		for _, ad := range addrs {
			if a, ok := netip.AddrFromSlice(ad.IP.To4()); ok && a.IsGlobalUnicast() {
				return a, nil
			}
		}
	}
	return netip.Addr{}, errors.New("node address: no IPv4 address on a link that is up")
}
