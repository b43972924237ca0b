package testenv

import (
	"os"
	"os/exec"
	"testing"

	"github.com/vmpod/vmpod/qmp/qmptest"
)

// BridgeNet is a network namespace with a bridge, br0, on which machines' taps go: a
// guest's network in the runtime's tests and benchmarks, where no CNI makes one.
type BridgeNet struct {
	*qmptest.Netns
	t testing.TB
}

// NewBridgeNet makes a network namespace with br0 up, holding the given addresses
// (CIDRs): the host side of the guests' network. The test's end removes both.
func NewBridgeNet(t testing.TB, cidrs ...string) *BridgeNet {
	t.Helper()
	n := &BridgeNet{Netns: qmptest.NewNetns(t), t: t}
	n.IP("link", "add", "br0", "type", "bridge")
	t.Cleanup(func() { _ = exec.Command("ip", "-n", n.Name, "link", "del", "br0").Run() })
	for _, cidr := range cidrs {
		n.IP("addr", "add", cidr, "dev", "br0")
	}
	n.IP("link", "set", "br0", "up")
	return n
}

// IP runs `ip` in the namespace, failing the test if it fails.
func (n *BridgeNet) IP(args ...string) {
	n.t.Helper()
	if out, err := exec.Command("ip", append([]string{"-n", n.Name}, args...)...).CombinedOutput(); err != nil {
		n.t.Fatalf("ip -n %s %v: %v: %s", n.Name, args, err, out)
	}
}

// Tap opens a tap named name on br0, up, for a machine's NIC (vmm.NIC.Tap).
func (n *BridgeNet) Tap(name string) *os.File {
	n.t.Helper()
	tap := n.OpenTap(n.t, name)
	n.IP("link", "set", name, "master", "br0")
	n.IP("link", "set", name, "up")
	return tap
}

// Answers says whether addr answers a ping from the namespace within 2 s.
func (n *BridgeNet) Answers(addr string) bool {
	return exec.Command("ip", "netns", "exec", n.Name, "ping", "-c", "1", "-W", "2", addr).Run() == nil
}
