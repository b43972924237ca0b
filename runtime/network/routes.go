package network

import (
	"fmt"
	"net"
	"net/netip"
	"sort"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// podRoutes picks the routes the guest needs from every table of the netns:
//
//   - main table, unicast, out of a pod interface: carried;
//   - local table and routes the kernel made from addresses (proto kernel): left out
//     silently, the guest's kernel makes the same ones;
//   - other tables (policy routing), routes learned from router advertisements, routes
//     out of other links, non-unicast routes: skipped with the reason;
//   - multipath routes: an error, as the agent's Route has one device and one gateway.
//
// A gateway route with the onlink flag becomes an on-link host route to the gateway plus
// the gateway route, which the guest can install without the flag. Per destination only
// the lowest-metric route is kept (the agent installs routes without a metric, so a second
// one would replace the first). On-link routes come first: the agent adds routes in order,
// and the kernel refuses a gateway it cannot reach yet.
func podRoutes(routes []netlink.Route, ifaces []Interface, links []netlink.Link) ([]Route, []Skipped, error) {
	byIndex := make(map[int]string, len(ifaces))
	for _, iface := range ifaces {
		byIndex[iface.Index] = iface.Name
	}
	var (
		out     []Route
		skipped []Skipped
	)
	for _, nr := range routes {
		dst, err := routeDestination(nr)
		if err != nil {
			return nil, nil, err
		}
		what := fmt.Sprintf("route %s table %d", dst, nr.Table)
		skip := func(why string) { skipped = append(skipped, Skipped{what, why}) }
		switch {
		case nr.Table == unix.RT_TABLE_LOCAL || nr.Protocol == unix.RTPROT_KERNEL:
			continue
		case nr.Table != unix.RT_TABLE_MAIN:
			skip("policy routing tables are not carried to the guest")
			continue
		case nr.Type != unix.RTN_UNICAST:
			skip(fmt.Sprintf("route type %d: only unicast routes are carried", nr.Type))
			continue
		case len(nr.MultiPath) > 0:
			return nil, nil, fmt.Errorf("%s: multipath routes are not supported (the guest route has one gateway)", what)
		case nr.Protocol == unix.RTPROT_RA:
			skip("learned from router advertisements, which reach the guest too")
			continue
		}
		device, ok := byIndex[nr.LinkIndex]
		if !ok {
			skip(fmt.Sprintf("goes out of %s, which is not a pod interface", linkName(links, nr.LinkIndex)))
			continue
		}
		r := Route{Destination: dst, Device: device, Metric: nr.Priority}
		if r.Gateway, err = optionalAddr(nr.Gw); err != nil {
			return nil, nil, fmt.Errorf("%s: gateway: %w", what, err)
		}
		if r.Source, err = optionalAddr(nr.Src); err != nil {
			return nil, nil, fmt.Errorf("%s: source: %w", what, err)
		}
		if r.Gateway.IsValid() && nr.Flags&int(netlink.FLAG_ONLINK) != 0 {
			out = append(out, Route{
				Destination: netip.PrefixFrom(r.Gateway, r.Gateway.BitLen()),
				Device:      device,
				Metric:      nr.Priority,
			})
		}
		out = append(out, r)
	}
	out, dups := lowestMetricPerDestination(out)
	skipped = append(skipped, dups...)
	sort.SliceStable(out, func(i, j int) bool { return !out[i].Gateway.IsValid() && out[j].Gateway.IsValid() })
	return out, skipped, nil
}

// routeDestination is the route's destination; a default route is 0.0.0.0/0 or ::/0
// (netlink fills Dst in for them, older versions left it nil).
func routeDestination(nr netlink.Route) (netip.Prefix, error) {
	if nr.Dst == nil {
		switch nr.Family {
		case unix.AF_INET:
			return netip.PrefixFrom(netip.IPv4Unspecified(), 0), nil
		case unix.AF_INET6:
			return netip.PrefixFrom(netip.IPv6Unspecified(), 0), nil
		}
		return netip.Prefix{}, fmt.Errorf("route without destination of address family %d", nr.Family)
	}
	p, ok := prefixOf(nr.Dst)
	if !ok {
		return netip.Prefix{}, fmt.Errorf("route destination %v: not an IP prefix", nr.Dst)
	}
	return p.Masked(), nil
}

func optionalAddr(ip net.IP) (netip.Addr, error) {
	if ip == nil {
		return netip.Addr{}, nil
	}
	a, ok := netip.AddrFromSlice(ip)
	if !ok {
		return netip.Addr{}, fmt.Errorf("%v is not an IP address", ip)
	}
	return a.Unmap(), nil
}

func lowestMetricPerDestination(routes []Route) ([]Route, []Skipped) {
	best := make(map[netip.Prefix]int) // destination -> index in out
	var (
		out     []Route
		skipped []Skipped
	)
	for _, r := range routes {
		i, seen := best[r.Destination]
		if !seen {
			best[r.Destination] = len(out)
			out = append(out, r)
			continue
		}
		loser := r
		if r.Metric < out[i].Metric {
			loser, out[i] = out[i], r
		}
		skipped = append(skipped, Skipped{
			What: fmt.Sprintf("route %s dev %s metric %d", loser.Destination, loser.Device, loser.Metric),
			Why:  fmt.Sprintf("a route to the same destination has a lower metric (%d); the guest gets one route per destination", out[i].Metric),
		})
	}
	return out, skipped
}

func linkName(links []netlink.Link, index int) string {
	for _, l := range links {
		if l.Attrs().Index == index {
			return l.Attrs().Name
		}
	}
	return fmt.Sprintf("ifindex %d", index)
}
