package vmspec

import (
	"errors"
	"fmt"
	"net"
	"regexp"
	"strings"

	"github.com/vmpod/vmpod/api/machine"
)

// Bounds of a valid spec. They keep a spec within what QEMU and the schema can express;
// the node admin's limits (the shim's config) are usually tighter and are applied by the shim.
const (
	MaxVCPUs        = 512
	MinMemoryMiB    = 16
	MaxMemoryMiB    = 16 << 20 // 16 TiB
	MaxDisks        = 64
	MaxInterfaces   = 16
	MaxHostDevices  = 16 // each of gpus and hostDevices
	MaxCredentials  = 16
	MaxEmptyDiskMiB = 64 << 20 // 64 TiB
	MaxKeyUsers     = 16       // per access credential
	maxDNSLabelSize = 63
)

// FieldError is one problem with one field of a spec, named by its JSON path
// (e.g. "disks[1].volume").
type FieldError struct {
	Path   string
	Detail string
}

func (e *FieldError) Error() string {
	if e.Path == "" { // the annotation as a whole
		return Annotation + ": " + e.Detail
	}
	return e.Path + ": " + e.Detail
}

var (
	dnsLabel = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)
	// labelValue is a Kubernetes label value's form (a UID has it)
	labelValue = regexp.MustCompile(`^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$`)
	uuidForm   = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)
	// Linux interface names: at most 15 bytes, no '/' or whitespace; kept to a safe subset.
	ifName = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,14}$`)
	// An extended resource name: a DNS-subdomain prefix and a name, as in nvidia.com/gpu.
	resourceName = regexp.MustCompile(`^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$`)
)

// IsUUID says whether s has the form UUID takes.
func IsUUID(s string) bool { return uuidForm.MatchString(s) }

// Validate checks the spec as Parse returns it (defaults filled in) and reports every
// problem, each as a *FieldError joined with errors.Join.
func (vm *VM) Validate() error {
	v := &validator{}
	if vm.Version != Version {
		v.add("version", "must be %q, got %q", Version, vm.Version)
	}
	vm.validateCPUAndMemory(v)
	switch vm.Machine {
	case machine.Q35:
	case machine.MicroVM:
		// measured: neither microvm's qboot nor SeaBIOS boots a virtio-mmio disk
		v.add("machine", "microvm boots only a kernel, not a disk through firmware: use q35")
	default:
		v.add("machine", "must be q35, got %q", vm.Machine)
	}
	switch vm.Firmware.Type {
	case FirmwareBIOS:
		if vm.Firmware.SecureBoot {
			v.add("firmware.secureBoot", "needs firmware.type uefi")
		}
	case FirmwareUEFI:
	default:
		v.add("firmware.type", "must be bios or uefi, got %q", vm.Firmware.Type)
	}
	vm.validateFeatures(v)
	volumes := vm.validateDisks(v)
	vm.validateInterfaces(v)
	vm.validateCloudInit(v, volumes)
	vm.validateAccessCredentials(v, volumes)
	vm.validateHostDevices(v)
	if vm.UUID != "" && !IsUUID(vm.UUID) {
		v.add("uuid", "must be a lowercase UUID (8-4-4-4-12 hex digits), got %q", vm.UUID)
	}
	if vm.Migration != nil {
		switch vm.Migration.Role {
		case RoleTarget:
		default:
			v.add("migration.role", "must be target (a source is any running VM pod), got %q", vm.Migration.Role)
		}
	}
	return errors.Join(v.errs...)
}

func (vm *VM) validateCPUAndMemory(v *validator) {
	for _, f := range []struct {
		name string
		n    int
	}{{"sockets", vm.CPU.Sockets}, {"cores", vm.CPU.Cores}, {"threads", vm.CPU.Threads}} {
		if f.n < 1 || f.n > MaxVCPUs {
			v.add("cpu."+f.name, "must be between 1 and %d, got %d", MaxVCPUs, f.n)
		}
	}
	// multiply in int64: three in-range factors cannot overflow it
	if n := int64(vm.CPU.Sockets) * int64(vm.CPU.Cores) * int64(vm.CPU.Threads); n > MaxVCPUs {
		v.add("cpu", "sockets*cores*threads is %d vCPUs, more than %d", n, MaxVCPUs)
	}
	if err := machine.CheckCPUModel(vm.CPU.Model); err != nil {
		v.add("cpu.model", "%v", err)
	}
	if vm.MemoryMiB < MinMemoryMiB || vm.MemoryMiB > MaxMemoryMiB {
		v.add("memoryMiB", "must be between %d and %d, got %d", MinMemoryMiB, MaxMemoryMiB, vm.MemoryMiB)
	}
	// growth room: hot-plugged sockets and virtio-mem memory (q35 is the only machine a
	// VM pod boots, checked above)
	if n := vm.CPU.MaxSockets; n != 0 {
		if n < vm.CPU.Sockets || n > MaxVCPUs {
			v.add("cpu.maxSockets", "must be between sockets (%d) and %d, got %d", vm.CPU.Sockets, MaxVCPUs, n)
		} else if all := int64(n) * int64(vm.CPU.Cores) * int64(vm.CPU.Threads); all > MaxVCPUs {
			v.add("cpu.maxSockets", "maxSockets*cores*threads is %d vCPUs, more than %d", all, MaxVCPUs)
		}
	}
	if m := vm.MaxMemoryMiB; m != 0 {
		switch {
		case m < vm.MemoryMiB || m > MaxMemoryMiB:
			v.add("maxMemoryMiB", "must be between memoryMiB (%d) and %d, got %d", vm.MemoryMiB, MaxMemoryMiB, m)
		case (m-vm.MemoryMiB)%GrowthBlockMiB != 0:
			v.add("maxMemoryMiB", "the room above memoryMiB (%d MiB) must be whole %d MiB blocks", m-vm.MemoryMiB, GrowthBlockMiB)
		}
	}
}

// GrowthBlockMiB is the unit memory is hot-plugged in: virtio-mem's block on x86-64.
const GrowthBlockMiB = 2

func (vm *VM) validateFeatures(v *validator) {
	f := vm.Features
	if f.ACPI == nil || f.SMM == nil {
		v.add("features", "acpi and smm must be set (Default sets them)")
		return
	}
	if !*f.SMM && vm.Firmware.SecureBoot {
		v.add("features.smm", "secure boot needs SMM")
	}
	if f.HyperV != nil {
		if err := f.HyperV.Check(); err != nil {
			v.add("features.hyperv", "%s", strings.ReplaceAll(err.Error(), "\n", "; "))
		}
	}
}

// validateDisks returns the set of volumes the disks use.
func (vm *VM) validateDisks(v *validator) map[string]bool {
	if len(vm.Disks) > MaxDisks {
		v.add("disks", "has %d disks, at most %d are allowed", len(vm.Disks), MaxDisks)
	}
	names, volumes, boot := map[string]int{}, map[string]bool{}, map[int]int{}
	for i, d := range vm.Disks {
		at := fmt.Sprintf("disks[%d]", i)
		v.name(at+".name", d.Name, names, i, "disks")
		if d.Source != SourceEmpty && v.label(at+".volume", d.Volume) {
			if volumes[d.Volume] {
				v.add(at+".volume", "volume %q is already used by another disk", d.Volume)
			}
			volumes[d.Volume] = true
		}
		switch d.Source {
		case SourceImage, SourceFile, SourceBlock:
			if d.SizeMiB != 0 {
				v.add(at+".sizeMiB", "only an empty disk has a size (a %s disk's is its volume's)", d.Source)
			}
		case SourceEmpty:
			if d.Volume != "" {
				v.add(at+".volume", "an empty disk has no volume, got %q", d.Volume)
			}
			if d.SizeMiB < 1 || d.SizeMiB > MaxEmptyDiskMiB {
				v.add(at+".sizeMiB", "must be between 1 and %d, got %d", MaxEmptyDiskMiB, d.SizeMiB)
			}
			if d.Device != DeviceDisk {
				v.add(at+".device", "an empty disk is a disk, not a %s", d.Device)
			}
			if d.ReadOnly {
				v.add(at+".readOnly", "an empty disk is writable")
			}
		default:
			v.add(at+".source", "must be image, file, block or empty, got %q", d.Source)
		}
		v.bus(at+".bus", d.Bus)
		switch d.Device {
		case DeviceDisk:
		case DeviceCDROM:
			if d.Bus == BusVirtio {
				v.add(at+".bus", "a cdrom needs bus sata or scsi (QEMU has no virtio cdrom)")
			}
		default:
			v.add(at+".device", "must be disk or cdrom, got %q", d.Device)
		}
		if d.BootOrder < 0 {
			v.add(at+".bootOrder", "must not be negative, got %d", d.BootOrder)
		} else if j, dup := boot[d.BootOrder]; dup && d.BootOrder > 0 {
			v.add(at+".bootOrder", "%d is also the boot order of disks[%d]", d.BootOrder, j)
		} else {
			boot[d.BootOrder] = i
		}
	}
	return volumes
}

func (vm *VM) validateInterfaces(v *validator) {
	if len(vm.Interfaces) > MaxInterfaces {
		v.add("interfaces", "has %d interfaces, at most %d are allowed", len(vm.Interfaces), MaxInterfaces)
	}
	names, pod := map[string]int{}, map[string]int{}
	masquerade := -1
	for i, n := range vm.Interfaces {
		at := fmt.Sprintf("interfaces[%d]", i)
		v.name(at+".name", n.Name, names, i, "interfaces")
		if !ifName.MatchString(n.PodInterface) {
			v.add(at+".podInterface", "must be a network interface name (1-15 of a-z A-Z 0-9 _ . -), got %q", n.PodInterface)
		} else if j, dup := pod[n.PodInterface]; dup {
			v.add(at+".podInterface", "%q is also used by interfaces[%d]", n.PodInterface, j)
		} else {
			pod[n.PodInterface] = i
		}
		switch n.Model {
		case ModelVirtio:
		case ModelE1000, ModelE1000E:
		default:
			v.add(at+".model", "must be virtio, e1000 or e1000e, got %q", n.Model)
		}
		switch n.Binding {
		case BindingBridge:
			if len(n.Ports) > 0 {
				v.add(at+".ports", "only the masquerade binding forwards ports (bridge gives the guest the pod's address)")
			}
		case BindingMasquerade:
			if masquerade >= 0 {
				v.add(at+".binding", "masquerade is also the binding of interfaces[%d]: one masquerade interface per VM", masquerade)
			}
			masquerade = i
		default:
			v.add(at+".binding", "must be bridge or masquerade, got %q", n.Binding)
		}
		seen := map[string]int{}
		for j, p := range n.Ports {
			pat := fmt.Sprintf("%s.ports[%d]", at, j)
			if p.Port < 1 || p.Port > 65535 {
				v.add(pat+".port", "must be between 1 and 65535, got %d", p.Port)
			}
			if p.Protocol != ProtocolTCP && p.Protocol != ProtocolUDP {
				v.add(pat+".protocol", "must be TCP or UDP, got %q", p.Protocol)
			}
			if p.Protocol == ProtocolTCP && p.Port == MigrationPort {
				v.add(pat+".port", "TCP %d is the port a migration target receives its guest on", MigrationPort)
			}
			key := fmt.Sprintf("%s/%d", p.Protocol, p.Port)
			if k, dup := seen[key]; dup {
				v.add(pat, "%s is also ports[%d]", key, k)
			}
			seen[key] = j
		}
		if n.MACAddress != "" {
			mac, err := net.ParseMAC(n.MACAddress)
			switch {
			case err != nil || len(mac) != 6:
				v.add(at+".macAddress", "must be a 6-byte MAC address like 02:00:00:00:00:01, got %q", n.MACAddress)
			case mac[0]&1 == 1:
				v.add(at+".macAddress", "%s is a multicast address", n.MACAddress)
			}
		}
	}
}

func (vm *VM) validateCloudInit(v *validator, diskVolumes map[string]bool) {
	ci := vm.CloudInit
	if ci == nil {
		return
	}
	inline := ci.UserData != "" || ci.NetworkData != ""
	switch {
	case inline && ci.SecretVolume != "":
		v.add("cloudInit", "has both inline data and secretVolume; use one")
	case !inline && ci.SecretVolume == "":
		v.add("cloudInit", "needs userData, networkData or secretVolume")
	case ci.SecretVolume != "":
		if v.label("cloudInit.secretVolume", ci.SecretVolume) && diskVolumes[ci.SecretVolume] {
			v.add("cloudInit.secretVolume", "volume %q is also a disk", ci.SecretVolume)
		}
	}
	v.bus("cloudInit.bus", ci.Bus)
}

// validateAccessCredentials: each credential's Secret volume is its own (no disk, cloud-init
// data or other credential reads it) and its propagation can happen.
func (vm *VM) validateAccessCredentials(v *validator, diskVolumes map[string]bool) {
	if len(vm.AccessCredentials) > MaxCredentials {
		v.add("accessCredentials", "has %d credentials, at most %d are allowed", len(vm.AccessCredentials), MaxCredentials)
	}
	seen := map[string]int{}
	for i, c := range vm.AccessCredentials {
		at := fmt.Sprintf("accessCredentials[%d]", i)
		v.name(at+".secretVolume", c.SecretVolume, seen, i, "accessCredentials")
		switch {
		case diskVolumes[c.SecretVolume]:
			v.add(at+".secretVolume", "volume %q is also a disk", c.SecretVolume)
		case vm.CloudInit != nil && vm.CloudInit.SecretVolume == c.SecretVolume && c.SecretVolume != "":
			v.add(at+".secretVolume", "volume %q is also cloudInit.secretVolume", c.SecretVolume)
		}
		switch c.Propagation {
		case PropagateNoCloud:
			if vm.CloudInit == nil {
				v.add(at+".propagation", "noCloud puts the keys in cloud-init's meta-data: the VM needs cloudInit")
			}
			if len(c.Users) > 0 {
				v.add(at+".users", "only propagation guestAgent names users (noCloud gives the keys to cloud-init's default user)")
			}
		case PropagateGuestAgent:
			if len(c.Users) == 0 {
				v.add(at+".users", "propagation guestAgent needs at least one user")
			}
			if len(c.Users) > MaxKeyUsers {
				v.add(at+".users", "has %d users, at most %d are allowed", len(c.Users), MaxKeyUsers)
			}
			for j, u := range c.Users {
				if !userName.MatchString(u) {
					v.add(fmt.Sprintf("%s.users[%d]", at, j), "must be a user name (letters, digits, _ . -, not starting with - or ., at most 32), got %q", u)
				}
			}
		default:
			v.add(at+".propagation", "must be noCloud or guestAgent, got %q", c.Propagation)
		}
	}
}

// userName is a portable guest account name: POSIX's portable set (upper case for
// Windows guests, whose agent takes the keys too).
var userName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_.-]{0,31}$`)

