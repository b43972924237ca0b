package bench

import (
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
	"github.com/vmpod/vmpod/integration/testenv"
	"github.com/vmpod/vmpod/internal/phases"
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

// podStart is how long a pod start took, and each of its CRI calls.
type podStart struct {
	total, runp, create, start time.Duration
}

// startPod is RunPodSandbox + CreateContainer + StartContainer, the pod start the
// kubelet does, timed as one and call by call.
func startPod(ctx context.Context, t *testing.T, rs runtimeapi.RuntimeServiceClient, handler, image string, n int) (criPod, podStart) {
	t.Helper()
	p, took, err := runPod(ctx, t.TempDir(), rs, handler, image, n)
	if err != nil {
		t.Fatal(err)
	}
	return p, took
}

// runPod is startPod for any goroutine: it returns its error, with the pod to remove if
// it got that far.
func runPod(ctx context.Context, logDir string, rs runtimeapi.RuntimeServiceClient, handler, image string, n int) (criPod, podStart, error) {
	return runPodWithLimit(ctx, logDir, rs, handler, image, n, 0)
}

// runPodWithLimit is runPod for a pod whose limits (what a kubelet sends in the sandbox's
// resources) add up to memBytes of memory; 0: none.
func runPodWithLimit(ctx context.Context, logDir string, rs runtimeapi.RuntimeServiceClient, handler, image string, n int, memBytes int64) (criPod, podStart, error) {
	cfg := &runtimeapi.PodSandboxConfig{
		Metadata:     &runtimeapi.PodSandboxMetadata{Name: fmt.Sprintf("bench-%s-%d", handler, n), Namespace: "vmpod-bench", Uid: fmt.Sprintf("bench-%s-%d-%d", handler, n, time.Now().UnixNano())},
		LogDirectory: logDir,
		Linux:        &runtimeapi.LinuxPodSandboxConfig{},
	}
	if memBytes > 0 {
		cfg.Linux.Resources = &runtimeapi.LinuxContainerResources{MemoryLimitInBytes: memBytes}
	}
	start := time.Now()
	var took podStart
	sb, err := rs.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: cfg, RuntimeHandler: handler})
	if err != nil {
		return criPod{}, took, fmt.Errorf("%s: run pod: %w", handler, err)
	}
	took.runp = time.Since(start)
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
		return criPod{sandbox: sb.PodSandboxId}, took, fmt.Errorf("%s: create container: %w", handler, err)
	}
	took.create = time.Since(start) - took.runp
	if _, err := rs.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: c.ContainerId}); err != nil {
		return criPod{sb.PodSandboxId, c.ContainerId}, took, fmt.Errorf("%s: start container: %w", handler, err)
	}
	took.total = time.Since(start)
	took.start = took.total - took.runp - took.create
	return criPod{sb.PodSandboxId, c.ContainerId}, took, nil
}

