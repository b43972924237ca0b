package network

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// dumpAttempts bounds the retries of a netlink dump the kernel marks as interrupted (the
// netns changed while it was read, e.g. a CNI plugin still at work).
const dumpAttempts = 5

// Inspect reads the pod network namespace at netnsPath and plans its plumbing. It changes
// nothing. Errors name the netns and what in it is wrong.
func Inspect(netnsPath string) (*Plan, error) {
	pn, err := openNetns(netnsPath)
	if err != nil {
		return nil, fmt.Errorf("network: netns %s: %w", netnsPath, err)
	}
	defer pn.close()
	snap, err := pn.snapshot()
	if err != nil {
		return nil, fmt.Errorf("network: netns %s: %w", netnsPath, err)
	}
	plan, err := buildPlan(netnsPath, snap)
	if err != nil {
		return nil, fmt.Errorf("network: netns %s: %w", netnsPath, err)
	}
	return plan, nil
}

// snapshot reads links, their addresses and every table's routes, as one consistent
// picture: a dump interrupted by a change is read again.
func (p *podNetns) snapshot() (snapshot, error) {
	for attempt := 1; ; attempt++ {
		snap, err := p.read()
		if errors.Is(err, netlink.ErrDumpInterrupted) && attempt < dumpAttempts {
			continue
		}
		return snap, err
	}
}

func (p *podNetns) read() (snapshot, error) {
	links, err := p.handle.LinkList()
	if err != nil {
		return snapshot{}, fmt.Errorf("list links: %w", err)
	}
	snap := snapshot{links: links, addrs: make(map[int][]netlink.Addr, len(links))}
	for _, l := range links {
		addrs, err := p.handle.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			return snapshot{}, fmt.Errorf("link %s: list addresses: %w", l.Attrs().Name, err)
		}
		snap.addrs[l.Attrs().Index] = addrs
	}
	snap.routes, err = p.handle.RouteListFiltered(netlink.FAMILY_ALL,
		&netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return snapshot{}, fmt.Errorf("list routes: %w", err)
	}
	return snap, nil
}