func (vm *VM) validateHostDevices(v *validator) {
	names := map[string]int{}
	for _, list := range []struct {
		field   string
		devices []HostDevice
	}{{"gpus", vm.GPUs}, {"hostDevices", vm.HostDevices}} {
		if len(list.devices) > MaxHostDevices {
			v.add(list.field, "has %d devices, at most %d are allowed", len(list.devices), MaxHostDevices)
		}
		for i, d := range list.devices {
			at := fmt.Sprintf("%s[%d]", list.field, i)
			v.name(at+".name", d.Name, names, i, "gpus and hostDevices")
			domain, _, _ := strings.Cut(d.ResourceName, "/")
			switch {
			case !resourceName.MatchString(d.ResourceName) || len(d.ResourceName) > 253:
				v.add(at+".resourceName", "must be an extended resource name like vendor.com/device, got %q", d.ResourceName)
			case domain == "kubernetes.io" || strings.HasSuffix(domain, ".kubernetes.io"):
				v.add(at+".resourceName", "%q is a native resource, not a device", d.ResourceName)
			}
		}
	}
}

// validator collects FieldErrors.
type validator struct{ errs []error }

func (v *validator) add(path, format string, args ...any) {
	v.errs = append(v.errs, &FieldError{Path: path, Detail: fmt.Sprintf(format, args...)})
}

// label checks a DNS-1123 label (the form of Kubernetes volume names); true if valid.
func (v *validator) label(path, s string) bool {
	if len(s) > maxDNSLabelSize || !dnsLabel.MatchString(s) {
		v.add(path, "must be a DNS label (lower-case a-z 0-9 -, at most 63), got %q", s)
		return false
	}
	return true
}

// podUID checks that uid can name a pod (a UID, as a label value carries it).
func (v *validator) podUID(path, uid string) {
	if len(uid) > maxDNSLabelSize || !labelValue.MatchString(uid) {
		v.add(path, "must be a pod's UID, got %q", uid)
	}
}

// name checks a label that must be unique in seen, where it records index i.
func (v *validator) name(path, s string, seen map[string]int, i int, list string) {
	if !v.label(path, s) {
		return
	}
	if _, dup := seen[s]; dup {
		v.add(path, "%q is used twice in %s", s, list)
		return
	}
	seen[s] = i
}

func (v *validator) bus(path string, b Bus) {
	switch b {
	case BusVirtio, BusSCSI, BusSATA:
	default:
		v.add(path, "must be virtio, scsi or sata, got %q", b)
	}
}
