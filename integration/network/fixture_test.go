// Integration tests of package runtime/network: real network namespaces, veths, bridges,
// taps and tc filters; and, in vm_test.go, the real VM behind them.
package network_test

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/vmpod/vmpod/runtime/network"
)

// podNet is a pod network namespace wired as the CNI bridge plugin wires one, built only
// from namespaces the test creates (the host's own interfaces are never touched): a "node"
// netns with a bridge per network holding the gateway address, and the pod netns with one
// veth end per network, addressed and routed.
type podNet struct {
	t    *testing.T
	id   string // random, so parallel runs in other worktrees never meet
	Pod  string // netns names (paths: /run/netns/<name>)
	Node string
	// host-side veth names in Node, by pod interface name
	hostVeth map[string]string
	// podRefs close what the test itself holds in the pod netns (netlink sockets,
	// listeners), so that DeletePodNetnsAndWait measures only what the code under test holds.
	podRefs []func()
}

// cniNetwork is one CNI network: a bridge in the node netns and a veth into the pod.
type cniNetwork struct {
	Bridge  string // in the node netns
	Iface   string // in the pod netns: eth0, net1, ...
	Gateway string // bridge address, CIDR
	PodAddr string // pod address, CIDR
	// Gateway6/PodAddr6: optional IPv6 on the same link.
	Gateway6, PodAddr6 string
	MTU                int
}

// eth0 is the default network of these tests: dual-stack, with an MTU that is not the
// default so its propagation is visible.
var eth0 = cniNetwork{
	Bridge: "br0", Iface: "eth0",
	Gateway: "10.99.0.1/24", PodAddr: "10.99.0.2/24",
	Gateway6: "fd00:99::1/64", PodAddr6: "fd00:99::2/64",
	MTU: 1400,
}

// net1 is a second (multus-style) network.
var net1 = cniNetwork{
	Bridge: "br1", Iface: "net1",
	Gateway: "10.98.0.1/24", PodAddr: "10.98.0.2/24",
	MTU: 1500,
}

func newPodNet(t *testing.T, networks ...cniNetwork) *podNet {
	t.Helper()
	b := make([]byte, 3)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	id := hex.EncodeToString(b)
	p := &podNet{t: t, id: id, Pod: "vmpodnet-" + id + "-pod", Node: "vmpodnet-" + id + "-node", hostVeth: map[string]string{}}
	ipCmd(t, "netns", "add", p.Node)
	t.Cleanup(func() { p.deleteNetns(p.Node) })
	ipCmd(t, "netns", "add", p.Pod)
	t.Cleanup(func() { p.deleteNetns(p.Pod) })
	ipCmd(t, "-n", p.Node, "link", "set", "lo", "up")
	ipCmd(t, "-n", p.Pod, "link", "set", "lo", "up")
	for i, n := range networks {
		p.addNetwork(i, n)
	}
	return p
}

func (p *podNet) addNetwork(i int, n cniNetwork) {
	t := p.t
	host := fmt.Sprintf("vh%s%d", p.id, i)
	p.hostVeth[n.Iface] = host
	mtu := fmt.Sprint(n.MTU)
	ipCmd(t, "-n", p.Node, "link", "add", n.Bridge, "mtu", mtu, "type", "bridge")
	ipCmd(t, "-n", p.Node, "addr", "add", n.Gateway, "dev", n.Bridge)
	ipCmd(t, "-n", p.Node, "link", "add", host, "mtu", mtu, "type", "veth", "peer", "name", n.Iface, "mtu", mtu, "netns", p.Pod)
	ipCmd(t, "-n", p.Node, "link", "set", host, "master", n.Bridge, "up")
	ipCmd(t, "-n", p.Node, "link", "set", n.Bridge, "up")
	ipCmd(t, "-n", p.Pod, "addr", "add", n.PodAddr, "dev", n.Iface)
	if n.PodAddr6 != "" {
		ipCmd(t, "-n", p.Node, "addr", "add", n.Gateway6, "dev", n.Bridge, "nodad")
		ipCmd(t, "-n", p.Pod, "addr", "add", n.PodAddr6, "dev", n.Iface, "nodad")
	}
	ipCmd(t, "-n", p.Pod, "link", "set", n.Iface, "up")
	if i == 0 { // the default network carries the default routes, as CNI's bridge with isGateway
		ipCmd(t, "-n", p.Pod, "route", "add", "default", "via", addrOf(n.Gateway))
		ipCmd(t, "-n", p.Pod, "route", "add", "192.0.2.0/24", "via", addrOf(n.Gateway))
		if n.PodAddr6 != "" {
			ipCmd(t, "-n", p.Pod, "-6", "route", "add", "default", "via", addrOf(n.Gateway6))
		}
	}
}

