package shim_test

import (
	"encoding/json"
	"strconv"
	"strings"
	"testing"

	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/integration/testenv"
	"github.com/vmpod/vmpod/runtime/vmm"
)

// limited is a container that sleeps under limits of cpuMilli thousandths of a CPU and
// memBytes of memory.
func limited(name string, cpuMilli, memBytes int64) testenv.ContainerConfig {
	return testenv.ContainerConfig{
		Metadata: testenv.Metadata{Name: name},
		Command:  sh("sleep 1000"),
		Linux: map[string]any{"resources": map[string]any{
			"cpu_period": 100000, "cpu_quota": cpuMilli * 100, "memory_limit_in_bytes": memBytes,
		}},
	}
}

// guestView reads, from inside container id, the guest's online CPUs, its MemTotal in MiB
// and the container's own memory.max (found through /proc/self/cgroup: on a cgroup v1 host
// containerd gives containers no cgroup namespace, and the guest's root shows instead).
func guestView(t *testing.T, id string) (cpus string, memMiB int, memoryMax string) {
	t.Helper()
	out := testenv.Crictl(t, "exec", "-s", id, "sh", "-c",
		`cat /sys/devices/system/cpu/online; awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo; cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/memory.max`)
	f := strings.Fields(out)
	if len(f) != 3 {
		t.Fatalf("guest view %q: want online CPUs, MemTotal, memory.max", out)
	}
	mem, err := strconv.Atoi(f[1])
	if err != nil {
		t.Fatalf("MemTotal %q: %v", f[1], err)
	}
	return f[0], mem, f[2]
}

// assertGrownTo2CPUs1GiB checks container id after an update to 2 CPUs and 1 GiB in a VM
// booted with bootMemMiB: 2 vCPUs online, at least 512 MiB more memory, the new limit in
// its cgroup. It returns the online CPUs and MemTotal.
func assertGrownTo2CPUs1GiB(t *testing.T, id string, bootMemMiB int) (cpus string, memMiB int) {
	t.Helper()
	cpus, memMiB, memMax := guestView(t, id)
	if cpus != "0-1" {
		t.Errorf("after the update: online CPUs %q, want 0-1", cpus)
	}
	if memMiB < bootMemMiB+512 {
		t.Errorf("after the update: MemTotal %d MiB, want at least %d (booted with %d)", memMiB, bootMemMiB+512, bootMemMiB)
	}
	if memMax != strconv.Itoa(1<<30) {
		t.Errorf("after the update: memory.max %s, want %d", memMax, 1<<30)
	}
	return cpus, memMiB
}

// In-place resize (kubelet's UpdateContainerResources) of a container whose new limits
// outgrow the VM: on q35 the VM grows by CPU hotplug and virtio-mem before the guest's
// cgroup takes the limits, and shrinks back once lower limits no longer need it.
func TestUpdateGrowsTheVM(t *testing.T) {
	testenv.RequireTestbed(t)
	pod := testenv.RunPod(t, testenv.PodConfig{
		Metadata:    testenv.Metadata{Name: "grow"},
		Annotations: map[string]string{"vmpod.dev/machine": "q35"},
	})
	id := pod.Container(limited("app", 500, 128<<20))
	cpus, mem, memMax := guestView(t, id)
	if cpus != "0" || mem > 512 || memMax != strconv.Itoa(128<<20) {
		t.Fatalf("before the update: CPUs %s, %d MiB, memory.max %s; want CPU 0, at most the 512 MiB default, 128 MiB", cpus, mem, memMax)
	}
	bootMem := mem

	// 2 CPUs and 1 GiB: more than the 1-vCPU, 512 MiB VM the pod booted as
	testenv.Crictl(t, "update", "--cpu-period", "100000", "--cpu-quota", "200000", "--memory", strconv.Itoa(1<<30), id)
	// 1 GiB + 64 MiB overhead was plugged; the guest's memmap of the new memory comes out
	// of it, so MemTotal grows by a little less than the 576 MiB added.
	assertGrownTo2CPUs1GiB(t, id, bootMem)

	// Lower limits take effect in the cgroup, and then the q35 VM gives back what it grew
	// for: the virtio-mem memory (onlined movable, so the guest can empty it) and, under
	// KVM, the hot-plugged vCPU (QEMU 7.2 under TCG does not survive a vCPU unplug).
	testenv.Crictl(t, "update", "--cpu-period", "100000", "--cpu-quota", "100000", "--memory", strconv.Itoa(256<<20), id)
	wantCPUs := "0-1"
	if accel, err := vmm.ResolveAccel(machine.AccelAuto); err == nil && accel == machine.KVM {
		wantCPUs = "0"
	}
	if cpus2, mem2, memMax := guestView(t, id); memMax != strconv.Itoa(256<<20) || cpus2 != wantCPUs || mem2 > bootMem+64 {
		t.Errorf("after lowering the limits: CPUs %s, %d MiB, memory.max %s; want CPUs %s, at most %d MiB (booted with %d), %d", cpus2, mem2, memMax, wantCPUs, bootMem+64, bootMem, 256<<20)
	}
	// and grows again as before
	testenv.Crictl(t, "update", "--cpu-period", "100000", "--cpu-quota", "200000", "--memory", strconv.Itoa(1<<30), id)
	assertGrownTo2CPUs1GiB(t, id, bootMem)
}

