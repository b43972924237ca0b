package shim_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmpod/vmpod/integration/testenv"
)

// churnCycles containers go through TestContainerChurn's pod, churnWorkers at a time.
const (
	churnCycles  = 200
	churnWorkers = 4
)

// Containers created, started, exec'd into, stopped and removed, several at a time, in
// one pod, the way a kubelet restarts crash-looping containers: the pod's shim ends with
// the file descriptors it had and about the memory, and no container leaves a process or
// a mount behind.
func TestContainerChurn(t *testing.T) {
	testenv.RequireTestbed(t)
	pod := testenv.RunPod(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: "churn"}})
	shim := testenv.ShimPid(t, pod.ID)
	image, dir := testenv.BusyboxImage(t), t.TempDir()
	// one cycle, on a worker goroutine: it reports instead of failing the test
	cycle := func(name string) error {
		config, err := json.Marshal(testenv.ContainerConfig{
			Metadata: testenv.Metadata{Name: name}, Image: map[string]string{"image": image},
			Command: []string{"sleep", "3600"}, LogPath: name + ".log", Linux: map[string]any{},
		})
		if err != nil {
			return err
		}
		path := filepath.Join(dir, name+".json")
		if err := os.WriteFile(path, config, 0o644); err != nil {
			return err
		}
		id, err := crictl("create", pod.ID, path, pod.Config)
		if err != nil {
			return err
		}
		for _, args := range [][]string{{"start", id}, {"exec", "-s", id, "echo", name}, {"stop", "-t", "0", id}, {"rm", id}} {
			out, err := crictl(args...)
			if err != nil {
				return err
			}
			if args[0] == "exec" && out != name {
				return fmt.Errorf("%s: exec said %q", name, out)
			}
		}
		if procs := testenv.LiveProcessesMentioning(id); len(procs) > 0 {
			return fmt.Errorf("%s removed, its processes live on: %q", name, procs)
		}
		if mounts := testenv.MountsWhere(func(p string) bool { return strings.Contains(p, id) }); len(mounts) > 0 {
			return fmt.Errorf("%s removed, its mounts stay: %q", name, mounts)
		}
		return nil
	}
	// a warm-up, then the shim's fds and memory as a baseline
	for i := range 2 * churnWorkers {
		if err := cycle(fmt.Sprintf("warm%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	baseFDs, baseRSS := shimFDs(t, shim), shimRSSKiB(t, shim)

	start := time.Now()
	runCycles(t, churnCycles, churnWorkers, func(i int) error { return cycle(fmt.Sprintf("c%d", i)) })
	took := time.Since(start)
	fds, rss := shimFDs(t, shim), shimRSSKiB(t, shim)
	t.Logf("%d cycles, %d at a time, in %v (%v each); shim fds %d → %d, RSS %d → %d KiB",
		churnCycles, churnWorkers, took.Round(time.Second), (took / churnCycles).Round(time.Millisecond), baseFDs, fds, baseRSS, rss)
	if fds > baseFDs {
		t.Errorf("the shim holds %d fds after %d cycles, %d before: a leak per container", fds, churnCycles, baseFDs)
	}
	// Go's heap breathes with the collector; a leak of even 50 KiB per container would be
	// ~10 MiB over the cycles
	if rss > baseRSS+8<<10 {
		t.Errorf("the shim's RSS grew from %d to %d KiB over %d cycles", baseRSS, rss, churnCycles)
	}
}

// runCycles runs cycle(0) to cycle(n-1), workers at a time. The first error of a worker
// ends that worker and stops handing out cycles; every error fails the test.
func runCycles(t *testing.T, n, workers int, cycle func(i int) error) {
	next, errs := make(chan int), make(chan error, workers)
	for range workers {
		go func() {
			// a helper's t.Fatal ends this goroutine: it still reports
			err := errors.New("a cycle failed the test")
			defer func() { errs <- err }()
			for i := range next {
				if err = cycle(i); err != nil {
					return
				}
			}
			err = nil
		}()
	}
feed:
	for i := range n {
		select {
		case next <- i:
		case err := <-errs: // a worker stopped early
			t.Error(err)
			workers--
			break feed
		}
	}
	close(next)
	for range workers {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
}

// crictl runs crictl with args and returns its trimmed output; errors carry the output.
func crictl(args ...string) (string, error) {
	out, err := testenv.Cmd("crictl", args...)
	return strings.TrimSpace(out), err
}

func shimFDs(t *testing.T, pid int) int {
	t.Helper()
	entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatalf("shim fds: %v", err)
	}
	return len(entries)
}

func shimRSSKiB(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatalf("shim status: %v", err)
	}
	for l := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			n, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			if err != nil {
				t.Fatalf("shim VmRSS %q: %v", v, err)
			}
			return n
		}
	}
	t.Fatal("shim status has no VmRSS")
	return 0
}