// Plumb inspects and plumbs the pod netns, and tears the plumbing down when the test
// ends. The teardown is registered before a VM's stop would be, so it runs after it
// (cleanups run last-first); tests that check teardown call it themselves first, and a
// second call does nothing.
func (p *podNet) Plumb() (*network.Plan, *network.Plumbing) {
	t := p.t
	t.Helper()
	plan, err := network.Inspect(p.PodPath())
	if err != nil {
		t.Fatal(err)
	}
	plumbing, err := network.Plumb(plan)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := plumbing.Teardown(); err != nil {
			t.Errorf("teardown: %v", err)
		}
	})
	return plan, plumbing
}

func (p *podNet) PodPath() string { return filepath.Join("/run/netns", p.Pod) }

// deleteNetns removes a netns if it is still there.
func (p *podNet) deleteNetns(name string) {
	if _, err := os.Stat(filepath.Join("/run/netns", name)); err != nil {
		return
	}
	if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
		p.t.Errorf("ip netns del %s: %v: %s", name, err, out)
	}
}

// DeletePodNetnsAndWait deletes the pod netns and waits until the kernel has destroyed it,
// which it does only once nothing refers to it any more (no open file, tap or netlink
// socket): the host-side veth disappears with the namespace.
func (p *podNet) DeletePodNetnsAndWait(iface string) {
	t := p.t
	t.Helper()
	for _, release := range p.podRefs {
		release()
	}
	p.podRefs = nil
	ipCmd(t, "netns", "del", p.Pod)
	node := p.handle(p.Node)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := node.LinkByName(p.hostVeth[iface]); err != nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("pod netns %s deleted but not destroyed after 10s (host veth %s still there): something still holds it", p.Pod, p.hostVeth[iface])
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// handle is a netlink handle in the named netns, closed with the test.
func (p *podNet) handle(name string) *netlink.Handle {
	t := p.t
	t.Helper()
	ns, err := netns.GetFromName(name)
	if err != nil {
		t.Fatalf("netns %s: %v", name, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatalf("netlink in %s: %v", name, err)
	}
	t.Cleanup(h.Close)
	if name == p.Pod {
		p.podRefs = append(p.podRefs, h.Close)
	}
	return h
}

func (p *podNet) link(ns, name string) netlink.Link {
	p.t.Helper()
	l, err := p.handle(ns).LinkByName(name)
	if err != nil {
		p.t.Fatalf("netns %s: link %s: %v", ns, name, err)
	}
	return l
}

// Exec runs a command in netns ns and returns its combined output.
func (p *podNet) Exec(ns string, args ...string) (string, error) {
	out, err := exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...).CombinedOutput()
	return string(out), err
}

func ipCmd(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

func tcCmd(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("tc", args...).CombinedOutput(); err != nil {
		t.Fatalf("tc %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// addrOf is the address of a CIDR.
func addrOf(cidr string) string {
	ip, _, err := net.ParseCIDR(cidr)
	if err != nil {
		panic(err)
	}
	return ip.String()
}

// inNetns runs fn on a thread in netns name (sockets fn creates stay in that netns), then
// puts the thread back. A thread that cannot get back stays locked and dies with its
// goroutine (it must not be the main thread, whose netns is the process's: never leave it
// in another netns).
func inNetns(name string, fn func() error) error {
	target, err := netns.GetFromName(name)
	if err != nil {
		return err
	}
	defer target.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer orig.Close()
		if err := netns.Set(target); err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		fnErr := fn()
		if err := netns.Set(orig); err != nil {
			errc <- fmt.Errorf("return from netns %s: %w", name, err)
			return
		}
		runtime.UnlockOSThread()
		errc <- fnErr
	}()
	return <-errc
}

// Listen opens a TCP listener in netns ns, accepting (and closing) connections until the
// test ends.
func (p *podNet) Listen(ns, addr string) {
	t := p.t
	t.Helper()
	var l net.Listener
	if err := inNetns(ns, func() (err error) { l, err = net.Listen("tcp", addr); return err }); err != nil {
		t.Fatalf("listen on %s in %s: %v", addr, ns, err)
	}
	t.Cleanup(func() { _ = l.Close() })
	if ns == p.Pod {
		p.podRefs = append(p.podRefs, func() { _ = l.Close() })
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			_ = c.Close()
		}
	}()
}

// Dial connects from netns ns to addr over TCP.
func (p *podNet) Dial(ns, addr string, timeout time.Duration) error {
	return inNetns(ns, func() error {
		c, err := net.DialTimeout("tcp", addr, timeout)
		if err == nil {
			_ = c.Close()
		}
		return err
	})
}
