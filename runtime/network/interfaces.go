package network

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
)

// supportedKinds are the link types a pod interface may have: what CNI plugins move into a
// pod netns (bridge/ptp/calico/cilium: veth; macvlan; ipvlan; vlan; SR-IOV and host-device:
// a physical function or VF, netlink's "device"). tc mirred works on any Ethernet link;
// the list is closed so that a surprise (a bridge, a tap) fails loudly instead of being
// redirected into the guest.
var supportedKinds = map[string]bool{
	"veth":    true,
	"macvlan": true,
	"ipvlan":  true,
	"vlan":    true,
	"device":  true,
}

// podInterface decides what a link of the netns is: a pod interface, something to skip
// (with the reason), or an error that must stop the plan.
func podInterface(link netlink.Link, addrs []netlink.Addr) (*Interface, *Skipped, error) {
	a := link.Attrs()
	what := "link " + a.Name
	switch {
	case a.Flags&net.FlagLoopback != 0:
		return nil, nil, nil // the guest has its own lo
	case a.EncapType != "ether":
		// The fallback tunnels (tunl0, sit0, ip6tnl0) appear in every netns once their
		// module is loaded, down and unaddressed; wireguard and tun are layer 3.
		return nil, &Skipped{what, fmt.Sprintf("not an Ethernet link (%s, encap %s)", link.Type(), a.EncapType)}, nil
	case a.Flags&net.FlagUp == 0:
		return nil, &Skipped{what, "down (CNI sets the pod's interfaces up)"}, nil
	case link.Type() == "tuntap":
		return nil, nil, fmt.Errorf("%s: a tap is already up in the netns: is it plumbed for another VM?", what)
	case !supportedKinds[link.Type()]:
		return nil, nil, fmt.Errorf("%s: type %s is not supported (want veth, macvlan, ipvlan, vlan or a physical device)", what, link.Type())
	case len(a.HardwareAddr) != 6 || isZeroMAC(a.HardwareAddr):
		return nil, nil, fmt.Errorf("%s: hardware address %q is not a usable Ethernet MAC", what, a.HardwareAddr)
	case a.MTU < 68:
		return nil, nil, fmt.Errorf("%s: MTU %d is below the IPv4 minimum of 68", what, a.MTU)
	}
	iface := &Interface{
		Name:  a.Name,
		Index: a.Index,
		Kind:  link.Type(),
		MAC:   append(net.HardwareAddr(nil), a.HardwareAddr...),
		MTU:   a.MTU,
	}
	for _, addr := range addrs {
		p, ok := prefixOf(addr.IPNet)
		if !ok {
			return nil, nil, fmt.Errorf("%s: address %v: not an IP prefix", what, addr.IPNet)
		}
		if p.Addr().Is6() && p.Addr().IsLinkLocalUnicast() {
			continue
		}
		iface.Addresses = append(iface.Addresses, p)
	}
	return iface, nil, nil
}

func isZeroMAC(mac net.HardwareAddr) bool {
	for _, b := range mac {
		if b != 0 {
			return false
		}
	}
	return true
}

// prefixOf converts an address with its mask, keeping the host bits ("10.0.0.2/24").
func prefixOf(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	addr, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	addr = addr.Unmap()
	ones, bits := n.Mask.Size()
	if bits != addr.BitLen() {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(addr, ones), true
}
