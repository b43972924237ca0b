package network

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// ingressHandle is the handle of every ingress qdisc, "ffff:" in tc's notation.
var ingressHandle = netlink.MakeHandle(0xffff, 0)

// redirectPriority is the filter's priority on the ingress qdisc; there is only this one.
const redirectPriority = 1

func ingressQdisc(linkIndex int) *netlink.Ingress {
	return &netlink.Ingress{QdiscAttrs: netlink.QdiscAttrs{
		LinkIndex: linkIndex,
		Handle:    ingressHandle,
		Parent:    netlink.HANDLE_INGRESS,
	}}
}

// addIngress adds the ingress qdisc to a link. It fails if the link has one already
// (NLM_F_EXCL): it may be another tool's, and Teardown deletes the qdiscs it added.
func (p *podNetns) addIngress(linkIndex int) error {
	if err := p.handle.QdiscAdd(ingressQdisc(linkIndex)); err != nil {
		if errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("add ingress qdisc: the link already has one (another runtime's, or a sandbox not torn down): %w", err)
		}
		return fmt.Errorf("add ingress qdisc: %w", err)
	}
	return nil
}

// delIngress deletes a link's ingress qdisc and with it its filters. A qdisc or link that
// is gone already (the tap went with QEMU's descriptor) is not an error.
func (p *podNetns) delIngress(linkIndex int) error {
	err := p.handle.QdiscDel(ingressQdisc(linkIndex))
	if err == nil || isGone(err) {
		return nil
	}
	return fmt.Errorf("delete ingress qdisc of ifindex %d: %w", linkIndex, err)
}

// redirect sends every frame arriving on link from out of link to, unchanged: a u32
// filter matching everything (netlink's nil selector is one all-zero key) with a mirred
// egress redirect, which steals the frame from from's own stack.
func (p *podNetns) redirect(from, to int) error {
	filter := &netlink.U32{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: from,
			Parent:    ingressHandle,
			Priority:  redirectPriority,
			Protocol:  unix.ETH_P_ALL,
		},
		Actions: []netlink.Action{netlink.NewMirredAction(to)},
	}
	if err := p.handle.FilterAdd(filter); err != nil {
		return fmt.Errorf("add u32 mirred redirect to ifindex %d: %w", to, err)
	}
	return nil
}

// isGone: the thing to delete does not exist (any more).
func isGone(err error) bool {
	var notFound netlink.LinkNotFoundError
	return errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV) || errors.As(err, &notFound)
}
