package network

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/vmpod/vmpod/internal/cleanup"
	"github.com/vmpod/vmpod/runtime/vmm"
)

// Plumbing is a Plan made real in the pod's netns: a tap per interface, mirrored to it.
// It holds the taps' files and the netns until Teardown.
type Plumbing struct {
	plan *Plan
	nics []vmm.NIC
	pn   *podNetns
	// undo holds everything Plumb created, to be removed last-first.
	undo cleanup.Stack

	mu     sync.Mutex
	closed bool // torn down: its netns handle is closed (a closed handle works in the shim's own netns)
	// plumbed are the interfaces with a tap, by link name: Plan's, then those Add plumbed
	plumbed map[string]*plumbed
	nextTap int // numbers the taps Add makes, after Plan's
}

// plumbed is one interface made real: its tap, and (for one Add plumbed) what removes it.
type plumbed struct {
	iface    Interface
	tapIndex int
	undo     *cleanup.Stack // nil for Plan's: Teardown removes those
}

// Plumb creates, for each interface of plan, its tap in the netns (same MTU, up, no IPv6
// addresses of its own) and the ingress qdiscs and u32 mirred filters that redirect every
// frame from the interface to the tap and back. On error nothing it created is left:
// no tap, qdisc, filter or open descriptor.
func Plumb(plan *Plan) (_ *Plumbing, retErr error) {
	if plan == nil || len(plan.Interfaces) == 0 {
		return nil, errors.New("network: plumb: the plan has no interfaces (make it with Inspect)")
	}
	pn, err := openNetns(plan.Netns)
	if err != nil {
		return nil, fmt.Errorf("network: netns %s: %w", plan.Netns, err)
	}
	p := &Plumbing{plan: plan, pn: pn, plumbed: map[string]*plumbed{}, nextTap: len(plan.Interfaces)}
	p.undo.Add("close netns", pn.close)
	defer func() {
		if retErr != nil {
			if err := p.undo.Run(); err != nil {
				retErr = errors.Join(retErr, fmt.Errorf("network: netns %s: undo: %w", plan.Netns, err))
			}
		}
	}()
	for _, iface := range plan.Interfaces {
		tap, tapIndex, err := p.plumbInterface(pn, iface, &p.undo)
		if err != nil {
			return nil, fmt.Errorf("network: netns %s: link %s: %w", plan.Netns, iface.Name, err)
		}
		p.nics = append(p.nics, vmm.NIC{Tap: tap, MAC: iface.MAC.String()})
		p.plumbed[iface.Name] = &plumbed{iface: iface, tapIndex: tapIndex}
	}
	return p, nil
}

// plumbInterface does one interface, pushing onto undo an undo for each thing it creates,
// and returns its tap's file and ifindex.
func (p *Plumbing) plumbInterface(pn *podNetns, iface Interface, undo *cleanup.Stack) (*os.File, int, error) {
	link, err := pn.handle.LinkByIndex(iface.Index)
	if err != nil {
		return nil, 0, fmt.Errorf("gone since Inspect (ifindex %d): %w", iface.Index, err)
	}
	if a := link.Attrs(); a.Name != iface.Name || !bytes.Equal(a.HardwareAddr, iface.MAC) {
		return nil, 0, fmt.Errorf("changed since Inspect: ifindex %d is now %s with MAC %s", iface.Index, a.Name, a.HardwareAddr)
	}

	tapFile, err := createTap(pn.ns, iface.Tap)
	if err != nil {
		return nil, 0, fmt.Errorf("tap %s: %w", iface.Tap, err)
	}
	tap, err := pn.handle.LinkByName(iface.Tap)
	if err != nil {
		_ = tapFile.Close() // the only descriptor: the tap goes with it
		return nil, 0, fmt.Errorf("tap %s: not found after creating it: %w", iface.Tap, err)
	}
	undo.Add("remove tap "+iface.Tap, func() error { return pn.removeTap(tapFile, tap.Attrs().Index) })

	if err := pn.prepareTap(tap, iface.MTU); err != nil {
		return nil, 0, fmt.Errorf("tap %s: %w", iface.Tap, err)
	}
	if m := p.plan.Masquerade; m != nil && m.Interface == iface.Name {
		if err := p.plumbMasquerade(pn, iface, tap); err != nil {
			return nil, 0, fmt.Errorf("tap %s: %w", iface.Tap, err)
		}
		return tapFile, tap.Attrs().Index, nil
	}
	if err := pn.addIngress(link.Attrs().Index); err != nil {
		return nil, 0, err
	}
	undo.Add("delete ingress qdisc of "+iface.Name, func() error { return pn.delIngress(link.Attrs().Index) })
	if err := pn.addIngress(tap.Attrs().Index); err != nil {
		return nil, 0, fmt.Errorf("tap %s: %w", iface.Tap, err)
	}
	undo.Add("delete ingress qdisc of "+iface.Tap, func() error { return pn.delIngress(tap.Attrs().Index) })

	// The filters go with their qdiscs: no undo of their own.
	if err := pn.redirect(link.Attrs().Index, tap.Attrs().Index); err != nil {
		return nil, 0, fmt.Errorf("%s to tap %s: %w", iface.Name, iface.Tap, err)
	}
	if err := pn.redirect(tap.Attrs().Index, link.Attrs().Index); err != nil {
		return nil, 0, fmt.Errorf("tap %s to %s: %w", iface.Tap, iface.Name, err)
	}
	return tapFile, tap.Attrs().Index, nil
}

