package network_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmpod/vmpod/integration/testenv"
)

// serveScript makes a container serve, from tmpfs, the rootfs's /payload and the guest
// kernel's release (which only the guest knows), with busybox httpd on port 8080.
const serveScript = `set -e
mkdir -p /dev/shm/www
cp /payload /dev/shm/www/payload
uname -r > /dev/shm/www/kernel
echo serving
exec httpd -f -p 8080 -h /dev/shm/www`

// writePayload puts size random bytes at rootfs/payload and returns them.
func writePayload(t *testing.T, size int) (payload []byte, prepare func(rootfs string)) {
	payload = make([]byte, size)
	if _, err := rand.Read(payload); err != nil {
		t.Fatal(err)
	}
	return payload, func(rootfs string) {
		if err := os.WriteFile(filepath.Join(rootfs, "payload"), payload, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// A pod with one dual-stack CNI interface, booted as a VM: the container reaches the
// gateway, the node reaches the container over IPv4 and IPv6, and it is the guest that
// answers. Then teardown leaves nothing, and the netns can be destroyed.
func TestPodNetworkThroughVM(t *testing.T) {
	testenv.Require(t)
	pn := newPodNet(t, eth0)
	veth := pn.link(pn.Pod, "eth0")
	p := bootPod(t, pn, "netpod")

	// What the guest sees, and the container → gateway direction.
	out := p.run(t, "look", `cat /sys/class/net/eth0/address /sys/class/net/eth0/mtu
ip -o addr show dev eth0; ip route; ip -6 route
grep fd000099000000000000000000000002 /proc/net/if_inet6
ping -c 3 -W 10 10.99.0.1; echo ping-exit=$?`)
	for _, want := range []string{
		veth.Attrs().HardwareAddr.String() + "\n1400\n",
		"inet 10.99.0.2/24", "inet6 fd00:99::2/64",
		"default via 10.99.0.1 dev eth0", "192.0.2.0/24 via 10.99.0.1 dev eth0", "default via fd00:99::1 dev eth0",
		"ping-exit=0",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("the guest's view lacks %q:\n%s", want, out)
		}
	}

	// The guest skips duplicate detection of the pod's IPv6 address (IPAM gave it out):
	// flags (5th field of /proc/net/if_inet6) carry IFA_F_NODAD and not IFA_F_TENTATIVE.
	if flags, ok := inet6Flags(out, "fd000099000000000000000000000002"); !ok {
		t.Errorf("fd00:99::2 is not in the guest's /proc/net/if_inet6:\n%s", out)
	} else if flags&unix.IFA_F_NODAD == 0 || flags&unix.IFA_F_TENTATIVE != 0 {
		t.Errorf("fd00:99::2 flags %#x: want nodad (%#x) and not tentative (%#x)", flags, unix.IFA_F_NODAD, unix.IFA_F_TENTATIVE)
	}

	// The node → pod direction, answered by the guest.
	payload, prepare := writePayload(t, 4<<20)
	server := p.startContainer(t, "httpd", serveScript, prepare)
	server.waitOutput(t, "serving")
	if out, err := busybox(t, pn.Node, "ping", "-c", "3", "-W", "10", "10.99.0.2"); err != nil {
		t.Errorf("ping from the node to the pod: %v\n%s", err, out)
	}
	var host unix.Utsname
	_ = unix.Uname(&host)
	for _, url := range []string{"http://10.99.0.2:8080/kernel", "http://[fd00:99::2]:8080/kernel"} {
		kernel := strings.TrimSpace(string(get(t, pn.Node, url, 30*time.Second)))
		if !strings.HasSuffix(kernel, "-vmpod") || kernel == unix.ByteSliceToString(host.Release[:]) {
			t.Errorf("GET %s: kernel %q, want the guest's (…-vmpod), not the host's", url, kernel)
		}
	}
	if got := get(t, pn.Node, "http://10.99.0.2:8080/payload", time.Minute); !bytes.Equal(got, payload) {
		t.Errorf("payload: got %d bytes, want the %d bytes written (intact)", len(got), len(payload))
	}

	// Teardown as the shim does it: containers, VM, then the plumbing.
	p.removeContainer(t, "httpd")
	if err := p.vm.Stop(testenv.Context(t, time.Minute)); err != nil {
		t.Fatalf("stop VM: %v", err)
	}
	if err := p.plumbing.Teardown(); err != nil {
		t.Fatalf("teardown: %v", err)
	}
	pn.AssertNoPlumbing()
	pn.DeletePodNetnsAndWait("eth0")
}

// Multus: a second network, net1, is a second guest NIC with its own MAC, MTU and
// address, reachable from the node like eth0.
func TestSecondPodNetwork(t *testing.T) {
	testenv.Require(t)
	pn := newPodNet(t, eth0, net1)
	macs := map[string]string{
		"eth0": pn.link(pn.Pod, "eth0").Attrs().HardwareAddr.String(),
		"net1": pn.link(pn.Pod, "net1").Attrs().HardwareAddr.String(),
	}
	p := bootPod(t, pn, "multus")

	out := p.run(t, "look", `for i in eth0 net1; do echo $i $(cat /sys/class/net/$i/address /sys/class/net/$i/mtu); done
ip -o -4 addr show; ip route`)
	for _, want := range []string{
		"eth0 " + macs["eth0"] + " 1400", "net1 " + macs["net1"] + " 1500",
		"eth0    inet 10.99.0.2/24", "net1    inet 10.98.0.2/24",
		"default via 10.99.0.1 dev eth0",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("the guest's view lacks %q:\n%s", want, out)
		}
	}
	_, prepare := writePayload(t, 1024)
	server := p.startContainer(t, "httpd", serveScript, prepare)
	server.waitOutput(t, "serving")
	for _, ip := range []string{"10.99.0.2", "10.98.0.2"} {
		if kernel := string(get(t, pn.Node, "http://"+ip+":8080/kernel", 30*time.Second)); !strings.Contains(kernel, "-vmpod") {
			t.Errorf("GET from %s: %q, want the guest kernel's release", ip, kernel)
		}
	}
	p.removeContainer(t, "httpd")
	if err := p.vm.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := p.plumbing.Teardown(); err != nil {
		t.Fatal(err)
	}
	pn.AssertNoPlumbing()
}

// The guest kernel names its NICs eth0, eth1, ... in probe order; the pod's names can
// cross them (here eth1 is created first, so it is the first NIC): each guest NIC still
// ends up with the name of the pod link whose MAC it has.
func TestPodNamesCrossingGuestKernelNames(t *testing.T) {
	testenv.Require(t)
	first := net1
	first.Iface = "eth1"
	second := eth0
	second.Bridge = "br9"
	second.PodAddr6, second.Gateway6 = "", ""
	pn := newPodNet(t, first, second)
	want := ""
	for _, name := range []string{"eth0", "eth1"} {
		want += name + " " + pn.link(pn.Pod, name).Attrs().HardwareAddr.String() + "\n"
	}
	p := bootPod(t, pn, "crossing")
	if p.plan.Interfaces[0].Name != "eth1" {
		t.Fatalf("plan order %+v: want eth1 first, so that it is the guest's first NIC", p.plan.Interfaces)
	}
	if got := p.run(t, "look", `for i in eth0 eth1; do echo $i $(cat /sys/class/net/$i/address); done`); got != want {
		t.Errorf("guest NICs:\n%swant:\n%s", got, want)
	}
}

// inet6Flags finds addr (32 hex digits) in /proc/net/if_inet6 lines within out and returns
// its flags field.
func inet6Flags(out, addr string) (uint64, bool) {
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) == 6 && f[0] == addr {
			v, err := strconv.ParseUint(f[4], 16, 32)
			return v, err == nil
		}
	}
	return 0, false
}
