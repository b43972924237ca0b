package shim_test

import (
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/vmpod/vmpod/integration/testenv"
)

// An interface added to a running q35 pod's netns, as multus' dynamic networks
// controller adds one (CNI ADD on a live pod: a veth whose pod end is net1, addressed),
// becomes a NIC of the guest under the same name, MAC and address, reachable from the
// veth's other end; removed (CNI DEL), it leaves the guest. docs/design/205.
func TestInterfaceAddedToARunningPod(t *testing.T) {
	testenv.RequireTestbed(t)
	pod := testenv.RunPod(t, testenv.PodConfig{
		Metadata:    testenv.Metadata{Name: "nics"},
		Annotations: map[string]string{"vmpod.dev/machine": "q35"},
	})
	id := pod.Container(testenv.ContainerConfig{Metadata: testenv.Metadata{Name: "app"}, Command: sh("sleep 1000")})

	net1 := testenv.AddPodInterface(t, pod.ID, "net1", "10.250.7.1/24", "10.250.7.2/24")
	t0 := time.Now()
	testenv.WaitForWithin(t, 30*time.Second, "net1 in the guest with its MAC and address", func() bool {
		out, _ := testenv.Cmd("crictl", "exec", "-s", id, "sh", "-c", "cat /sys/class/net/net1/address; ip -4 addr show dev net1")
		return strings.Contains(out, net1.MAC) && strings.Contains(out, "10.250.7.2/24")
	})
	t.Logf("net1 configured in the guest %v after CNI's last step", time.Since(t0).Round(10*time.Millisecond))
	if b, err := exec.Command("ping", "-c", "1", "-W", "5", "-I", net1.Host, "10.250.7.2").CombinedOutput(); err != nil {
		t.Errorf("ping the guest's net1 from the veth's other end: %v\n%s", err, b)
	}

	// CNI DEL: the veth goes, and with it the guest's NIC
	testenv.RemovePodInterface(t, net1)
	testenv.WaitForWithin(t, 30*time.Second, "net1 to leave the guest", func() bool {
		out, err := testenv.Cmd("crictl", "exec", "-s", id, "sh", "-c", "ls /sys/class/net")
		return err == nil && !strings.Contains(out, "net1")
	})
	// and eth0 still carries the pod's network
	if out, err := testenv.Cmd("crictl", "exec", "-s", id, "sh", "-c", "ls /sys/class/net"); err != nil || !strings.Contains(out, "eth0") {
		t.Errorf("the guest's interfaces after net1 left: %q, %v", out, err)
	}
}
