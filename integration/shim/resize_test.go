package shim_test

import (
	"strconv"
	"strings"
	"testing"

	"github.com/vmpod/vmpod/integration/testenv"
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

// In-place resize (kubelet's UpdateContainerResources) of a container whose new limits
// outgrow the VM: on q35 the VM grows by CPU hotplug and virtio-mem before the guest's
// cgroup takes the limits.
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
	cpus, mem, memMax = guestView(t, id)
	if cpus != "0-1" {
		t.Errorf("after the update: online CPUs %q, want 0-1", cpus)
	}
	// 1 GiB + 64 MiB overhead was plugged; the guest's memmap of the new memory comes out
	// of it, so MemTotal grows by a little less than the 576 MiB added.
	if mem < bootMem+512 {
		t.Errorf("after the update: MemTotal %d MiB, want at least %d (booted with %d, 576 MiB added)", mem, bootMem+512, bootMem)
	}
	if memMax != strconv.Itoa(1<<30) {
		t.Errorf("after the update: memory.max %s, want %d", memMax, 1<<30)
	}

	// Shrinking the limits takes effect in the cgroup; the VM keeps its size.
	testenv.Crictl(t, "update", "--memory", strconv.Itoa(256<<20), id)
	if cpus2, mem2, memMax := guestView(t, id); memMax != strconv.Itoa(256<<20) || cpus2 != cpus || mem2 < mem-16 {
		t.Errorf("after shrinking: CPUs %s, %d MiB, memory.max %s; want %s, ~%d MiB, %d", cpus2, mem2, memMax, cpus, mem, 256<<20)
	}
}

// On microvm (no hotplug) an update the VM cannot hold is refused, naming the limit and
// the way out, and changes nothing.
func TestUpdateBeyondAVMWithoutHotplugIsRefused(t *testing.T) {
	testenv.RequireTestbed(t)
	pod := testenv.RunPod(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: "nogrow"}})
	id := pod.Container(limited("app", 500, 128<<20))

	_, err := testenv.Cmd("crictl", "update", "--memory", strconv.Itoa(1<<30), id)
	if err == nil || !strings.Contains(err.Error(), "resources.memory.limit") || !strings.Contains(err.Error(), "q35") {
		t.Fatalf("update to 1 GiB on microvm: %v; want an error naming resources.memory.limit and q35", err)
	}
	if _, _, memMax := guestView(t, id); memMax != strconv.Itoa(128<<20) {
		t.Errorf("after the refused update: memory.max %s, want the old %d", memMax, 128<<20)
	}
	// Within the VM's size an update still applies.
	testenv.Crictl(t, "update", "--memory", strconv.Itoa(256<<20), id)
	if _, _, memMax := guestView(t, id); memMax != strconv.Itoa(256<<20) {
		t.Errorf("after an update within the VM: memory.max %s, want %d", memMax, 256<<20)
	}
}
