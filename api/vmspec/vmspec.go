// Package vmspec is the schema of the vmpod.dev/vm pod annotation: the whole contract between
// the vmpod controller, which writes it, and the vmpod shim, which boots the pod as a VM.
//
// The package is imported by the shim, so it depends on the standard library (and the
// vocabulary package api/machine) only.
//
// The annotation chooses *within* what the node admin allows: sizes, device models, boot
// order, cloud-init data. It never names host paths, QEMU arguments, binaries or kernel
// command lines; disks are the pod's own volumes, named by volume name, and the shim finds
// them in the compute container's OCI spec at the fixed paths below (see
// docs/design/100-vm-annotation.md and docs/design/101-containerdisk.md).
package vmspec

import (
	"path"

	"github.com/vmpod/vmpod/api/machine"
)

// Annotation is the pod annotation that carries a VM's JSON spec. Its presence makes a
// vmpod pod a VM pod; without it the pod is an ordinary container pod.
const Annotation = "vmpod.dev/vm"

// Version is the only schema version this package reads and writes.
const Version = "v1alpha1"

// MaxSize bounds the annotation. The API server caps all of a pod's annotations together at
// 256 KiB; a larger value cannot be a pod annotation, so Parse refuses it before decoding.
const MaxSize = 256 << 10

// The compute container and where the pod's volumes appear in it. The controller renders
// these; the shim looks a disk's volume up at these destinations in the compute container's
// OCI spec (mounts and linux.devices), which is why no host path ever needs to be named.
const (
	// ComputeContainer is the name of the pod's one container, whose life is the VM's.
	ComputeContainer = "compute"
	// VolumeMountRoot is where filesystem volumes are mounted: VolumeMountRoot/<volume>.
	VolumeMountRoot = "/vmpod/volumes"
	// BlockDeviceRoot is where block volumes appear: BlockDeviceRoot/<volume>.
	BlockDeviceRoot = "/vmpod/devices"
	// DiskImageFile is the raw disk image in a filesystem volume (SourceFile), as in KubeVirt.
	DiskImageFile = "disk.img"
	// ContainerDiskDir holds the one disk file (qcow2 or raw) of an image volume
	// (SourceImage); KubeVirt's containerDisk images put it in /disk too.
	ContainerDiskDir = "disk"
	// CloudInitUserDataKey and CloudInitNetworkDataKey are the file names (Secret keys) of a
	// cloud-init Secret volume, as in KubeVirt's cloudInitNoCloud.secretRef.
	CloudInitUserDataKey    = "userdata"
	CloudInitNetworkDataKey = "networkdata"
	// GuestAgentPingCommand is the exec command of a guestAgentPing readiness probe. The
	// shim answers an exec of exactly [GuestAgentPingCommand] in the compute container with
	// a qemu-guest-agent guest-ping instead of running anything.
	GuestAgentPingCommand = "vmpod.dev/guest-agent-ping"
	// GuestInfoCommand is an exec that prints what the guest agent reports of the guest,
	// as GuestInfo JSON: `kubectl exec <pod> -- vmpod.dev/guest-info`.
	GuestInfoCommand = "vmpod.dev/guest-info"
	// PauseCommand and UnpauseCommand are execs the shim answers by stopping and resuming
	// the VM's vCPUs (QMP stop/cont): the kubelet has no pause of its own, and an exec is
	// authorized like any other (pods/exec). While paused, the guestAgentPing probe and
	// every other exec fail at once, saying so. Each prints the VM's state after it.
	PauseCommand   = "vmpod.dev/pause"
	UnpauseCommand = "vmpod.dev/unpause"
)

// VolumeMountPath is where a filesystem volume is mounted in the compute container.
func VolumeMountPath(volume string) string { return path.Join(VolumeMountRoot, volume) }

// BlockDevicePath is where a block volume appears in the compute container.
func BlockDevicePath(volume string) string { return path.Join(BlockDeviceRoot, volume) }

