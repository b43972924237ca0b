package shim_test

import (
	"strings"
	"testing"

	"github.com/vmpod/vmpod/integration/testenv"
)

// A container whose spec carries VFIO nodes (what a device plugin's CDI spec injects) has
// them resolved on the host by major:minor, never by name: /dev/null under a VFIO name is
// refused, naming the node; a microvm pod, which has no PCIe to plug into, refuses any,
// naming the annotation that gives one. Neither leaves the container behind, and the pod
// stays usable. (A real passthrough needs an IOMMU and a spare device: docs/design/206.)
func TestVFIODevicesAreCheckedOnTheHost(t *testing.T) {
	testenv.RequireTestbed(t)
	fake := []testenv.Device{{ContainerPath: "/dev/vfio/7", HostPath: "/dev/null", Permissions: "rw"}}
	for name, tc := range map[string]struct {
		annotations map[string]string
		want        string
	}{
		"q35":     {nil, "/dev/vfio/7: devices: char device 1:3"},
		"microvm": {microvm, "PCI passthrough needs a q35 pod (annotation vmpod.dev/machine: q35)"},
	} {
		t.Run(name, func(t *testing.T) {
			pod := testenv.RunPod(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: "vfio-" + name}, Annotations: tc.annotations})
			cfg := testenv.ContainerConfig{Metadata: testenv.Metadata{Name: "gpu"}, Command: sh("sleep 1000"), Devices: fake}
			cfg.Image = map[string]string{"image": testenv.BusyboxImage(t)}
			cfg.Linux = map[string]any{}
			cfg.LogPath = "gpu.log"
			_, err := testenv.Cmd("crictl", "create", pod.ID, testenv.WriteJSON(t, "gpu.json", cfg), pod.Config)
			if err == nil {
				id := strings.TrimSpace(testenv.Crictl(t, "ps", "-a", "-q", "--name", "gpu", "--pod", pod.ID))
				_, err = testenv.Cmd("crictl", "start", id)
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("a container with /dev/null as /dev/vfio/7: %v, want %q", err, tc.want)
			}
			// the pod still runs containers
			pod.Container(testenv.ContainerConfig{Metadata: testenv.Metadata{Name: "ok"}, Command: sh("sleep 1000")})
		})
	}
}
