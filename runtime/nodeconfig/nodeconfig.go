// Package nodeconfig is the node admin's vmpod configuration: which QEMU, guest kernel and
// initramfs to use, how VMs are sized and timed, and which pod annotations a pod author may
// set. It is a TOML file (default /etc/vmpod/config.toml; containerd's runtime option
// ConfigPath overrides it), decoded strictly: an unknown key is an error that names it.
package nodeconfig

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/pelletier/go-toml/v2"

	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/devices"
	"github.com/vmpod/vmpod/runtime/vmm"
	"github.com/vmpod/vmpod/runtime/vmpodagent"
	"github.com/vmpod/vmpod/runtime/vmuser"
)

// DefaultPath is where the shim looks without a ConfigPath runtime option.
const DefaultPath = "/etc/vmpod/config.toml"

// Config is the file's content.
type Config struct {
	Hypervisor  Hypervisor  `toml:"hypervisor"`
	Sizing      Sizing      `toml:"sizing"`
	Timeouts    Timeouts    `toml:"timeouts"`
	Annotations Annotations `toml:"annotations"`
	Devices     Devices     `toml:"devices"`
	Isolation   Isolation   `toml:"isolation"`
	// StateDir holds one directory per pod (sockets, shared directory); keep it short,
	// unix socket paths are limited to 108 bytes.
	StateDir string `toml:"state_dir"`
	// Debug turns on debug logs in the shim and the guest agent.
	Debug bool `toml:"debug"`
}

// Hypervisor says what boots the VMs.
type Hypervisor struct {
	QEMU      string `toml:"qemu"`
	Virtiofsd string `toml:"virtiofsd"`
	Kernel    string `toml:"kernel"`
	Initrd    string `toml:"initrd"`
	// KernelParams are appended to the guest kernel command line.
	KernelParams []string         `toml:"kernel_params"`
	Machine      machine.Type     `toml:"machine"`
	Accel        machine.Accel    `toml:"accel"`
	SharedFS     machine.SharedFS `toml:"shared_fs"`
	// Templates starts each container pod whose machine is q35 (the default) from a
	// template of its shape — a guest booted once and saved — instead of booting it
	// (docs/design/022). TemplateDir keeps the templates; "" is state_dir + "-templates".
	Templates   bool   `toml:"templates"`
	TemplateDir string `toml:"template_dir"`
	// TemplateCgroup is the cgroup a template's making runs in (its QEMU and
	// virtiofsd), and so the one its RAM file's pages stay charged to: a node's cache,
	// neither the pod that happened to make it nor the shim's (containerd's) cgroup. A
	// cgroupfs path or systemd's slice:prefix:name; "" is DefaultTemplateCgroup.
	TemplateCgroup string `toml:"template_cgroup"`

	// VM pods (docs/design/110): qemu-img probes their disk images and makes overlays;
	// OVMF's code and variable-store template boot firmware.type uefi; with secureBoot, its
	// SMM build and a template with Microsoft's keys enrolled (they sign shim, which carries
	// the distributions' keys).
	QEMUImg        string `toml:"qemu_img"`
	UEFICode       string `toml:"uefi_code"`
	UEFIVars       string `toml:"uefi_vars"`
	UEFISecureCode string `toml:"uefi_secure_code"`
	UEFISecureVars string `toml:"uefi_secure_vars"`
	// CPUModels are the named QEMU CPU models a VM pod may ask for. Without one a VM gets
	// the host's CPU (KVM) or an emulated baseline (TCG). A named model is the admin's to
	// allow: it is what keeps a VM movable between hosts of different CPUs, and only a
	// host that has its features can give them all.
	CPUModels []string `toml:"cpu_models"`
}

// Sizing bounds the VMs: a pod gets what its resources ask for within these limits.
type Sizing struct {
	DefaultVCPUs int `toml:"default_vcpus"`
	// MaxVCPUs and MaxMemoryMiB cap a pod's boot size and how far an update of its limits
	// can grow it: by hotplug on q35 (docs/design/008), from room booted offline on
	// microvm (docs/design/013).
	MaxVCPUs         int `toml:"max_vcpus"`
	DefaultMemoryMiB int `toml:"default_memory_mib"`
	MaxMemoryMiB     int `toml:"max_memory_mib"`
	// GuestOverheadMiB is added to a pod's memory limit for the guest kernel and agent.
	GuestOverheadMiB int `toml:"guest_overhead_mib"`
	// MicrovmGrowth gives microvm pods their growth room (up to the maximums, booted
	// offline: docs/design/013); false boots them at their size, and an update that
	// outgrows it is refused.
	MicrovmGrowth bool `toml:"microvm_growth"`
	// FreePageReporting has guests report the memory they free, which the host then
	// takes back (a virtio-balloon that never inflates; KubeVirt's default too).
	// Memory a guest frees stays resident on the host without it; with it, a guest that
	// reuses freed memory faults it in again (measured in docs/benchmarks.md).
	FreePageReporting bool `toml:"free_page_reporting"`
}

