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
// QEMU's userspace virtio-net ⇄ guest) next to a baseline taken in the same run: the
// same busybox tools as a plain process in the same pod netns, before it is plumbed.
// All times are taken on the host's clock (the guest's is jiffy-grained under TCG).
// Figures go to docs/design/401-pod-network.md; nothing here asserts a speed.
func TestBenchPodNetwork(t *testing.T) {
	testenv.Require(t)
	if os.Getenv("VMPOD_BENCH") != "1" {
		t.Skip("benchmark: set VMPOD_BENCH=1 to measure (about a minute of 2 busy cores)")
	}
	pn := newPodNet(t, benchNet)
	node := startNodeServer(t, pn)
	podIP := addrOf(benchNet.PodAddr)

	// Baseline: busybox httpd/wget as plain processes in the pod netns.
	rootfs := testenv.OverlayRootfs(t, testenv.BusyboxRootfs(t))
	_, prepare := writePayload(t, benchPayload)
	prepare(rootfs)
	httpd := exec.Command("ip", "netns", "exec", pn.Pod, "chroot", rootfs, "httpd", "-f", "-p", "8080", "-h", "/")
	if err := httpd.Start(); err != nil {
		t.Fatal(err)
	}
	runInNetns := func(script string) string {
		out, err := exec.Command("ip", "netns", "exec", pn.Pod, "chroot", rootfs, "sh", "-c", script).CombinedOutput()
		if err != nil {
			t.Fatalf("%s in the pod netns: %v: %s", script, err, out)
		}
		return string(out)
	}
	base := measurePodNetwork(t, pn, node, "http://"+podIP+":8080/payload", runInNetns)
	_ = httpd.Process.Kill()
	_ = httpd.Wait()

	// The same through the VM.
	p := bootPod(t, pn, "netbench")
	server := p.startContainer(t, "httpd", serveScript, prepare)
	server.waitOutput(t, "serving")
	n := 0
	runInGuest := func(script string) string { n++; return p.run(t, fmt.Sprintf("wget%d", n), script) }
	vm := measurePodNetwork(t, pn, node, "http://"+podIP+":8080/payload", runInGuest)

	fmt.Printf("pod network, %d MiB transfers, RTT from %d pings; baseline = plain process in the pod netns\n", benchPayload>>20, pingCount)
	fmt.Printf("  %-34s %-28s %s\n", "", "baseline (netns)", "VM (tc mirred + tap + virtio-net)")
	fmt.Printf("  %-34s %-28s %s\n", "RTT node→pod min / p50 / p90", base.rtt, vm.rtt)
	fmt.Printf("  %-34s %-28s %s\n", "TCP pod→node (HTTP GET by node)", base.tx, vm.tx)
	fmt.Printf("  %-34s %-28s %s\n", "TCP node→pod (wget in pod)", base.rx, vm.rx)
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
