package network

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// Lease is what the DHCP server gives a VM pod's guest for one pod interface: the
// interface's own address, so the guest OS, whatever it is, takes the pod's IP the way
// KubeVirt's bridge binding gives it (no cloud-init or agent needed).
type Lease struct {
	// MAC is the guest NIC's: only its requests are answered.
	MAC     net.HardwareAddr
	Address netip.Prefix // the pod's IPv4 address and prefix
	Gateway netip.Addr   // invalid: no default route
	// Routes other than the default and the on-link subnet (classless static routes).
	Routes     []Route
	MTU        int
	DNS        []netip.Addr
	Search     []string
	Hostname   string
	ServerAddr netip.Addr // the server identifier: the gateway, else the guest's own address
}

// LeaseFor is the lease for the plan's interface named name, or an error when it has no
// IPv4 address to give (an IPv6-only pod: the guest configures itself from router
// advertisements, as for any host).
func (p *Plan) LeaseFor(name string, dns []netip.Addr, search []string, hostname string) (Lease, error) {
	var iface *Interface
	for i := range p.Interfaces {
		if p.Interfaces[i].Name == name {
			iface = &p.Interfaces[i]
		}
	}
	if iface == nil {
		return Lease{}, fmt.Errorf("network: no pod interface %s", name)
	}
	l := Lease{MAC: iface.MAC, MTU: iface.MTU, Hostname: hostname, Search: search}
	for _, a := range iface.Addresses {
		if a.Addr().Is4() {
			l.Address = a
			break
		}
	}
	if !l.Address.IsValid() {
		return Lease{}, fmt.Errorf("network: pod interface %s has no IPv4 address to lease", name)
	}
	for _, d := range dns {
		if d.Is4() {
			l.DNS = append(l.DNS, d)
		}
	}
	for _, r := range p.Routes {
		if r.Device != name || !r.Destination.Addr().Is4() {
			continue
		}
		switch {
		case r.Destination.Bits() == 0:
			l.Gateway = r.Gateway
		case r.Destination.Masked() == l.Address.Masked() && !r.Gateway.IsValid():
			// the on-link subnet: the mask says it
		default:
			l.Routes = append(l.Routes, r)
		}
	}
	l.ServerAddr = l.Gateway
	if !l.ServerAddr.IsValid() {
		l.ServerAddr = l.Address.Addr()
	}
	return l, nil
}

// leaseForever: the pod's address does not change while the pod lives, so the guest never
// needs to renew (an infinite lease, RFC 2131 0xffffffff).
const leaseForever = 0xffffffff

// reply is the server's answer to req under lease, or nil for a request it ignores
// (another MAC, a RELEASE, a DECLINE).
func reply(req *dhcpv4.DHCPv4, l Lease) (*dhcpv4.DHCPv4, error) {
	if req.OpCode != dhcpv4.OpcodeBootRequest || req.ClientHWAddr.String() != l.MAC.String() {
		return nil, nil
	}
	yours := net.IP(l.Address.Addr().AsSlice())
	var typ dhcpv4.MessageType
	switch req.MessageType() {
	case dhcpv4.MessageTypeDiscover:
		typ = dhcpv4.MessageTypeOffer
	case dhcpv4.MessageTypeRequest:
		asked := req.RequestedIPAddress()
		if asked == nil || asked.IsUnspecified() {
			asked = req.ClientIPAddr
		}
		typ = dhcpv4.MessageTypeAck
		if !asked.Equal(yours) {
			typ = dhcpv4.MessageTypeNak // it asks for an address that is not the pod's
		}
	case dhcpv4.MessageTypeInform:
		typ = dhcpv4.MessageTypeAck
	default:
		return nil, nil
	}
	server := net.IP(l.ServerAddr.AsSlice())
	mods := []dhcpv4.Modifier{
		dhcpv4.WithMessageType(typ),
		dhcpv4.WithServerIP(server),
		dhcpv4.WithOption(dhcpv4.OptServerIdentifier(server)),
	}
	if typ == dhcpv4.MessageTypeNak {
		return dhcpv4.NewReplyFromRequest(req, mods...)
	}
	if req.MessageType() != dhcpv4.MessageTypeInform {
		mods = append(mods, dhcpv4.WithYourIP(yours), dhcpv4.WithOption(dhcpv4.OptIPAddressLeaseTime(leaseForever*time.Second)))
	}
	mods = append(mods, dhcpv4.WithNetmask(net.CIDRMask(l.Address.Bits(), 32)))
	var gw net.IP
	if l.Gateway.IsValid() {
		gw = net.IP(l.Gateway.AsSlice())
		mods = append(mods, dhcpv4.WithRouter(gw))
	}
	if len(l.Routes) > 0 {
		// RFC 3442: a client that takes classless routes ignores the router option, so
		// the default route goes in them too.
		var routes []*dhcpv4.Route
		for _, r := range l.Routes {
			var via net.IP = net.IPv4zero
			if r.Gateway.IsValid() {
				via = net.IP(r.Gateway.AsSlice())
			}
			routes = append(routes, &dhcpv4.Route{Dest: prefixNet(r.Destination), Router: via})
		}
		if gw != nil {
			routes = append(routes, &dhcpv4.Route{Dest: &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}, Router: gw})
		}
		mods = append(mods, dhcpv4.WithOption(dhcpv4.OptClasslessStaticRoute(routes...)))
	}
	if len(l.DNS) > 0 {
		var dns []net.IP
		for _, d := range l.DNS {
			dns = append(dns, net.IP(d.AsSlice()))
		}
		mods = append(mods, dhcpv4.WithDNS(dns...))
	}
	if len(l.Search) > 0 {
		mods = append(mods, dhcpv4.WithDomainSearchList(l.Search...), dhcpv4.WithOption(dhcpv4.OptDomainName(l.Search[0])))
	}
	if l.Hostname != "" {
		mods = append(mods, dhcpv4.WithOption(dhcpv4.OptHostName(l.Hostname)))
	}
	if l.MTU > 0 {
		mods = append(mods, dhcpv4.WithGeneric(dhcpv4.OptionInterfaceMTU, binary.BigEndian.AppendUint16(nil, uint16(l.MTU))))
	}
	return dhcpv4.NewReplyFromRequest(req, mods...)
}

func prefixNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(p.Masked().Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// DHCPServer answers one guest NIC's DHCP requests on its tap in the pod's netns.
//
// It reads with a packet socket on the tap for all protocols (ETH_P_ALL: those see a frame
// before tc's ingress redirect, Plumb's mirred to the pod link, takes it; a socket bound to
// ETH_P_IP would see nothing), filtered in the kernel to DHCP requests so the guest's other
// traffic is not copied to it, and writes its answers
// as whole frames out of the tap, i.e. to the guest. Nothing needs an address in the
// netns, and the redirect stays as it is: the guest's DHCP broadcasts also reach the pod
// network, where no other server answers for the pod's MAC.
type DHCPServer struct {
	lease   Lease
	sock    *os.File
	tapMAC  net.HardwareAddr
	ifindex int
	done    chan struct{}
	wg      sync.WaitGroup
}

// ServeDHCP starts answering the guest on the tap of the plumbing's interface named name
// (one Plumb or Add plumbed). Close stops it.
func (p *Plumbing) ServeDHCP(name string, lease Lease) (*DHCPServer, error) {
	p.mu.Lock()
	pl, ok := p.plumbed[name]
	closed := p.closed
	p.mu.Unlock()
	if closed {
		return nil, fmt.Errorf("network: DHCP: %w", errTornDown)
	}
	if !ok {
		return nil, fmt.Errorf("network: DHCP: no pod interface %s", name)
	}
	iface := &pl.iface
	pn, err := openNetns(p.plan.Netns)
	if err != nil {
		return nil, fmt.Errorf("network: DHCP: netns %s: %w", p.plan.Netns, err)
	}
	defer pn.close()
	tap, err := pn.handle.LinkByName(iface.Tap)
	if err != nil {
		return nil, fmt.Errorf("network: DHCP: tap %s: %w", iface.Tap, err)
	}
	var fd int
	err = inNetns(pn.ns, func() error {
		var err error
		// protocol 0 receives nothing until bind, so the filter is in place before any frame
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		if err := attachDHCPFilter(fd); err != nil {
			unix.Close(fd)
			return err
		}
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: tap.Attrs().Index}); err != nil {
			unix.Close(fd)
			return err
		}
		// a blocked recvfrom does not wake when the socket is shut down: poll for Close
		tv := unix.NsecToTimeval(recvPoll.Nanoseconds())
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
			unix.Close(fd)
			return err
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("network: DHCP: packet socket on tap %s: %w", iface.Tap, err)
	}
	s := &DHCPServer{lease: lease, sock: os.NewFile(uintptr(fd), "dhcp-"+iface.Tap), tapMAC: tap.Attrs().HardwareAddr,
		ifindex: tap.Attrs().Index, done: make(chan struct{})}
	s.wg.Add(1)
	go s.serve()
	return s, nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// recvPoll is how often the server looks whether it was closed.
const recvPoll = 200 * time.Millisecond

func (s *DHCPServer) serve() {
	defer s.wg.Done()
	buf := make([]byte, 2048)
	for {
		n, sa, err := unix.Recvfrom(int(s.sock.Fd()), buf, 0)
		select {
		case <-s.done:
			return
		default:
		}
		if errors.Is(err, unix.EINTR) || errors.Is(err, unix.EAGAIN) {
			continue
		}
		if err != nil {
			return // the socket is broken: the guest keeps what it has leased
		}
		if ll, isLL := sa.(*unix.SockaddrLinklayer); isLL && ll.Pkttype == unix.PACKET_OUTGOING {
			continue // on its way into the guest (mirrored from the pod link): not the guest's
		}
		req, from, ok := parseDHCPFrame(buf[:n])
		if !ok || !bytes.Equal(from, s.lease.MAC) {
			continue // only the guest NIC's own frames, whatever their chaddr says
		}
		rep, err := reply(req, s.lease)
		if err != nil || rep == nil {
			continue
		}
		frame := dhcpFrame(rep, s.tapMAC, from, req.IsBroadcast())
		_ = unix.Sendto(int(s.sock.Fd()), frame, 0, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_IP), Ifindex: s.ifindex, Halen: 6})
	}
}

