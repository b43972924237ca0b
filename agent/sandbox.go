package agent

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"
	"unsafe"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
)

// nicAppearWait bounds the wait for a NIC the host has just added.
const nicAppearWait = 5 * time.Second

var (
	validHostname = regexp.MustCompile(`^[a-zA-Z0-9]([a-zA-Z0-9.-]{0,62})$`)
	validSysctl   = regexp.MustCompile(`^[a-z0-9_]+(\.[a-zA-Z0-9_-]+)+$`)
)

// setupSandbox makes the guest the pod: randomness and shared directory (a guest restored
// from a template), clock, hostname, network, DNS, sysctls. Each step names the request
// field it failed on.
func setupSandbox(req *agentv1.SetupSandboxRequest) error {
	if len(req.Entropy) > 0 {
		if err := addEntropy(req.Entropy); err != nil {
			return fmt.Errorf("entropy: %w", err)
		}
		// said on the console: a guest restored from a template has its template's pool
		// until here, and a test must be able to tell the reseed was done
		slog.Info("random number generator reseeded from the host", "bytes", len(req.Entropy))
	}
	if req.Share != "" {
		if err := mountLateShare(req.Share); err != nil {
			return fmt.Errorf("share: %w", err)
		}
	}
	if req.HostTimeUnixNanos > 0 {
		ts := unix.NsecToTimespec(req.HostTimeUnixNanos)
		if err := unix.ClockSettime(unix.CLOCK_REALTIME, &ts); err != nil {
			return fmt.Errorf("host_time_unix_nanos: set clock: %w", err)
		}
	}
	if req.Hostname != "" {
		if !validHostname.MatchString(req.Hostname) {
			return invalidf("hostname %q: not a valid host name", req.Hostname)
		}
		if err := unix.Sethostname([]byte(req.Hostname)); err != nil {
			return fmt.Errorf("hostname: %w", err)
		}
	}
	if err := linkUp("lo"); err != nil {
		return err
	}
	for i, iface := range req.Interfaces {
		if err := setupInterface(iface); err != nil {
			return fmt.Errorf("interfaces[%d]: %w", i, err)
		}
	}
	for i, r := range req.Routes {
		if err := addRoute(r); err != nil {
			return fmt.Errorf("routes[%d]: %w", i, err)
		}
	}
	if req.Dns != nil {
		if err := writeResolvConf("/etc/resolv.conf", req.Dns); err != nil {
			return fmt.Errorf("dns: %w", err)
		}
	}
	for k, v := range req.Sysctls {
		if err := setSysctl(k, v); err != nil {
			return fmt.Errorf("sysctls[%s]: %w", k, err)
		}
	}
	return nil
}

func linkUp(name string) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return fmt.Errorf("link %s: %w", name, err)
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return fmt.Errorf("link %s up: %w", name, err)
	}
	return nil
}

