// Package runtime boots a vmpod guest with QEMU and drives it through its agent: VM life
// (start, stop, kill, death), the host⇄guest channel, the shared filesystem, and a Go
// method for every agent operation.
package runtime

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"time"
)

// Machine is the QEMU machine type. microvm boots fastest; q35 is needed for PCI hotplug
// (CPU, memory, disks, NICs) and VFIO.
type Machine string

const (
	MachineMicroVM Machine = "microvm"
	MachineQ35     Machine = "q35"
)

// Accel selects the accelerator. Auto is KVM where /dev/kvm opens and the CPU has
// vmx/svm, else TCG (with a warning in the log).
type Accel string

const (
	AccelAuto Accel = "auto"
	AccelKVM  Accel = "kvm"
	AccelTCG  Accel = "tcg"
)

// SharedFS is how the host's shared directory reaches the guest (docs/design/003-shared-fs.md).
type SharedFS string

const (
	SharedFSVirtioFS SharedFS = "virtio-fs"
	SharedFS9P       SharedFS = "9p"
	SharedFSNone     SharedFS = "none"
)

// Defaults for Config's zero values.
const (
	DefaultQEMU        = "/usr/bin/qemu-system-x86_64"
	DefaultVirtiofsd   = "/usr/lib/qemu/virtiofsd"
	DefaultQboot       = "/usr/share/qemu/qboot.rom"
	DefaultVCPUs       = 1
	DefaultMemoryMiB   = 512
	DefaultBootTimeout = 30 * time.Second
	DefaultCallTimeout = 30 * time.Second
	DefaultStopTimeout = 10 * time.Second
)

// Config describes one VM. Paths are host paths chosen by the node admin or the caller,
// never by a pod author.
type Config struct {
	// Name identifies the VM in logs, errors and QEMU's process title.
	Name string
	// StateDir holds the VM's sockets and shared directory. It must not exist; Start
	// creates it and Stop removes it. Unix socket paths limit it to about 80 bytes.
	StateDir string
	// LogPath receives QEMU's stderr and the guest console (default StateDir/vm.log,
	// which goes away with StateDir).
	LogPath string

	QEMUPath      string // default DefaultQEMU
	VirtiofsdPath string // default DefaultVirtiofsd
	Kernel        string // uncompressed vmlinux with a PVH entry
	Initrd        string
	// KernelParams are appended to the guest kernel command line (node admin's choice).
	KernelParams []string

	Machine Machine // default microvm
	Accel   Accel   // default auto

	VCPUs        int // default DefaultVCPUs
	MaxVCPUs     int // CPU hotplug headroom (q35 only); default VCPUs
	MemoryMiB    int // default DefaultMemoryMiB
	MaxMemoryMiB int // virtio-mem headroom (q35 only); 0 = none

	SharedFS SharedFS // default virtio-fs

	// NICs are attached at boot.
	NICs []NIC

	BootTimeout time.Duration // until the agent answers; default DefaultBootTimeout
	CallTimeout time.Duration // per agent call (long polls excepted); default DefaultCallTimeout
	StopTimeout time.Duration // graceful stop before QEMU is killed; default DefaultStopTimeout

	// Debug turns on the agent's debug log (on the guest console).
	Debug bool
}

// NIC is a tap device opened by the caller (in the pod's network namespace) and handed
// to QEMU by file descriptor.
type NIC struct {
	Tap *os.File
	MAC string
}

var validName = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$`)

// maxSocketPath: sun_path is 108 bytes including the NUL; the longest socket the VM
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
	if c.Machine == "" {
		c.Machine = MachineMicroVM
	}
	if c.Accel == "" {
		c.Accel = AccelAuto
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
		c.SharedFS = SharedFSVirtioFS
	}
	if c.BootTimeout == 0 {
		c.BootTimeout = DefaultBootTimeout
	}
	if c.CallTimeout == 0 {
		c.CallTimeout = DefaultCallTimeout
	}
	if c.StopTimeout == 0 {
		c.StopTimeout = DefaultStopTimeout
	}
	return c
}

// Validate reports every problem with c, each naming its field.
func (c Config) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: "+format, append([]any{field}, args...)...))
	}
	if !validName.MatchString(c.Name) {
		bad("name", "%q must be 1-128 of [a-zA-Z0-9_.-], starting with a letter or digit", c.Name)
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
	for field, path := range map[string]string{"qemu": c.QEMUPath, "kernel": c.Kernel, "initrd": c.Initrd} {
		if err := checkFile(path); err != nil {
			bad(field, "%v", err)
		}
	}
	if c.SharedFS == SharedFSVirtioFS {
		if err := checkFile(c.VirtiofsdPath); err != nil {
			bad("virtiofsd", "%v", err)
		}
	}
	switch c.Machine {
	case MachineMicroVM:
		if c.MaxVCPUs > c.VCPUs {
			bad("max_vcpus", "CPU hotplug needs machine q35 (microvm has no hotplug)")
		}
		if c.MaxMemoryMiB > 0 {
			bad("max_memory_mib", "memory hotplug needs machine q35 (microvm has no hotplug)")
		}
	case MachineQ35:
	default:
		bad("machine", "%q: want microvm or q35", c.Machine)
	}
	switch c.Accel {
	case AccelAuto, AccelKVM, AccelTCG:
	default:
		bad("accel", "%q: want auto, kvm or tcg", c.Accel)
	}
	if c.VCPUs < 1 || c.VCPUs > 255 {
		bad("vcpus", "%d: want 1-255", c.VCPUs)
	}
	if c.MaxVCPUs < c.VCPUs || c.MaxVCPUs > 255 {
		bad("max_vcpus", "%d: want vcpus (%d) to 255", c.MaxVCPUs, c.VCPUs)
	}
	if c.MemoryMiB < 64 {
		bad("memory_mib", "%d: want at least 64", c.MemoryMiB)
	}
	if c.MaxMemoryMiB != 0 && c.MaxMemoryMiB < c.MemoryMiB {
		bad("max_memory_mib", "%d is below memory_mib %d", c.MaxMemoryMiB, c.MemoryMiB)
	}
	switch c.SharedFS {
	case SharedFSVirtioFS, SharedFS9P, SharedFSNone:
	default:
		bad("shared_fs", "%q: want virtio-fs, 9p or none", c.SharedFS)
	}
	for i, nic := range c.NICs {
		if nic.Tap == nil {
			bad(fmt.Sprintf("nics[%d].tap", i), "missing")
		}
	}
	for field, d := range map[string]time.Duration{"boot_timeout": c.BootTimeout, "call_timeout": c.CallTimeout, "stop_timeout": c.StopTimeout} {
		if d < 0 {
			bad(field, "%v is negative", d)
		}
	}
	return errors.Join(errs...)
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
