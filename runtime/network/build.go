package network

import (
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/vishvananda/netlink"
)

// snapshot is what Inspect reads from a netns. buildPlan turns it into a Plan without
// touching the kernel, so the rules are unit-tested on constructed netlink values.
type snapshot struct {
	links  []netlink.Link
	addrs  map[int][]netlink.Addr // by link index
	routes []netlink.Route        // every table
}

// buildPlan applies the rules of interfaces.go and routes.go to a snapshot.
func buildPlan(netnsPath string, snap snapshot) (*Plan, error) {
	plan := &Plan{Netns: netnsPath}
	links := append([]netlink.Link(nil), snap.links...)
	sort.Slice(links, func(i, j int) bool { return links[i].Attrs().Index < links[j].Attrs().Index })

	var errs []error
	for _, link := range links {
		iface, skip, err := podInterface(link, snap.addrs[link.Attrs().Index])
		switch {
		case err != nil:
			errs = append(errs, err)
		case skip != nil:
			plan.Skipped = append(plan.Skipped, *skip)
		case iface != nil:
			iface.Tap = tapName(len(plan.Interfaces), iface.Name)
			plan.Interfaces = append(plan.Interfaces, *iface)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if len(plan.Interfaces) == 0 {
		return nil, fmt.Errorf("no usable interface (want an Ethernet link that is up, such as CNI's veth)%s", skippedSuffix(plan.Skipped))
	}
	if err := checkTapNames(plan.Interfaces, links); err != nil {
		return nil, err
	}

	routes, skipped, err := podRoutes(snap.routes, plan.Interfaces, links)
	if err != nil {
		return nil, err
	}
	plan.Routes = routes
	plan.Skipped = append(plan.Skipped, skipped...)
	return plan, nil
}

// checkTapNames fails if a tap name is taken in the netns: TUNSETIFF would attach to an
// existing persistent tap of that name instead of creating one (Plumb also passes
// IFF_TUN_EXCL, which closes the race; this check gives the better message).
func checkTapNames(ifaces []Interface, links []netlink.Link) error {
	for _, iface := range ifaces {
		for _, l := range links {
			if l.Attrs().Name == iface.Tap {
				return fmt.Errorf("link %s: tap name %s is taken by a %s link (ifindex %d): left by another sandbox?",
					iface.Name, iface.Tap, l.Type(), l.Attrs().Index)
			}
		}
	}
	return nil
}

func skippedSuffix(skipped []Skipped) string {
	if len(skipped) == 0 {
		return "; the netns has only lo"
	}
	parts := make([]string, len(skipped))
	for i, s := range skipped {
		parts[i] = s.String()
	}
	return "; skipped: " + strings.Join(parts, "; ")
}