// Close stops the server (within recvPoll) and closes its socket.
func (s *DHCPServer) Close() error {
	select {
	case <-s.done:
		return nil
	default:
	}
	close(s.done)
	s.wg.Wait()
	return s.sock.Close()
}

// parseDHCPFrame picks a BOOTP request out of an Ethernet frame: IPv4, UDP to port 67.
func parseDHCPFrame(f []byte) (*dhcpv4.DHCPv4, net.HardwareAddr, bool) {
	if len(f) < 14+20+8 || binary.BigEndian.Uint16(f[12:14]) != unix.ETH_P_IP {
		return nil, nil, false
	}
	ip := f[14:]
	ihl := int(ip[0]&0x0f) * 4
	if ip[0]>>4 != 4 || ihl < 20 || len(ip) < ihl+8 || ip[9] != unix.IPPROTO_UDP {
		return nil, nil, false
	}
	udp := ip[ihl:]
	if binary.BigEndian.Uint16(udp[2:4]) != dhcpv4.ServerPort {
		return nil, nil, false
	}
	ulen := int(binary.BigEndian.Uint16(udp[4:6]))
	if ulen < 8 || ulen > len(udp) {
		return nil, nil, false
	}
	msg, err := dhcpv4.FromBytes(udp[8:ulen])
	if err != nil {
		return nil, nil, false
	}
	return msg, net.HardwareAddr(append([]byte(nil), f[6:12]...)), true
}

// dhcpFrame wraps a reply in UDP (67 → 68), IPv4 and Ethernet: broadcast when the client
// asked for it (it cannot take unicast before it has its address), else to its MAC and
// the address it is given.
func dhcpFrame(rep *dhcpv4.DHCPv4, src, dst net.HardwareAddr, broadcast bool) []byte {
	payload := rep.ToBytes()
	dstIP := rep.YourIPAddr.To4()
	if broadcast || dstIP == nil || dstIP.IsUnspecified() {
		dstIP = net.IPv4bcast.To4()
		dst = net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
	}
	srcIP := rep.ServerIPAddr.To4()
	frame := make([]byte, 14+20+8+len(payload))
	copy(frame[0:6], dst)
	copy(frame[6:12], src)
	binary.BigEndian.PutUint16(frame[12:14], unix.ETH_P_IP)
	ip := frame[14:34]
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:4], uint16(20+8+len(payload)))
	ip[8] = 64
	ip[9] = unix.IPPROTO_UDP
	copy(ip[12:16], srcIP)
	copy(ip[16:20], dstIP)
	binary.BigEndian.PutUint16(ip[10:12], checksum(ip))
	udp := frame[34:42]
	binary.BigEndian.PutUint16(udp[0:2], dhcpv4.ServerPort)
	binary.BigEndian.PutUint16(udp[2:4], dhcpv4.ClientPort)
	binary.BigEndian.PutUint16(udp[4:6], uint16(8+len(payload)))
	// UDP checksum 0: none (allowed over IPv4)
	copy(frame[42:], payload)
	return frame
}

func checksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// attachDHCPFilter lets through only IPv4 UDP to port 67, unfragmented: what a DHCP
// client sends.
func attachDHCPFilter(fd int) error {
	prog, err := bpf.Assemble(dhcpFilter)
	if err != nil {
		return err
	}
	filter := make([]unix.SockFilter, len(prog))
	for i, ins := range prog {
		filter[i] = unix.SockFilter{Code: ins.Op, Jt: ins.Jt, Jf: ins.Jf, K: ins.K}
	}
	return unix.SetsockoptSockFprog(fd, unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, &unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]})
}

// dhcpFilter is the classic BPF program of attachDHCPFilter (on Ethernet frames).
var dhcpFilter = []bpf.Instruction{
	bpf.LoadAbsolute{Off: 12, Size: 2},                                  // ethertype
	bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: unix.ETH_P_IP, SkipTrue: 8}, // → drop
	bpf.LoadAbsolute{Off: 14 + 9, Size: 1},                              // IP protocol
	bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: unix.IPPROTO_UDP, SkipTrue: 6},
	bpf.LoadAbsolute{Off: 14 + 6, Size: 2}, // flags + fragment offset
	bpf.JumpIf{Cond: bpf.JumpBitsSet, Val: 0x1fff, SkipTrue: 4},
	bpf.LoadMemShift{Off: 14},              // X = IP header length
	bpf.LoadIndirect{Off: 14 + 2, Size: 2}, // UDP destination port
	bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: dhcpv4.ServerPort, SkipTrue: 1},
	bpf.RetConstant{Val: 0xffff},
	bpf.RetConstant{Val: 0},
}
