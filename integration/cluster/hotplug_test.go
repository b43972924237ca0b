package cluster

import (
	"strings"
	"testing"
	"time"

	"github.com/vmpod/vmpod/integration/testenv"
)

// hotplugVolume: a blank DataVolume (on the shared class: with two vmpod nodes, a
// node-local volume binds where its blank-image pod ran, which need not be the VM's node)
// added to running VM vm (pod pod) with kubectl vmpod
// addvolume reaches the guest as a virtio disk named by its serial, without a restart,
// through an attachment pod the kubelet mounts the PVC for; what the guest writes there is
// still there after a restart of the VM, which gets the disk again from its spec; removed
// with removevolume, the disk leaves the guest and the attachment pod goes.
func hotplugVolume(t *testing.T, c *testenv.Cluster, ns, vm, pod string) {
	t.Helper()
	const dv = "data-hp"
	const marker = "hot-plugged-by-e2e"
	sharedBlankDataVolume(t, c, ns, dv)
	if out := c.Kubectl(t, "vmpod", "addvolume", "-n", ns, vm, "--volume-name="+dv); !strings.Contains(out, "volume "+dv+" added") {
		t.Fatalf("addvolume: %s", out)
	}
	disk := "/dev/disk/by-id/virtio-" + dv
	guestHas := func(pod string) bool {
		out, _ := c.KubectlErr("exec", "-n", ns, pod, "-c", "compute", "--", "ls", "/dev/disk/by-id")
		return strings.Contains(out, "virtio-"+dv)
	}
	t0 := time.Now()
	testenv.WaitForWithin(t, 3*time.Minute, "the hot-plugged disk in the guest", func() bool { return guestHas(pod) })
	t.Logf("addvolume: the guest has the disk after %v", time.Since(t0).Round(time.Second))
	if phase := c.Kubectl(t, "get", "vm.vmpod.dev", "-n", ns, vm, "-o", `jsonpath={.status.volumeStatus[?(@.name=="`+dv+`")].phase}`); phase != "Ready" {
		t.Errorf("volume status phase %q, want Ready", phase)
	}
	if now := c.Kubectl(t, "get", "pod", "-n", ns, pod, "-o", "jsonpath={.metadata.name}"); now != pod {
		t.Fatalf("the VM's pod changed while a volume was added")
	}
	c.Kubectl(t, "exec", "-n", ns, pod, "-c", "compute", "--", "sh", "-c", "printf "+marker+" | dd of="+disk+" conv=fsync")

	// a restart: the new pod gets the disk again, with what was written
	uid := c.Kubectl(t, "get", "vm.vmpod.dev", "-n", ns, vm, "-o", "jsonpath={.status.podUID}")
	c.Kubectl(t, "vmpod", "restart", "-n", ns, vm)
	testenv.WaitForWithin(t, 2*time.Minute, "restart to replace the VM's pod", func() bool {
		now, _ := c.KubectlErr("get", "vm.vmpod.dev", "-n", ns, vm, "-o", "jsonpath={.status.podUID}")
		return now != "" && now != uid
	})
	pod = waitVM(t, c, ns, vm, vmBootWithin, "Running", "True")
	var out string
	if !testenv.PollWithin(3*time.Minute, func() bool {
		out, _ = c.KubectlErr("exec", "-n", ns, pod, "-c", "compute", "--", "head", "-c", "18", disk)
		return out == marker
	}) {
		t.Errorf("after the restart, the hot-plugged disk holds %q, want %q", out, marker)
	}

	// removed: gone from the guest and the node
	c.Kubectl(t, "vmpod", "removevolume", "-n", ns, vm, "--volume-name="+dv)
	testenv.WaitForWithin(t, 3*time.Minute, "the disk to leave the guest", func() bool { return !guestHas(pod) })
	testenv.WaitForWithin(t, 2*time.Minute, "the attachment pod to go", func() bool {
		pods, _ := c.KubectlErr("get", "pods", "-n", ns, "-l", "vmpod.dev/hotplug-volume="+dv, "-o", "name")
		return strings.TrimSpace(pods) == ""
	})
	if st := c.Kubectl(t, "get", "vm.vmpod.dev", "-n", ns, vm, "-o", "jsonpath={.status.volumeStatus}"); st != "" {
		t.Errorf("volume status after removevolume: %s", st)
	}
}

// sharedBlankDataVolume imports a blank 64 MiB DataVolume on the shared (ReadWriteMany)
// class, as a KubeVirt user's CDI manifest asks for it.
func sharedBlankDataVolume(t *testing.T, c *testenv.Cluster, ns, name string) {
	t.Helper()
	applyConverted(t, c, ns, `apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: `+name+`
spec:
  source:
    blank: {}
  storage:
    accessModes: [ReadWriteMany]
    storageClassName: vmpod-shared
    resources: {requests: {storage: 64Mi}}
`)
	waitDataVolume(t, c, ns, name, "Succeeded", 3*time.Minute)
}