func setupInterface(iface *agentv1.Interface) error {
	mac, err := net.ParseMAC(iface.Mac)
	if err != nil {
		return invalidf("mac %q: %v", iface.Mac, err)
	}
	link, err := waitForLink(mac)
	if err != nil {
		return err
	}
	if iface.Name != "" && link.Attrs().Name != iface.Name {
		// The kernel names NICs eth0, eth1, ... in probe order, which need not be the
		// request's: the name may be another NIC's. Move that one aside; its own entry
		// of the request renames it afterwards.
		if other, err := netlink.LinkByName(iface.Name); err == nil {
			if err := renameLink(other, fmt.Sprintf("vmpodnic%d", other.Attrs().Index)); err != nil {
				return fmt.Errorf("name %q: move %w", iface.Name, err)
			}
		}
		if err := renameLink(link, iface.Name); err != nil {
			return fmt.Errorf("name %q: %w", iface.Name, err)
		}
	}
	if iface.Mtu > 0 {
		if err := netlink.LinkSetMTU(link, int(iface.Mtu)); err != nil {
			return fmt.Errorf("mtu %d: %w", iface.Mtu, err)
		}
	}
	want := map[string]bool{}
	addrs := make([]*netlink.Addr, 0, len(iface.Addresses))
	for j, a := range iface.Addresses {
		addr, err := netlink.ParseAddr(a)
		if err != nil {
			return invalidf("addresses[%d] %q: %v", j, a, err)
		}
		if addr.IP.To4() == nil {
			// The pod's IPAM handed out this address and the pod side already holds it;
			// duplicate detection in the guest could only delay it (1-2 s of
			// "tentative", when the address cannot be bound or answer).
			addr.Flags |= unix.IFA_F_NODAD
		}
		addrs = append(addrs, addr)
		want[addr.IPNet.String()] = true
	}
	if iface.ReplaceAddresses {
		// the old ones first: a new address in an old one's subnet is its secondary, and
		// would go with it
		if err := removeAddressesBut(link, want); err != nil {
			return err
		}
	}
	for j, addr := range addrs {
		if err := netlink.AddrReplace(link, addr); err != nil {
			return fmt.Errorf("addresses[%d] %q: %w", j, iface.Addresses[j], err)
		}
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("link up: %w", err)
	}
	return nil
}

// renameLink renames a link, which the kernel allows only while it is down.
func renameLink(link netlink.Link, name string) error {
	if err := netlink.LinkSetDown(link); err != nil {
		return fmt.Errorf("link %s down: %w", link.Attrs().Name, err)
	}
	if err := netlink.LinkSetName(link, name); err != nil {
		return fmt.Errorf("link %s to %s: %w", link.Attrs().Name, name, err)
	}
	return nil
}

