package network_test

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/vmpod/vmpod/integration/testenv"
)

// benchPayload is the size of every transfer; below the guest's 64 MiB /dev/shm.
const benchPayload = 32 << 20

// benchNet: a plain 1500-byte network, the usual pod MTU.
var benchNet = cniNetwork{Bridge: "br0", Iface: "eth0", Gateway: "10.99.0.1/24", PodAddr: "10.99.0.2/24", MTU: 1500}

// TestBenchPodNetwork measures the pod network through the VM (veth ⇄ tc mirred ⇄ tap ⇄
// QEMU's userspace virtio-net ⇄ guest) next to two references taken in the same run with
// the same busybox tools as plain host processes: in the pod netns before it is plumbed
// (the baseline), and behind the same tc mirred redirect into a veth instead of a tap (what
// the redirect itself costs). All times are taken on the host's clock. Figures go to
// docs/design/401-pod-network.md; nothing here asserts a speed.
func TestBenchPodNetwork(t *testing.T) {
	testenv.Require(t)
	if os.Getenv("VMPOD_BENCH") != "1" {
		t.Skip("benchmark: set VMPOD_BENCH=1 to measure (about a minute of 2 busy cores)")
	}
	pn := newPodNet(t, benchNet)
	node := startNodeServer(t, pn)
	url := "http://" + addrOf(benchNet.PodAddr) + ":8080/payload"
	_, prepare := writePayload(t, benchPayload)
	rootfs := testenv.OverlayRootfs(t, testenv.BusyboxRootfs(t))
	prepare(rootfs)

	base := measurePlainProcess(t, pn, node, pn.Pod, rootfs, url)
	mirrored, unmirror := pn.mirrorIntoNetns()
	mirror := measurePlainProcess(t, pn, node, mirrored, rootfs, url)
	unmirror()

	p := bootPod(t, pn, "netbench")
	server := p.startContainer(t, "httpd", serveScript, prepare)
	server.waitOutput(t, "serving")
	n := 0
	runInGuest := func(script string) string { n++; return p.run(t, fmt.Sprintf("wget%d", n), script) }
	vm := measurePodNetwork(t, pn, node, url, runInGuest)

	fmt.Printf("pod network, %d MiB transfers, RTT from %d pings, median of %d transfers (min–max)\n", benchPayload>>20, pingCount, throughput)
	row := func(what, a, b, c string) { fmt.Printf("  %-26s %-27s %-27s %s\n", what, a, b, c) }
	row("", "baseline: process in netns", "tc mirred ⇄ veth ⇄ process", "VM: tc mirred ⇄ tap ⇄ guest")
	row("RTT min / p50 / p90", base.rtt, mirror.rtt, vm.rtt)
	row("TCP pod→node (node GETs)", base.tx, mirror.tx, vm.tx)
	row("TCP node→pod (pod wgets)", base.rx, mirror.rx, vm.rx)
}

// measurePlainProcess measures with busybox httpd and wget run on the host in netns ns,
// chrooted into rootfs.
func measurePlainProcess(t *testing.T, pn *podNet, node *nodeServer, ns, rootfs, url string) netFigures {
	t.Helper()
	httpd := exec.Command("ip", "netns", "exec", ns, "chroot", rootfs, "httpd", "-f", "-p", "8080", "-h", "/")
	if err := httpd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = httpd.Process.Kill(); _ = httpd.Wait() }()
	run := func(script string) string {
		out, err := exec.Command("ip", "netns", "exec", ns, "chroot", rootfs, "sh", "-c", script).CombinedOutput()
		if err != nil {
			t.Fatalf("%s in netns %s: %v: %s", script, ns, err, out)
		}
		return string(out)
	}
	return measurePodNetwork(t, pn, node, url, run)
}

// mirrorIntoNetns redirects the pod's eth0 with the same tc mirred filters as Plumb, but
// into a veth whose other end, in a new netns, has the pod's MAC and addresses: the VM
// replaced by a plain netns. It returns that netns and the undo.
func (p *podNet) mirrorIntoNetns() (string, func()) {
	t := p.t
	mirrored := "vmpodnet-" + p.id + "-mirror"
	mac := p.link(p.Pod, "eth0").Attrs().HardwareAddr.String()
	mtu := fmt.Sprint(benchNet.MTU)
	ipCmd(t, "netns", "add", mirrored)
	t.Cleanup(func() { p.deleteNetns(mirrored) })
	ipCmd(t, "-n", p.Pod, "link", "add", "vm0", "mtu", mtu, "type", "veth", "peer", "name", "eth0", "netns", mirrored)
	ipCmd(t, "-n", mirrored, "link", "set", "eth0", "address", mac, "mtu", mtu)
	ipCmd(t, "-n", mirrored, "addr", "add", benchNet.PodAddr, "dev", "eth0")
	ipCmd(t, "-n", mirrored, "link", "set", "eth0", "up")
	ipCmd(t, "-n", mirrored, "link", "set", "lo", "up")
	ipCmd(t, "-n", mirrored, "route", "add", "default", "via", addrOf(benchNet.Gateway))
	ipCmd(t, "-n", p.Pod, "link", "set", "vm0", "up")
	for _, redirect := range [][2]string{{"eth0", "vm0"}, {"vm0", "eth0"}} {
		tcCmd(t, "-n", p.Pod, "qdisc", "add", "dev", redirect[0], "ingress")
		tcCmd(t, "-n", p.Pod, "filter", "add", "dev", redirect[0], "parent", "ffff:", "protocol", "all",
			"u32", "match", "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", redirect[1])
	}
	return mirrored, func() {
		tcCmd(t, "-n", p.Pod, "qdisc", "del", "dev", "eth0", "ingress")
		// Deleted here, not with the netns: that happens asynchronously, and Inspect
		// would find vm0 still there.
		ipCmd(t, "-n", p.Pod, "link", "del", "vm0")
		p.deleteNetns(mirrored)
	}
}

