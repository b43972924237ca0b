package vmm

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmpod/vmpod/api/machine"
)

// templateConfig is a template machine whose files exist (TemplateKey reads their
// identity), under dir.
func templateConfig(t *testing.T, dir, name string) Config {
	t.Helper()
	for _, f := range []string{"qemu", "vmlinux", "initrd"} {
		p := filepath.Join(dir, f)
		if _, err := os.Stat(p); os.IsNotExist(err) {
			if err := os.WriteFile(p, []byte(f), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	return Config{Name: name, StateDir: filepath.Join(dir, "state", name), QEMUPath: filepath.Join(dir, "qemu"),
		Type: machine.Q35, Accel: machine.TCG, Template: true, SharedFS: machine.VirtioFS, Ports: []string{"agent"},
		Boot: Boot{Kernel: filepath.Join(dir, "vmlinux"), Initrd: filepath.Join(dir, "initrd"), KernelParams: []string{"quiet"}}}
}

// Machines that differ only in what each restore has of its own share a key; anything that
// shapes the machine or the guest it boots makes another.
func TestTemplateKey(t *testing.T) {
	dir := t.TempDir()
	base := templateConfig(t, dir, "a")
	key := func(c Config) string {
		t.Helper()
		k, err := c.TemplateKey()
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	want := key(base)
	same := templateConfig(t, dir, "other-pod")
	same.Cgroup, same.LogPath = "/pods/x", filepath.Join(dir, "x.log")
	if k := key(same); k != want {
		t.Errorf("another name, state dir, cgroup and log: key %s, want %s", k, want)
	}
	for name, change := range map[string]func(*Config){
		"memory":         func(c *Config) { c.MemoryMiB = 1024 },
		"vcpus":          func(c *Config) { c.VCPUs, c.MaxVCPUs = 2, 2 },
		"growth room":    func(c *Config) { c.MaxMemoryMiB = 4096 },
		"kernel params":  func(c *Config) { c.Boot.KernelParams = []string{"quiet", "debug"} },
		"ports":          func(c *Config) { c.Ports = []string{"agent", "other"} },
		"page reporting": func(c *Config) { c.FreePageReporting = true },
		"cpu model":      func(c *Config) { c.CPUModel = "Nehalem" },
	} {
		c := templateConfig(t, dir, "a")
		change(&c)
		if key(c) == want {
			t.Errorf("%s changed, the key did not", name)
		}
	}
	// a rebuilt kernel
	later := time.Now().Add(time.Hour)
	if err := os.Chtimes(base.Boot.Kernel, later, later); err != nil {
		t.Fatal(err)
	}
	if key(base) == want {
		t.Error("the kernel changed, the key did not")
	}
	if _, err := (Config{Name: "x"}).TemplateKey(); err == nil {
		t.Error("a key for a machine that is not a template's")
	}
}

func TestTemplateValidation(t *testing.T) {
	dir := t.TempDir()
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	saved := &SavedTemplate{State: f, RAM: f}
	for name, tc := range map[string]struct {
		change func(*Config)
		want   string
	}{
		"microvm":                    {func(c *Config) { c.Type = machine.MicroVM }, "template: needs machine q35"},
		"no ACPI":                    {func(c *Config) { c.NoACPI = true }, "template: needs machine q35 with ACPI"},
		"9p":                         {func(c *Config) { c.SharedFS = machine.NineP }, "template: shared_fs 9p"},
		"UUID":                       {func(c *Config) { c.UUID = "a8098c1a-f86e-11da-bd1a-00112444be1e" }, "template: an SMBIOS UUID"},
		"disk":                       {func(c *Config) { c.Files = []FDSetFile{{File: f}} }, "template: disks"},
		"restore and live migration": {func(c *Config) { c.Incoming, c.RestoreFrom = true, saved }, "template: a template machine restores a file (restore_from) or receives"},
		"paused":                     {func(c *Config) { c.Paused = true }, "template: a restored guest must run"},
		"NICs when saving":           {func(c *Config) { c.NICs = []NIC{{Tap: f}} }, "nics: a template being saved has none"},
		"too many NICs": {func(c *Config) {
			c.RestoreFrom = saved
			c.NICs = []NIC{{Tap: f}, {Tap: f}, {Tap: f}, {Tap: f}}
		}, "nics: 4: a restored template machine plugs at most 3"},
		"restore without RAM":                             {func(c *Config) { c.RestoreFrom = &SavedTemplate{State: f} }, "restore_from: a saved template is a state file and a RAM file"},
		"restore into a machine that is not a template's": {func(c *Config) { c.Template, c.RestoreFrom = false, saved }, "restore_from:"},
	} {
		c := templateConfig(t, dir, "v")
		tc.change(&c)
		err := c.withDefaults().Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", name, err, tc.want)
		}
	}
	c := templateConfig(t, dir, "ok")
	c.RestoreFrom = saved
	c.NICs = []NIC{{Tap: f}}
	if err := c.withDefaults().Validate(); err != nil {
		t.Errorf("a restore with a NIC: %v", err)
	}
	// the target of a restored machine's migration: its NICs and virtiofsd, no file
	target := templateConfig(t, dir, "target")
	target.Incoming = true
	target.NICs = []NIC{{Tap: f}}
	if err := target.withDefaults().Validate(); err != nil || target.saving() || !target.runsVirtiofsd() {
		t.Errorf("a restored machine's migration target: %v (saving %v, virtiofsd %v)", err, target.saving(), target.runsVirtiofsd())
	}
	if err := c.CheckTemplate(); err != nil {
		t.Errorf("CheckTemplate of a restore with a NIC: %v", err)
	}
}

// testMemfd is an empty memfd, closed when the test ends.
func testMemfd(t *testing.T) *os.File {
	t.Helper()
	fd, err := unix.MemfdCreate("test", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "memfd")
	t.Cleanup(func() { f.Close() })
	return f
}

// copyRAM copies what the guest wrote and nothing else: the pages it never touched (holes)
// and the ones it zeroed stay unallocated in the copy.
func TestCopyRAMKeepsItSparse(t *testing.T) {
	src, dst := testMemfd(t), testMemfd(t)
	defer src.Close()
	defer dst.Close()
	const pages = 64
	if err := src.Truncate(pages * ramPage); err != nil {
		t.Fatal(err)
	}
	page := func(b byte) []byte { return bytes.Repeat([]byte{b}, ramPage) }
	for at, content := range map[int][]byte{0: page('a'), 1: page(0), 2: page(0), 40: page('b'), 63: page('c')} {
		if _, err := src.WriteAt(content, int64(at)*ramPage); err != nil {
			t.Fatal(err)
		}
	}
	n, err := copyRAM(dst, src)
	if err != nil {
		t.Fatal(err)
	}
	if n != 3*ramPage {
		t.Errorf("wrote %d bytes, want the 3 pages with data", n)
	}
	got := make([]byte, pages*ramPage)
	if _, err := dst.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, pages*ramPage)
	_, _ = src.ReadAt(want, 0)
	if !bytes.Equal(got, want) {
		t.Error("the copy's contents differ")
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(dst.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	if allocated := st.Blocks * 512; allocated != 3*ramPage {
		t.Errorf("the copy has %d bytes allocated, want %d", allocated, 3*ramPage)
	}
}

// The pages a restore copies into a machine's RAM are charged to the machine's cgroup (the
// pod's), where QEMU runs, not to the shim's: the copier is a process in that cgroup.
func TestRAMCopyIsChargedToThePod(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipped: making a cgroup needs root")
	}
	c, err := openPodCgroup(fmt.Sprintf("/vmpod-test-ramcopy-%d", os.Getpid()))
	if err != nil {
		t.Skipf("skipped: no cgroup to test in: %v", err)
	}
	src, dst := testMemfd(t), testMemfd(t)
	defer src.Close()
	const size = 16 << 20
	if _, err := src.Write(bytes.Repeat([]byte("guest RAM"), size/9+1)[:size]); err != nil {
		t.Fatal(err)
	}
	m := &Machine{cgroup: c}
	copier, err := m.startRAMCopy(dst, src)
	if err != nil {
		t.Fatal(err)
	}
	n, err := copier.wait()
	if err != nil {
		t.Fatal(err)
	}
	if n != size {
		t.Errorf("copied %d bytes, want %d", n, size)
	}
	st, err := c.stats()
	if err != nil {
		t.Fatal(err)
	}
	if st.Memory == nil || st.Memory.Usage < size {
		t.Errorf("the pod's cgroup is charged %+v, want at least the %d bytes copied", st.Memory, size)
	}
	dst.Close()
	if err := c.remove(); err != nil {
		t.Error(err)
	}
}
