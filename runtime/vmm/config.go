// Package vmm is the machine layer: one QEMU process and everything of it on the host —
// the state directory, the QMP monitor, the device model (package devices) that renders
// QEMU's command line and places hotplugs, the shared directory and its virtiofsd, the
// virtio-serial ports guest layers talk through, the pod cgroup QEMU runs in, and the
// teardown of all of it. A Machine is up when QMP answers; what runs in the guest is for
// the guest layers on top (runtime/vmpodagent for container pods, runtime/qga for VM
// pods), which reach the guest only through the ports and the monitor this layer owns.
package vmm

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/devices"
	"github.com/vmpod/vmpod/runtime/vmuser"
)

// Defaults for Config's zero values.
const (
	DefaultQEMU        = "/usr/bin/qemu-system-x86_64"
	DefaultVirtiofsd   = "/usr/lib/qemu/virtiofsd"
	DefaultVCPUs       = 1
	DefaultMemoryMiB   = 512
	DefaultUpTimeout   = 30 * time.Second
	DefaultStopTimeout = 10 * time.Second
)

// Config describes one machine. Paths are host paths chosen by the node admin or the
// runtime, never by a pod author.
type Config struct {
	// Name identifies the machine in logs, errors and QEMU's process title.
	Name string
	// StateDir holds the machine's sockets and shared directory. It must not exist; Start
	// creates it and the teardown removes it. Unix socket paths limit it to about 80 bytes.
	StateDir string
	// LogPath receives QEMU's stderr and, with ConsoleLog, the guest's serial console
	// (default StateDir/vm.log, which goes away with StateDir).
	LogPath string

	QEMUPath string // default DefaultQEMU
	// Users, if set, runs QEMU as a uid of its own leased from the pool, with no
	// capabilities, and gives it only descriptors: sockets the runtime listens on or
	// connected, files it opened (docs/design/014). Nil runs QEMU as root.
	Users *vmuser.Pool
	// FileOwners, if set, runs virtiofsd as root of a user namespace whose 64 Ki ids are a
	// range leased from the pool (Stride vmuser.OwnerRange), and shares directories
	// through ID-mapped mounts: virtiofsd is no user of the host's files, and a file it
	// makes for the guest's uid u is u's on disk (docs/design/025). Nil runs it as root.
	FileOwners *vmuser.Pool
	// PodUIDs and PodGIDs, with FileOwners, are the host ids of a pod with a user
	// namespace of its own (its ID mappings' host sides), which its files are owned by
	// already: virtiofsd's namespace maps them onto themselves and only its root onto the
	// leased range, and nothing is mounted ID-mapped (RootfsMap is nil).
	PodUIDs, PodGIDs []IDRange

	Type  machine.Type  // default microvm
	Accel machine.Accel // default auto

	VCPUs int // default DefaultVCPUs
	// MaxVCPUs and MaxMemoryMiB are how far the machine can grow (see OfflineGrowth): on
	// q35 by hotplug (vCPUs, a virtio-mem device), on microvm, which has no hotplug, from
	// vCPUs and RAM present at boot but kept offline (maxcpus=, mem=).
	MaxVCPUs int // default VCPUs
	// Cores and Threads make sockets of Cores*Threads vCPUs (a VM's topology); 0 and 0
	// leave it to QEMU. VCPUs and MaxVCPUs are then whole sockets.
	Cores, Threads int
	MemoryMiB      int // default DefaultMemoryMiB
	MaxMemoryMiB   int // 0 = no growth

	// CPUModel is the guest's CPU model: "" (or machine.CPUHostModel) lets the machine pick
	// for its accelerator, the host's CPU under KVM; machine.CPUHostPassthrough is the
	// host's CPU as it is (KVM only); anything else a QEMU model name.
	CPUModel string
	// HyperV enlightenments for Windows guests. KVM implements them; under TCG the machine
	// boots without them (Start logs it): QEMU would take most and implement none.
	HyperV *machine.HyperV
	// KVMHidden hides the KVM signature from the guest.
	KVMHidden bool
	// NoACPI and NoSMM turn off q35's ACPI and System Management Mode.
	NoACPI, NoSMM bool

	// Boot is how the guest starts: a kernel, or firmware that boots from a disk.
	Boot Boot

	SharedFS      machine.SharedFS // default none
	VirtiofsdPath string           // default DefaultVirtiofsd; with SharedFS virtio-fs

	// Ports are virtio-serial ports, by the name the guest finds them under; the host end
	// of each is a unix socket (PortSocket) QEMU listens on.
	Ports []string
	// Console is where the guest's first serial port goes.
	Console Console

	// NICs are attached at boot.
	NICs []NIC
	// Devices are more cold-plugged devices (disks, ...), in the order the guest sees them.
	Devices []devices.Device
	// HostDevices are host PCI functions passed through (vfio-pci, bound and claimed by
	// the caller: devices.Sysfs.CheckVFIO and Bind), each on a PCIe root port of its own (q35).
	HostDevices []devices.PCIAddress
	// PCIHole64 sizes q35's 64-bit PCI window for their BARs (devices.PCIHole64For; 0:
	// QEMU's default).
	PCIHole64 uint64
	// Files are opened by the caller for QEMU (disk images opened inside their volume):
	// QEMU gets each as fd set Files[i].Set, which a device names as /dev/fdset/<set>.
	Files []FDSetFile

	// Reboot makes a guest reboot reset the machine (a VM pod's OS reboots in place);
	// without it QEMU exits, as a container pod's guest must not come back by itself.
	Reboot bool
	// Paused starts QEMU with its vCPUs stopped (-S); Resume starts them.
	Paused bool
	// Incoming starts QEMU waiting for a migration (-incoming defer) instead of booting:
	// the target of a live migration (AcceptMigration). Its Config must give the same
	// machine and devices as the source's.
	Incoming bool
	// Template makes the machine a template's (docs/design/022): booted once to have its
	// state saved (SaveTemplate), or started from such a state (RestoreFrom) instead of
	// booting. A saved state carries neither a virtiofsd connection nor a tap, so a
	// template machine's virtio-fs device and NICs are hot-plugged once its guest is up
	// rather than cold-plugged, and its RAM is shared so that virtio-fs can be added. A
	// template being saved has no NICs and starts no virtiofsd. q35 with ACPI only; what a
	// saved state would carry for every restore (an SMBIOS UUID, disks, host devices) is
	// refused.
	Template bool
	// With Incoming, a template machine is the target of a live migration of a machine
	// restored from a template (RestoreFrom): it plugs what a restore plugs before the
	// stream arrives, so that its devices are the source's.
	// RestoreFrom, with Template, is what SaveTemplate saved of a template machine whose
	// TemplateKey equals this one's: QEMU restores it and Start returns once the guest
	// runs again with the virtio-fs device and NICs plugged. The files stay the caller's.
	RestoreFrom *SavedTemplate
	// ExitOnPanic ends QEMU with status 1 when the guest reports a kernel panic
	// (pvpanic) instead of leaving it paused.
	ExitOnPanic bool
	// FreePageReporting gives the VM a virtio-balloon whose guest reports the memory it
	// frees, which QEMU returns to the host (nodeconfig sizing.free_page_reporting).
	FreePageReporting bool
	// VNC gives the guest a VGA display served over VNC on a unix socket (VNCSocket).
	VNC bool
	// UUID is the machine's SMBIOS UUID (and serial number): stable per VM, it is how a
	// guest OS and licensing tell one machine from another.
	UUID string

	// Cgroup is the cgroup QEMU and virtiofsd run in (the pod's): a cgroupfs path below
	// the hierarchy's root, or a systemd slice:prefix:name triple. "" leaves them in the
	// shim's cgroup.
	Cgroup string

	// OwnerSockets are sockets the machine's owner serves for it elsewhere (a shim's ttrpc
	// socket). If the owner dies without tearing the machine down, the sweep of its state
	// directory (SweepOrphans, CleanupState) removes each that nobody serves any more.
	OwnerSockets []string

	UpTimeout   time.Duration // until QMP answers; default DefaultUpTimeout
	StopTimeout time.Duration // graceful stop before QEMU is told to quit; default DefaultStopTimeout
}

