package bench

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/vmpod/vmpod/integration/testenv"
)

// envCount is a bench size from the environment, or def.
func envCount(name string, def int) int {
	if n, err := strconv.Atoi(os.Getenv(name)); err == nil && n > 0 {
		return n
	}
	return def
}

// startAtOnce starts n pods concurrently and returns them with the wall time until the
// last was started and each pod's own start. Every pod that got a sandbox is returned, for
// removal, also on error.
func startAtOnce(ctx context.Context, t *testing.T, rs runtimeapi.RuntimeServiceClient, handler, image string, first, n int) ([]criPod, time.Duration, sample, error) {
	var mu sync.Mutex
	var pods []criPod
	var each sample
	var errs []error
	var wg sync.WaitGroup
	start := time.Now()
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p, took, err := runPod(ctx, t.TempDir(), rs, handler, image, first+i)
			mu.Lock()
			defer mu.Unlock()
			if p.sandbox != "" {
				pods = append(pods, p)
			}
			if err != nil {
				errs = append(errs, err)
				return
			}
			each = append(each, took.total)
		}()
	}
	wg.Wait()
	wall := time.Since(start)
	if len(errs) > 0 {
		return pods, wall, each, fmt.Errorf("%d of %d pods failed to start, first: %w", len(errs), n, errs[0])
	}
	return pods, wall, each, nil
}

func removeAll(ctx context.Context, rs runtimeapi.RuntimeServiceClient, pods []criPod) {
	var wg sync.WaitGroup
	sem := make(chan struct{}, 4)
	for _, p := range pods {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			removePod(ctx, rs, p)
		}()
	}
	wg.Wait()
}

// memAvailable is the host's MemAvailable in bytes.
func memAvailable(t *testing.T) int64 {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "MemAvailable:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatal("no MemAvailable in /proc/meminfo")
	return 0
}

// TestBenchDensity: pods started at once against one pod started alone, vmpod and runc in
// the same run (issue 14: 20 at once within 3× one pod's start), and many idle pods on
// the node: the host memory each costs.
func TestBenchDensity(t *testing.T) {
	requireBench(t)
	// 20 guests booting at once on the 2 emulating cores of a TCG test machine take longer
	// than the default boot timeout (30 s): measured, 2 to 5 of 20 timed out on a slow day
	testenv.WithNodeConfig(t, "[timeouts]\nboot = \"3m\"\n", func() { benchDensity(t) })
}

func benchDensity(t *testing.T) {
	rs := criClient(t)
	ctx := context.Background()
	image := testenv.BusyboxImage(t)
	atOnce := envCount("VMPOD_BENCH_AT_ONCE", 20)
	idle := envCount("VMPOD_BENCH_IDLE_PODS", 50)

	burst := func(label, handler string) time.Duration {
		var alone sample
		for i := range 3 {
			p, took := startPod(ctx, t, rs, handler, image, 1000+i)
			alone = append(alone, took.total)
			removePod(ctx, rs, p)
		}
		pods, wall, each, err := startAtOnce(ctx, t, rs, handler, image, 2000, atOnce)
		removeAll(ctx, rs, pods)
		if err != nil {
			t.Fatal(err)
		}
		report(t, "density, %s: one pod alone %s; %d at once: all started after %s (%.1f× one alone; goal <= 3), each %s",
			label, ms(alone.pct(0.5)), atOnce, ms(wall), float64(wall)/float64(alone.pct(0.5)), each)
		return wall
	}
	burst("runc", "runc")
	// q35 pods restored from a template (the default, docs/design/022 and 024); the
	// template is made first, by a pod of its own: in a burst on a node without one, the
	// pod that makes it restores and the others boot rather than wait
	templateDir := testenv.TemplateDir(t)
	_ = os.RemoveAll(templateDir)
	t.Cleanup(func() { _ = os.RemoveAll(templateDir) })
	p, _ := startPod(ctx, t, rs, "vmpod", image, 999)
	removePod(ctx, rs, p)
	restored := burst("vmpod from a template (q35, the default)", "vmpod")
	// the same burst with runc creating the app containers, as before docs/design/023
	var byRunc time.Duration
	testenv.WithNodeConfig(t, runcAppsConfig, func() { byRunc = burst("vmpod, app containers by runc", "vmpod") })
	report(t, "density, vmpod: %d at once, app containers by the agent %s, by runc %s (ratio %.2f)", atOnce, ms(restored), ms(byRunc), float64(restored)/float64(byRunc))
	var booted time.Duration
	testenv.WithNodeConfig(t, bootedConfig, func() { booted = burst("vmpod booted (microvm)", "vmpod") })
	report(t, "density, vmpod: %d at once from a template %s, booted %s (ratio %.2f)", atOnce, ms(restored), ms(booted), float64(restored)/float64(booted))
	testenv.WithNodeConfig(t, bootedConfig, func() { idleMemoryOf(ctx, t, rs, image, "booted (microvm)") })
	idleMemoryOf(ctx, t, rs, image, "from a template (q35, the default)")

	before := memAvailable(t)
	var pods []criPod
	defer func() { removeAll(ctx, rs, pods) }()
	start := time.Now()
	var startErr error
	for len(pods) < idle && startErr == nil { // 5 at a time: the node's cores, not the API, set the pace
		var batch []criPod
		batch, _, _, startErr = startAtOnce(ctx, t, rs, "vmpod", image, 3000+len(pods), min(5, idle-len(pods)))
		pods = append(pods, batch...)
	}
	took := time.Since(start)
	time.Sleep(10 * time.Second) // let them settle
	m := measureIdle(t, pods)
	drop := (before - memAvailable(t)) / int64(len(pods))
	cpu := idleCPU(t, pods, 10*time.Second)
	if startErr != nil {
		report(t, "density: pod %d of %d failed to start (%v): the node was full", len(pods), idle, startErr)
	}
	report(t, "density: %d idle vmpod pods on the node, started in %s (5 at a time); per pod: guest RAM %d MiB, overhead beyond it %d MiB (goal <= 40) + TCG code cache %d MiB (TCG only); host MemAvailable fell %d MiB per pod; idle CPU %.1f%% of a core per pod",
		len(pods), took.Round(time.Second), m.guestRAM>>20, m.overhead()>>20, m.tcgCache>>20, drop>>20, cpu*100)
}

