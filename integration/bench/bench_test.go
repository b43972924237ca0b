// Package bench measures vmpod against baselines taken in the same run, and prints the
// ratios (`make bench`). Nothing here asserts a time: figures go to docs/benchmarks.md.
package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/ttrpc"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
	"github.com/vmpod/vmpod/agent/channel"
	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/devices"
	"github.com/vmpod/vmpod/integration/testenv"
	"github.com/vmpod/vmpod/qmp/qmptest"
	"github.com/vmpod/vmpod/runtime"
	"github.com/vmpod/vmpod/runtime/nodeconfig"
	"github.com/vmpod/vmpod/runtime/vmm"
	"github.com/vmpod/vmpod/runtime/vmpodagent"
)

const envBench = "VMPOD_BENCH"

func requireBench(t *testing.T) {
	testenv.Require(t)
	if os.Getenv(envBench) != "1" {
		t.Skipf("benchmark: set %s=1 (make bench does); make test only checks it builds", envBench)
	}
}

func rounds(def int) int {
	if n, err := strconv.Atoi(os.Getenv("VMPOD_BENCH_ROUNDS")); err == nil && n > 0 {
		return n
	}
	return def
}

type sample []time.Duration

func (s sample) pct(p float64) time.Duration {
	c := append(sample(nil), s...)
	sort.Slice(c, func(i, j int) bool { return c[i] < c[j] })
	return c[int(p*float64(len(c)-1)+0.5)]
}