// shimPhases reads back the steps the shim logged for creating container id (the
// sandbox's create boots the VM): its "container created" line in containerd's log.
func shimPhases(t *testing.T, id string) []phases.Step {
	t.Helper()
	path := os.Getenv(testenv.EnvContainerdLog)
	if path == "" {
		t.Fatalf("%s not set (hack/containerd.sh env)", testenv.EnvContainerdLog)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(b)) {
		if !strings.Contains(line, "container="+id) || !strings.Contains(line, `msg="container created`) {
			continue
		}
		_, rest, ok := strings.Cut(line, `phases="`)
		value, _, closed := strings.Cut(rest, `"`)
		if !ok || !closed {
			t.Fatalf("container %s: no phases in the shim's line %q", id, line)
		}
		steps, err := phases.Parse(value)
		if err != nil {
			t.Fatal(err)
		}
		return steps
	}
	t.Fatalf("container %s: the shim logged no \"container created\" line in %s", id, path)
	return nil
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

	handlers := []string{"runc", "vmpod"}
	gvisor := hasHandler(ctx, t, rs, "runsc")
	if gvisor {
		handlers = append(handlers, "runsc")
	}
	starts := map[string]sample{}
	execs := map[string]sample{}
	execsTiny := map[string]sample{}  // ExecSync of tinyProgram: the runtime's path with a program that costs nothing
	floors := map[string]sample{}     // the program's own fork, exec and exit, run from a shell in the container
	calls := map[string]sample{}      // vmpod's CRI calls, by call
	phaseOf := map[string]sample{}    // the shim's steps of a pod start, by step
	var order []string                // the steps in the order they happen
	runcApps := map[string]sample{}   // vmpod with runc creating app containers: pod start, RunPodSandbox, app create
	booted := map[string]sample{}     // vmpod microvm booted: pod start, RunPodSandbox, shim steps
	bootedRunc := map[string]sample{} // the same with runc creating app containers
	large := map[string]sample{}      // vmpod with a 1 GiB limit: a smaller template's guest, the rest plugged
	var bare sample                   // bare QEMU's boot to the agent's first reply, the floor
	kernel, initrd := testenv.Kernel(t), testenv.Initrd(t)
	var bootedOrder []string
	// the first pod makes the template (docs/design/022); timed apart
	templateDir := testenv.TemplateDir(t)
	_ = os.RemoveAll(templateDir)
	t.Cleanup(func() { _ = os.RemoveAll(templateDir) })
	p, first := startPod(ctx, t, rs, "vmpod", image, -1)
	removePod(ctx, rs, p)
	for i := range n {
		for _, handler := range handlers {
			p, d := startPod(ctx, t, rs, handler, image, i)
			starts[handler] = append(starts[handler], d.total)
			if handler == "vmpod" {
				calls["RunPodSandbox"] = append(calls["RunPodSandbox"], d.runp)
				calls["CreateContainer"] = append(calls["CreateContainer"], d.create)
				calls["StartContainer"] = append(calls["StartContainer"], d.start)
				recordPhases(t, p, phaseOf, &order)
			}
			for range 4 {
				s := time.Now()
				resp, err := rs.ExecSync(ctx, &runtimeapi.ExecSyncRequest{ContainerId: p.container, Cmd: []string{"true"}, Timeout: 30})
				if err != nil || resp.ExitCode != 0 {
					t.Fatalf("%s: exec: %v %+v", handler, err, resp)
				}
				execs[handler] = append(execs[handler], time.Since(s))
			}
			writeTinyProgram(ctx, t, rs, p.container)
			for range 4 {
				s := time.Now()
				resp, err := rs.ExecSync(ctx, &runtimeapi.ExecSyncRequest{ContainerId: p.container, Cmd: []string{tinyProgramPath}, Timeout: 30})
				if err != nil || resp.ExitCode != 0 {
					t.Fatalf("%s: exec %s: %v %+v", handler, tinyProgramPath, err, resp)
				}
				execsTiny[handler] = append(execsTiny[handler], time.Since(s))
			}
			floors[handler] = append(floors[handler], programRun(ctx, t, rs, p.container))
			removePod(ctx, rs, p)
		}
		bare = append(bare, bareBoot(t, kernel, initrd))
		// the same vmpod pod with runc creating its app container, as before design 023
		// (with runc's warm-up, design 021), alternating with the others
		var p criPod
		var d podStart
		testenv.WithNodeConfig(t, runcAppsConfig, func() { p, d = startPod(ctx, t, rs, "vmpod", image, i) })
		runcApps["pod start"] = append(runcApps["pod start"], d.total)
		runcApps["RunPodSandbox"] = append(runcApps["RunPodSandbox"], d.runp)
		runcApps["app create"] = append(runcApps["app create"], appCreate(t, p))
		removePod(ctx, rs, p)
		// and booted (microvm, as before docs/design/024)
		testenv.WithNodeConfig(t, bootedConfig, func() { p, d = startPod(ctx, t, rs, "vmpod", image, i) })
		booted["pod start"] = append(booted["pod start"], d.total)
		booted["RunPodSandbox"] = append(booted["RunPodSandbox"], d.runp)
		recordPhases(t, p, booted, &bootedOrder)
		removePod(ctx, rs, p)
		testenv.WithNodeConfig(t, bootedConfig+runcAppsConfig, func() { p, d = startPod(ctx, t, rs, "vmpod", image, i) })
		bootedRunc["pod start"] = append(bootedRunc["pod start"], d.total)
		bootedRunc["app create"] = append(bootedRunc["app create"], appCreate(t, p))
		removePod(ctx, rs, p)
		// and a pod with a 1 GiB limit (1088 MiB with the guest's overhead), which restores
		// the 1024 MiB template and has the rest plugged (docs/design/022, templates by
		// doublings of the default memory)
		p, d, err := runPodWithLimit(ctx, t.TempDir(), rs, "vmpod", image, i, 1<<30)
		if err != nil {
			t.Fatal(err)
		}
		large["pod start"] = append(large["pod start"], d.total)
		large["RunPodSandbox"] = append(large["RunPodSandbox"], d.runp)
		steps := shimPhases(t, p.sandbox)
		at := slices.IndexFunc(steps, func(s phases.Step) bool { return s.Name == "memory" })
		if at < 0 {
			t.Fatalf("a pod with a 1 GiB limit: no memory plug among the shim's steps %v: want the default memory's template restored and the rest plugged", steps)
		}
		large["memory plug"] = append(large["memory plug"], steps[at].Took)
		removePod(ctx, rs, p)
	}
	report(t, "bare QEMU exec → first agent reply (the same kernel and initramfs): %s", bare)
	report(t, "CRI pod start / bare boot (p50; issue 14's goal <= 1.0): from a template (the default) %.2f, booted (microvm) %.2f",
		float64(starts["vmpod"].pct(0.5))/float64(bare.pct(0.5)), float64(booted["pod start"].pct(0.5))/float64(bare.pct(0.5)))
	report(t, "vmpod from a template (q35, the default, docs/design/022 and 024) against a boot (microvm), p50 of %d:", n)
	report(t, "  the first pod, which makes the template: pod start %s", ms(first.total))
	report(t, "  RunPodSandbox  template %9s  boot %9s  ratio %.2f", ms(calls["RunPodSandbox"].pct(0.5)), ms(booted["RunPodSandbox"].pct(0.5)),
		float64(calls["RunPodSandbox"].pct(0.5))/float64(booted["RunPodSandbox"].pct(0.5)))
	report(t, "  pod start      template %9s  boot %9s  ratio %.2f", ms(starts["vmpod"].pct(0.5)), ms(booted["pod start"].pct(0.5)),
		float64(starts["vmpod"].pct(0.5))/float64(booted["pod start"].pct(0.5)))
	report(t, "  a pod with a 1 GiB limit (a smaller template's guest, the rest plugged): RunPodSandbox %s, pod start %s, the plug %s",
		ms(large["RunPodSandbox"].pct(0.5)), ms(large["pod start"].pct(0.5)), ms(large["memory plug"].pct(0.5)))
	report(t, "  where a booted pod's start goes:")
	for _, k := range bootedOrder {
		report(t, "    shim %-24s %s", k, ms(booted[k].pct(0.5)))
	}
	for _, k := range []string{"app create", "pod start"} {
		report(t, "  %-14s booted, app container by the agent %9s, by runc %9s  ratio %.2f", k,
			ms(booted[k].pct(0.5)), ms(bootedRunc[k].pct(0.5)), float64(booted[k].pct(0.5))/float64(bootedRunc[k].pct(0.5)))
	}
	byAgent := map[string]sample{"pod start": starts["vmpod"], "RunPodSandbox": calls["RunPodSandbox"], "app create": phaseOf["app create"]}
	report(t, "app containers created by the agent (docs/design/023) against runc (vmpod.runcapps, with its warm-up), p50 of %d:", n)
	for _, k := range []string{"RunPodSandbox", "app create", "pod start"} {
		report(t, "  %-14s agent %9s  runc %9s  ratio %.2f", k, ms(byAgent[k].pct(0.5)), ms(runcApps[k].pct(0.5)), float64(byAgent[k].pct(0.5))/float64(runcApps[k].pct(0.5)))
	}
	reportIdleMemory(ctx, t, rs, image)
	report(t, "CRI pod start (runp+create+start), runc:  %s", starts["runc"])
	report(t, "CRI pod start (runp+create+start), vmpod: %s", starts["vmpod"])
	report(t, "CRI pod start ratio vmpod / runc (p50):   %.2f", float64(starts["vmpod"].pct(0.5))/float64(starts["runc"].pct(0.5)))
	report(t, "where a vmpod pod start goes (p50 of %d; the shim's steps from its log, docs/benchmarks.md says what each is):", n)
	for _, c := range []string{"RunPodSandbox", "CreateContainer", "StartContainer"} {
		report(t, "  CRI %-26s %s", c, ms(calls[c].pct(0.5)))
	}
	for _, k := range order {
		report(t, "    shim %-24s %s", k, ms(phaseOf[k].pct(0.5)))
	}
	report(t, "ExecSync `true`, runc:                    %s", execs["runc"])
	report(t, "ExecSync `true`, vmpod:                   %s", execs["vmpod"])
	report(t, "ExecSync ratio vmpod / runc (p50):        %.2f  (goal <= 2 under TCG, <= 1 on KVM)", float64(execs["vmpod"].pct(0.5))/float64(execs["runc"].pct(0.5)))
	// An ExecSync is the program's own run plus the runtime's path to it. Under TCG the
	// guest's fork, exec and exit of `true` is emulated; what is vmpod's is the rest.
	for _, h := range []string{"runc", "vmpod"} {
		report(t, "  %-5s `/bin/true` forked and run by a shell in the container %8s, the rest of an ExecSync %8s",
			h, ms(floors[h].pct(0.5)), ms(execs[h].pct(0.5)-floors[h].pct(0.5)))
	}
	// The same with a program whose own run costs next to nothing (no libc, no loader):
	// the runtimes' paths side by side, whatever the guest's CPU costs.
	report(t, "ExecSync of a %d-byte static program that exits at once, runc:  %s", len(tinyProgram()), execsTiny["runc"])
	report(t, "ExecSync of a %d-byte static program that exits at once, vmpod: %s", len(tinyProgram()), execsTiny["vmpod"])
	report(t, "  ratio vmpod / runc (p50): %.2f", float64(execsTiny["vmpod"].pct(0.5))/float64(execsTiny["runc"].pct(0.5)))
	if !gvisor {
		report(t, "gVisor: not measured: containerd has no runsc handler (make bench builds one: hack/gvisor.sh)")
		return
	}
	report(t, "CRI pod start, gVisor (runsc, systrap):   %s", starts["runsc"])
	report(t, "ExecSync `true`, gVisor:                  %s", execs["runsc"])
	report(t, "ExecSync of the static program, gVisor:   %s", execsTiny["runsc"])
	mem := map[string]int64{}
	for _, h := range handlers {
		mem[h] = idleTreeMemory(ctx, t, rs, h, image)
	}
	report(t, "peers side by side (p50; idle memory: PSS of a pod's shim and everything under it, mean of %d pods):", memoryPods)
	report(t, "  %-8s %12s %12s %14s", "", "pod start", "ExecSync", "idle memory")
	for _, h := range handlers {
		report(t, "  %-8s %12s %12s %10d MiB", h, ms(starts[h].pct(0.5)), ms(execs[h].pct(0.5)), mem[h]>>20)
	}
	report(t, "  ratio vmpod / runsc: pod start %.2f, ExecSync %.2f", float64(starts["vmpod"].pct(0.5))/float64(starts["runsc"].pct(0.5)),
		float64(execs["vmpod"].pct(0.5))/float64(execs["runsc"].pct(0.5)))
}