// Timeouts are durations in Go syntax ("30s").
type Timeouts struct {
	Boot Duration `toml:"boot"`
	Call Duration `toml:"call"`
	Stop Duration `toml:"stop"`
}

// Devices is what the node lets vmpod do with host PCI devices a pod was allocated.
type Devices struct {
	// VFIOBind lists the vendor:device IDs ("10de:2236", "10de:*") the shim may bind to
	// vfio-pci when a pod is given one still on its host driver. Empty (the default): only
	// functions already bound to vfio-pci (by the device plugin, the DRA driver or the
	// admin) are passed through.
	VFIOBind []string `toml:"vfio_bind"`
}

// Isolation is how the node keeps what faces a guest from the node (docs/design/014).
type Isolation struct {
	// QEMUUser is "pod" (the default): each VM's QEMU runs as a uid of its own, leased
	// from [FirstUID, FirstUID+UIDs), without capabilities, under its seccomp filter;
	// or "root", for a node that cannot give QEMU its own user (9p shared folders, a
	// /dev/kvm only root may open).
	QEMUUser string `toml:"qemu_user"`
	// FirstUID and UIDs reserve the host uids QEMUs run as: a range no user, container
	// runtime or kubelet user namespace maps. The default is the top 64 Ki of systemd's
	// unassigned 0x70000000-0x7FFDFFFF.
	FirstUID uint32 `toml:"first_uid"`
	UIDs     uint32 `toml:"uids"`
	// LockDir holds the leases, one lock file per uid: host-wide, like the uids, so that
	// several vmpod nodes of one host (test clusters) never share one. The file-owner
	// ranges' are in its "owners" directory.
	LockDir string `toml:"lock_dir"`
	// VirtiofsdUser is "pod" (the default): each VM's virtiofsd runs as root of a user
	// namespace of its own, whose 64 Ki ids are a host range leased from
	// [FirstOwnerID, FirstOwnerID+OwnerIDs), and serves the pod's files through
	// ID-mapped mounts (docs/design/025); or "root", for shared files on a filesystem
	// that cannot be mounted ID-mapped. For a pod with a user namespace of its own
	// (hostUsers: false) the namespace maps the pod's host ids onto themselves instead.
	VirtiofsdUser string `toml:"virtiofsd_user"`
	FirstOwnerID  uint32 `toml:"first_owner_id"`
	OwnerIDs      uint32 `toml:"owner_ids"`
}

// QEMU user modes (Isolation.QEMUUser).
const (
	QEMUUserPod  = "pod"
	QEMUUserRoot = "root"
)

// FileOwners is the pool virtiofsd's ranges are leased from, nil when it runs as root.
func (i Isolation) FileOwners() *vmuser.Pool {
	if i.VirtiofsdUser == QEMUUserRoot {
		return nil
	}
	return &vmuser.Pool{Dir: filepath.Join(i.LockDir, "owners"), First: i.FirstOwnerID, Count: i.OwnerIDs, Stride: vmuser.OwnerRange}
}

// QEMUUsers is the pool QEMUs' uids are leased from, nil when QEMU runs as root.
func (i Isolation) QEMUUsers() *vmuser.Pool {
	if i.QEMUUser == QEMUUserRoot {
		return nil
	}
	return &vmuser.Pool{Dir: i.LockDir, First: i.FirstUID, Count: i.UIDs, Sweep: vmuser.DefaultSweep}
}

// Annotations lists the vmpod.dev/* pod annotations pod authors may set on this node.
type Annotations struct {
	Allowed []string `toml:"allowed"`
}

// Duration is a time.Duration written as a string in TOML.
type Duration struct{ time.Duration }

func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return err
	}
	d.Duration = v
	return nil
}

