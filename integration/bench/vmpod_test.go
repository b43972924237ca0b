package bench

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/api/vmspec"
	"github.com/vmpod/vmpod/integration/testenv"
	"github.com/vmpod/vmpod/runtime/qga"
	"github.com/vmpod/vmpod/runtime/vmm"
)

// The VM-pod test guest (hack/vm-guest-image.sh): its cache dir and its containerDisk.
const (
	envGuestDir   = "VMPOD_VM_GUEST_DIR"
	envGuestImage = "VMPOD_VM_GUEST_IMAGE"
)

// agentReadyWithin bounds a boot to the guest agent's first answer (TCG, 2 busy cores).
const agentReadyWithin = 4 * time.Minute

func vmGuest(t *testing.T) (dir, image string) {
	t.Helper()
	dir, image = os.Getenv(envGuestDir), os.Getenv(envGuestImage)
	if dir == "" || image == "" {
		t.Skipf("VM pod benchmark: needs %s and %s (make bench sets them)", envGuestDir, envGuestImage)
	}
	return dir, image
}

// overlay is a throwaway qcow2 over base, as a containerDisk's guest writes go to one.
func overlay(t *testing.T, base string) string {
	t.Helper()
	ov := filepath.Join(t.TempDir(), "overlay.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, ov).CombinedOutput(); err != nil {
		t.Fatalf("overlay: %v: %s", err, out)
	}
	return ov
}

// bareVMBoot starts QEMU by hand with what vmpod gives a VM pod (q35, SeaBIOS, 1 vCPU,
// 1 GiB, the disk on virtio-blk over a qcow2 overlay, a virtio NIC, the guest agent's
// port, pvpanic, VGA) and times it to the guest agent's first answer: the floor a VM pod
// start is compared to. It returns QEMU's pid and how to stop it.
func bareVMBoot(t *testing.T, base string) (time.Duration, int, func()) {
	t.Helper()
	dir, err := os.MkdirTemp("/run", "vmpod-bench-")
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "qga.sock")
	args := []string{"-name", "bench-bare", "-machine", "q35", "-accel", fmt.Sprintf("tcg,tb-size=%d", vmm.TCGCodeCacheMiB), "-cpu", "qemu64,+arat",
		"-smp", "1", "-m", "1024", "-nodefaults", "-no-user-config", "-display", "none", "-vnc", "unix:" + filepath.Join(dir, "vnc.sock"),
		"-serial", "file:" + filepath.Join(dir, "console.log"),
		"-blockdev", "driver=qcow2,node-name=disk0,file.driver=file,file.filename=" + overlay(t, base),
		"-device", "virtio-blk-pci,drive=disk0,bootindex=1",
		"-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
		"-chardev", "socket,id=qga,path=" + sock + ",server=on,wait=off",
		"-device", "virtio-serial-pci,id=vser0", "-device", "virtserialport,chardev=qga,name=" + qga.PortName,
		"-device", "pvpanic", "-device", "VGA"}
	start := time.Now()
	cmd := exec.Command("qemu-system-x86_64", args...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	stop := func() { _ = cmd.Process.Kill(); _ = cmd.Wait(); _ = os.RemoveAll(dir) }
	agent := qga.New(func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	})
	defer agent.Close()
	if err := waitPing(agent); err != nil {
		stop()
		t.Fatalf("bare QEMU: %v", err)
	}
	return time.Since(start), cmd.Process.Pid, stop
}