// tinyProgramPath is where writeTinyProgram puts tinyProgram in a container.
const tinyProgramPath = "/exit0"

// tinyProgram is a whole x86-64 Linux program that exits 0 at once: an ELF header, one
// loadable segment and three instructions, no libc and no dynamic loader. Its exec costs
// a runtime what any exec costs, and its own run next to nothing, under TCG too.
func tinyProgram() []byte {
	const base, ehsize, phsize = 0x400000, 64, 56
	code := []byte{0xb8, 0x3c, 0, 0, 0, 0x31, 0xff, 0x0f, 0x05} // mov eax, 60 (exit); xor edi, edi; syscall
	b := make([]byte, ehsize+phsize, ehsize+phsize+len(code))
	le := binary.LittleEndian
	copy(b, "\x7fELF\x02\x01\x01")           // 64-bit, little-endian, ELF version 1
	le.PutUint16(b[16:], 2)                  // ET_EXEC
	le.PutUint16(b[18:], 62)                 // EM_X86_64
	le.PutUint32(b[20:], 1)                  // version
	le.PutUint64(b[24:], base+ehsize+phsize) // entry: the code after the headers
	le.PutUint64(b[32:], ehsize)             // program headers' offset
	le.PutUint16(b[52:], ehsize)             // ELF header's size
	le.PutUint16(b[54:], phsize)             // a program header's size
	le.PutUint16(b[56:], 1)                  // one program header
	ph := b[ehsize:]
	size := uint64(ehsize + phsize + len(code))
	le.PutUint32(ph[0:], 1)     // PT_LOAD
	le.PutUint32(ph[4:], 5)     // readable, executable
	le.PutUint64(ph[16:], base) // the whole file at base
	le.PutUint64(ph[24:], base)
	le.PutUint64(ph[32:], size)
	le.PutUint64(ph[40:], size)
	le.PutUint64(ph[48:], 0x1000)
	return append(b, code...)
}

