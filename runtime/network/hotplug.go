package network

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/vishvananda/netlink"

	"github.com/vmpod/vmpod/internal/cleanup"
	"github.com/vmpod/vmpod/runtime/vmm"
)

// Interfaces added to or removed from a running pod's netns (multus' dynamic networks
// controller runs CNI ADD and DEL on a live pod) reach its VM through Watch, Rescan, Add
// and Remove: docs/design/205-nic-hotplug.md.

// Watch signals on the returned channel whenever a link or an address of the netns
// changes (several changes may make one signal), until ctx ends.
func (p *Plumbing) Watch(ctx context.Context) (<-chan struct{}, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, fmt.Errorf("network: netns %s: watch: %w", p.plan.Netns, errTornDown)
	}
	done := make(chan struct{})
	links := make(chan netlink.LinkUpdate, 16)
	addrs := make(chan netlink.AddrUpdate, 16)
	fail := func(err error) (<-chan struct{}, error) {
		close(done)
		return nil, fmt.Errorf("network: netns %s: watch: %w", p.plan.Netns, err)
	}
	if err := netlink.LinkSubscribeWithOptions(links, done, netlink.LinkSubscribeOptions{Namespace: &p.pn.ns}); err != nil {
		return fail(err)
	}
	if err := netlink.AddrSubscribeWithOptions(addrs, done, netlink.AddrSubscribeOptions{Namespace: &p.pn.ns}); err != nil {
		return fail(err)
	}
	changed := make(chan struct{}, 1)
	signal := func() {
		select {
		case changed <- struct{}{}:
		default:
		}
	}
	go func() {
		defer close(changed)
		defer func() {
			close(done)
			// netlink's goroutines may be blocked sending: let them see done and end
			go func() {
				for range links {
				}
			}()
			go func() {
				for range addrs {
				}
			}()
		}()
		for {
			select {
			case <-ctx.Done():
				return
			case _, ok := <-links:
				if !ok {
					return
				}
				signal()
			case _, ok := <-addrs:
				if !ok {
					return
				}
				signal()
			}
		}
	}()
	return changed, nil
}

// Rescan reads the netns again and returns what changed since it was plumbed: a Plan of
// the pod interfaces that appeared (with taps named for Add, and the routes out of them),
// and the names of the plumbed interfaces that are gone. The Plumbing's own taps are not
// pod interfaces; a link that cannot be one (down, not Ethernet, an unsupported kind) is
// in the Plan's Skipped, not an error: CNI may not be done with it yet.
func (p *Plumbing) Rescan() (added *Plan, removed []string, err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, nil, fmt.Errorf("network: netns %s: %w", p.plan.Netns, errTornDown)
	}
	snap, err := p.pn.snapshot()
	if err != nil {
		return nil, nil, fmt.Errorf("network: netns %s: %w", p.plan.Netns, err)
	}
	ours := map[int]bool{}
	for _, pl := range p.plumbed {
		ours[pl.tapIndex] = true
	}
	added = &Plan{Netns: p.plan.Netns}
	var current []Interface
	present := map[string]int{} // link name → ifindex
	for _, link := range snap.links {
		a := link.Attrs()
		if ours[a.Index] {
			continue
		}
		present[a.Name] = a.Index
		iface, skip, err := podInterface(link, snap.addrs[a.Index])
		switch {
		case err != nil:
			added.Skipped = append(added.Skipped, Skipped{"link " + a.Name, err.Error()})
		case skip != nil:
			added.Skipped = append(added.Skipped, *skip)
		case iface != nil:
			current = append(current, *iface)
			if pl, ok := p.plumbed[iface.Name]; !ok || pl.iface.Index != iface.Index {
				added.Interfaces = append(added.Interfaces, *iface)
			}
		}
	}
	for name, pl := range p.plumbed {
		if idx, ok := present[name]; !ok || idx != pl.iface.Index {
			removed = append(removed, name)
		}
	}
	slices.Sort(removed)
	if len(added.Interfaces) == 0 {
		return added, removed, nil
	}
	for i := range added.Interfaces {
		added.Interfaces[i].Tap = tapName(p.nextTap+i, added.Interfaces[i].Name)
	}
	routes, skipped, err := podRoutes(snap.routes, current, snap.links)
	if err != nil {
		// the interfaces still come and go; only their routes are not known
		added.Skipped = append(added.Skipped, Skipped{"routes", err.Error()})
	}
	added.Skipped = append(added.Skipped, skipped...)
	for _, r := range routes {
		if slices.ContainsFunc(added.Interfaces, func(i Interface) bool { return i.Name == r.Device }) {
			added.Routes = append(added.Routes, r)
		}
	}
	return added, removed, nil
}

// Add plumbs iface (one of a Rescan's Plan) as Plumb does: a tap mirrored to it. The NIC
// is for vmm.Machine.PlugNIC; the tap stays the Plumbing's until Remove or Teardown. On
// error nothing it made is left.
func (p *Plumbing) Add(iface Interface) (vmm.NIC, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return vmm.NIC{}, fmt.Errorf("network: netns %s: link %s: %w", p.plan.Netns, iface.Name, errTornDown)
	}
	if _, dup := p.plumbed[iface.Name]; dup {
		return vmm.NIC{}, fmt.Errorf("network: netns %s: link %s: plumbed already", p.plan.Netns, iface.Name)
	}
	undo := &cleanup.Stack{}
	tap, tapIndex, err := p.plumbInterface(p.pn, iface, undo)
	if err != nil {
		return vmm.NIC{}, errors.Join(fmt.Errorf("network: netns %s: link %s: %w", p.plan.Netns, iface.Name, err), undo.Run())
	}
	p.nextTap++
	p.plumbed[iface.Name] = &plumbed{iface: iface, tapIndex: tapIndex, undo: undo}
	return vmm.NIC{Tap: tap, MAC: iface.MAC.String()}, nil
}

// Remove takes away what Add made for the interface named name (its link is gone, or
// going): the qdiscs and filters, the tap. An interface Plumb made stays until Teardown.
func (p *Plumbing) Remove(name string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	pl, ok := p.plumbed[name]
	if !ok {
		return nil
	}
	if pl.undo == nil {
		return fmt.Errorf("network: netns %s: link %s: plumbed with the pod, it goes with the pod", p.plan.Netns, name)
	}
	delete(p.plumbed, name)
	if err := pl.undo.Run(); err != nil {
		return fmt.Errorf("network: netns %s: link %s: %w", p.plan.Netns, name, err)
	}
	return nil
}

// Hotplugged says whether the interface named name was plumbed by Add.
func (p *Plumbing) Hotplugged(name string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	pl, ok := p.plumbed[name]
	return ok && pl.undo != nil
}