// idlePodsCompared is how many idle pods idleMemory starts of each kind.
const idlePodsCompared = 5

// idleMemoryOf starts idlePodsCompared idle vmpod pods at once and reports what the host's
// MemAvailable lost per pod and their PSS, 10 s after they started: what a booted and a
// restored guest (whose RAM is a memfd QEMU maps only as the guest touches it, so its PSS
// alone undercounts) cost the node.
func idleMemoryOf(ctx context.Context, t *testing.T, rs runtimeapi.RuntimeServiceClient, image, label string) {
	before := memAvailable(t)
	pods, _, _, err := startAtOnce(ctx, t, rs, "vmpod", image, 4000, idlePodsCompared)
	defer removeAll(ctx, rs, pods)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(10 * time.Second)
	m := measureIdle(t, pods)
	drop := (before - memAvailable(t)) / int64(len(pods))
	report(t, "idle memory, %d pods %s: host MemAvailable fell %d MiB per pod; PSS per pod: guest RAM %d MiB, overhead beyond it %d MiB + TCG code cache %d MiB",
		len(pods), label, drop>>20, m.guestRAM>>20, m.overhead()>>20, m.tcgCache>>20)
}

// idleCPU is the CPU the pods' host processes (QEMU, the shim, virtiofsd) use over d, in
// cores per pod.
func idleCPU(t *testing.T, pods []criPod, d time.Duration) float64 {
	var pids []string
	for _, p := range pods {
		qemu := strconv.Itoa(testenv.QEMUPid(t, p.sandbox))
		pids = append(pids, qemu, parentOf(qemu))
		for _, proc := range testenv.LiveProcessesMentioning(testenv.PodStateDir(t, p.sandbox)) {
			if pid, _, _ := strings.Cut(proc, ": "); pid != qemu {
				pids = append(pids, pid)
			}
		}
	}
	ticks := func() (sum int64) {
		for _, pid := range pids {
			b, err := os.ReadFile("/proc/" + pid + "/stat")
			if err != nil {
				continue
			}
			f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
			if len(f) > 12 { // utime and stime, fields 14 and 15 of stat
				u, _ := strconv.ParseInt(f[11], 10, 64)
				s, _ := strconv.ParseInt(f[12], 10, 64)
				sum += u + s
			}
		}
		return sum
	}
	const hz = 100 // USER_HZ on Linux
	t0 := ticks()
	time.Sleep(d)
	return float64(ticks()-t0) / hz / d.Seconds() / float64(len(pods))
}