// writeTinyProgram writes tinyProgram into container at tinyProgramPath, through its
// shell's printf (the image has no other way in).
func writeTinyProgram(ctx context.Context, t *testing.T, rs runtimeapi.RuntimeServiceClient, container string) {
	t.Helper()
	var octal strings.Builder
	for _, c := range tinyProgram() {
		fmt.Fprintf(&octal, "\\%03o", c)
	}
	script := fmt.Sprintf("printf '%s' > %s && chmod 755 %s", octal.String(), tinyProgramPath, tinyProgramPath)
	resp, err := rs.ExecSync(ctx, &runtimeapi.ExecSyncRequest{ContainerId: container, Cmd: []string{"sh", "-c", script}, Timeout: 60})
	if err != nil || resp.ExitCode != 0 {
		t.Fatalf("write %s in %s: %v %+v", tinyProgramPath, container, err, resp)
	}
}

// programRuns is how many times programRun runs the program: /proc/uptime counts in
// 10 ms steps.
const programRuns = 20

// programRun is how long one fork, exec and exit of /bin/true takes in container when a
// shell in it runs it: the part of an ExecSync of `true` that is the program's, whatever
// the runtime.
func programRun(ctx context.Context, t *testing.T, rs runtimeapi.RuntimeServiceClient, container string) time.Duration {
	t.Helper()
	script := fmt.Sprintf(`read a _ < /proc/uptime; for i in $(seq %d); do /bin/true; done; read b _ < /proc/uptime; echo $a $b`, programRuns)
	resp, err := rs.ExecSync(ctx, &runtimeapi.ExecSyncRequest{ContainerId: container, Cmd: []string{"sh", "-c", script}, Timeout: 60})
	if err != nil || resp.ExitCode != 0 {
		t.Fatalf("time /bin/true in %s: %v %+v", container, err, resp)
	}
	var from, to float64
	if _, err := fmt.Sscan(string(resp.Stdout), &from, &to); err != nil {
		t.Fatalf("time /bin/true in %s: output %q: %v", container, resp.Stdout, err)
	}
	return time.Duration(math.Round((to-from)/programRuns*1e6)) * time.Microsecond
}