// VM is the decoded annotation. Parse returns it validated and with defaults filled in;
// Encode writes every field explicitly, so what the shim reads is what the controller meant.
type VM struct {
	// Version must be Version.
	Version string `json:"version"`
	CPU     CPU    `json:"cpu"`
	// MemoryMiB is the guest's RAM. QEMU's own overhead is not included: the RuntimeClass
	// overhead accounts for it.
	MemoryMiB int64 `json:"memoryMiB"`
	// MaxMemoryMiB above MemoryMiB is room to hot-plug memory into the running guest
	// (KubeVirt's memory.maxGuest): a virtio-mem device of the difference, which grows and
	// shrinks as the compute container's memory limit does (docs/design/208). 0: none.
	MaxMemoryMiB int64        `json:"maxMemoryMiB,omitempty"`
	Machine      machine.Type `json:"machine,omitempty"`
	Firmware     Firmware     `json:"firmware"`
	Features     Features     `json:"features"`
	// Disks in the order the guest sees them. Each names a pod volume.
	Disks      []Disk      `json:"disks,omitempty"`
	Interfaces []Interface `json:"interfaces,omitempty"`
	CloudInit  *CloudInit  `json:"cloudInit,omitempty"`
	// AccessCredentials give the guest's users SSH public keys (KubeVirt's
	// accessCredentials).
	AccessCredentials []AccessCredential `json:"accessCredentials,omitempty"`
	// GPUs and HostDevices are allocated the Kubernetes way (device plugin or DRA, resource
	// limits on the compute container); the shim resolves them from the OCI spec's CDI
	// devices. Here they only say how many of each resource the guest gets and their names.
	GPUs        []HostDevice `json:"gpus,omitempty"`
	HostDevices []HostDevice `json:"hostDevices,omitempty"`
	Migration   *Migration   `json:"migration,omitempty"`
	// UUID is the machine's SMBIOS UUID and serial, and cloud-init's instance-id: the
	// same for every boot of one VirtualMachine (the controller uses the object's UID),
	// so the guest sees one machine across restarts and cloud-init runs its
	// per-instance modules once. Empty: the shim derives none (a fresh one per boot).
	UUID string `json:"uuid,omitempty"`
}

// CPU is the guest's CPU: its topology (Sockets*Cores*Threads vCPUs) and model.
type CPU struct {
	Sockets int `json:"sockets"`
	Cores   int `json:"cores"`
	Threads int `json:"threads"`
	// MaxSockets above Sockets is room to hot-plug whole sockets into the running guest
	// (KubeVirt's cpu.maxSockets), as the compute container's CPU limit grows
	// (docs/design/208). 0: none.
	MaxSockets int `json:"maxSockets,omitempty"`
	// Model is "" or machine.CPUHostModel for the node's default, machine.CPUHostPassthrough,
	// or a named QEMU model (e.g. "Skylake-Client-IBRS"); the shim boots any but the
	// default only if the node's config lists it (hypervisor.cpu_models).
	Model string `json:"model,omitempty"`
}

// Features are the machine's optional platform features (KubeVirt's domain.features).
type Features struct {
	// ACPI and SMM default to on (QEMU's q35); UEFI secure boot needs SMM.
	ACPI *bool `json:"acpi"`
	SMM  *bool `json:"smm"`
	// HyperV are Hyper-V enlightenments for Windows guests. They are paravirtual interfaces
	// of KVM: on a node without KVM the shim boots the guest without them and says so.
	HyperV *machine.HyperV `json:"hyperv,omitempty"`
	// KVMHidden hides the KVM signature from the guest.
	KVMHidden bool `json:"kvmHidden,omitempty"`
}

// VCPUs is the number of vCPUs the topology gives the guest.
func (c CPU) VCPUs() int { return c.Sockets * c.Cores * c.Threads }

// MaxVCPUs is the most vCPUs the guest can have: its sockets, or MaxSockets if more.
func (c CPU) MaxVCPUs() int { return max(c.Sockets, c.MaxSockets) * c.Cores * c.Threads }

// PerSocket is the number of vCPUs in a socket: the unit of CPU hotplug.
func (c CPU) PerSocket() int { return c.Cores * c.Threads }

// CPUResizable says whether the spec declares a CPU room (cpu.maxSockets, which may be
// all used): its vCPUs follow the compute container's CPU limit.
func (vm *VM) CPUResizable() bool { return vm.CPU.MaxSockets != 0 }

// MemoryResizable says whether the spec declares a memory room (maxMemoryMiB, which may
// be all used): its memory follows the compute container's memory limit.
func (vm *VM) MemoryResizable() bool { return vm.MaxMemoryMiB != 0 }

// Firmware is how the guest boots.
type Firmware struct {
	Type FirmwareType `json:"type"`
	// SecureBoot needs Type uefi on q35.
	SecureBoot bool `json:"secureBoot,omitempty"`
}