func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// Default is the configuration without a file: the vmpod guest installed under
// /usr/share/vmpod and Debian's QEMU.
func Default() Config {
	return Config{
		Hypervisor: Hypervisor{
			QEMU:           vmm.DefaultQEMU,
			Virtiofsd:      vmm.DefaultVirtiofsd,
			Kernel:         "/usr/share/vmpod/vmlinux",
			Initrd:         "/usr/share/vmpod/initrd.img",
			Machine:        machine.Q35, // with Templates: a pod starts faster than a microvm boots (docs/design/024)
			Templates:      true,
			Accel:          machine.AccelAuto,
			SharedFS:       machine.VirtioFS,
			QEMUImg:        "/usr/bin/qemu-img",
			UEFICode:       "/usr/share/OVMF/OVMF_CODE_4M.fd",
			UEFIVars:       "/usr/share/OVMF/OVMF_VARS_4M.fd",
			UEFISecureCode: "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",
			UEFISecureVars: "/usr/share/OVMF/OVMF_VARS_4M.ms.fd",
		},
		Sizing: Sizing{
			DefaultVCPUs:     1,
			MaxVCPUs:         4,
			DefaultMemoryMiB: 512,
			MaxMemoryMiB:     8192,
			GuestOverheadMiB: 64,
			MicrovmGrowth:    true,

			FreePageReporting: true,
		},
		Timeouts: Timeouts{
			Boot: Duration{vmpodagent.DefaultBootTimeout},
			Call: Duration{vmpodagent.DefaultCallTimeout},
			Stop: Duration{vmm.DefaultStopTimeout},
		},
		Isolation: Isolation{
			QEMUUser: QEMUUserPod,
			FirstUID: vmuser.DefaultFirst,
			UIDs:     vmuser.DefaultCount,
			LockDir:  vmuser.DefaultDir,

			VirtiofsdUser: QEMUUserPod,
			FirstOwnerID:  vmuser.DefaultOwnersFirst,
			OwnerIDs:      vmuser.DefaultOwnersCount,
		},
		Annotations: Annotations{Allowed: []string{"vmpod.dev/machine", "vmpod.dev/shared-fs", "vmpod.dev/vm", "vmpod.dev/migration-target"}},
		StateDir:    "/run/vmpod",
	}
}

// Load reads path over the defaults. A missing file at DefaultPath means "defaults"; a
// missing file anywhere else is an error (someone asked for it).
func Load(path string) (Config, error) {
	cfg := Default()
	if path == "" {
		path = DefaultPath
	}
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) && path == DefaultPath {
		return cfg, cfg.Validate()
	}
	if err != nil {
		return Config{}, fmt.Errorf("vmpod config: %w", err)
	}
	dec := toml.NewDecoder(bytes.NewReader(b)).DisallowUnknownFields()
	if err := dec.Decode(&cfg); err != nil {
		var strict *toml.StrictMissingError
		if errors.As(err, &strict) {
			return Config{}, fmt.Errorf("vmpod config %s: unknown keys:\n%s", path, strict.String())
		}
		var de *toml.DecodeError
		if errors.As(err, &de) {
			row, col := de.Position()
			return Config{}, fmt.Errorf("vmpod config %s:%d:%d: %s (key %v)", path, row, col, de.Error(), de.Key())
		}
		return Config{}, fmt.Errorf("vmpod config %s: %w", path, err)
	}
	if err := cfg.Validate(); err != nil {
		return Config{}, fmt.Errorf("vmpod config %s: %w", path, err)
	}
	return cfg, nil
}

// DefaultTemplateCgroup is hypervisor.template_cgroup's default: beside the kubelet's
// kubepods, as the node's other system memory is.
const DefaultTemplateCgroup = "/vmpod-templates"

// TemplateCgroup is the cgroup templates are made in (hypervisor.template_cgroup).
func (c Config) TemplateCgroup() string {
	if c.Hypervisor.TemplateCgroup != "" {
		return c.Hypervisor.TemplateCgroup
	}
	return DefaultTemplateCgroup
}

// TemplateDir is where container pods' templates are kept (hypervisor.template_dir).
func (c Config) TemplateDir() string {
	if c.Hypervisor.TemplateDir != "" {
		return c.Hypervisor.TemplateDir
	}
	return filepath.Clean(c.StateDir) + "-templates"
}

