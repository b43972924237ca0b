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

// CheckVFIO hands over only whole IOMMU groups the pod was given, bound to vfio-pci, and
// lets Bind bind only what the node allows; it refuses anything else, naming the node and
// the device, and changes nothing.
func TestCheckVFIOAndBind(t *testing.T) {
	f := newFakeSysfs(t)
	for addr, ids := range map[string][2]string{"0000:01:00.0": {"0x10de", "0x2236"}, "0000:01:00.1": {"0x10de", "0x1aef"}, "0000:02:00.0": {"0x8086", "0x10d3"}} {
		f.file("bus/pci/devices/"+addr+"/vendor", ids[0]+"\n")
		f.file("bus/pci/devices/"+addr+"/device", ids[1]+"\n")
	}
	s := Sysfs{Root: f.root, afterWrite: f.kernel()}
	claim := func(nodes []CharDevice, allow []string) ([]PCIAddress, error) {
		c, err := s.CheckVFIO(nodes, allow)
		if err != nil {
			return nil, err
		}
		return c.Functions, c.Bind()
	}
	group7 := CharDevice{Path: "/dev/vfio/7", Major: 243, Minor: 0}
	nic := CharDevice{Path: "/dev/vfio/devices/vfio0", Major: 511, Minor: 0}

	// already vfio-pci (the device plugin's doing): no allow-list needed
	got, err := claim([]CharDevice{nic}, nil)
	if err != nil || len(got) != 1 || got[0] != mustAddr(t, "0000:02:00.0") {
		t.Fatalf("ClaimVFIO(vfio0) = %v, %v", got, err)
	}
	// group 7: a GPU on nouveau and its audio function; the bridge stays
	if _, err := claim([]CharDevice{group7}, nil); err == nil || !strings.Contains(err.Error(), "/dev/vfio/7: devices: 0000:01:00.0: vendor:device 10de:2236 has driver nouveau, not vfio-pci") {
		t.Errorf("ClaimVFIO of a group on nouveau without an allow-list: %v", err)
	}
	if d := strings.TrimSpace(f.read("bus/pci/devices/0000:01:00.0/driver_override")); d != "(null)" {
		t.Errorf("a refused claim left driver_override %q", d)
	}
	got, err = claim([]CharDevice{group7, group7}, []string{"10de:*"})
	if err != nil || len(got) != 2 {
		t.Fatalf("ClaimVFIO(group 7) with 10de:* allowed = %v, %v", got, err)
	}
	for _, a := range got {
		if d, _ := s.Driver(a); d != "vfio-pci" {
			t.Errorf("%s has driver %q after the claim", a, d)
		}
	}
	// one function of a group whose other endpoint the pod was not given
	f.mkdir("devices/pci0000:00/0000:00:01.0/0000:01:00.0/vfio-dev/vfio1")
	f.symlink("dev/char/511:1", "../../devices/pci0000:00/0000:00:01.0/0000:01:00.0/vfio-dev/vfio1")
	if _, err := claim([]CharDevice{{Path: "/dev/vfio/devices/vfio1", Major: 511, Minor: 1}}, nil); err == nil || !strings.Contains(err.Error(), "IOMMU group 7 also holds 0000:01:00.1, which the pod was not given") {
		t.Errorf("ClaimVFIO of half a group: %v", err)
	}
	// not VFIO at all: /dev/null under a VFIO name
	if _, err := claim([]CharDevice{{Path: "/dev/vfio/9", Major: 1, Minor: 3}}, nil); err == nil || !strings.Contains(err.Error(), "/dev/vfio/9") || !strings.Contains(err.Error(), "not a VFIO group or device") {
		t.Errorf("ClaimVFIO of /dev/null: %v", err)
	}
}

func TestCheckVFIOBindPattern(t *testing.T) {
	for p, ok := range map[string]bool{"10de:2236": true, "10DE:*": true, "10de": false, "10de:22": false, "*:*": false, "10de:2236:0": false} {
		if err := CheckVFIOBindPattern(p); (err == nil) != ok {
			t.Errorf("CheckVFIOBindPattern(%q) = %v, want ok=%v", p, err, ok)
		}
	}
}

// A GPU's 64-bit BARs size the q35 window: 2 x 32 GiB needs more than QEMU's 32 GiB.
func TestBAR64BytesAndWindow(t *testing.T) {
	f := newFakeSysfs(t)
	f.file("bus/pci/devices/0000:01:00.0/resource",
		"0x00000000fa000000 0x00000000faffffff 0x0000000000040200\n"+ // 32-bit MMIO, 16 MiB
			"0x0000038000000000 0x00000387ffffffff 0x000000000014220c\n"+ // 64-bit prefetchable, 32 GiB
			"0x0000000000000000 0x0000000000000000 0x0000000000000000\n"+
			"0x0000038800000000 0x0000038801ffffff 0x000000000014220c\n"+ // 64-bit, 32 MiB
			"0x0000000000000000 0x0000000000000000 0x0000000000000000\n"+
			"0x000000000000e000 0x000000000000e07f 0x0000000000040101\n"+ // I/O
			"0x00000000fb000000 0x00000000fb07ffff 0x0000000000046200\n") // ROM: not a BAR
	s := Sysfs{Root: f.root}
	got, err := s.BAR64Bytes(mustAddr(t, "0000:01:00.0"))
	if want := uint64(32<<30 + 32<<20); err != nil || got != want {
		t.Fatalf("BAR64Bytes = %d, %v; want %d", got, err, want)
	}
	if w := PCIHole64For(got); w != 128<<30 {
		t.Errorf("PCIHole64For(%d) = %d, want 128 GiB", got, w)
	}
	if w := PCIHole64For(256 << 20); w != 0 {
		t.Errorf("PCIHole64For(256 MiB) = %d, want 0 (QEMU's default maps it)", w)
	}
}