func (s sample) String() string {
	return fmt.Sprintf("p50 %v  p90 %v  min %v  (n=%d)", ms(s.pct(0.5)), ms(s.pct(0.9)), ms(s.pct(0)), len(s))
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1fms", float64(d.Microseconds())/1000) }

// report prints a result line and appends it to $VMPOD_BENCH_OUT if set.
func report(t *testing.T, format string, args ...any) {
	line := fmt.Sprintf(format, args...)
	fmt.Println(line)
	if out := os.Getenv("VMPOD_BENCH_OUT"); out != "" {
		f, err := os.OpenFile(out, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
		if err == nil {
			fmt.Fprintln(f, line)
			_ = f.Close()
		}
	}
}

// bareBoot starts QEMU with the same kernel and initramfs, the agent's port and nothing
// else vmpod adds (no virtiofsd, shared dir, QMP, rng), and times exec → first agent
// reply with a minimal client. It is the floor vmpodagent.Boot is compared to, so it gets
// the translated-code cache vmpod gives a TCG guest.
func bareBoot(t *testing.T, kernel, initrd string) time.Duration {
	dir, err := os.MkdirTemp("/run", "vmpod-bare-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "agent.sock")
	khz := tscKHz(t)
	start := time.Now()
	cmd := exec.Command(vmm.DefaultQEMU,
		"-M", "microvm", "-accel", fmt.Sprintf("tcg,tb-size=%d", vmm.TCGCodeCacheMiB), "-cpu", "qemu64,+arat", "-nodefaults", "-no-user-config",
		"-m", "512M", "-smp", "1", "-display", "none", "-no-reboot",
		"-kernel", kernel, "-initrd", initrd,
		"-append", "console=ttyS0 quiet panic=-1 pci=off tsc=reliable tsc_early_khz="+khz,
		"-serial", "file:"+filepath.Join(dir, "console.log"),
		"-chardev", "socket,id=agent,path="+sock+",server=on,wait=off",
		"-device", "virtio-serial-device,id=vser0",
		"-device", "virtserialport,bus=vser0.0,chardev=agent,name="+agentv1.PortName)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var raw net.Conn
	for {
		if raw, err = net.Dial("unix", sock); err == nil {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("bare QEMU: no agent socket: %v", err)
		}
		time.Sleep(2 * time.Millisecond)
	}
	conn, err := channel.Client(ctx, raw)
	if err != nil {
		t.Fatalf("bare QEMU: handshake: %v", err)
	}
	client := ttrpc.NewClient(conn)
	defer client.Close()
	if _, err := agentv1.NewAgentClient(client).Ping(ctx, &agentv1.PingRequest{}); err != nil {
		t.Fatalf("bare QEMU: ping: %v", err)
	}
	return time.Since(start)
}

func tscKHz(t *testing.T) string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(b)) {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "cpu MHz" {
			mhz, _ := strconv.ParseFloat(strings.TrimSpace(v), 64)
			return strconv.Itoa(int(mhz * 1000))
		}
	}
	t.Fatal("no cpu MHz in /proc/cpuinfo")
	return ""
}

func startVM(t *testing.T, name string) (*vmpodagent.Guest, time.Duration) {
	return bootVM(t, testenv.VMConfig(t, name))
}

func bootVM(t *testing.T, cfg vmpodagent.Config) (*vmpodagent.Guest, time.Duration) {
	start := time.Now()
	vm, err := vmpodagent.Boot(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	return vm, time.Since(start)
}

// TestBenchBoot: bare QEMU boot vs runtime.Start (microvm, the default), the default pod
// as it boots now (microvm with the node's default growth room, 4 vCPUs and 8 GiB of
// which 1 and 512 MiB are online: in-place resize, issue 13 point 5), and q35 with the
// resize headroom a q35 pod would get (8 vCPU slots, virtio-mem to 16 GiB) — the other
// route to resizing default pods. Alternating, so drift hits all alike. Each microvm's
// QEMU memory (PSS) is read once it answers, to show what the offline room costs.
func TestBenchBoot(t *testing.T) {
	requireBench(t)
	kernel, initrd := testenv.Kernel(t), testenv.Initrd(t)
	sizing := nodeconfig.Default().Sizing
	n := rounds(15)
	var bare, full, grow, q35 sample
	fullMem, growMem := map[string]int64{}, map[string]int64{}
	boot := func(cfg vmpodagent.Config, into *sample, mem map[string]int64) {
		vm, d := bootVM(t, cfg)
		*into = append(*into, d)
		if mem != nil {
			for k, v := range pssByKind(t, strconv.Itoa(vm.Machine().Pid())) {
				mem[k] += v
			}
		}
		if err := vm.Stop(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	for i := range n {
		bare = append(bare, bareBoot(t, kernel, initrd))
		boot(testenv.VMConfig(t, fmt.Sprintf("bench-boot-%d", i)), &full, fullMem)
		cfg := testenv.VMConfig(t, fmt.Sprintf("bench-boot-grow-%d", i))
		cfg.MaxVCPUs, cfg.MaxMemoryMiB = sizing.MaxVCPUs, sizing.MaxMemoryMiB
		boot(cfg, &grow, growMem)
		cfg = testenv.VMConfig(t, fmt.Sprintf("bench-boot-q35-%d", i))
		cfg.Type, cfg.MaxVCPUs, cfg.MaxMemoryMiB = machine.Q35, 8, 16384
		boot(cfg, &q35, nil)
	}
	report(t, "boot, bare QEMU exec → first agent reply:  %s", bare)
	report(t, "boot, vmpodagent.Boot → first agent reply: %s", full)
	report(t, "boot ratio vmpodagent.Boot / bare QEMU: p50 %.2f, min %.2f  (goal <= 1.15)",
		float64(full.pct(0.5))/float64(bare.pct(0.5)), float64(full.pct(0))/float64(bare.pct(0)))
	report(t, "boot, microvm with %d vCPUs / %d MiB offline room → first agent reply: %s", sizing.MaxVCPUs, sizing.MaxMemoryMiB, grow)
	report(t, "boot ratio microvm+room / microvm: p50 %.2f, min %.2f",
		float64(grow.pct(0.5))/float64(full.pct(0.5)), float64(grow.pct(0))/float64(full.pct(0)))
	mib := func(m map[string]int64, k string) int64 { return m[k] / int64(n) >> 20 }
	report(t, "QEMU PSS at first agent reply, microvm: guest RAM %d MiB, the rest %d MiB; with the offline room: %d MiB, %d MiB",
		mib(fullMem, "guest RAM"), mib(fullMem, "other")+mib(fullMem, "TCG cache"), mib(growMem, "guest RAM"), mib(growMem, "other")+mib(growMem, "TCG cache"))
	report(t, "boot, q35 with resize headroom → first agent reply: %s", q35)
	report(t, "boot ratio q35+headroom / microvm: p50 %.2f, min %.2f",
		float64(q35.pct(0.5))/float64(full.pct(0.5)), float64(q35.pct(0))/float64(full.pct(0)))
}

// TestBenchFreePageReporting: what memory a guest has freed costs the host, with free page
// reporting (every VM's virtio-balloon, sizing.free_page_reporting, the default) and
// without. In each 512 MiB microvm a container touches a 256 MiB buffer (busybox dd) and
// exits; the guest RAM QEMU keeps resident (PSS of its memory backend) is read when the
// guest is idle after boot and again after the container, each after a settle (the
// guest reports freed memory every 2 s, in 2 MiB blocks). Alternating, so drift hits both.
func TestBenchFreePageReporting(t *testing.T) {
	requireBench(t)
	n := rounds(3)
	const settle = 8 * time.Second
	ctx := context.Background()
	guestRAM := func(vm *vmpodagent.Guest) int64 {
		return pssByKind(t, strconv.Itoa(vm.Machine().Pid()))["guest RAM"]
	}
	boots := map[bool]sample{}
	measure := func(name string, reporting bool) (idle, after int64) {
		cfg := testenv.VMConfig(t, name)
		cfg.FreePageReporting = reporting
		vm, d := bootVM(t, cfg)
		boots[reporting] = append(boots[reporting], d)
		defer vm.Stop(ctx)
		time.Sleep(settle)
		idle = guestRAM(vm)
		touchAndFree(t, vm, "256M")
		time.Sleep(settle)
		return idle, guestRAM(vm)
	}
	var on, off [2][]int64 // PSS bytes: idle, after
	for i := range n {
		for _, reporting := range []bool{true, false} {
			idle, after := measure(fmt.Sprintf("bench-fpr-%d-%v", i, reporting), reporting)
			into := &off
			if reporting {
				into = &on
			}
			into[0], into[1] = append(into[0], idle), append(into[1], after)
		}
	}
	mib := func(xs []int64) int64 { slices.Sort(xs); return xs[len(xs)/2] >> 20 }
	report(t, "guest RAM resident (PSS, p50 of %d), 512 MiB microvm: idle after boot %d MiB with free page reporting, %d MiB without", n, mib(on[0]), mib(off[0]))
	report(t, "guest RAM resident after a container touched and freed 256 MiB: %d MiB with free page reporting, %d MiB without",
		mib(on[1]), mib(off[1]))
	report(t, "boot → first agent reply with the balloon: %s; without: %s", boots[true], boots[false])
}

// TestBenchShrink: what giving back a q35 VM's growth does for the host (issue 11). A VM
// booted with 1 vCPU and 512 MiB grows to 2 vCPUs and 1536 MiB (virtio-mem); a container
// touches and frees 768 MiB; then the VM shrinks back to its boot size. Guest RAM resident
// on the host (PSS) after the touch and after the shrink, without free page reporting (so
// the shrink alone is measured) and with it (the default), and how long the memory unplug
// (and, under KVM, the vCPU unplug) takes.
func TestBenchShrink(t *testing.T) {
	requireBench(t)
	n := rounds(3)
	const settle = 8 * time.Second
	ctx := context.Background()
	type result struct{ touched, shrunk int64 }
	var cpuTimes, memTimes sample
	measure := func(name string, reporting bool) result {
		cfg := testenv.VMConfig(t, name)
		cfg.Type = machine.Q35
		cfg.VCPUs, cfg.MaxVCPUs = 1, 2
		cfg.MemoryMiB, cfg.MaxMemoryMiB = 512, 1536
		cfg.FreePageReporting = reporting
		vm, _ := bootVM(t, cfg)
		defer vm.Stop(ctx)
		if _, err := vm.GrowVCPUs(ctx, 2); err != nil {
			t.Fatal(err)
		}
		if _, err := vm.ResizeMemory(ctx, 1536); err != nil {
			t.Fatal(err)
		}
		touchAndFree(t, vm, "768M")
		time.Sleep(settle)
		var r result
		r.touched = pssByKind(t, strconv.Itoa(vm.Machine().Pid()))["guest RAM"]
		if vm.Machine().Accel() == machine.KVM { // TCG: QEMU 7.2 does not survive it (008)
			t0 := time.Now()
			if cpus, err := vm.ShrinkVCPUs(ctx, 1); err != nil || cpus != 1 {
				t.Fatalf("shrink to 1 vCPU: %d, %v", cpus, err)
			}
			cpuTimes = append(cpuTimes, time.Since(t0))
		}
		t1 := time.Now()
		if _, err := vm.ResizeMemory(ctx, 512); err != nil {
			t.Fatalf("shrink memory: %v", err)
		}
		memTimes = append(memTimes, time.Since(t1))
		time.Sleep(settle)
		r.shrunk = pssByKind(t, strconv.Itoa(vm.Machine().Pid()))["guest RAM"]
		return r
	}
	results := map[bool][]result{}
	for i := range n {
		for _, reporting := range []bool{false, true} {
			results[reporting] = append(results[reporting], measure(fmt.Sprintf("bench-shrink-%d-%v", i, reporting), reporting))
		}
	}
	p50 := func(rs []result, f func(result) int64) int64 {
		xs := make([]int64, len(rs))
		for i, r := range rs {
			xs[i] = f(r)
		}
		slices.Sort(xs)
		return xs[len(xs)/2] >> 20
	}
	touched, shrunk := func(r result) int64 { return r.touched }, func(r result) int64 { return r.shrunk }
	report(t, "q35 grown to 1536 MiB, 768 MiB touched and freed, then shrunk to its 512 MiB boot size (guest RAM PSS, p50 of %d): without free page reporting %d MiB -> %d MiB; with it %d MiB -> %d MiB",
		n, p50(results[false], touched), p50(results[false], shrunk), p50(results[true], touched), p50(results[true], shrunk))
	report(t, "shrink: 1 GiB of virtio-mem given back %s", memTimes)
	if len(cpuTimes) > 0 {
		report(t, "shrink: hot-plugged vCPU removed (ACPI eject, until its slot is free) %s", cpuTimes)
	} else {
		report(t, "shrink: vCPUs kept (accel %s: QEMU 7.2 under TCG does not survive a vCPU unplug)", machine.TCG)
	}
}

// touchAndFree has a container in vm's guest touch size of memory (dd's buffer) and end.
func touchAndFree(t *testing.T, vm *vmpodagent.Guest, size string) {
	t.Helper()
	ctx := context.Background()
	rootfs := testenv.OverlayRootfs(t, testenv.BusyboxRootfs(t))
	p, err := vm.CreateContainer(ctx, "hog", rootfs, testenv.Spec("dd", "if=/dev/zero", "of=/dev/null", "bs="+size, "count=1"), runtime.Stdio{Stderr: &bytes.Buffer{}})
	if err != nil {
		t.Fatal(err)
	}
	if err := vm.Agent().StartContainer(ctx, "hog"); err != nil {
		t.Fatal(err)
	}
	if exit, err := testenv.WaitOutput(ctx, p); err != nil || exit.Status != 0 {
		t.Fatalf("dd in the guest: %v, status %d", err, exit.Status)
	}
	if err := vm.RemoveContainer(ctx, "hog", true); err != nil {
		t.Fatal(err)
	}
}

// TestBenchHotplugDisk: how long a disk takes to come into a running q35 VM and to go
// (issue 11): PlugDisk's QMP steps; until a container in the guest sees the disk in sysfs
// (polled by exec, so it includes an exec's ~0.3 s under TCG); UnplugDisk until QEMU's
// DEVICE_DELETED, which waits for the guest to let go.
func TestBenchHotplugDisk(t *testing.T) {
	requireBench(t)
	n := rounds(5)
	ctx := context.Background()
	cfg := testenv.VMConfig(t, "bench-hotplug")
	cfg.Type = machine.Q35
	vm, _ := bootVM(t, cfg)
	defer vm.Stop(ctx)
	rootfs := testenv.OverlayRootfs(t, testenv.BusyboxRootfs(t))
	if _, err := vm.CreateContainer(ctx, "c", rootfs, testenv.Spec("sleep", "1000"), runtime.Stdio{}); err != nil {
		t.Fatal(err)
	}
	if err := vm.Agent().StartContainer(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	image := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(image, make([]byte, 16<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	seen := func(serial string) bool {
		return strings.Contains(containerSh(ctx, t, vm, "c", "cat /sys/block/vd*/serial 2>/dev/null; true"), serial)
	}
	var plug, visible, unplug sample
	for i := range n {
		f, err := os.OpenFile(image, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		serial := fmt.Sprintf("bench%d", i)
		start := time.Now()
		if err := vm.Machine().PlugDisk(ctx, devices.VirtioBlk{DeviceID: serial, Serial: serial}, f); err != nil {
			t.Fatal(err)
		}
		plug = append(plug, time.Since(start))
		f.Close()
		for !seen(serial) {
			if time.Since(start) > time.Minute {
				t.Fatalf("disk %s not in the guest after a minute", serial)
			}
		}
		visible = append(visible, time.Since(start))
		start = time.Now()
		if err := vm.Machine().UnplugDisk(ctx, serial); err != nil {
			t.Fatal(err)
		}
		unplug = append(unplug, time.Since(start))
	}
	report(t, "disk hotplug, q35: PlugDisk (add-fd, blockdev-add, device_add): %s", plug)
	report(t, "disk hotplug, q35: until a container sees it in sysfs:          %s", visible)
	report(t, "disk unplug, q35: UnplugDisk until the guest let it go:         %s", unplug)
}

// TestBenchHotplug: how long a vCPU, memory and a NIC take to come into a running q35 VM
// (issue 11), each until the guest has it: GrowVCPUs and ResizeMemory return when the
// guest has onlined what was plugged; a NIC counts from PlugNIC until a container in the
// guest finds one more virtio-net device (polled by exec: ~0.3 s of it is the exec under
// TCG), and its unplug until QEMU's DEVICE_DELETED. Each round boots a fresh VM, so every
// vCPU and memory figure is a first plug. Disks: TestBenchHotplugDisk; PCI passthrough
// needs a VFIO device this host lacks: the nested proof (docs/nested-vfio.md) times it.
func TestBenchHotplug(t *testing.T) {
	requireBench(t)
	n := rounds(3)
	ctx := context.Background()
	ns := qmptest.NewNetns(t)
	var cpu, mem, nicPlug, nicSeen, nicUnplug sample
	for i := range n {
		cfg := testenv.VMConfig(t, fmt.Sprintf("bench-hotplug-%d", i))
		cfg.Type = machine.Q35
		cfg.VCPUs, cfg.MaxVCPUs = 1, 2
		cfg.MemoryMiB, cfg.MaxMemoryMiB = 512, 1024
		vm, _ := bootVM(t, cfg)
		rootfs := testenv.OverlayRootfs(t, testenv.BusyboxRootfs(t))
		if _, err := vm.CreateContainer(ctx, "c", rootfs, testenv.Spec("sleep", "1000"), runtime.Stdio{}); err != nil {
			t.Fatal(err)
		}
		if err := vm.Agent().StartContainer(ctx, "c"); err != nil {
			t.Fatal(err)
		}

		start := time.Now()
		if got, err := vm.GrowVCPUs(ctx, 2); err != nil || got != 2 {
			t.Fatalf("grow to 2 vCPUs: %d online, %v", got, err)
		}
		cpu = append(cpu, time.Since(start))
		start = time.Now()
		if _, err := vm.ResizeMemory(ctx, 1024); err != nil {
			t.Fatalf("grow memory to 1024 MiB: %v", err)
		}
		mem = append(mem, time.Since(start))

		// virtio devices of type 1 (net): found through the virtio bus, which a container
		// sees whatever its network namespace
		nets := func() int {
			c, _ := strconv.Atoi(containerSh(ctx, t, vm, "c", "grep -l 0x0001 /sys/bus/virtio/devices/*/device 2>/dev/null | wc -l"))
			return c
		}
		before := nets()
		tap := ns.OpenTap(t, fmt.Sprintf("benchtap%d", i))
		start = time.Now()
		if err := vm.Machine().PlugNIC(ctx, "nic1", vmm.NIC{Tap: tap, MAC: fmt.Sprintf("02:00:00:00:01:%02x", i)}); err != nil {
			t.Fatal(err)
		}
		nicPlug = append(nicPlug, time.Since(start))
		for nets() <= before {
			if time.Since(start) > time.Minute {
				t.Fatal("the plugged NIC is not in the guest after a minute")
			}
		}
		nicSeen = append(nicSeen, time.Since(start))
		start = time.Now()
		if err := vm.Machine().UnplugNIC(ctx, "nic1"); err != nil {
			t.Fatal(err)
		}
		nicUnplug = append(nicUnplug, time.Since(start))
		if err := vm.Stop(ctx); err != nil {
			t.Fatal(err)
		}
	}
	report(t, "vCPU hotplug, q35: 1 -> 2 until the guest has it online:          %s", cpu)
	report(t, "memory hotplug, q35: 512 -> 1024 MiB (virtio-mem) until online:   %s", mem)
	report(t, "NIC hotplug, q35: PlugNIC (getfd, netdev_add, device_add):        %s", nicPlug)
	report(t, "NIC hotplug, q35: until a container sees the virtio-net device:   %s", nicSeen)
	report(t, "NIC unplug, q35: UnplugNIC until the guest let it go:             %s", nicUnplug)
}

// containerSh execs script with sh in container id of vm's guest and returns its stdout,
// trimmed.
func containerSh(ctx context.Context, t *testing.T, vm *vmpodagent.Guest, id, script string) string {
	t.Helper()
	var out bytes.Buffer
	p, err := vm.Exec(ctx, id, fmt.Sprintf("sh-%d", time.Now().UnixNano()), testenv.Spec("sh", "-c", script).Process, runtime.Stdio{Stdout: &out})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := testenv.WaitOutput(ctx, p); err != nil {
		t.Fatal(err)
	}
	_ = p.Remove(ctx)
	return strings.TrimSpace(out.String())
}

// TestBenchExec: agent round trip, and exec of `true` into a running container in the
// VM vs `runc exec` of the same into the same rootfs on the host.
func TestBenchExec(t *testing.T) {
	requireBench(t)
	n := rounds(20)
	vm, _ := startVM(t, "bench-exec")
	defer vm.Stop(context.Background())
	ctx := context.Background()

	var ping sample
	for range n * 5 {
		s := time.Now()
		if _, err := vm.Agent().Ping(ctx); err != nil {
			t.Fatal(err)
		}
		ping = append(ping, time.Since(s))
	}

	rootfs := testenv.OverlayRootfs(t, testenv.BusyboxRootfs(t))
	spec := testenv.Spec("sleep", "1000")
	if _, err := vm.CreateContainer(ctx, "c", rootfs, spec, runtime.Stdio{}); err != nil {
		t.Fatal(err)
	}
	if err := vm.Agent().StartContainer(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	// The agent starts an exec itself unless the process needs runc (docs/design/019);
	// an rlimit is such a need (CRI sets none; the OCI default spec has RLIMIT_NOFILE), and
	// costs runc nothing measurable: the same exec through `runc exec` in the guest,
	// alternating with the agent's.
	direct := testenv.Spec("true").Process
	direct.Rlimits = nil
	viaRunc := testenv.Spec("true").Process
	viaRunc.Rlimits = []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Soft: 1024, Hard: 1024}}
	var vmExec, vmRuncExec sample
	for i := range n {
		for _, path := range []struct {
			proc *specs.Process
			into *sample
		}{{direct, &vmExec}, {viaRunc, &vmRuncExec}} {
			s := time.Now()
			p, err := vm.Exec(ctx, "c", fmt.Sprintf("e%d-%d", i, len(*path.into)), path.proc, runtime.Stdio{Stdout: &bytes.Buffer{}})
			if err != nil {
				t.Fatal(err)
			}
			if exit, err := testenv.WaitOutput(ctx, p); err != nil || exit.Status != 0 {
				t.Fatalf("exec: %v status %d", err, exit.Status)
			}
			*path.into = append(*path.into, time.Since(s))
			_ = p.Remove(ctx)
		}
	}
	// What the exec'd program itself costs in the guest, which no exec path can save: a
	// shell running /bin/true 11 times against once, per run (busybox is dynamically
	// linked: under TCG the loader's work is most of it).
	var once, eleven sample
	for i := range max(n/2, 3) {
		for _, k := range []int{1, 11} {
			p := testenv.Spec("sh", "-c", strings.Repeat("/bin/true; ", k)).Process
			p.Rlimits = nil
			s := time.Now()
			proc, err := vm.Exec(ctx, "c", fmt.Sprintf("loop%d-%d", k, i), p, runtime.Stdio{Stdout: &bytes.Buffer{}})
			if err != nil {
				t.Fatal(err)
			}
			if exit, err := testenv.WaitOutput(ctx, proc); err != nil || exit.Status != 0 {
				t.Fatalf("exec: %v status %d", err, exit.Status)
			}
			if k == 1 {
				once = append(once, time.Since(s))
			} else {
				eleven = append(eleven, time.Since(s))
			}
			_ = proc.Remove(ctx)
		}
	}
	_ = vm.RemoveContainer(ctx, "c", true)
	trueInGuest := (eleven.pct(0.5) - once.pct(0.5)) / 10

	hostExec := hostRuncExec(t, n)
	report(t, "agent ping round trip:                     %s", ping)
	report(t, "exec `true`, vmpod, started by the agent:  %s", vmExec)
	report(t, "exec `true`, vmpod, through guest runc:    %s", vmRuncExec)
	report(t, "exec `true`, runc on the host (baseline):  %s", hostExec)
	report(t, "exec ratio vmpod agent / guest runc (p50):  %.2f", float64(vmExec.pct(0.5))/float64(vmRuncExec.pct(0.5)))
	report(t, "/bin/true run by a shell in the guest:     %s each (p50s: 11 runs %s, 1 run %s)", ms(trueInGuest), ms(eleven.pct(0.5)), ms(once.pct(0.5)))
	report(t, "exec ratio vmpod agent / a shell in the guest running it: %.2f", float64(vmExec.pct(0.5))/float64(trueInGuest))
	report(t, "exec ratio vmpod / host runc (p50):         %.2f", float64(vmExec.pct(0.5))/float64(hostExec.pct(0.5)))
}

// hostRuncExec times `runc exec` of `true` on the host, into a container over the same
// busybox rootfs, with the guest's runc binary.
func hostRuncExec(t *testing.T, n int) sample {
	runc := os.Getenv("VMPOD_BENCH_RUNC")
	if runc == "" {
		t.Skip("set VMPOD_BENCH_RUNC to a runc binary for the host baseline (make bench does)")
	}
	bundle := t.TempDir()
	spec := testenv.Spec("sleep", "1000")
	spec.Root.Path = testenv.OverlayRootfs(t, testenv.BusyboxRootfs(t))
	b, _ := json.Marshal(spec)
	if err := os.WriteFile(filepath.Join(bundle, "config.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	state := filepath.Join("/run", "vmpod-bench-runc")
	id := "bench-" + strconv.Itoa(os.Getpid())
	rc := func(args ...string) *exec.Cmd {
		return exec.Command(runc, append([]string{"--root", state}, args...)...)
	}
	// A file, not a pipe: the detached container inherits runc's stdio, and a pipe would
	// stay open as long as it runs.
	runLog, err := os.Create(filepath.Join(bundle, "run.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer runLog.Close()
	run := rc("run", "-d", "--bundle", bundle, id)
	run.Stdout, run.Stderr = runLog, runLog
	if err := run.Run(); err != nil {
		out, _ := os.ReadFile(runLog.Name())
		t.Fatalf("host runc run: %v: %s", err, out)
	}
	defer func() { _ = rc("delete", "-f", id).Run(); _ = os.RemoveAll(state) }()
	procFile := filepath.Join(bundle, "true.json")
	pb, _ := json.Marshal(testenv.Spec("true").Process)
	if err := os.WriteFile(procFile, pb, 0o644); err != nil {
		t.Fatal(err)
	}
	var s sample
	for range n {
		start := time.Now()
		if out, err := rc("exec", "--process", procFile, id).CombinedOutput(); err != nil {
			t.Fatalf("host runc exec: %v: %s", err, out)
		}
		s = append(s, time.Since(start))
	}
	return s
}

// metadataWorkload is what a container rootfs sees more than bulk reads: creating, listing,
// statting and deleting many small files, and walking the tree.
const metadataWorkload = `cd /root && for i in $(seq 300); do echo x > f$i; done && ls -la >/dev/null && ` +
	`find / -xdev -type f -exec stat -c %s {} + >/dev/null && rm -f f*`

// TestBenchSharedFS: container start (`true`) and a metadata-heavy command over 9p and
// virtio-fs, in one run (docs/design/003-shared-fs.md).
func TestBenchSharedFS(t *testing.T) {
	requireBench(t)
	n := rounds(5)
	ctx := context.Background()
	for _, fs := range []machine.SharedFS{machine.NineP, machine.VirtioFS} {
		cfg := testenv.VMConfig(t, "bench-"+strings.ReplaceAll(string(fs), "-", ""))
		cfg.SharedFS = fs
		if fs == machine.NineP {
			cfg.Users = nil // QEMU serves 9p itself: only as root (vmm.Config.Users)
		}
		vm, err := vmpodagent.Boot(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		runOnce := func(id string, args ...string) time.Duration {
			rootfs := testenv.OverlayRootfs(t, testenv.BusyboxRootfs(t))
			var stderr bytes.Buffer
			s := time.Now()
			p, err := vm.CreateContainer(ctx, id, rootfs, testenv.Spec(args...), runtime.Stdio{Stderr: &stderr})
			if err != nil {
				t.Fatal(err)
			}
			if err := vm.Agent().StartContainer(ctx, id); err != nil {
				t.Fatal(err)
			}
			exit, err := testenv.WaitOutput(ctx, p)
			d := time.Since(s)
			if err != nil || exit.Status != 0 {
				t.Fatalf("%s over %s: exit %d, %v: %s", args[0], fs, exit.Status, err, stderr.String())
			}
			if err := vm.RemoveContainer(ctx, id, true); err != nil {
				t.Fatal(err)
			}
			return d
		}
		var start, meta sample
		for i := range n {
			start = append(start, runOnce(fmt.Sprintf("t%d", i), "true"))
			meta = append(meta, runOnce(fmt.Sprintf("m%d", i), "sh", "-c", metadataWorkload))
		}
		report(t, "%-9s container create+start+exit of `true`: %s", fs, start)
		report(t, "%-9s metadata workload (300 files, find+stat): %s", fs, meta)
		if err := vm.Stop(ctx); err != nil {
			t.Fatal(err)
		}
	}
}

// TestBenchStdio: container stdout throughput through the agent's offset-addressed
// stream RPCs, against the same command under runc on the host writing into a pipe.
func TestBenchStdio(t *testing.T) {
	requireBench(t)
	const mib = 32
	args := []string{"dd", "if=/dev/zero", "bs=64k", fmt.Sprintf("count=%d", mib*16)}
	ctx := context.Background()
	vm, _ := startVM(t, "bench-stdio")
	defer vm.Stop(ctx)
	rootfs := testenv.OverlayRootfs(t, testenv.BusyboxRootfs(t))
	var out countingWriter
	s := time.Now()
	p, err := vm.CreateContainer(ctx, "dd", rootfs, testenv.Spec(args...), runtime.Stdio{Stdout: &out, Stderr: &bytes.Buffer{}})
	if err != nil {
		t.Fatal(err)
	}
	if err := vm.Agent().StartContainer(ctx, "dd"); err != nil {
		t.Fatal(err)
	}
	if exit, err := testenv.WaitOutput(ctx, p); err != nil || exit.Status != 0 || out.n != mib<<20 {
		t.Fatalf("dd: exit %d, %v, %d bytes", exit.Status, err, out.n)
	}
	vmRate := float64(out.n) / time.Since(s).Seconds() / (1 << 20)

	runc := os.Getenv("VMPOD_BENCH_RUNC")
	if runc == "" {
		t.Skip("set VMPOD_BENCH_RUNC for the host baseline")
	}
	bundle := t.TempDir()
	spec := testenv.Spec(args...)
	spec.Root.Path = testenv.OverlayRootfs(t, testenv.BusyboxRootfs(t))
	b, _ := json.Marshal(spec)
	if err := os.WriteFile(filepath.Join(bundle, "config.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	var hostOut countingWriter
	cmd := exec.Command(runc, "--root", "/run/vmpod-bench-runc", "run", "--bundle", bundle, "dd-"+strconv.Itoa(os.Getpid()))
	cmd.Stdout, cmd.Stderr = &hostOut, &bytes.Buffer{}
	s = time.Now()
	if err := cmd.Run(); err != nil || hostOut.n != mib<<20 {
		t.Fatalf("host runc dd: %v, %d bytes", err, hostOut.n)
	}
	hostRate := float64(hostOut.n) / time.Since(s).Seconds() / (1 << 20)
	_ = os.RemoveAll("/run/vmpod-bench-runc")
	report(t, "stdout %d MiB, vmpod (agent stream RPCs): %.1f MiB/s (incl. container start)", mib, vmRate)
	report(t, "stdout %d MiB, runc on the host (pipe):   %.1f MiB/s (incl. container start)", mib, hostRate)
	report(t, "stdout ratio vmpod / host runc:            %.2f", vmRate/hostRate)
}

type countingWriter struct{ n int }

func (c *countingWriter) Write(p []byte) (int, error) { c.n += len(p); return len(p), nil }
