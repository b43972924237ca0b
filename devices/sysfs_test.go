package devices

import (
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
)

// fakeSysfs builds the parts of /sys that VFIO preparation reads and writes, for a
// host with a GPU (0000:01:00.0, bound to "nouveau") and its audio function
// (0000:01:00.1, no driver) behind a PCIe bridge (0000:00:01.0), all in IOMMU
// group 7, plus a NIC alone in group 9 already bound to vfio-pci. There is no
// VFIO hardware on vmpod's development machines, so this is what tests run on.
type fakeSysfs struct {
	t    *testing.T
	root string
}

func newFakeSysfs(t *testing.T) *fakeSysfs {
	f := &fakeSysfs{t: t, root: t.TempDir()}
	for _, d := range []string{"bus/pci/drivers/nouveau", "bus/pci/drivers/vfio-pci", "bus/pci/drivers/pcieport", "bus/pci/devices", "dev/char", "devices/virtual/vfio/7"} {
		f.mkdir(d)
	}
	for _, d := range []string{"bus/pci/drivers/nouveau", "bus/pci/drivers/vfio-pci", "bus/pci/drivers/pcieport"} {
		f.file(d+"/bind", "")
		f.file(d+"/unbind", "")
	}
	f.file("bus/pci/drivers_probe", "")
	f.device("0000:00:01.0", "devices/pci0000:00/0000:00:01.0", "0x060400", 7, "pcieport")
	f.device("0000:01:00.0", "devices/pci0000:00/0000:00:01.0/0000:01:00.0", "0x030000", 7, "nouveau")
	f.device("0000:01:00.1", "devices/pci0000:00/0000:00:01.0/0000:01:00.1", "0x040300", 7, "")
	f.device("0000:02:00.0", "devices/pci0000:00/0000:00:02.0/0000:02:00.0", "0x020000", 9, "vfio-pci")
	f.symlink("dev/char/243:0", "../../devices/virtual/vfio/7")
	f.symlink("dev/char/10:196", "../../devices/virtual/misc/vfio")
	f.mkdir("devices/pci0000:00/0000:00:02.0/0000:02:00.0/vfio-dev/vfio0")
	f.symlink("dev/char/511:0", "../../devices/pci0000:00/0000:00:02.0/0000:02:00.0/vfio-dev/vfio0")
	f.symlink("dev/char/1:3", "../../devices/virtual/mem/null")
	return f
}

func (f *fakeSysfs) device(addr, dir, class string, group int, driver string) {
	f.mkdir(dir)
	f.file(dir+"/class", class+"\n")
	f.file(dir+"/driver_override", "(null)\n")
	f.symlink("bus/pci/devices/"+addr, "../../../"+dir)
	g := filepath.Join("kernel/iommu_groups", strconv.Itoa(group), "devices")
	f.mkdir(g)
	f.symlink(g+"/"+addr, "../../../../"+dir)
	f.symlink(dir+"/iommu_group", strings.Repeat("../", strings.Count(dir, "/")+1)+"kernel/iommu_groups/"+strconv.Itoa(group))
	if driver != "" {
		f.bind(addr, driver)
	}
}

// bind plays the kernel binding driver to addr.
func (f *fakeSysfs) bind(addr, driver string) {
	link := filepath.Join(f.root, "bus/pci/devices", addr, "driver")
	os.Remove(link)
	if driver != "" {
		if err := os.Symlink(filepath.Join(f.root, "bus/pci/drivers", driver), link); err != nil {
			f.t.Fatal(err)
		}
	}
}

func (f *fakeSysfs) read(rel string) string {
	b, err := os.ReadFile(filepath.Join(f.root, rel))
	if err != nil {
		f.t.Fatal(err)
	}
	return string(b)
}

func (f *fakeSysfs) mkdir(rel string) {
	if err := os.MkdirAll(filepath.Join(f.root, rel), 0o755); err != nil {
		f.t.Fatal(err)
	}
}

func (f *fakeSysfs) file(rel, content string) {
	if err := os.WriteFile(filepath.Join(f.root, rel), []byte(content), 0o644); err != nil {
		f.t.Fatal(err)
	}
}

func (f *fakeSysfs) symlink(rel, target string) {
	if err := os.Symlink(target, filepath.Join(f.root, rel)); err != nil {
		f.t.Fatal(err)
	}
}

// kernel returns an afterWrite hook that acts like the PCI core: unbind removes
// the driver link, drivers_probe binds the overriding driver (if any).
func (f *fakeSysfs) kernel() func(path, value string) {
	return func(path, value string) {
		rel, _ := filepath.Rel(f.root, path)
		switch {
		case strings.HasSuffix(rel, "/unbind"):
			f.bind(value, "")
		case rel == "bus/pci/drivers_probe":
			override := strings.TrimSpace(f.read("bus/pci/devices/" + value + "/driver_override"))
			if override != "(null)" && override != "" {
				f.bind(value, override)
			}
		}
	}
}

