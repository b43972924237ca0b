package network

import (
	"net"
	"net/netip"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
)

// Plan is a pod network namespace as Inspect found it, and what Plumb will make of it.
type Plan struct {
	// Netns is the path of the pod's network namespace.
	Netns string
	// Interfaces become the guest's NICs, in this order (ifindex order: creation order, so
	// CNI's eth0 before the interfaces multus adds).
	Interfaces []Interface
	// Routes are given to the guest in this order: on-link routes before the routes whose
	// gateway they make reachable.
	Routes []Route
	// Skipped lists what Inspect found but leaves out of the plan, for the shim's log.
	Skipped []Skipped
	// Masquerade, set by the caller before Plumb, puts one interface behind NAT instead of
	// mirroring it (VM pods' masquerade binding).
	Masquerade *Masquerade
}

// Interface is one pod link in the netns and the guest NIC it becomes.
type Interface struct {
	// Name is the link's name in the netns; the guest NIC gets the same name, so a
	// container sees eth0, net1, ... as it would under runc.
	Name string
	// Index is the link's ifindex in the netns.
	Index int
	// Kind is netlink's type of the link: veth, macvlan, ipvlan, vlan or device.
	Kind string
	// MAC is the link's hardware address, which the guest NIC takes over: peers keep the
	// neighbour entries CNI's setup made them learn.
	MAC net.HardwareAddr
	MTU int
	// Addresses are the link's IPv4 and IPv6 addresses with their prefix lengths; IPv6
	// link-local addresses are left out (the guest derives the same one from the MAC).
	Addresses []netip.Prefix
	// Tap is the name of the tap Plumb creates for this link in the netns.
	Tap string
}

// Route is a route of the netns's main table that the guest gets.
type Route struct {
	// Destination is 0.0.0.0/0 or ::/0 for a default route.
	Destination netip.Prefix
	// Gateway is the zero Addr for an on-link route.
	Gateway netip.Addr
	// Source is the preferred source address, the zero Addr if unset.
	Source netip.Addr
	// Device is the Interface.Name the route goes out of.
	Device string
	// Metric is the route's priority in the netns. The agent has no metric, so a plan
	// keeps only the lowest-metric route per destination.
	Metric int
}

// Skipped is a link or route Inspect left out, and why.
type Skipped struct {
	What string // e.g. "link tunl0", "route 10.1.0.0/16 table 100"
	Why  string
}

func (s Skipped) String() string { return s.What + ": " + s.Why }

// GuestInterfaces is Plan's part of the agent's SetupSandboxRequest.interfaces.
func (p *Plan) GuestInterfaces() []*agentv1.Interface {
	out := make([]*agentv1.Interface, 0, len(p.Interfaces))
	for _, iface := range p.Interfaces {
		addrs := make([]string, 0, len(iface.Addresses))
		for _, a := range iface.Addresses {
			addrs = append(addrs, a.String())
		}
		out = append(out, &agentv1.Interface{
			Mac:       iface.MAC.String(),
			Name:      iface.Name,
			Addresses: addrs,
			Mtu:       uint32(iface.MTU),
		})
	}
	return out
}

// GuestRoutes is Plan's part of the agent's SetupSandboxRequest.routes. Destinations are
// always explicit CIDRs ("0.0.0.0/0", "::/0"), never the empty default, so a device-only
// IPv6 default route keeps its family.
func (p *Plan) GuestRoutes() []*agentv1.Route {
	out := make([]*agentv1.Route, 0, len(p.Routes))
	for _, r := range p.Routes {
		gr := &agentv1.Route{Destination: r.Destination.String(), Device: r.Device}
		if r.Gateway.IsValid() {
			gr.Gateway = r.Gateway.String()
		}
		if r.Source.IsValid() {
			gr.Source = r.Source.String()
		}
		out = append(out, gr)
	}
	return out
}