// Boot is a direct kernel boot (Kernel set) or a firmware boot from the machine's disks.
type Boot struct {
	Kernel string // uncompressed vmlinux with a PVH entry, or a bzImage
	Initrd string
	// KernelParams are the guest layer's kernel command line; the machine adds what the
	// machine type needs (pci=off on microvm, the TSC rate under TCG).
	KernelParams []string
	// Firmware for a boot without Kernel: BIOS (SeaBIOS) or UEFI (OVMF). With Kernel, q35
	// uses qboot, the fastest to reach a kernel.
	Firmware Firmware
}

// Firmware is what the machine starts with when it boots from disk.
type Firmware struct {
	Type FirmwareType
	// UEFI: the OVMF code (read-only) and the machine's own copy of the variable store,
	// made from VarsTemplate in the state directory.
	Code, VarsTemplate string
	// SecureBoot (UEFI): Code is OVMF's SMM build and VarsTemplate has the keys enrolled.
	SecureBoot bool
}

// FirmwareType names a firmware.
type FirmwareType string

const (
	FirmwareBIOS FirmwareType = "bios" // SeaBIOS, QEMU's default
	FirmwareUEFI FirmwareType = "uefi" // OVMF from pflash
)

// Console is the destination of the guest's serial console.
type Console string

const (
	// ConsoleLog appends the console to LogPath (container pods: boot diagnostics).
	ConsoleLog Console = "log"
	// ConsoleSocket serves the console on a unix socket (ConsoleSocket), for a VM pod's
	// log and interactive attach.
	ConsoleSocket Console = "socket"
	// ConsoleNone leaves the guest without a serial console.
	ConsoleNone Console = "none"
)