// Validate reports every problem, each naming its key.
func (c Config) Validate() error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: "+format, append([]any{key}, args...)...))
	}
	for key, p := range map[string]string{
		"hypervisor.qemu": c.Hypervisor.QEMU, "hypervisor.kernel": c.Hypervisor.Kernel,
		"hypervisor.initrd": c.Hypervisor.Initrd, "hypervisor.virtiofsd": c.Hypervisor.Virtiofsd,
		"hypervisor.qemu_img": c.Hypervisor.QEMUImg, "hypervisor.uefi_code": c.Hypervisor.UEFICode,
		"hypervisor.uefi_vars": c.Hypervisor.UEFIVars, "hypervisor.uefi_secure_code": c.Hypervisor.UEFISecureCode,
		"hypervisor.uefi_secure_vars": c.Hypervisor.UEFISecureVars, "state_dir": c.StateDir,
	} {
		if !filepath.IsAbs(p) {
			bad(key, "%q must be an absolute path", p)
		}
	}
	if d := c.Hypervisor.TemplateDir; d != "" && (!filepath.IsAbs(d) || filepath.Clean(d) != d) {
		bad("hypervisor.template_dir", "%q must be a clean absolute path", d)
	}
	if g := c.Hypervisor.TemplateCgroup; g != "" {
		if err := vmm.CheckCgroupPath(g); err != nil {
			bad("hypervisor.template_cgroup", "%v", err)
		}
	}
	if err := c.Hypervisor.Machine.Check(); err != nil {
		bad("hypervisor.machine", "%v", err)
	}
	if err := c.Hypervisor.Accel.Check(); err != nil {
		bad("hypervisor.accel", "%v", err)
	}
	if c.Hypervisor.SharedFS == machine.NoSharedFS {
		bad("hypervisor.shared_fs", "%q: container pods need a shared filesystem (virtio-fs or 9p)", c.Hypervisor.SharedFS)
	} else if err := c.Hypervisor.SharedFS.Check(); err != nil {
		bad("hypervisor.shared_fs", "%v", err)
	}
	switch c.Isolation.QEMUUser {
	case QEMUUserRoot:
	case QEMUUserPod:
		if err := c.Isolation.QEMUUsers().Validate(); err != nil {
			bad("isolation", "%v", err)
		}
		if c.Hypervisor.SharedFS == machine.NineP {
			bad("hypervisor.shared_fs", "%v: use virtio-fs, or isolation.qemu_user = %q", vmm.ErrNinePNeedsRoot, QEMUUserRoot)
		}
	default:
		bad("isolation.qemu_user", "%q: want %q or %q", c.Isolation.QEMUUser, QEMUUserPod, QEMUUserRoot)
	}
	switch c.Isolation.VirtiofsdUser {
	case QEMUUserRoot:
	case QEMUUserPod:
		owners := c.Isolation.FileOwners()
		if err := owners.Validate(); err != nil {
			bad("isolation.first_owner_id", "%v", err)
		} else if qemu := c.Isolation.QEMUUsers(); qemu != nil && owners.First <= qemu.Last() && qemu.First <= owners.Last() {
			bad("isolation.first_owner_id", "file owners %d..%d overlap QEMU's uids %d..%d", owners.First, owners.Last(), qemu.First, qemu.Last())
		}
	default:
		bad("isolation.virtiofsd_user", "%q: want %q or %q", c.Isolation.VirtiofsdUser, QEMUUserPod, QEMUUserRoot)
	}
	for i, m := range c.Hypervisor.CPUModels {
		if err := machine.CheckNamedCPUModel(m); err != nil {
			bad(fmt.Sprintf("hypervisor.cpu_models[%d]", i), "%v", err)
		}
	}
	for i, p := range c.Devices.VFIOBind {
		if err := devices.CheckVFIOBindPattern(p); err != nil {
			bad(fmt.Sprintf("devices.vfio_bind[%d]", i), "%q: %v", p, err)
		}
	}
	s := c.Sizing
	if s.DefaultVCPUs < 1 || s.MaxVCPUs < s.DefaultVCPUs {
		bad("sizing", "want 1 <= default_vcpus (%d) <= max_vcpus (%d)", s.DefaultVCPUs, s.MaxVCPUs)
	}
	if s.DefaultMemoryMiB < 64 || s.MaxMemoryMiB < s.DefaultMemoryMiB {
		bad("sizing", "want 64 <= default_memory_mib (%d) <= max_memory_mib (%d)", s.DefaultMemoryMiB, s.MaxMemoryMiB)
	}
	if s.GuestOverheadMiB < 0 {
		bad("sizing.guest_overhead_mib", "%d is negative", s.GuestOverheadMiB)
	}
	for key, d := range map[string]Duration{"timeouts.boot": c.Timeouts.Boot, "timeouts.call": c.Timeouts.Call, "timeouts.stop": c.Timeouts.Stop} {
		if d.Duration <= 0 {
			bad(key, "%v: must be positive", d.Duration)
		}
	}
	return errors.Join(errs...)
}
