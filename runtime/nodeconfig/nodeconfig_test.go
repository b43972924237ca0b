package nodeconfig

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func write(t *testing.T, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestLoadOverridesDefaults(t *testing.T) {
	cfg, err := Load(write(t, `
state_dir = "/run/vp"
[hypervisor]
kernel = "/opt/vmpod/vmlinux"
machine = "microvm"
templates = false
[sizing]
max_vcpus = 8
microvm_growth = false
[timeouts]
boot = "45s"
`))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Hypervisor.Kernel != "/opt/vmpod/vmlinux" || cfg.Hypervisor.Machine != "microvm" || cfg.Hypervisor.Templates || cfg.Sizing.MaxVCPUs != 8 || cfg.Sizing.MicrovmGrowth ||
		cfg.Timeouts.Boot.Duration != 45*time.Second || cfg.StateDir != "/run/vp" {
		t.Fatalf("overrides not applied: %+v", cfg)
	}
	if cfg.Hypervisor.Initrd != Default().Hypervisor.Initrd || cfg.Sizing.DefaultVCPUs != 1 || !Default().Sizing.MicrovmGrowth {
		t.Fatalf("defaults lost: %+v", cfg)
	}
	if d := Default().Hypervisor; d.Machine != "q35" || !d.Templates {
		t.Fatalf("default machine %s, templates %v: want q35 pods restored from templates (docs/design/024)", d.Machine, d.Templates)
	}
}

func TestLoadRejectsBadInputNamingTheKey(t *testing.T) {
	cases := map[string]struct{ content, want string }{
		"unknown key":       {"[hypervisor]\nkernal = \"/x\"\n", "kernal"},
		"unknown table":     {"[hypervisr]\nqemu = \"/x\"\n", "hypervisr"},
		"bad machine":       {"[hypervisor]\nmachine = \"pc\"\n", "hypervisor.machine"},
		"bad cpu model":     {"[hypervisor]\ncpu_models = [\"Nehalem\", \"qemu64,+vmx\"]\n", "hypervisor.cpu_models[1]"},
		"host as a model":   {"[hypervisor]\ncpu_models = [\"host\"]\n", "hypervisor.cpu_models[0]: \"host\": list QEMU CPU model names only"},
		"relative path":     {"[hypervisor]\nkernel = \"vmlinux\"\n", "hypervisor.kernel"},
		"relative cgroup":   {"[hypervisor]\ntemplate_cgroup = \"vmpod-templates\"\n", "hypervisor.template_cgroup"},
		"cgroup above root": {"[hypervisor]\ntemplate_cgroup = \"/a/../..\"\n", "hypervisor.template_cgroup"},
		"bad duration":      {"[timeouts]\nboot = \"soon\"\n", "boot"},
		"negative timeout":  {"[timeouts]\nstop = \"-1s\"\n", "timeouts.stop"},
		"sizes upside down": {"[sizing]\ndefault_vcpus = 4\nmax_vcpus = 2\n", "sizing"},
		"not toml":          {"[hypervisor\n", "config"},
		"wrong type":        {"[sizing]\nmax_vcpus = \"many\"\n", "max_vcpus"},
		"bad vfio_bind":     {"[devices]\nvfio_bind = [\"10de:*\", \"nvidia\"]\n", "devices.vfio_bind[1]: \"nvidia\""},
		"bad qemu_user":     {"[isolation]\nqemu_user = \"qemu\"\n", "isolation.qemu_user: \"qemu\""},
		"uids with root":    {"[isolation]\nfirst_uid = 0\n", "isolation: vm users: first uid 0"},
		"uids with nobody":  {"[isolation]\nfirst_uid = 60000\nuids = 10000\n", "include nobody"},
		"9p with own users": {"[hypervisor]\nshared_fs = \"9p\"\n", "hypervisor.shared_fs: 9p makes QEMU the file server"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := Load(write(t, tc.content))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error naming %q", err, tc.want)
			}
		})
	}
}

func TestMissingExplicitFileIsAnError(t *testing.T) {
	if _, err := Load("/no/such/vmpod.toml"); err == nil {
		t.Fatal("a config path that does not exist loaded")
	}
}

// FuzzLoad: any file at the config path loads or is refused; no panic, and what loads
// validates.
func FuzzLoad(f *testing.F) {
	for _, s := range []string{
		"", "state_dir = \"/run/vp\"\n[hypervisor]\nmachine = \"q35\"\n", "[sizing]\ndefault_vcpus = 4\nmax_vcpus = 2\n",
		"[timeouts]\nboot = \"45s\"\n", "[hypervisor\n", "[annotations]\nallowed = [\"vmpod.dev/vm\"]\n",
	} {
		f.Add([]byte(s))
	}
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		p := filepath.Join(dir, "config.toml")
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		cfg, err := Load(p)
		if err != nil {
			return
		}
		if err := cfg.Validate(); err != nil {
			t.Fatalf("loaded a config that does not validate: %v", err)
		}
	})
}
