package agent

import (
	"crypto/rand"
	"net"
	"os"
	"runtime"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
)

// addEntropy credits bytes to the kernel's pool and reseeds it; it runs against the
// host's kernel here (the guest's is the same code), which needs CAP_SYS_ADMIN.
func TestAddEntropy(t *testing.T) {
	if err := addEntropy(make([]byte, maxEntropy+1)); !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "at most 512") {
		t.Errorf("too much entropy: %v, want an invalid argument naming the limit", err)
	}
	if os.Geteuid() != 0 {
		t.Skip("RNDADDENTROPY and RNDRESEEDCRNG need root")
	}
	// bytes from the kernel itself: what is credited back is random
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	if err := addEntropy(b); err != nil {
		t.Fatalf("add entropy: %v", err)
	}
}

func TestIsMountPoint(t *testing.T) {
	if ok, err := isMountPoint("/proc"); err != nil || !ok {
		t.Errorf("/proc: %v, %v; want a mount point", ok, err)
	}
	dir := t.TempDir()
	if ok, err := isMountPoint(dir); err != nil || ok {
		t.Errorf("%s: %v, %v; want a plain directory", dir, ok, err)
	}
	if ok, err := isMountPoint(dir + "/missing"); err != nil || ok {
		t.Errorf("missing: %v, %v; want false, no error", ok, err)
	}
}

// A migrated guest takes its new pod's addresses (docs/design/212): with
// replace_addresses the link keeps only the listed ones of global scope (and its IPv6
// link-local one); without, addresses are added to what the link has. Runs in a network
// namespace of its own on the host's kernel (the guest's is the same code).
func TestInterfaceAddressesAreReplacedWhenAsked(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("a network namespace and its links need root")
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	host, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer host.Close()
	ns, err := netns.New() // and the thread is in it
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	defer netns.Set(host)

	mac := "02:00:00:00:21:02"
	hw, _ := net.ParseMAC(mac)
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0", HardwareAddr: hw}, PeerName: "peer0"}); err != nil {
		t.Fatal(err)
	}
	addresses := func() []string {
		link, err := netlink.LinkByName("eth0")
		if err != nil {
			t.Fatal(err)
		}
		list, err := netlink.AddrList(link, netlink.FAMILY_ALL)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, a := range list {
			if a.Scope == unix.RT_SCOPE_UNIVERSE {
				out = append(out, a.IPNet.String())
			}
		}
		slices.Sort(out)
		return out
	}
	source := &agentv1.Interface{Mac: mac, Name: "eth0", Addresses: []string{"10.98.0.2/24", "fd98::2/64"}}
	if err := setupInterface(source); err != nil {
		t.Fatal(err)
	}
	if err := setupInterface(&agentv1.Interface{Mac: mac, Addresses: []string{"10.98.0.3/24"}}); err != nil {
		t.Fatal(err)
	}
	if got := addresses(); !slices.Equal(got, []string{"10.98.0.2/24", "10.98.0.3/24", "fd98::2/64"}) {
		t.Errorf("addresses added: %v, want the first ones kept", got)
	}
	target := &agentv1.Interface{Mac: mac, Addresses: []string{"10.97.0.2/24", "fd97::2/64"}, ReplaceAddresses: true}
	if err := setupInterface(target); err != nil {
		t.Fatal(err)
	}
	if got := addresses(); !slices.Equal(got, []string{"10.97.0.2/24", "fd97::2/64"}) {
		t.Errorf("addresses replaced: %v, want only the new pod's", got)
	}
	// a pod on the same network: the new address is in the old one's subnet (it would be
	// the old one's secondary, removed with it)
	sameNet := &agentv1.Interface{Mac: mac, Addresses: []string{"10.97.0.3/24", "fd97::3/64"}, ReplaceAddresses: true}
	if err := setupInterface(sameNet); err != nil {
		t.Fatal(err)
	}
	if got := addresses(); !slices.Equal(got, []string{"10.97.0.3/24", "fd97::3/64"}) {
		t.Errorf("addresses replaced within the subnet: %v, want only the new pod's", got)
	}
}
