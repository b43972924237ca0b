package network

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
)

// Masquerade puts one pod interface's guest NIC behind NAT instead of mirroring it: the
// guest lives on a private subnet (Guest in Subnet, the tap holds Gateway), its traffic
// leaves the pod interface with the pod's address (MASQUERADE), and the pod's address is
// forwarded to it (DNAT): every port, or only Ports. KubeVirt's masquerade binding.
type Masquerade struct {
	Interface string // the pod interface, e.g. eth0
	Subnet    netip.Prefix
	Guest     netip.Addr
	Gateway   netip.Addr
	Ports     []Port // none: everything
	// Kept are ports of the pod's own, never forwarded: what the shim serves on the pod's
	// address (a migration target's port).
	Kept []Port
}

// Port is a forwarded port.
type Port struct {
	Protocol string // tcp or udp
	Port     int
}

// plumbMasquerade does the NAT side of iface, whose tap exists and is up: the gateway's
// address on the tap, forwarding on, the iptables rules; each with its undo.
func (p *Plumbing) plumbMasquerade(pn *podNetns, iface Interface, tap netlink.Link) error {
	m := p.plan.Masquerade
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: m.Gateway.AsSlice(), Mask: net.CIDRMask(m.Subnet.Bits(), 32)}}
	if err := pn.handle.AddrAdd(tap, addr); err != nil {
		return fmt.Errorf("address %s: %w", m.Gateway, err)
	}
	// the address goes with the tap: no undo of its own
	if err := inNetns(pn.ns, func() error {
		return os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0)
	}); err != nil {
		return fmt.Errorf("ip_forward: %w", err)
	}
	var pod netip.Addr
	for _, a := range iface.Addresses {
		if a.Addr().Is4() {
			pod = a.Addr()
			break
		}
	}
	if !pod.IsValid() {
		return errors.New("masquerade: the pod interface has no IPv4 address")
	}
	rules := [][]string{{"POSTROUTING", "-s", m.Guest.String() + "/32", "-o", iface.Name, "-j", "MASQUERADE"}}
	if len(m.Ports) == 0 {
		for _, port := range m.Kept { // ahead of the rule that forwards everything
			rules = append(rules, []string{"PREROUTING", "-i", iface.Name, "-d", pod.String() + "/32", "-p", port.Protocol,
				"--dport", strconv.Itoa(port.Port), "-j", "RETURN"})
		}
		rules = append(rules, []string{"PREROUTING", "-i", iface.Name, "-d", pod.String() + "/32", "-j", "DNAT", "--to-destination", m.Guest.String()})
	}
	for _, port := range m.Ports {
		rules = append(rules, []string{"PREROUTING", "-i", iface.Name, "-d", pod.String() + "/32", "-p", port.Protocol,
			"--dport", strconv.Itoa(port.Port), "-j", "DNAT", "--to-destination", m.Guest.String()})
	}
	for _, rule := range rules {
		if err := iptables(p.plan.Netns, "nat", "-A", rule); err != nil {
			return err
		}
		p.undo.Add("delete NAT rule "+strings.Join(rule, " "), func() error {
			if _, err := os.Stat(p.plan.Netns); err != nil {
				return nil // the netns went, and its rules with it
			}
			return iptables(p.plan.Netns, "nat", "-D", rule)
		})
	}
	return nil
}

// iptables runs iptables on a table of the netns at netnsPath (the shim has no nftables
// library; CNI's portmap plugin works the same way).
func iptables(netnsPath, table, op string, rule []string) error {
	args := append([]string{"--net=" + netnsPath, "iptables", "-w", "5", "-t", table, op}, rule...)
	out, err := exec.Command("nsenter", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("network: netns %s: iptables -t %s %s %s: %w: %s", netnsPath, table, op, strings.Join(rule, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// MasqueradeLease is the DHCP lease of the guest behind Masquerade: its private address,
// the netns as gateway and server.
func (p *Plan) MasqueradeLease(mac net.HardwareAddr, dns []netip.Addr, search []string, hostname string) (Lease, error) {
	m := p.Masquerade
	if m == nil {
		return Lease{}, errors.New("network: the plan has no masquerade interface")
	}
	l := Lease{MAC: mac, Address: netip.PrefixFrom(m.Guest, m.Subnet.Bits()), Gateway: m.Gateway, ServerAddr: m.Gateway,
		Search: search, Hostname: hostname}
	for _, iface := range p.Interfaces {
		if iface.Name == m.Interface {
			l.MTU = iface.MTU
		}
	}
	for _, d := range dns {
		if d.Is4() {
			l.DNS = append(l.DNS, d)
		}
	}
	return l, nil
}

// ListenInNetns listens on addr (tcp) inside the netns at netnsPath: the socket stays in
// the netns whatever thread accepts on it.
func ListenInNetns(netnsPath, addr string) (net.Listener, error) {
	pn, err := openNetns(netnsPath)
	if err != nil {
		return nil, fmt.Errorf("network: netns %s: %w", netnsPath, err)
	}
	defer pn.close()
	var l net.Listener
	err = inNetns(pn.ns, func() error {
		var err error
		l, err = net.Listen("tcp", addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("network: netns %s: %w", netnsPath, err)
	}
	return l, nil
}

// DialInNetns connects to addr (tcp) from inside the netns at netnsPath: a port-forward to
// a guest behind Masquerade, which only the netns can reach.
func DialInNetns(netnsPath, addr string) (net.Conn, error) {
	return DialInNetnsContext(context.Background(), netnsPath, addr)
}

// DialInNetnsContext is DialInNetns bounded by ctx: a peer on another node may not answer.
func DialInNetnsContext(ctx context.Context, netnsPath, addr string) (net.Conn, error) {
	if netnsPath == "" { // the caller's own
		return (&net.Dialer{}).DialContext(ctx, "tcp", addr)
	}
	pn, err := openNetns(netnsPath)
	if err != nil {
		return nil, fmt.Errorf("network: netns %s: %w", netnsPath, err)
	}
	defer pn.close()
	var conn net.Conn
	err = inNetns(pn.ns, func() error {
		var err error
		conn, err = (&net.Dialer{}).DialContext(ctx, "tcp", addr)
		return err
	})
	return conn, err
}
