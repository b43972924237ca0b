package testenv

import (
	"encoding/json"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// PodInterface is an interface added to a running pod's netns the way multus' dynamic
// networks controller adds one (CNI ADD on a live pod): a veth whose pod end is named
// and addressed, its other end on the host with an address in the same subnet.
type PodInterface struct {
	Host string // the host end's name
	MAC  string // the pod end's hardware address
}

// AddPodInterface adds to pod sandbox id's netns an interface name with address podCIDR,
// whose host end has hostCIDR; the test's end removes it if it is still there.
func AddPodInterface(t testing.TB, id, name, hostCIDR, podCIDR string) PodInterface {
	t.Helper()
	return addPodInterface(t, id, name, podCIDR, func(host netlink.Link) error {
		return netlink.AddrAdd(host, cidrAddr(t, hostCIDR))
	})
}

// AddBridgedPodInterface is AddPodInterface with the host end on bridge (PodBridge)
// instead of addressed, so that several pods' interfaces share one L2 network, as a
// multus bridge network's do. podCIDR "" leaves the pod end without an address.
func AddBridgedPodInterface(t testing.TB, id, name, bridge, podCIDR string) PodInterface {
	t.Helper()
	br, err := netlink.LinkByName(bridge)
	if err != nil {
		t.Fatal(err)
	}
	return addPodInterface(t, id, name, podCIDR, func(host netlink.Link) error {
		return netlink.LinkSetMaster(host, br)
	})
}

func addPodInterface(t testing.TB, id, name, podCIDR string, hostSide func(netlink.Link) error) PodInterface {
	t.Helper()
	podNS, err := netns.GetFromPath(PodNetns(t, id))
	if err != nil {
		t.Fatal(err)
	}
	defer podNS.Close()
	host := fmt.Sprintf("vmpif%d", time.Now().UnixNano()%1000000)
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: host}, PeerName: name, PeerNamespace: netlink.NsFd(int(podNS))}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatalf("veth %s/%s: %v", host, name, err)
	}
	t.Cleanup(func() { RemovePodInterface(t, PodInterface{Host: host}) })
	hostLink, err := netlink.LinkByName(host)
	if err != nil {
		t.Fatal(err)
	}
	mustNet(t, hostSide(hostLink))
	mustNet(t, netlink.LinkSetUp(hostLink))
	h, err := netlink.NewHandleAt(podNS)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	podLink, err := h.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	if podCIDR != "" {
		mustNet(t, h.AddrAdd(podLink, cidrAddr(t, podCIDR)))
	}
	mustNet(t, h.LinkSetUp(podLink))
	return PodInterface{Host: host, MAC: podLink.Attrs().HardwareAddr.String()}
}

// PodBridge makes a bridge on the host with address cidr, for AddBridgedPodInterface; the
// test's end removes it. It returns the bridge's name.
func PodBridge(t testing.TB, cidr string) string {
	t.Helper()
	name := fmt.Sprintf("vmpbr%d", time.Now().UnixNano()%1000000)
	if err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name}}); err != nil {
		t.Fatalf("bridge %s: %v", name, err)
	}
	t.Cleanup(func() {
		if l, err := netlink.LinkByName(name); err == nil {
			if err := netlink.LinkDel(l); err != nil {
				t.Errorf("delete bridge %s: %v", name, err)
			}
		}
	})
	br, err := netlink.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	mustNet(t, netlink.AddrAdd(br, cidrAddr(t, cidr)))
	mustNet(t, netlink.LinkSetUp(br))
	return name
}

// RemovePodInterface deletes the veth (CNI DEL): both ends go.
func RemovePodInterface(t testing.TB, i PodInterface) {
	t.Helper()
	if l, err := netlink.LinkByName(i.Host); err == nil {
		if err := netlink.LinkDel(l); err != nil {
			t.Errorf("delete veth %s: %v", i.Host, err)
		}
	}
}

// PodNetns is the path of the network namespace of pod sandbox id, as CRI made it.
func PodNetns(t testing.TB, id string) string {
	t.Helper()
	var v struct {
		Info struct {
			RuntimeSpec struct {
				Linux struct {
					Namespaces []struct{ Type, Path string } `json:"namespaces"`
				} `json:"linux"`
			} `json:"runtimeSpec"`
		} `json:"info"`
	}
	if err := json.Unmarshal([]byte(Crictl(t, "inspectp", id)), &v); err != nil {
		t.Fatal(err)
	}
	for _, ns := range v.Info.RuntimeSpec.Linux.Namespaces {
		if ns.Type == "network" && ns.Path != "" {
			return ns.Path
		}
	}
	t.Fatalf("pod %s has no network namespace path in crictl inspectp", id)
	return ""
}

func cidrAddr(t testing.TB, cidr string) *netlink.Addr {
	t.Helper()
	ip, n, err := net.ParseCIDR(cidr)
	if err != nil {
		t.Fatal(err)
	}
	n.IP = ip
	return &netlink.Addr{IPNet: n}
}

func mustNet(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