// NIC is a tap device opened by the caller (in the pod's network namespace) and handed
// to QEMU by file descriptor.
type NIC struct {
	Tap *os.File
	MAC string
	// Model is "" (virtio-net) or an emulated NIC, e1000 or e1000e (q35).
	Model string
}

// FDSetFile is a file the caller opened for QEMU; QEMU finds it in fd set Set.
type FDSetFile struct {
	File *os.File
	Set  int
}

var (
	validName = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$`)
	validUUID = regexp.MustCompile(`^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$`)
)

// maxSocketPath: sun_path is 108 bytes including the NUL; the longest socket the machine
// creates is StateDir + "/virtiofsd.sock".
const maxSocketPath = 107

// withDefaults returns a copy with zero values filled in.
func (c Config) withDefaults() Config {
	if c.LogPath == "" && c.StateDir != "" {
		c.LogPath = filepath.Join(c.StateDir, "vm.log")
	}
	if c.QEMUPath == "" {
		c.QEMUPath = DefaultQEMU
	}
	if c.VirtiofsdPath == "" {
		c.VirtiofsdPath = DefaultVirtiofsd
	}
	if c.Type == "" {
		c.Type = machine.MicroVM
	}
	if c.Accel == "" {
		c.Accel = machine.AccelAuto
	}
	if c.VCPUs == 0 {
		c.VCPUs = DefaultVCPUs
	}
	if c.MaxVCPUs == 0 {
		c.MaxVCPUs = c.VCPUs
	}
	if c.MemoryMiB == 0 {
		c.MemoryMiB = DefaultMemoryMiB
	}
	if c.SharedFS == "" {
		c.SharedFS = machine.NoSharedFS
	}
	if c.Console == "" {
		c.Console = ConsoleLog
	}
	if c.UpTimeout == 0 {
		c.UpTimeout = DefaultUpTimeout
	}
	if c.StopTimeout == 0 {
		c.StopTimeout = DefaultStopTimeout
	}
	return c
}

// ErrNinePNeedsRoot is why 9p and an unprivileged QEMU (Config.Users) do not go together:
// QEMU is 9p's file server, and would have to read and chown every file of the pod's
// rootfs. virtiofsd serves them from a process of its own instead.
var ErrNinePNeedsRoot = errors.New("9p makes QEMU the file server of the pod's files, which needs root")

// Validate reports every problem with c, each naming its field.
func (c Config) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: "+format, append([]any{field}, args...)...))
	}
	if !validName.MatchString(c.Name) {
		bad("name", "%q must be 1-128 of [a-zA-Z0-9_.-], starting with a letter or digit", c.Name)
	}
	for _, sock := range c.OwnerSockets {
		if !filepath.IsAbs(sock) || filepath.Clean(sock) != sock {
			bad("owner_sockets", "%q must be a clean absolute path", sock)
		}
	}
	switch {
	case c.StateDir == "" || !filepath.IsAbs(c.StateDir):
		bad("state_dir", "%q must be an absolute path", c.StateDir)
	case len(c.StateDir)+len("/virtiofsd.sock") > maxSocketPath:
		bad("state_dir", "%q is too long for unix socket paths (max %d bytes)", c.StateDir, maxSocketPath-len("/virtiofsd.sock"))
	default:
		if _, err := os.Lstat(c.StateDir); err == nil {
			bad("state_dir", "%q already exists (a VM of that name running, or not cleaned up)", c.StateDir)
		}
	}
	if c.LogPath != "" && !filepath.IsAbs(c.LogPath) {
		bad("log_path", "%q must be an absolute path", c.LogPath)
	}
	if err := checkFile(c.QEMUPath); err != nil {
		bad("qemu", "%v", err)
	}
	c.Boot.validate(c.Type, bad)
	if c.SharedFS == machine.VirtioFS {
		if err := checkFile(c.VirtiofsdPath); err != nil {
			bad("virtiofsd", "%v", err)
		}
	}
	if (len(c.PodUIDs) > 0 || len(c.PodGIDs) > 0) && c.FileOwners == nil {
		bad("pod_uids", "a pod's own ids are mapped for a virtiofsd in a user namespace: set file_owners")
	}
	if err := checkIDRanges(c.PodUIDs, len(c.PodUIDs) > 0 || len(c.PodGIDs) > 0); err != nil {
		bad("pod_uids", "%v", err)
	}
	if err := checkIDRanges(c.PodGIDs, len(c.PodUIDs) > 0 || len(c.PodGIDs) > 0); err != nil {
		bad("pod_gids", "%v", err)
	}
	if err := c.Type.Check(); err != nil {
		bad("machine", "%v", err)
	}
	if err := c.Accel.Check(); err != nil {
		bad("accel", "%v", err)
	}
	if c.VCPUs < 1 || c.VCPUs > 255 {
		bad("vcpus", "%d: want 1-255", c.VCPUs)
	}
	if c.MaxVCPUs < c.VCPUs || c.MaxVCPUs > 255 {
		bad("max_vcpus", "%d: want vcpus (%d) to 255", c.MaxVCPUs, c.VCPUs)
	}
	if c.Cores != 0 || c.Threads != 0 {
		if per := c.Cores * c.Threads; c.Cores < 1 || c.Threads < 1 || c.VCPUs%per != 0 || c.MaxVCPUs%per != 0 {
			bad("cores", "%d cores of %d threads: want both at least 1, vcpus (%d) and max_vcpus (%d) whole sockets", c.Cores, c.Threads, c.VCPUs, c.MaxVCPUs)
		}
	}
	if c.MemoryMiB < 64 {
		bad("memory_mib", "%d: want at least 64", c.MemoryMiB)
	}
	if c.MaxMemoryMiB != 0 && c.MaxMemoryMiB < c.MemoryMiB {
		bad("max_memory_mib", "%d is below memory_mib %d", c.MaxMemoryMiB, c.MemoryMiB)
	}
	if err := c.SharedFS.Check(); err != nil {
		bad("shared_fs", "%v", err)
	}
	switch c.Console {
	case ConsoleLog, ConsoleSocket, ConsoleNone:
	default:
		bad("console", "%q: want log, socket or none", c.Console)
	}
	for i, nic := range c.NICs {
		if nic.Tap == nil {
			bad(fmt.Sprintf("nics[%d].tap", i), "missing")
		}
	}
	if c.UUID != "" && !validUUID.MatchString(c.UUID) {
		bad("uuid", "%q is not a UUID", c.UUID)
	}
	if err := machine.CheckCPUModel(c.CPUModel); err != nil {
		bad("cpu_model", "%v", err)
	}
	if c.HyperV != nil {
		if err := c.HyperV.Check(); err != nil {
			bad("hyperv", "%v", err)
		}
	}
	if (c.NoACPI || c.NoSMM) && c.Type != machine.Q35 {
		bad("no_acpi/no_smm", "only machine q35 has ACPI and SMM switches")
	}
	if c.NoSMM && c.Boot.Firmware.SecureBoot {
		bad("no_smm", "secure boot needs SMM")
	}
	if c.VNC && c.Type != machine.Q35 {
		bad("vnc", "a display needs machine q35")
	}
	sets := map[int]bool{}
	for i, f := range c.Files {
		if f.File == nil {
			bad(fmt.Sprintf("files[%d].file", i), "missing")
		}
		if sets[f.Set] {
			bad(fmt.Sprintf("files[%d].set", i), "fd set %d is used twice", f.Set)
		}
		if f.Set < 0 || f.Set >= machineFDSets {
			bad(fmt.Sprintf("files[%d].set", i), "fd set %d is outside 0..%d (the machine's own sets follow)", f.Set, machineFDSets-1)
		}
		sets[f.Set] = true
	}
	if c.Users != nil {
		if err := c.Users.Validate(); err != nil {
			bad("users", "%v", err)
		}
		if c.SharedFS == machine.NineP {
			bad("shared_fs", "%s: use virtio-fs, or run QEMU as root (no users)", ErrNinePNeedsRoot)
		}
	}
	if c.Template {
		c.validateTemplate(bad)
		if c.saving() && len(c.NICs) > 0 {
			bad("nics", "a template being saved has none: each restore plugs its own")
		}
	} else if c.RestoreFrom != nil {
		bad("restore_from", "a saved state is restored only into a template machine (template)")
	}
	for field, d := range map[string]time.Duration{"up_timeout": c.UpTimeout, "stop_timeout": c.StopTimeout} {
		if d < 0 {
			bad(field, "%v is negative", d)
		}
	}
	return errors.Join(errs...)
}

// CheckTemplate reports why c cannot be a template machine (Template) — be restored from
// a template or be saved as one, NICs aside — or nil.
func (c Config) CheckTemplate() error {
	c = c.withDefaults()
	c.Template = true
	var errs []error
	c.validateTemplate(func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: "+format, append([]any{field}, args...)...))
	})
	return errors.Join(errs...)
}

// validateTemplate reports what a template machine cannot have.
func (c Config) validateTemplate(bad func(field, format string, args ...any)) {
	if c.Type != machine.Q35 || c.NoACPI {
		bad("template", "needs machine q35 with ACPI, through which the devices a saved state lacks are hot-plugged")
	}
	if c.Boot.Kernel == "" {
		bad("template", "needs a direct kernel boot")
	}
	if c.SharedFS == machine.NineP {
		bad("template", "shared_fs 9p cannot be hot-plugged; use virtio-fs")
	}
	if c.Incoming && c.RestoreFrom != nil {
		bad("template", "a template machine restores a file (restore_from) or receives a live migration of a restored one (incoming), not both")
	}
	if c.Paused {
		bad("template", "a restored guest must run: its devices are plugged and its agent set up at once")
	}
	if c.UUID != "" {
		bad("template", "an SMBIOS UUID would be the same in every restore")
	}
	if len(c.Devices) > 0 || len(c.HostDevices) > 0 || len(c.Files) > 0 {
		bad("template", "disks and host devices are not part of a template")
	}
	if r := c.RestoreFrom; r != nil && (r.State == nil || r.RAM == nil) {
		bad("restore_from", "a saved template is a state file and a RAM file")
	}
	if len(c.NICs) > templateNICs {
		bad("nics", "%d: a restored template machine plugs at most %d", len(c.NICs), templateNICs)
	}
	if c.VNC || c.Reboot {
		bad("template", "VM pods' display and in-place reboot are not part of a template")
	}
}

// saving is a template machine being booted to have its state saved.
func (c Config) saving() bool { return c.Template && c.RestoreFrom == nil && !c.Incoming }

// runsVirtiofsd says whether the machine gets a virtiofsd (a template being saved has no
// shared directory yet).
func (c Config) runsVirtiofsd() bool { return c.SharedFS == machine.VirtioFS && !c.saving() }

// templateFormat changes whenever what a saved state depends on changes in a way
// TemplateKey cannot see (the rendering of the machine, the restore's steps).
const templateFormat = "vmpod-template-1"

// TemplateKey identifies what a template machine's saved state depends on: QEMU's
// command line as Start would render it (every RAM block and device a restore must match,
// the kernel command line the guest booted with), with the name and the state directory's
// paths left out, the identity of the files it reads (QEMU, kernel, initramfs), and the
// host's kernel release and CPU flags (a guest keeps using the CPU features it found).
// Machines with equal keys can restore each other's saved state; names, state
// directories, taps and the shared directory's contents differ freely.
func (c Config) TemplateKey() (string, error) {
	c = c.withDefaults()
	if !c.Template {
		return "", errors.New("template key: not a template machine")
	}
	plan, err := planFor(c)
	if err != nil {
		return "", fmt.Errorf("template key: %w", err)
	}
	hw, err := plan.hardware(nil, nil)
	if err != nil {
		return "", fmt.Errorf("template key: %w", err)
	}
	args, _ := hw.Render()
	h := sha256.New()
	field := func(s string) { fmt.Fprintf(h, "%d:%s\n", len(s), s) } // no two lists hash alike
	field(templateFormat)
	for i, a := range args {
		if i > 0 && args[i-1] == "-name" {
			continue
		}
		a = strings.ReplaceAll(a, c.LogPath, "$LOG") // first: it may be in the state dir
		field(strings.ReplaceAll(a, c.StateDir, "$STATE"))
	}
	var uts unix.Utsname
	if err := unix.Uname(&uts); err != nil {
		return "", fmt.Errorf("template key: %w", err)
	}
	field(unix.ByteSliceToString(uts.Release[:]))
	field(strings.Join(slices.Sorted(maps.Keys(plan.host.flags)), " "))
	for _, f := range []string{c.QEMUPath, c.Boot.Kernel, c.Boot.Initrd} {
		id, err := fileIdentity(f)
		if err != nil {
			return "", fmt.Errorf("template key: %w", err)
		}
		field(f + " " + id)
	}
	return hex.EncodeToString(h.Sum(nil))[:32], nil
}

// fileIdentity is a file's device, inode, size and modification time: a rebuilt kernel or
// an upgraded QEMU gives another.
func fileIdentity(path string) (string, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return "", fmt.Errorf("%s: %w", path, err)
	}
	return fmt.Sprintf("%d:%d:%d:%d.%d", st.Dev, st.Ino, st.Size, st.Mtim.Sec, st.Mtim.Nsec), nil
}

func (b Boot) validate(t machine.Type, bad func(field, format string, args ...any)) {
	if b.Kernel != "" {
		for field, path := range map[string]string{"kernel": b.Kernel, "initrd": b.Initrd} {
			if err := checkFile(path); err != nil {
				bad(field, "%v", err)
			}
		}
		if b.Firmware.Type != "" {
			bad("firmware", "%s: a direct kernel boot uses no firmware of its own", b.Firmware.Type)
		}
		return
	}
	if t == machine.MicroVM {
		bad("firmware", "machine microvm boots only a kernel (its firmware cannot boot from a disk): use machine q35")
	}
	switch b.Firmware.Type {
	case FirmwareBIOS:
		if b.Firmware.SecureBoot {
			bad("firmware.secure_boot", "needs UEFI")
		}
	case FirmwareUEFI:
		for field, path := range map[string]string{"firmware.code": b.Firmware.Code, "firmware.vars": b.Firmware.VarsTemplate} {
			if err := checkFile(path); err != nil {
				bad(field, "%v", err)
			}
		}
	default:
		bad("firmware", "%q: want bios or uefi (or a kernel)", b.Firmware.Type)
	}
}

func checkFile(path string) error {
	if path == "" {
		return errors.New("not set")
	}
	if !filepath.IsAbs(path) {
		return fmt.Errorf("%q must be an absolute path", path)
	}
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	if fi.IsDir() {
		return fmt.Errorf("%q is a directory", path)
	}
	return nil
}

// IDRange is Count host ids from First.
type IDRange struct{ First, Count uint32 }

// maxIDRanges leaves one of the kernel's 340 lines of an ID map to virtiofsd's root.
const maxIDRanges = 339

// checkIDRanges refuses ranges a user namespace could not map onto themselves beside its
// root: id 0 (the root is the leased range's), overlaps, too many lines. want says the
// list must not be empty (its partner is not).
func checkIDRanges(rs []IDRange, want bool) error {
	switch {
	case want && len(rs) == 0:
		return errors.New("empty, while the other list is not: a pod's own uids and gids come together")
	case len(rs) > maxIDRanges:
		return fmt.Errorf("%d ranges: at most %d", len(rs), maxIDRanges)
	}
	for i, r := range rs {
		last := uint64(r.First) + uint64(r.Count) - 1
		switch {
		case r.Count == 0:
			return fmt.Errorf("[%d]: no ids", i)
		case r.First == 0:
			return fmt.Errorf("[%d]: includes id 0, host root's", i)
		case last > 1<<32-2:
			return fmt.Errorf("[%d]: %d ids from %d run past the last valid id", i, r.Count, r.First)
		}
		for j, o := range rs[:i] {
			if uint64(r.First) <= uint64(o.First)+uint64(o.Count)-1 && uint64(o.First) <= last {
				return fmt.Errorf("[%d] overlaps [%d]", i, j)
			}
		}
	}
	return nil
}