// recordPhases adds the shim's steps of p's start (its sandbox's and app container's,
// "sandbox boot", "app create", ...) to into, and new step names to order.
func recordPhases(t *testing.T, p criPod, into map[string]sample, order *[]string) {
	t.Helper()
	for _, c := range []struct{ who, id string }{{"sandbox", p.sandbox}, {"app", p.container}} {
		for _, s := range shimPhases(t, c.id) {
			key := c.who + " " + s.Name
			if _, seen := into[key]; !seen {
				*order = append(*order, key)
			}
			into[key] = append(into[key], s.Took)
		}
	}
}

// runcAppsConfig is the node config of vmpod pods whose app containers runc creates.
const runcAppsConfig = "kernel_params = [\"" + agentv1.KernelParamRuncApps + "\"]\n"

// appCreate is the shim's create step of p's app container.
func appCreate(t *testing.T, p criPod) time.Duration {
	t.Helper()
	for _, s := range shimPhases(t, p.container) {
		if s.Name == "create" {
			return s.Took
		}
	}
	t.Fatalf("container %s: the shim logged no create step", p.container)
	return 0
}

// bootedConfig is the node config of vmpod pods booted, not restored from a template:
// microvm, the default before docs/design/024.
const bootedConfig = "machine = \"microvm\"\ntemplates = false\n"