func mustAddr(t *testing.T, s string) PCIAddress {
	a, err := ParsePCIAddress(s)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func TestIOMMUGroupOf(t *testing.T) {
	f := newFakeSysfs(t)
	s := Sysfs{Root: f.root}
	g, err := s.IOMMUGroupOf(mustAddr(t, "0000:01:00.1"))
	if err != nil {
		t.Fatal(err)
	}
	want := IOMMUGroup{Number: 7, Devices: []PCIAddress{mustAddr(t, "0000:00:01.0"), mustAddr(t, "0000:01:00.0"), mustAddr(t, "0000:01:00.1")}}
	if !reflect.DeepEqual(g, want) {
		t.Errorf("group %+v, want %+v", g, want)
	}
	if _, err := s.IOMMUGroupOf(mustAddr(t, "0000:05:00.0")); err == nil {
		t.Error("IOMMU group of a device that does not exist")
	}
}

func TestPrepareVFIOBindsEveryEndpointOfTheGroup(t *testing.T) {
	f := newFakeSysfs(t)
	s := Sysfs{Root: f.root, afterWrite: f.kernel()}
	if _, err := s.PrepareVFIO(mustAddr(t, "0000:01:00.0")); err != nil {
		t.Fatal(err)
	}
	for addr, want := range map[string]string{"0000:01:00.0": "vfio-pci", "0000:01:00.1": "vfio-pci", "0000:00:01.0": "pcieport"} {
		if got, err := s.Driver(mustAddr(t, addr)); err != nil || got != want {
			t.Errorf("driver of %s = %q, %v; want %q", addr, got, err, want)
		}
	}
	if got := f.read("bus/pci/drivers/nouveau/unbind"); got != "0000:01:00.0" {
		t.Errorf("nouveau/unbind got %q", got)
	}
	if got := f.read("bus/pci/devices/0000:00:01.0/driver_override"); got != "(null)\n" {
		t.Errorf("the bridge's driver_override was changed to %q", got)
	}
	// Already bound: nothing is written.
	f.file("bus/pci/drivers_probe", "untouched")
	if err := s.BindVFIO(mustAddr(t, "0000:02:00.0")); err != nil {
		t.Fatal(err)
	}
	if got := f.read("bus/pci/drivers_probe"); got != "untouched" {
		t.Errorf("binding a device already on vfio-pci probed again (%q)", got)
	}
}

func TestBindVFIOFailures(t *testing.T) {
	f := newFakeSysfs(t)
	// No kernel behind the files: the probe does not bind anything.
	err := Sysfs{Root: f.root}.BindVFIO(mustAddr(t, "0000:01:00.1"))
	if err == nil || !strings.Contains(err.Error(), "after probing") {
		t.Errorf("unclaimed device: %v", err)
	}
	os.RemoveAll(filepath.Join(f.root, "bus/pci/drivers/vfio-pci"))
	err = Sysfs{Root: f.root, afterWrite: f.kernel()}.BindVFIO(mustAddr(t, "0000:01:00.0"))
	if err == nil || !strings.Contains(err.Error(), "modprobe vfio-pci") {
		t.Errorf("without the vfio-pci driver: %v", err)
	}
	if got, _ := (Sysfs{Root: f.root}).Driver(mustAddr(t, "0000:01:00.0")); got != "nouveau" {
		t.Errorf("a failed bind left the device on %q", got)
	}
}

func TestResolveVFIODevice(t *testing.T) {
	f := newFakeSysfs(t)
	s := Sysfs{Root: f.root}
	got, err := s.ResolveVFIODevice(243, 0) // /dev/vfio/7
	if err != nil {
		t.Fatal(err)
	}
	if want := []PCIAddress{mustAddr(t, "0000:01:00.0"), mustAddr(t, "0000:01:00.1")}; !reflect.DeepEqual(got, want) {
		t.Errorf("group node resolves to %v, want the group's endpoints %v", got, want)
	}
	got, err = s.ResolveVFIODevice(511, 0) // /dev/vfio/devices/vfio0
	if err != nil || !reflect.DeepEqual(got, []PCIAddress{mustAddr(t, "0000:02:00.0")}) {
		t.Errorf("iommufd cdev resolves to %v, %v; want 0000:02:00.0", got, err)
	}
	for _, node := range [][2]uint32{{10, 196}, {1, 3}, {9, 9}} {
		if got, err := s.ResolveVFIODevice(node[0], node[1]); err == nil {
			t.Errorf("%d:%d resolves to %v, want an error", node[0], node[1], got)
		}
	}
}