// statusResources is what CRI's ContainerStatus says a container's limits are: what the
// kubelet's in-place resize checks against what it asked for.
func statusResources(t *testing.T, id string) (cpuQuota, memoryLimit int64) {
	t.Helper()
	var v struct {
		Status struct {
			Resources struct {
				Linux struct {
					CPUQuota           int64 `json:"cpuQuota,string"`
					MemoryLimitInBytes int64 `json:"memoryLimitInBytes,string"`
				} `json:"linux"`
			} `json:"resources"`
		} `json:"status"`
	}
	out := testenv.Crictl(t, "inspect", id)
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		t.Fatalf("crictl inspect: %v\n%s", err, out)
	}
	return v.Status.Resources.Linux.CPUQuota, v.Status.Resources.Linux.MemoryLimitInBytes
}

// In-place resize of an ordinary pod (no machine annotation: q35 restored from a template,
// which grows by hotplug) and of a microvm pod (which has no hotplug and grows from vCPUs
// and memory blocks it booted with offline); the container's status reports the new
// limits, as with runc. Beyond the node's maximum an update is refused, naming the limit,
// and changes nothing.
func TestInPlaceResizeOfADefaultPod(t *testing.T) {
	eachHandler(t, "resize", checkInPlaceResize)
	t.Run("vmpod-microvm", func(t *testing.T) {
		checkInPlaceResize(t, testenv.RunPod(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: "resize-microvm"}, Annotations: microvm}))
	})
}

func checkInPlaceResize(t *testing.T, pod *testenv.Pod) {
	id := pod.Container(limited("app", 500, 128<<20))
	var bootMem int
	if pod.Handler == "vmpod" {
		cpus, mem, memMax := guestView(t, id)
		if cpus != "0" || mem > 512 || memMax != strconv.Itoa(128<<20) {
			t.Fatalf("before the update: CPUs %s, %d MiB, memory.max %s; want CPU 0, at most the 512 MiB default, 128 MiB", cpus, mem, memMax)
		}
		bootMem = mem
	}

	testenv.Crictl(t, "update", "--cpu-period", "100000", "--cpu-quota", "200000", "--memory", strconv.Itoa(1<<30), id)
	if quota, limit := statusResources(t, id); quota != 200000 || limit != 1<<30 {
		t.Errorf("status after the update: cpu quota %d, memory limit %d; want 200000, %d", quota, limit, 1<<30)
	}
	if pod.Handler != "vmpod" {
		return
	}
	// 1 GiB + the guest's overhead, in whole blocks (q35: virtio-mem's 2 MiB, microvm:
	// the kernel's 128 MiB)
	_, mem := assertGrownTo2CPUs1GiB(t, id, bootMem)

	// the test bed's node allows 8 GiB and 4 vCPUs
	_, err := testenv.Cmd("crictl", "update", "--memory", strconv.Itoa(16<<30), id)
	if err == nil || !strings.Contains(err.Error(), "resources.memory.limit") || !strings.Contains(err.Error(), "max_memory_mib") {
		t.Fatalf("update to 16 GiB: %v; want an error naming resources.memory.limit and sizing.max_memory_mib", err)
	}
	if _, mem2, memMax := guestView(t, id); memMax != strconv.Itoa(1<<30) || mem2 < mem-16 || mem2 > mem+16 {
		t.Errorf("after the refused update: memory.max %s, MemTotal %d MiB; want %d and ~%d MiB", memMax, mem2, 1<<30, mem)
	}
}
