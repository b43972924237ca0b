package bench

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/vmpod/vmpod/integration/testenv"
)

func criClient(t *testing.T) runtimeapi.RuntimeServiceClient {
	t.Helper()
	testenv.RequireTestbed(t)
	conn, err := grpc.NewClient(os.Getenv(testenv.EnvRuntimeEndpoint), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return runtimeapi.NewRuntimeServiceClient(conn)
}

// criPod is one pod started through the CRI API.
type criPod struct {
	sandbox, container string
}

// startPod is RunPodSandbox + CreateContainer + StartContainer, the pod start the
// kubelet does, timed as one.
func startPod(ctx context.Context, t *testing.T, rs runtimeapi.RuntimeServiceClient, handler, image string, n int) (criPod, time.Duration) {
	t.Helper()
	cfg := &runtimeapi.PodSandboxConfig{
		Metadata:     &runtimeapi.PodSandboxMetadata{Name: fmt.Sprintf("bench-%s-%d", handler, n), Namespace: "vmpod-bench", Uid: fmt.Sprintf("bench-%s-%d-%d", handler, n, time.Now().UnixNano())},
		LogDirectory: t.TempDir(),
		Linux:        &runtimeapi.LinuxPodSandboxConfig{},
	}
	start := time.Now()
	sb, err := rs.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: cfg, RuntimeHandler: handler})
	if err != nil {
		t.Fatalf("%s: run pod: %v", handler, err)
	}
	c, err := rs.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{
		PodSandboxId: sb.PodSandboxId,
		Config: &runtimeapi.ContainerConfig{
			Metadata: &runtimeapi.ContainerMetadata{Name: "sleeper"},
			Image:    &runtimeapi.ImageSpec{Image: image},
			Command:  []string{"sleep", "100000"},
			LogPath:  "sleeper.log",
			Linux:    &runtimeapi.LinuxContainerConfig{},
		},
		SandboxConfig: cfg,
	})
	if err != nil {
		t.Fatalf("%s: create container: %v", handler, err)
	}
	if _, err := rs.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: c.ContainerId}); err != nil {
		t.Fatalf("%s: start container: %v", handler, err)
	}
	return criPod{sb.PodSandboxId, c.ContainerId}, time.Since(start)
}

func removePod(ctx context.Context, rs runtimeapi.RuntimeServiceClient, p criPod) {
	_, _ = rs.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: p.sandbox})
	_, _ = rs.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: p.sandbox})
}

// TestBenchCRI: pod start and ExecSync, vmpod against runc in the same run, and the
// host memory an idle vmpod pod costs beyond the guest RAM it uses.
func TestBenchCRI(t *testing.T) {
	requireBench(t)
	rs := criClient(t)
	ctx := context.Background()
	image := testenv.BusyboxImage(t)
	n := rounds(5)

	starts := map[string]sample{}
	execs := map[string]sample{}
	for i := range n {
		for _, handler := range []string{"runc", "vmpod"} {
			p, d := startPod(ctx, t, rs, handler, image, i)
			starts[handler] = append(starts[handler], d)
			for range 4 {
				s := time.Now()
				resp, err := rs.ExecSync(ctx, &runtimeapi.ExecSyncRequest{ContainerId: p.container, Cmd: []string{"true"}, Timeout: 30})
				if err != nil || resp.ExitCode != 0 {
					t.Fatalf("%s: exec: %v %+v", handler, err, resp)
				}
				execs[handler] = append(execs[handler], time.Since(s))
			}
			if handler == "vmpod" && i == 0 {
				reportIdleMemory(t, rs, p)
			}
			removePod(ctx, rs, p)
		}
	}
	report(t, "CRI pod start (runp+create+start), runc:  %s", starts["runc"])
	report(t, "CRI pod start (runp+create+start), vmpod: %s", starts["vmpod"])
	report(t, "CRI pod start ratio vmpod / runc (p50):   %.2f", float64(starts["vmpod"].pct(0.5))/float64(starts["runc"].pct(0.5)))
	report(t, "ExecSync `true`, runc:                    %s", execs["runc"])
	report(t, "ExecSync `true`, vmpod:                   %s", execs["vmpod"])
	report(t, "ExecSync ratio vmpod / runc (p50):        %.2f  (goal <= 1)", float64(execs["vmpod"].pct(0.5))/float64(execs["runc"].pct(0.5)))
}

// reportIdleMemory: RSS of the pod's shim, QEMU and virtiofsd against the memory the
// guest uses (MemTotal - MemFree: every page it touched is backed by QEMU's RSS).
func reportIdleMemory(t *testing.T, rs runtimeapi.RuntimeServiceClient, p criPod) {
	time.Sleep(3 * time.Second) // let the pod settle
	resp, err := rs.ExecSync(context.Background(), &runtimeapi.ExecSyncRequest{ContainerId: p.container, Cmd: []string{"cat", "/proc/meminfo"}, Timeout: 30})
	if err != nil {
		t.Fatal(err)
	}
	meminfo := map[string]int64{}
	for l := range strings.Lines(string(resp.Stdout)) {
		f := strings.Fields(l)
		if len(f) >= 2 {
			v, _ := strconv.ParseInt(f[1], 10, 64)
			meminfo[strings.TrimSuffix(f[0], ":")] = v << 10
		}
	}
	guestUsed := meminfo["MemTotal"] - meminfo["MemFree"]
	dir := testenv.PodStateDir(t, p.sandbox)
	var host int64
	var parts []string
	for _, proc := range testenv.LiveProcessesMentioning(dir) {
		pid, cmd, _ := strings.Cut(proc, ": ")
		rss := rssBytes(pid)
		host += rss
		parts = append(parts, fmt.Sprintf("%s %d MiB", filepath.Base(strings.Fields(cmd)[0]), rss>>20))
	}
	// the pod's shim: the parent of its QEMU
	if shim := parentOf(strconv.Itoa(testenv.QEMUPid(t, p.sandbox))); shim != "" {
		rss := rssBytes(shim)
		host += rss
		parts = append(parts, fmt.Sprintf("shim %d MiB", rss>>20))
	}
	report(t, "idle pod host RSS: %s = %d MiB; guest uses %d MiB; overhead %d MiB (goal <= 40)",
		strings.Join(parts, " + "), host>>20, guestUsed>>20, (host-guestUsed)>>20)
}

func rssBytes(pid string) int64 {
	b, err := os.ReadFile(filepath.Join("/proc", pid, "status"))
	if err != nil {
		return 0
	}
	for l := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10
		}
	}
	return 0
}

func parentOf(pid string) string {
	b, err := os.ReadFile(filepath.Join("/proc", pid, "stat"))
	if err != nil {
		return ""
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	if len(f) < 2 {
		return ""
	}
	return f[1]
}