// FirmwareType is the guest firmware.
type FirmwareType string

const (
	FirmwareBIOS FirmwareType = "bios"
	FirmwareUEFI FirmwareType = "uefi"
)

// Disk is one guest disk backed by one pod volume.
type Disk struct {
	// Name is the disk's name, unique in the VM; the shim uses it as the disk's serial.
	Name string `json:"name"`
	// Volume is the name of a pod volume (never a path); none for source empty.
	Volume string `json:"volume,omitempty"`
	// Source says how that volume holds the disk.
	Source DiskSource `json:"source"`
	Device DiskDevice `json:"device,omitempty"`
	Bus    Bus        `json:"bus,omitempty"`
	// BootOrder: lower boots first; 0 means not bootable. Unique among disks.
	BootOrder int  `json:"bootOrder,omitempty"`
	ReadOnly  bool `json:"readOnly,omitempty"`
	// SizeMiB is the size of a source empty disk, and only of one.
	SizeMiB int64 `json:"sizeMiB,omitempty"`
}

// DiskSource is how a pod volume holds a disk, and so where the shim finds it.
type DiskSource string

const (
	// SourceImage: an OCI image volume (KubeVirt's containerDisk), mounted read-only at
	// VolumeMountPath(volume); the disk is the one regular file in its ContainerDiskDir. The
	// guest writes to a throwaway overlay, so the disk is ephemeral.
	SourceImage DiskSource = "image"
	// SourceFile: a filesystem volume (PVC) mounted at VolumeMountPath(volume); the disk is
	// the raw file DiskImageFile in it.
	SourceFile DiskSource = "file"
	// SourceBlock: a block volume (PVC, volumeMode Block) at BlockDevicePath(volume).
	SourceBlock DiskSource = "block"
	// SourceEmpty: a blank disk of SizeMiB the shim makes in the compute container's
	// writable layer (KubeVirt's emptyDisk): the pod's ephemeral storage, gone with it.
	SourceEmpty DiskSource = "empty"
)

// DiskDevice is what the guest sees.
type DiskDevice string

const (
	DeviceDisk  DiskDevice = "disk"
	DeviceCDROM DiskDevice = "cdrom"
)

// Bus is the guest-visible disk controller.
type Bus string

const (
	BusVirtio Bus = "virtio"
	BusSCSI   Bus = "scsi"
	BusSATA   Bus = "sata"
)

// Interface is one guest NIC backed by one interface of the pod's network namespace.
type Interface struct {
	// Name is the interface's name in the VM spec, unique in the VM.
	Name string `json:"name"`
	// PodInterface is the network-namespace interface the NIC is wired to: eth0 for the pod
	// network, the name Multus was asked to use (net1, ...) for secondary networks.
	PodInterface string `json:"podInterface"`
	Model        Model  `json:"model,omitempty"`
	// MACAddress is optional; by default the guest NIC takes the pod interface's MAC, so the
	// pod's IP reaches the guest.
	MACAddress string `json:"macAddress,omitempty"`
	// Binding is how the guest NIC reaches the pod interface; default bridge.
	Binding Binding `json:"binding,omitempty"`
	// Ports, with binding masquerade, are the pod ports forwarded to the guest; none
	// forwards every port (KubeVirt's semantics).
	Ports []Port `json:"ports,omitempty"`
}

// Binding is a guest NIC's way onto its pod interface (KubeVirt's interface binding).
type Binding string

const (
	// BindingBridge: the guest NIC is the pod interface: it takes the pod's MAC and, by
	// DHCP from the shim, the pod's IP, routes and DNS.
	BindingBridge Binding = "bridge"
	// BindingMasquerade: the guest sits on a private subnet behind NAT in the pod's network
	// namespace (MasqueradeGuest / MasqueradeGateway); its traffic leaves with the pod's IP,
	// and the pod's IP (Ports, or every port) is forwarded to it. The guest's address does
	// not change when the pod's does, which live migration and multi-NIC guests need.
	BindingMasquerade Binding = "masquerade"
)

// The masquerade binding's private subnet, KubeVirt's defaults: the guest is .2, the pod's
// netns .1 (the guest's gateway and DNS-less DHCP server).
const (
	MasqueradeSubnet  = "10.0.2.0/24"
	MasqueradeGuest   = "10.0.2.2"
	MasqueradeGateway = "10.0.2.1"
)

