package shim_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmpod/vmpod/integration/testenv"
	"github.com/vmpod/vmpod/runtime/vmuser"
)

// EnvPodCycles sets TestPodChurn's cycle count: the 200 take ~10 minutes of TCG
// boots on two cores, too long for make test, which runs podCyclesCI.
const (
	EnvPodCycles = "VMPOD_POD_CYCLES"
	podCyclesCI  = 16
	podWorkers   = 2 // one per core: a boot is CPU-bound under TCG
)

// Whole pods created, started, exec'd into, stopped and removed, podWorkers at a time: each
// leaves nothing (AssertPodGone: processes, shim, mounts, shim socket, state dir), and the
// host ends with what it had — containerd's fds and memory, network namespaces, loop
// devices, pod cgroups, QEMU uid leases.
func TestPodChurn(t *testing.T) {
	testenv.RequireTestbed(t)
	cycles := podCyclesCI
	if v := os.Getenv(EnvPodCycles); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("%s=%q: want a positive count", EnvPodCycles, v)
		}
		cycles = n
	}
	image := testenv.BusyboxImage(t)
	cycle := func(i int) error {
		pod := testenv.RunPod(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: fmt.Sprintf("podchurn%d", i)}})
		id := pod.Container(testenv.ContainerConfig{Metadata: testenv.Metadata{Name: "c"}, Image: map[string]string{"image": image},
			Command: []string{"sleep", "3600"}})
		want := fmt.Sprint("pod", i)
		if out, err := crictl("exec", "-s", id, "echo", want); err != nil || out != want {
			return fmt.Errorf("cycle %d: exec: %q, %v", i, out, err)
		}
		if stopErr, removeErr := pod.Remove(30 * time.Second); stopErr != nil || removeErr != nil {
			return fmt.Errorf("cycle %d: stop %v, remove %v", i, stopErr, removeErr)
		}
		testenv.AssertPodGone(t, pod.ID)
		return nil
	}
	host := func() hostCounts {
		return hostCounts{
			containerdFDs: countEntries(t, fmt.Sprintf("/proc/%d/fd", containerdPid(t))),
			containerdRSS: shimRSSKiB(t, containerdPid(t)),
			netns:         countEntries(t, filepath.Join(testbedRun(t), "state", "netns")),
			loops:         loopDevices(t),
			cgroups:       cgroups(),
		}
	}
	// a warm-up (containerd's caches, the image), then the baseline
	for i := range podWorkers {
		if err := cycle(-1 - i); err != nil {
			t.Fatal(err)
		}
	}
	before := host()

	start := time.Now()
	runCycles(t, cycles, podWorkers, cycle)
	took := time.Since(start)
	after := host()
	t.Logf("%d pod cycles, %d at a time, in %v (%v each); before %+v, after %+v",
		cycles, podWorkers, took.Round(time.Second), (took / time.Duration(cycles)).Round(time.Millisecond), before, after)
	if after.netns > before.netns || after.loops > before.loops || after.cgroups > before.cgroups {
		t.Errorf("host resources grew over %d pods: before %+v, after %+v", cycles, before, after)
	}
	// containerd keeps per-pod state it frees lazily (its event queues, GC of metadata):
	// a leak of one fd per pod shows over the cycles, a few from caches do not
	if after.containerdFDs > before.containerdFDs+8 {
		t.Errorf("containerd holds %d fds after %d pods, %d before", after.containerdFDs, cycles, before.containerdFDs)
	}
	if after.containerdRSS > before.containerdRSS+32<<10 {
		t.Errorf("containerd's RSS grew from %d to %d KiB over %d pods", before.containerdRSS, after.containerdRSS, cycles)
	}
	if held, err := vmuser.Default().Held(""); err != nil || len(held) > 0 {
		t.Errorf("QEMU uid leases still held after every pod is gone: %v %v", held, err)
	}
}

type hostCounts struct {
	containerdFDs, containerdRSS, netns, loops, cgroups int
}

// testbedRun is the test bed's run dir (hack/testbed-lib.sh TB_RUN): its containerd logs
// to <run>/logs/containerd.log.
func testbedRun(t *testing.T) string {
	t.Helper()
	log := os.Getenv(testenv.EnvContainerdLog)
	if log == "" {
		t.Skip("no test bed containerd log (" + testenv.EnvContainerdLog + ")")
	}
	return filepath.Dir(filepath.Dir(log))
}

func containerdPid(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(testbedRun(t), "containerd.pid"))
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

func countEntries(t *testing.T, dir string) int {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return len(entries)
}

func loopDevices(t *testing.T) int {
	t.Helper()
	out, err := exec.Command("losetup", "-n", "-l").Output()
	if err != nil {
		t.Fatalf("losetup: %v", err)
	}
	if s := strings.TrimSpace(string(out)); s != "" {
		return len(strings.Split(s, "\n"))
	}
	return 0
}

// cgroups counts the host's cgroups: a pod's (its QEMU's, its containers') must go with it.
func cgroups() int {
	n := 0
	_ = filepath.WalkDir("/sys/fs/cgroup", func(path string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			n++
		}
		return nil
	})
	return n
}