func waitPing(agent *qga.Client) error {
	deadline := time.Now().Add(agentReadyWithin)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		err := agent.Ping(ctx)
		cancel()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no guest agent after %v: %w", agentReadyWithin, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// vmPodBoot is a VM pod start as the kubelet does it (RunPodSandbox, CreateContainer with
// the containerDisk image volume, StartContainer), timed to the first guestAgentPing exec
// that succeeds.
func vmPodBoot(ctx context.Context, t *testing.T, rs runtimeapi.RuntimeServiceClient, image string, n int) (criPod, time.Duration) {
	t.Helper()
	return vmPodBootWith(ctx, t, rs, image, n, nil, &runtimeapi.LinuxContainerConfig{})
}

// vmPodBootWith is vmPodBoot of the VM edit changes, its compute container with linux.
func vmPodBootWith(ctx context.Context, t *testing.T, rs runtimeapi.RuntimeServiceClient, image string, n int, edit func(*vmspec.VM), linux *runtimeapi.LinuxContainerConfig) (criPod, time.Duration) {
	t.Helper()
	vm := vmspec.VM{Version: vmspec.Version, CPU: vmspec.CPU{Sockets: 1, Cores: 1, Threads: 1}, MemoryMiB: 1024, Machine: machine.Q35,
		Firmware:   vmspec.Firmware{Type: vmspec.FirmwareBIOS},
		Disks:      []vmspec.Disk{{Name: "root", Volume: "root", Source: vmspec.SourceImage, Device: vmspec.DeviceDisk, Bus: vmspec.BusVirtio, BootOrder: 1}},
		Interfaces: []vmspec.Interface{{Name: "default", PodInterface: "eth0", Model: vmspec.ModelVirtio}}}
	if edit != nil {
		edit(&vm)
	}
	ann, err := vm.Encode()
	if err != nil {
		t.Fatal(err)
	}
	cfg := &runtimeapi.PodSandboxConfig{
		Metadata:     &runtimeapi.PodSandboxMetadata{Name: fmt.Sprintf("bench-vm-%d", n), Namespace: "vmpod-bench", Uid: fmt.Sprintf("bench-vm-%d-%d", n, time.Now().UnixNano())},
		Hostname:     "bench-vm",
		LogDirectory: t.TempDir(),
		Annotations:  map[string]string{vmspec.Annotation: string(ann)},
		Linux:        &runtimeapi.LinuxPodSandboxConfig{},
	}
	start := time.Now()
	sb, err := rs.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: cfg, RuntimeHandler: "vmpod"})
	if err != nil {
		t.Fatalf("VM pod: run pod: %v", err)
	}
	c, err := rs.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{
		PodSandboxId: sb.PodSandboxId,
		Config: &runtimeapi.ContainerConfig{
			Metadata: &runtimeapi.ContainerMetadata{Name: vmspec.ComputeContainer},
			Image:    &runtimeapi.ImageSpec{Image: testenv.BusyboxImage(t)},
			LogPath:  "compute.log", Stdin: true, Tty: true,
			Mounts: []*runtimeapi.Mount{{ContainerPath: vmspec.VolumeMountPath("root"), Image: &runtimeapi.ImageSpec{Image: image}, Readonly: true}},
			Linux:  linux,
		},
		SandboxConfig: cfg,
	})
	if err != nil {
		t.Fatalf("VM pod: create container: %v", err)
	}
	p := criPod{sb.PodSandboxId, c.ContainerId}
	if _, err := rs.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: c.ContainerId}); err != nil {
		removePod(ctx, rs, p)
		t.Fatalf("VM pod: start container: %v", err)
	}
	deadline := time.Now().Add(agentReadyWithin)
	for {
		resp, err := rs.ExecSync(ctx, &runtimeapi.ExecSyncRequest{ContainerId: c.ContainerId, Cmd: []string{vmspec.GuestAgentPingCommand}, Timeout: 5})
		if err == nil && resp.ExitCode == 0 {
			return p, time.Since(start)
		}
		if time.Now().After(deadline) {
			removePod(ctx, rs, p)
			t.Fatalf("VM pod: no guest agent after %v: %v", agentReadyWithin, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// pss is a process's whole proportional set size.
func pss(t *testing.T, pid int) int64 {
	var sum int64
	for _, v := range pssByKind(t, strconv.Itoa(pid)) {
		sum += v
	}
	return sum
}

// idleSettle is how long a booted guest idles before its memory is measured: cloud-init and
// the rest of boot are done by then (TCG).
const idleSettle = 60 * time.Second

// TestBenchVMPod: a VM pod's start to guest-agent ready and its host memory, against bare
// QEMU booting the same disk with the same firmware and devices and, where make bench
// started libvirt, the same guest through libvirt (virtqemud + virtlogd + QEMU, the
// daemons virt-launcher runs per VM).
func TestBenchVMPod(t *testing.T) {
	requireBench(t)
	dir, image := vmGuest(t)
	base := filepath.Join(dir, "disk.qcow2")
	rs := criClient(t)
	ctx := context.Background()
	testenv.Crictl(t, "pull", image)
	n := rounds(3)
	libvirt := libvirtAvailable()
	var bare, pod, lv sample
	for i := range n {
		d, _, stop := bareVMBoot(t, base)
		stop()
		bare = append(bare, d)
		p, d := vmPodBoot(ctx, t, rs, image, i)
		removePod(ctx, rs, p)
		pod = append(pod, d)
		if libvirt {
			v, d := startLibvirtVM(t, base, fmt.Sprintf("bench-lv-%d", i))
			v.Stop(t)
			lv = append(lv, d)
		}
	}
	report(t, "VM boot to guest agent, bare QEMU (SeaBIOS, same disk): %s", bare)
	report(t, "VM pod start to guest agent (runp+create+start+ping):  %s", pod)
	report(t, "VM pod start ratio vmpod / bare QEMU (p50): %.2f  (goal <= 1.10)", float64(pod.pct(0.5))/float64(bare.pct(0.5)))
	if libvirt {
		report(t, "VM start to guest agent through libvirt (virsh create): %s", lv)
		report(t, "VM start ratio vmpod / libvirt (p50): %.2f  (goal < 1)", float64(pod.pct(0.5))/float64(lv.pct(0.5)))
	} else {
		report(t, "libvirt baseline: not run (make bench starts libvirt with hack/libvirt-baseline.sh)")
	}

	// host memory of one idle VM each way, measured one at a time
	_, barePid, stop := bareVMBoot(t, base)
	time.Sleep(idleSettle)
	bareMem := pss(t, barePid)
	stop()
	p, _ := vmPodBoot(ctx, t, rs, image, 100)
	time.Sleep(idleSettle)
	qemu := testenv.QEMUPid(t, p.sandbox)
	shim, _ := strconv.Atoi(parentOf(strconv.Itoa(qemu)))
	podQEMU, podShim := pss(t, qemu), pss(t, shim)
	removePod(ctx, rs, p)
	report(t, "idle VM host memory (PSS), bare QEMU: %d MiB", bareMem>>20)
	report(t, "idle VM host memory (PSS), vmpod: %d MiB (QEMU %d + shim %d)", (podQEMU+podShim)>>20, podQEMU>>20, podShim>>20)
	if libvirt {
		v, _ := startLibvirtVM(t, base, "bench-lv-mem")
		time.Sleep(idleSettle)
		lvQEMU := pss(t, v.QEMUPid)
		var daemons int64
		for _, pid := range libvirtDaemonPids(t) {
			daemons += pss(t, pid)
		}
		v.Stop(t)
		report(t, "idle VM host memory (PSS), libvirt: %d MiB (QEMU %d + virtqemud/virtlogd %d)", (lvQEMU+daemons)>>20, lvQEMU>>20, daemons>>20)
		report(t, "idle VM host memory ratio vmpod / libvirt: %.2f  (goal < 1)", float64(podQEMU+podShim)/float64(lvQEMU+daemons))
	}
}

// TestBenchVMPodResize: a running VM pod (the Debian test guest, 1 vCPU, 1 GiB, room for
// 2 sockets and 1.5 GiB) resized in place as the kubelet does it (CRI
// UpdateContainerResources of the compute container): the time the update takes and until
// the guest sees the change, and the guest RAM resident on the host that a memory shrink
// gives back after the guest used the memory it was given. docs/design/208.
func TestBenchVMPodResize(t *testing.T) {
	requireBench(t)
	_, image := vmGuest(t)
	rs := criClient(t)
	ctx := context.Background()
	testenv.Crictl(t, "pull", image)
	limits := func(cpus, memMiB int64) *runtimeapi.LinuxContainerResources {
		return &runtimeapi.LinuxContainerResources{CpuPeriod: 100000, CpuQuota: cpus * 100000, MemoryLimitInBytes: memMiB << 20}
	}
	p, _ := vmPodBootWith(ctx, t, rs, image, 200, func(vm *vmspec.VM) { vm.CPU.MaxSockets, vm.MaxMemoryMiB = 2, 1536 },
		&runtimeapi.LinuxContainerConfig{Resources: limits(1, 1024)})
	defer removePod(ctx, rs, p)
	time.Sleep(idleSettle)
	guest := func(script string) string {
		resp, err := rs.ExecSync(ctx, &runtimeapi.ExecSyncRequest{ContainerId: p.container, Cmd: []string{"sh", "-c", script}, Timeout: 60})
		if err != nil || resp.ExitCode != 0 {
			t.Fatalf("guest %q: %v %s", script, err, resp.GetStderr())
		}
		return string(resp.Stdout)
	}
	update := func(r *runtimeapi.LinuxContainerResources) time.Duration {
		start := time.Now()
		if _, err := rs.UpdateContainerResources(ctx, &runtimeapi.UpdateContainerResourcesRequest{ContainerId: p.container, Linux: r}); err != nil {
			t.Fatalf("update to %d CPUs, %d MiB: %v", r.CpuQuota/r.CpuPeriod, r.MemoryLimitInBytes>>20, err)
		}
		return time.Since(start)
	}
	seen := func(script, want string) time.Duration {
		start := time.Now()
		for deadline := start.Add(time.Minute); ; time.Sleep(100 * time.Millisecond) {
			if guest(script) == want {
				return time.Since(start)
			}
			if time.Now().After(deadline) {
				t.Fatalf("the guest's %q is not %q after a minute", script, want)
			}
		}
	}
	const memTotalMiB = "echo $(( $(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2) / 1024 ))"
	bootMiB, _ := strconv.Atoi(strings.TrimSpace(guest(memTotalMiB)))

	// a vCPU: once (QEMU under TCG does not survive its unplug)
	cpuUpdate := update(limits(2, 1024))
	cpuSeen := seen("nproc", "2\n")
	report(t, "VM pod resize, vCPU 1 -> 2 (a socket): update %v, then nproc 2 after %v", cpuUpdate.Round(time.Millisecond), cpuSeen.Round(time.Millisecond))

	// memory: grown, filled by the guest (tmpfs), freed, shrunk; the host RSS of each step
	qemu := testenv.QEMUPid(t, p.sandbox)
	var grow, shrink sample
	var freed, given []int64
	for i := range rounds(3) {
		grow = append(grow, update(limits(2, 1536)))
		seen(memTotalMiB+" | awk '{print ($1 >= "+strconv.Itoa(bootMiB+500)+")}'", "1\n")
		guest("dd if=/dev/zero of=/dev/shm/fill bs=1M count=640 2>/dev/null; sync")
		full := pss(t, qemu)
		guest("rm -f /dev/shm/fill")
		time.Sleep(10 * time.Second) // free page reporting (on by default) returns what it can
		reported := pss(t, qemu)
		shrink = append(shrink, update(limits(2, 1024)))
		after := pss(t, qemu)
		freed, given = append(freed, (full-reported)>>20), append(given, (reported-after)>>20)
		t.Logf("round %d: QEMU PSS %d MiB filled, %d MiB freed, %d MiB after the shrink", i, full>>20, reported>>20, after>>20)
	}
	report(t, "VM pod resize, memory 1024 -> 1536 MiB (onlined movable): update %s", grow)
	report(t, "VM pod resize, memory 1536 -> 1024 MiB after the guest used and freed 640 MiB: update %s", shrink)
	report(t, "VM pod resize, host memory (QEMU PSS) returned once the guest freed it (free page reporting): %v MiB; then by the shrink: %v MiB", freed, given)
}