// Port is a pod port forwarded to the guest.
type Port struct {
	// Name is optional, for humans.
	Name     string   `json:"name,omitempty"`
	Protocol Protocol `json:"protocol,omitempty"` // default TCP
	Port     int      `json:"port"`
}

// Protocol of a forwarded port.
type Protocol string

const (
	ProtocolTCP Protocol = "TCP"
	ProtocolUDP Protocol = "UDP"
)

// Model is the guest NIC model.
type Model string

const (
	ModelVirtio Model = "virtio"
	ModelE1000  Model = "e1000"
	ModelE1000E Model = "e1000e"
)

// CloudInit is NoCloud data; the shim builds the cidata disk from it. The data is either
// inline or a Secret volume, never both.
type CloudInit struct {
	UserData    string `json:"userData,omitempty"`
	NetworkData string `json:"networkData,omitempty"`
	// SecretVolume is a pod volume (a Secret) mounted at VolumeMountPath; its files
	// CloudInitUserDataKey and CloudInitNetworkDataKey hold the data.
	SecretVolume string `json:"secretVolume,omitempty"`
	// Bus of the cidata disk.
	Bus Bus `json:"bus,omitempty"`
}

// AccessCredential is a set of SSH public keys, from a Secret, and how they reach the guest.
type AccessCredential struct {
	// SecretVolume is a pod volume (a Secret) mounted at VolumeMountPath(SecretVolume);
	// each of its files holds authorized_keys lines.
	SecretVolume string `json:"secretVolume"`
	// Propagation is how the keys reach the guest; default noCloud.
	Propagation KeyPropagation `json:"propagation,omitempty"`
	// Users, with propagation guestAgent, are the guest accounts whose authorized_keys
	// get the keys.
	Users []string `json:"users,omitempty"`
}

// KeyPropagation is how an access credential's keys reach the guest.
type KeyPropagation string

const (
	// PropagateNoCloud puts the keys in cloud-init's meta-data (public-keys): cloud-init
	// gives them to the guest's default user at its first boot. Needs CloudInit.
	PropagateNoCloud KeyPropagation = "noCloud"
	// PropagateGuestAgent has the QEMU guest agent add the keys to each of Users'
	// authorized_keys (guest-ssh-add-authorized-keys) once the agent answers and the
	// account exists, at every start of the VM (a reboot inside the guest keeps them).
	PropagateGuestAgent KeyPropagation = "guestAgent"
)

// HostDevice is a device the guest gets, by the Kubernetes resource that allocates it.
type HostDevice struct {
	// Name is unique among the VM's GPUs and host devices.
	Name string `json:"name"`
	// ResourceName is an extended resource, e.g. nvidia.com/GA102GL_A10.
	ResourceName string `json:"resourceName"`
}

// GuestInfo is what GuestInfoCommand prints: the guest OS, hostname and addresses as the
// QEMU guest agent reports them (KubeVirt's VMI status.guestOSInfo and interfaces).
type GuestInfo struct {
	AgentVersion string           `json:"agentVersion"`
	OS           *GuestOS         `json:"os,omitempty"`
	Hostname     string           `json:"hostname,omitempty"`
	Interfaces   []GuestInterface `json:"interfaces,omitempty"`
}

// GuestOS is the guest's os-release, as far as the agent reports it.
type GuestOS struct {
	ID            string `json:"id,omitempty"`
	Name          string `json:"name,omitempty"`
	PrettyName    string `json:"prettyName,omitempty"`
	Version       string `json:"version,omitempty"`
	VersionID     string `json:"versionId,omitempty"`
	KernelRelease string `json:"kernelRelease,omitempty"`
	Machine       string `json:"machine,omitempty"`
}

// GuestInterface is a guest NIC with its addresses (CIDR notation).
type GuestInterface struct {
	Name string   `json:"name"`
	MAC  string   `json:"mac,omitempty"`
	IPs  []string `json:"ips,omitempty"`
}

// Migration marks a pod as the target of a live migration (MigrateAcceptCommand): its QEMU
// starts waiting for the guest instead of booting it.
type Migration struct {
	Role MigrationRole `json:"role"`
}

// MigrationRole is a pod's end of a migration.
type MigrationRole string

const (
	// RoleTarget: QEMU starts waiting for an incoming migration instead of booting.
	RoleTarget MigrationRole = "target"
)
