package pod

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/vmpod/vmpod/api/vmspec"
	"github.com/vmpod/vmpod/devices"
)

// fakeVFIOSysfs is a sysfs with one GPU (0000:65:00.0, IOMMU group 7, on vfio-pci, a
// 32 GiB 64-bit BAR) behind /dev/vfio/7 (243:0), and /dev/null (1:3).
func fakeVFIOSysfs(t *testing.T) devices.Sysfs {
	t.Helper()
	root := t.TempDir()
	dev := "devices/pci0000:64/0000:64:00.0/0000:65:00.0"
	mk := func(rel string) {
		if err := os.MkdirAll(filepath.Join(root, rel), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	file := func(rel, content string) {
		if err := os.WriteFile(filepath.Join(root, rel), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	link := func(rel, target string) {
		if err := os.Symlink(target, filepath.Join(root, rel)); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range []string{dev, "bus/pci/devices", "bus/pci/drivers/vfio-pci", "kernel/iommu_groups/7/devices", "dev/char", "devices/virtual/vfio/7", "devices/virtual/mem/null"} {
		mk(d)
	}
	file(dev+"/class", "0x030200\n")
	file(dev+"/vendor", "0x10de\n")
	file(dev+"/device", "0x2236\n")
	file(dev+"/resource", "0x0000038000000000 0x00000387ffffffff 0x000000000014220c\n")
	link("bus/pci/devices/0000:65:00.0", "../../../"+dev)
	link(dev+"/driver", "../../../../bus/pci/drivers/vfio-pci")
	link(dev+"/iommu_group", "../../../../kernel/iommu_groups/7")
	link("kernel/iommu_groups/7/devices/0000:65:00.0", "../../../../"+dev)
	link("dev/char/243:0", "../../devices/virtual/vfio/7")
	link("dev/char/1:3", "../../devices/virtual/mem/null")
	return devices.Sysfs{Root: root}
}

func TestHostDevicesFor(t *testing.T) {
	sysfs := fakeVFIOSysfs(t)
	vm := &vmspec.VM{GPUs: []vmspec.HostDevice{{Name: "gpu1", ResourceName: "nvidia.com/GA102GL_A10"}}}
	spec := func(env []string, devs ...specs.LinuxDevice) *specs.Spec {
		return &specs.Spec{Process: &specs.Process{Env: env}, Linux: &specs.Linux{Devices: devs}}
	}
	group7 := specs.LinuxDevice{Path: "/dev/vfio/7", Type: "c", Major: 243, Minor: 0}
	container := specs.LinuxDevice{Path: "/dev/vfio/vfio", Type: "c", Major: 10, Minor: 196}

	fns, hole, err := hostDevicesFor(spec([]string{"PCI_RESOURCE_NVIDIA_COM_GA102GL_A10=0000:65:00.0"}, container, group7), vm, sysfs, nil)
	if err != nil || len(fns) != 1 || fns[0].String() != "0000:65:00.0" || hole != 64<<30 {
		t.Fatalf("hostDevicesFor = %v, %d, %v; want 0000:65:00.0 and a 64 GiB window", fns, hole, err)
	}
	if fns, _, err := hostDevicesFor(spec(nil, group7), &vmspec.VM{}, sysfs, nil); err != nil || fns != nil {
		t.Errorf("a VM without gpus/hostDevices: %v, %v", fns, err)
	}
	for name, tc := range map[string]struct {
		spec *specs.Spec
		want string
	}{
		"no device":       {spec(nil, container), "1 asked for, but the compute container was given 0 VFIO devices (is the device plugin or DRA driver of nvidia.com/GA102GL_A10 running"},
		"not VFIO":        {spec(nil, specs.LinuxDevice{Path: "/dev/vfio/9", Type: "c", Major: 1, Minor: 3}), "/dev/vfio/9: devices: char device 1:3"},
		"env elsewhere":   {spec([]string{"PCI_RESOURCE_X=0000:66:00.0"}, group7), "env PCI_RESOURCE_X names 0000:66:00.0, which none of the container's VFIO devices gives"},
		"env not an addr": {spec([]string{"PCI_RESOURCE_X=gpu0"}, group7), "env PCI_RESOURCE_X"},
	} {
		if _, _, err := hostDevicesFor(tc.spec, vm, sysfs, nil); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v; want an error saying %q", name, err, tc.want)
		}
	}
}