// hasHandler reports whether the CRI runtime has a runtime handler of that name.
func hasHandler(ctx context.Context, t *testing.T, rs runtimeapi.RuntimeServiceClient, name string) bool {
	st, err := rs.Status(ctx, &runtimeapi.StatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	return slices.ContainsFunc(st.RuntimeHandlers, func(h *runtimeapi.RuntimeHandler) bool { return h.Name == name })
}

// idleTreeMemory is the mean host memory (PSS) of memoryPods idle pods of a handler: the
// pod's shim and every process under it (runc: the shim, pause and the container; runsc:
// the shim, the sandbox's Sentry and gofer; vmpod: the shim, QEMU with the guest's RAM,
// virtiofsd, the pid proxies) — the one measure that applies to all three.
func idleTreeMemory(ctx context.Context, t *testing.T, rs runtimeapi.RuntimeServiceClient, handler, image string) int64 {
	var pods []criPod
	defer func() {
		for _, p := range pods {
			removePod(ctx, rs, p)
		}
	}()
	for i := range memoryPods {
		p, _ := startPod(ctx, t, rs, handler, image, 200+i)
		pods = append(pods, p)
	}
	time.Sleep(5 * time.Second) // let them settle
	var sum int64
	for _, p := range pods {
		shim := shimOf(t, p.sandbox)
		for _, pid := range append(descendants(shim), shim) {
			sum += pssOf(pid)
		}
	}
	return sum / int64(len(pods))
}

// shimOf finds the shim serving a pod sandbox: containerd starts it with "-id <sandbox>".
func shimOf(t *testing.T, sandbox string) int {
	dirs, _ := os.ReadDir("/proc")
	for _, d := range dirs {
		pid, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		b, _ := os.ReadFile(filepath.Join("/proc", d.Name(), "cmdline"))
		if args := strings.Split(string(b), "\x00"); slices.Contains(args, "-id") && slices.Contains(args, sandbox) {
			return pid
		}
	}
	t.Fatalf("no shim for sandbox %s", sandbox)
	return 0
}

// descendants lists every process below pid.
func descendants(pid int) []int {
	children := map[int][]int{}
	dirs, _ := os.ReadDir("/proc")
	for _, d := range dirs {
		child, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		if ppid, err := strconv.Atoi(parentOf(d.Name())); err == nil {
			children[ppid] = append(children[ppid], child)
		}
	}
	var out []int
	for queue := children[pid]; len(queue) > 0; queue = queue[1:] {
		out = append(out, queue[0])
		queue = append(queue, children[queue[0]]...)
	}
	return out
}

// pssOf is a process's PSS in bytes (0 once it is gone).
func pssOf(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return 0
	}
	for l := range strings.Lines(string(b)) {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "Pss:" {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb << 10
		}
	}
	return 0
}