func waitForLink(mac net.HardwareAddr) (netlink.Link, error) {
	deadline := time.Now().Add(nicAppearWait)
	for {
		links, err := netlink.LinkList()
		if err != nil {
			return nil, fmt.Errorf("list links: %w", err)
		}
		for _, l := range links {
			if l.Attrs().HardwareAddr.String() == mac.String() {
				return l, nil
			}
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("mac %s: no guest NIC has it after %v", mac, nicAppearWait)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// removeAddressesBut removes the link's addresses of global scope that want does not
// name (an IPv6 link-local address stays: the link's own). The kernel takes the routes
// through them along.
func removeAddressesBut(link netlink.Link, want map[string]bool) error {
	have, err := netlink.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		return fmt.Errorf("addresses of %s: %w", link.Attrs().Name, err)
	}
	for _, a := range have {
		if a.Scope != unix.RT_SCOPE_UNIVERSE || want[a.IPNet.String()] {
			continue
		}
		switch err := netlink.AddrDel(link, &a); {
		case err == nil:
			slog.Info("address removed: not the pod's any more", "link", link.Attrs().Name, "address", a.IPNet.String())
		case errors.Is(err, unix.EADDRNOTAVAIL):
			// a secondary address that went with its primary (without promote_secondaries)
		default:
			return fmt.Errorf("remove address %s: %w", a.IPNet, err)
		}
	}
	return nil
}

func addRoute(r *agentv1.Route) error {
	route := netlink.Route{}
	if r.Device != "" {
		l, err := netlink.LinkByName(r.Device)
		if err != nil {
			return fmt.Errorf("device %q: %w", r.Device, err)
		}
		route.LinkIndex = l.Attrs().Index
	}
	if r.Destination != "" {
		_, dst, err := net.ParseCIDR(r.Destination)
		if err != nil {
			return invalidf("destination %q: %v", r.Destination, err)
		}
		route.Dst = dst
	}
	if r.Gateway != "" {
		if route.Gw = net.ParseIP(r.Gateway); route.Gw == nil {
			return invalidf("gateway %q: not an IP address", r.Gateway)
		}
	} else {
		route.Scope = netlink.SCOPE_LINK
	}
	if r.Source != "" {
		if route.Src = net.ParseIP(r.Source); route.Src == nil {
			return invalidf("source %q: not an IP address", r.Source)
		}
	}
	if err := netlink.RouteReplace(&route); err != nil {
		return fmt.Errorf("add route to %q via %q: %w", r.Destination, r.Gateway, err)
	}
	return nil
}

func writeResolvConf(path string, dns *agentv1.DNS) error {
	var b strings.Builder
	for i, s := range dns.Servers {
		if net.ParseIP(s) == nil {
			return invalidf("servers[%d] %q: not an IP address", i, s)
		}
		fmt.Fprintf(&b, "nameserver %s\n", s)
	}
	if len(dns.Searches) > 0 {
		fmt.Fprintf(&b, "search %s\n", strings.Join(dns.Searches, " "))
	}
	if len(dns.Options) > 0 {
		fmt.Fprintf(&b, "options %s\n", strings.Join(dns.Options, " "))
	}
	if strings.ContainsAny(strings.Join(append(dns.Searches, dns.Options...), ""), "\n\x00") {
		return invalidf("searches/options: contain a newline")
	}
	return os.WriteFile(path, []byte(b.String()), 0o644)
}

func setSysctl(key, value string) error {
	if !validSysctl.MatchString(key) {
		return invalidf("key %q: not a sysctl name", key)
	}
	if strings.ContainsAny(value, "\n\x00") {
		return invalidf("value %q: contains a newline", value)
	}
	path := filepath.Join("/proc/sys", strings.ReplaceAll(key, ".", "/"))
	if err := os.WriteFile(path, []byte(value), 0); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// maxEntropy bounds SetupSandboxRequest.entropy: the kernel's pool takes 256 bits at a time.
const maxEntropy = 512

// addEntropy credits b to the kernel's entropy pool and reseeds its random number
// generator from it at once (RNDRESEEDCRNG), so that what the guest draws from now on
// differs from what any other restore of the same saved state draws.
func addEntropy(b []byte) error {
	if len(b) > maxEntropy {
		return invalidf("%d bytes: at most %d", len(b), maxEntropy)
	}
	f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	// struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
	info := make([]byte, 8+len(b))
	binary.NativeEndian.PutUint32(info[0:], uint32(len(b)*8))
	binary.NativeEndian.PutUint32(info[4:], uint32(len(b)))
	copy(info[8:], b)
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.RNDADDENTROPY, uintptr(unsafe.Pointer(&info[0]))); errno != 0 {
		return fmt.Errorf("RNDADDENTROPY: %w", errno)
	}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.RNDRESEEDCRNG, 0); errno != 0 {
		return fmt.Errorf("RNDRESEEDCRNG: %w", errno)
	}
	return nil
}

// shareAppearWait bounds the wait for a virtio-fs device the host has just plugged: the
// guest's driver registers its tag once the hotplug's probe has run.
const shareAppearWait = 5 * time.Second

// mountLateShare mounts the shared directory of a guest that booted without one (restored
// from a template): the device was plugged after the restore, and until its driver has
// probed it virtio-fs does not know the tag (EINVAL). A guest that has its share mounted
// already keeps it.
func mountLateShare(spec string) error {
	if mounted, err := isMountPoint(agentv1.GuestSharedDir); err != nil {
		return err
	} else if mounted {
		return nil
	}
	deadline := time.Now().Add(shareAppearWait)
	for {
		err := mountShare(spec)
		if err == nil || !errors.Is(err, unix.EINVAL) || time.Now().After(deadline) {
			return err
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// isMountPoint says whether dir is the root of a mount (it and its parent differ in
// device), false if it does not exist.
func isMountPoint(dir string) (bool, error) {
	var st, parent unix.Stat_t
	if err := unix.Stat(dir, &st); errors.Is(err, unix.ENOENT) {
		return false, nil
	} else if err != nil {
		return false, fmt.Errorf("stat %s: %w", dir, err)
	}
	if err := unix.Stat(filepath.Dir(dir), &parent); err != nil {
		return false, fmt.Errorf("stat %s: %w", filepath.Dir(dir), err)
	}
	return st.Dev != parent.Dev, nil
}