// in6AddrGenModeNone is IN6_ADDR_GEN_MODE_NONE of linux/if_link.h (not in x/sys/unix).
const in6AddrGenModeNone = 1

// prepareTap gives the tap the pod link's MTU and sets it up. Its IPv6 address generation
// is turned off first: otherwise the tap gets a link-local address of its own and sends
// DAD and router solicitations out of itself, i.e. into the guest, from a MAC the pod
// does not have.
func (p *podNetns) prepareTap(tap netlink.Link, mtu int) error {
	if err := p.handle.LinkSetIP6AddrGenMode(tap, in6AddrGenModeNone); err != nil && !errors.Is(err, unix.EAFNOSUPPORT) {
		// EAFNOSUPPORT: IPv6 is off in this netns, so there is nothing to silence.
		return fmt.Errorf("IPv6 addrgenmode none: %w", err)
	}
	if err := p.handle.LinkSetMTU(tap, mtu); err != nil {
		return fmt.Errorf("MTU %d: %w", mtu, err)
	}
	if err := p.handle.LinkSetUp(tap); err != nil {
		return fmt.Errorf("up: %w", err)
	}
	return nil
}

// removeTap closes our descriptor of the tap, which deletes it unless QEMU still holds its
// copy; then it deletes a tap that is still there, so Teardown leaves none even if QEMU
// outlived it.
func (p *podNetns) removeTap(tapFile *os.File, index int) error {
	closeErr := tapFile.Close()
	link, err := p.handle.LinkByIndex(index)
	if err != nil {
		if isGone(err) {
			return closeErr
		}
		return errors.Join(closeErr, fmt.Errorf("look up tap ifindex %d: %w", index, err))
	}
	if link.Type() != "tuntap" {
		return closeErr // the index went to another link: not ours
	}
	if err := p.handle.LinkDel(link); err != nil && !isGone(err) {
		return errors.Join(closeErr, fmt.Errorf("delete tap %s: %w", link.Attrs().Name, err))
	}
	return closeErr
}

// errTornDown: the plumbing's netns handle is closed.
var errTornDown = errors.New("the pod network is torn down")

// Plan is the plan this plumbing was made from.
func (p *Plumbing) Plan() *Plan { return p.plan }

// NICs are the taps for vmm.Config.NICs, in Plan.Interfaces order, each with the MAC
// its guest NIC must have. The files stay owned by the Plumbing: vmm.Start hands
// copies to QEMU, Teardown closes them.
func (p *Plumbing) NICs() []vmm.NIC { return append([]vmm.NIC(nil), p.nics...) }

// Teardown removes what Plumb created, last first: the ingress qdiscs with their filters,
// the taps (closing their files), and releases the netns. Call it once the VM has
// stopped; if QEMU still runs, its NICs lose their link. Errors name each step that
// failed; everything is attempted. Calling it again does nothing.
func (p *Plumbing) Teardown() error {
	p.mu.Lock()
	p.closed = true
	var errs []error
	for name, pl := range p.plumbed {
		if pl.undo != nil {
			errs = append(errs, pl.undo.Run())
			delete(p.plumbed, name)
		}
	}
	errs = append(errs, p.undo.Run())
	p.mu.Unlock()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("network: netns %s: teardown: %w", p.plan.Netns, err)
	}
	return nil
}
