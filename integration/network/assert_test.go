package network_test

import (
	"os"
	"path/filepath"
	"strings"

	"github.com/vishvananda/netlink"
)

// tunDescriptors lists this process's open descriptors of /dev/net/tun.
func tunDescriptors() []string {
	var out []string
	entries, _ := os.ReadDir("/proc/self/fd")
	for _, e := range entries {
		target, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name()))
		if err == nil && target == "/dev/net/tun" {
			out = append(out, e.Name())
		}
	}
	return out
}

// AssertNoPlumbing fails the test if anything Plumb makes is in the pod netns or this
// process: a tap, an ingress qdisc other than those in keepIngressOn, a tun descriptor.
func (p *podNet) AssertNoPlumbing(keepIngressOn ...string) {
	t := p.t
	t.Helper()
	h := p.handle(p.Pod)
	links, err := h.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	keep := strings.Join(keepIngressOn, ",")
	for _, l := range links {
		if l.Type() == "tuntap" {
			t.Errorf("leak: tap %s still in pod netns", l.Attrs().Name)
		}
		qdiscs, err := h.QdiscList(l)
		if err != nil {
			t.Fatal(err)
		}
		for _, q := range qdiscs {
			if _, ingress := q.(*netlink.Ingress); ingress && !strings.Contains(keep, l.Attrs().Name) {
				t.Errorf("leak: ingress qdisc still on %s", l.Attrs().Name)
			}
		}
	}
	if fds := tunDescriptors(); len(fds) > 0 {
		t.Errorf("leak: descriptors of /dev/net/tun still open: %v", fds)
	}
}