// memoryPods is how many idle pods share the node in the memory measurement: file pages
// (the guest kernel and initramfs QEMU maps, QEMU's and the shim's binaries) are page cache
// shared by every pod, and PSS charges each of N pods 1/N of them, as a real node would.
const memoryPods = 3

// reportIdleMemory: the host memory per idle pod, proportional (PSS), split into the
// guest's RAM (the memfd backing it), TCG's translated-code cache (the rwx anonymous
// mapping; KVM has none) and the rest of QEMU, the shim and virtiofsd.
func reportIdleMemory(ctx context.Context, t *testing.T, rs runtimeapi.RuntimeServiceClient, image string) {
	var pods []criPod
	for i := range memoryPods {
		p, _ := startPod(ctx, t, rs, "vmpod", image, 100+i)
		pods = append(pods, p)
	}
	defer func() {
		for _, p := range pods {
			removePod(ctx, rs, p)
		}
	}()
	time.Sleep(5 * time.Second) // let them settle
	m := measureIdle(t, pods)
	report(t, "idle pod memory, PSS per pod of %d: guest RAM %d MiB; QEMU %d MiB + TCG code cache %d MiB; shim %d MiB; virtiofsd %d MiB",
		memoryPods, m.guestRAM>>20, m.qemu>>20, m.tcgCache>>20, m.shim>>20, m.helpers>>20)
	report(t, "idle pod overhead beyond guest RAM: %d MiB without TCG's code cache (goal <= 40), %d MiB with it (TCG only)",
		m.overhead()>>20, (m.overhead()+m.tcgCache)>>20)
}

// idleMemory is the host memory of a pod (PSS, bytes), by what holds it.
type idleMemory struct {
	guestRAM, tcgCache, qemu, shim, helpers int64
}

// overhead is what a pod costs beyond its guest's RAM, TCG's code cache aside (KVM has none).
func (m idleMemory) overhead() int64 { return m.qemu + m.shim + m.helpers }

// measureIdle is the mean idleMemory of pods.
func measureIdle(t *testing.T, pods []criPod) idleMemory {
	var sum idleMemory
	for _, p := range pods {
		qemu := strconv.Itoa(testenv.QEMUPid(t, p.sandbox))
		m := pssByKind(t, qemu)
		sum.guestRAM += m["guest RAM"]
		sum.tcgCache += m["TCG cache"]
		sum.qemu += m["other"]
		sum.shim += pssByKind(t, parentOf(qemu))["other"]
		for _, proc := range testenv.LiveProcessesMentioning(testenv.PodStateDir(t, p.sandbox)) {
			if pid, _, _ := strings.Cut(proc, ": "); pid != qemu {
				sum.helpers += pssByKind(t, pid)["other"]
			}
		}
	}
	n := int64(len(pods))
	return idleMemory{sum.guestRAM / n, sum.tcgCache / n, sum.qemu / n, sum.shim / n, sum.helpers / n}
}

// pssByKind sums a process's PSS by kind of mapping: the guest's RAM, TCG's code cache,
// and everything else.
func pssByKind(t *testing.T, pid string) map[string]int64 {
	b, err := os.ReadFile(filepath.Join("/proc", pid, "smaps"))
	if err != nil {
		t.Fatalf("smaps of %s: %v", pid, err)
	}
	out := map[string]int64{}
	kind := "other"
	for l := range strings.Lines(string(b)) {
		f := strings.Fields(l)
		if len(f) == 0 {
			continue
		}
		if strings.Contains(f[0], "-") && len(f) >= 5 { // a mapping's header line
			switch {
			case strings.Contains(l, "memory-backend"), strings.Contains(l, "memfd:vmpod-ram"): // QEMU's, a template's (runtime/vmm)
				kind = "guest RAM"
			case f[1] == "rwxp" && len(f) == 5: // anonymous, writable and executable
				kind = "TCG cache"
			default:
				kind = "other"
			}
			continue
		}
		if f[0] == "Pss:" && len(f) >= 2 {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			out[kind] += kb << 10
		}
	}
	return out
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