const (
	pingCount  = 50
	throughput = 3 // rounds per direction; the median is reported
)

type netFigures struct{ rtt, tx, rx string }

// measurePodNetwork measures RTT with busybox ping from the node, pod→node throughput with
// a Go HTTP client in the node netns fetching url, and node→pod throughput with busybox
// wget run by runInPod from the node's server.
func measurePodNetwork(t *testing.T, pn *podNet, node *nodeServer, url string, runInPod func(script string) string) netFigures {
	t.Helper()
	podIP := addrOf(benchNet.PodAddr)
	var f netFigures
	if out, err := busybox(t, pn.Node, "ping", "-c", "3", "-W", "10", podIP); err != nil { // warm up ARP and TCG
		t.Fatalf("warm-up ping: %v\n%s", err, out)
	}
	out, err := busybox(t, pn.Node, "ping", "-c", fmt.Sprint(pingCount), "-i", "0.1", podIP)
	if err != nil {
		t.Fatalf("ping: %v\n%s", err, out)
	}
	var rtts []float64
	for _, m := range regexp.MustCompile(`time=(\S+) ms`).FindAllStringSubmatch(out, -1) {
		var ms float64
		if _, err := fmt.Sscan(m[1], &ms); err != nil {
			t.Fatalf("ping time %q: %v", m[1], err)
		}
		rtts = append(rtts, ms)
	}
	if len(rtts) < pingCount*9/10 {
		t.Fatalf("%d of %d pings answered:\n%s", len(rtts), pingCount, out)
	}
	slices.Sort(rtts)
	pct := func(p float64) float64 { return rtts[int(p*float64(len(rtts)-1)+0.5)] }
	f.rtt = fmt.Sprintf("%.3f / %.3f / %.3f ms", pct(0), pct(0.5), pct(0.9))

	client := httpClientIn(pn.Node)
	var tx []float64
	for range throughput {
		start := time.Now()
		body, err := getOnce(client, url)
		if err != nil || len(body) != benchPayload {
			t.Fatalf("GET %s: %d bytes, %v", url, len(body), err)
		}
		tx = append(tx, mibPerSec(benchPayload, time.Since(start)))
	}
	f.tx = median(tx)

	var rx []float64
	for range throughput {
		node.reset()
		runInPod(fmt.Sprintf("wget -q -O /dev/null http://%[1]s/big && wget -q -O /dev/null http://%[1]s/done", node.addr))
		rx = append(rx, mibPerSec(benchPayload, node.elapsed()))
	}
	f.rx = median(rx)
	return f
}

func mibPerSec(bytes int, d time.Duration) float64 { return float64(bytes) / (1 << 20) / d.Seconds() }

func median(xs []float64) string {
	slices.Sort(xs)
	return fmt.Sprintf("%.0f MiB/s (of %.0f–%.0f)", xs[len(xs)/2], xs[0], xs[len(xs)-1])
}

// nodeServer serves benchPayload bytes at /big in the node netns and times, on the host's
// clock, from the /big request to the /done request that follows its full download.
type nodeServer struct {
	addr       string
	mu         sync.Mutex
	start, end time.Time
}

func startNodeServer(t *testing.T, pn *podNet) *nodeServer {
	s := &nodeServer{addr: addrOf(benchNet.Gateway) + ":8081"}
	var l net.Listener
	if err := inNetns(pn.Node, func() (err error) { l, err = net.Listen("tcp", s.addr); return err }); err != nil {
		t.Fatal(err)
	}
	payload := make([]byte, benchPayload)
	mux := http.NewServeMux()
	mux.HandleFunc("/big", func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		s.start = time.Now()
		s.mu.Unlock()
		w.Header().Set("Content-Length", fmt.Sprint(len(payload)))
		_, _ = w.Write(payload)
	})
	mux.HandleFunc("/done", func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		s.end = time.Now()
		s.mu.Unlock()
	})
	srv := &http.Server{Handler: mux}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close() })
	return s
}

func (s *nodeServer) reset() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.start, s.end = time.Time{}, time.Time{}
}

func (s *nodeServer) elapsed() time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.end.Sub(s.start)
}
