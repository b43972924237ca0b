package v1alpha1

import (
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// RunStrategy says when the VM's pod should exist.
// +kubebuilder:validation:Enum=Always;RerunOnFailure;Once;Manual;Halted
type RunStrategy string

const (
	// RunStrategyAlways keeps a pod running: it is recreated whenever it ends, with a
	// back-off when it failed.
	RunStrategyAlways RunStrategy = "Always"
	// RunStrategyRerunOnFailure recreates the pod (with back-off) when it failed, but not when
	// the guest shut down cleanly.
	RunStrategyRerunOnFailure RunStrategy = "RerunOnFailure"
	// RunStrategyOnce runs one pod and never recreates it.
	RunStrategyOnce RunStrategy = "Once"
	// RunStrategyManual creates and deletes the pod only on start and stop requests.
	RunStrategyManual RunStrategy = "Manual"
	// RunStrategyHalted deletes the pod.
	RunStrategyHalted RunStrategy = "Halted"
)

// StateChangeRequestAnnotation carries a one-shot start, stop or restart request on a
// VirtualMachine (JSON, see StateChangeRequest). vmpod has no aggregated API server to serve
// KubeVirt's start/stop/restart subresources, so a request is metadata the controller
// consumes and removes; see docs/design/102-state-change-requests.md.
const StateChangeRequestAnnotation = "vmpod.dev/state-change-request"

// StateChangeAction is what a StateChangeRequest asks for.
type StateChangeAction string

const (
	StateChangeStart   StateChangeAction = "Start"
	StateChangeStop    StateChangeAction = "Stop"
	StateChangeRestart StateChangeAction = "Restart"
	// StateChangePause and StateChangeUnpause stop and resume the running VM's vCPUs in
	// place (its memory, devices and connections stay); the controller carries them out
	// through an exec of vmspec.PauseCommand / UnpauseCommand in the VM's pod.
	StateChangePause   StateChangeAction = "Pause"
	StateChangeUnpause StateChangeAction = "Unpause"
)

// StateChangeRequest is the value of StateChangeRequestAnnotation.
type StateChangeRequest struct {
	Action StateChangeAction `json:"action"`
	// PodUID, on Restart, is the pod to replace: the request is done once that pod is gone
	// and another runs, so repeating it cannot restart the VM twice.
	PodUID types.UID `json:"podUID,omitempty"`
}

// VirtualMachineSpec is the desired VM.
// +kubebuilder:validation:XValidation:rule="has(self.instancetype) || (has(self.template.spec.domain.memory) && has(self.template.spec.domain.memory.guest)) || (has(self.template.spec.domain.resources.requests) && 'memory' in self.template.spec.domain.resources.requests)",message="set memory.guest or resources.requests.memory",fieldPath=".template.spec.domain"
// +kubebuilder:validation:XValidation:rule="!has(self.instancetype) || !has(self.template.spec.domain.cpu)",message="the instancetype sets the vCPUs: remove domain.cpu",fieldPath=".template.spec.domain.cpu"
// +kubebuilder:validation:XValidation:rule="!has(self.instancetype) || !has(self.template.spec.domain.memory) || !has(self.template.spec.domain.memory.guest)",message="the instancetype sets the memory: remove domain.memory.guest",fieldPath=".template.spec.domain.memory"
// +kubebuilder:validation:XValidation:rule="!has(self.instancetype) || !has(self.template.spec.domain.resources.requests) || !('memory' in self.template.spec.domain.resources.requests)",message="the instancetype sets the memory: remove resources.requests.memory",fieldPath=".template.spec.domain.resources"
type VirtualMachineSpec struct {
	// RunStrategy says when the VM's pod should exist.
	RunStrategy RunStrategy `json:"runStrategy"`

	// Instancetype gives the VM its vCPUs and memory; the template then sets neither
	// (domain.cpu, domain.memory.guest, a memory request).
	// +optional
	Instancetype *InstancetypeMatcher `json:"instancetype,omitempty"`
	// Preference gives the VM defaults for what its template leaves unset.
	// +optional
	Preference *PreferenceMatcher `json:"preference,omitempty"`

	// Template is the VM the pod runs.
	Template VirtualMachineTemplateSpec `json:"template"`

	// DataVolumeTemplates are DataVolumes the controller creates, owned by the VM, before
	// the first pod; volumes refer to them by name.
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=16
	// +kubebuilder:validation:XValidation:rule="self.all(t, self.exists_one(u, u.metadata.name == t.metadata.name))",message="dataVolumeTemplates names must be unique"
	// +optional
	DataVolumeTemplates []DataVolumeTemplateSpec `json:"dataVolumeTemplates,omitempty"`
}

// TemplateMeta is the part of object metadata a template may set.
type TemplateMeta struct {
	// +optional
	Labels map[string]string `json:"labels,omitempty"`
	// +optional
	Annotations map[string]string `json:"annotations,omitempty"`
}

// VirtualMachineTemplateSpec is the pod-to-be: metadata copied to the pod and the VM's spec.
type VirtualMachineTemplateSpec struct {
	// Labels and annotations for the pod. The controller adds its own; the vmpod.dev/vm
	// annotation cannot be set here.
	// +optional
	// +kubebuilder:validation:XValidation:rule="!has(self.annotations) || !('vmpod.dev/vm' in self.annotations)",message="the vmpod.dev/vm annotation is rendered by the controller from spec"
	ObjectMeta TemplateMeta `json:"metadata,omitempty"`
	Spec       InstanceSpec `json:"spec"`
}

// InstanceSpec is one run of the VM (KubeVirt's VirtualMachineInstanceSpec; in vmpod the
// instance is a Pod).
// +kubebuilder:validation:XValidation:rule="self.domain.devices.disks.all(d, self.volumes.exists(v, v.name == d.name))",message="every disk needs a volume of the same name in volumes",fieldPath=".domain.devices.disks"
// +kubebuilder:validation:XValidation:rule="self.volumes.all(v, self.domain.devices.disks.exists(d, d.name == v.name))",message="every volume needs a disk of the same name in domain.devices.disks",fieldPath=".volumes"
// +kubebuilder:validation:XValidation:rule="self.domain.devices.interfaces.all(i, self.networks.exists(n, n.name == i.name))",message="every interface needs a network of the same name in networks",fieldPath=".domain.devices.interfaces"
// +kubebuilder:validation:XValidation:rule="self.networks.all(n, self.domain.devices.interfaces.exists(i, i.name == n.name))",message="every network needs an interface of the same name in domain.devices.interfaces",fieldPath=".networks"
// +kubebuilder:validation:XValidation:rule="self.volumes.all(v, !has(v.emptyDisk) || self.domain.devices.disks.all(d, d.name != v.name || (!has(d.cdrom) && !(has(d.disk) && has(d.disk.readonly) && d.disk.readonly))))",message="an emptyDisk volume's disk is a writable disk: not a cdrom, not readOnly",fieldPath=".volumes"
// +kubebuilder:validation:XValidation:rule="!has(self.accessCredentials) || self.accessCredentials.all(c, !has(c.sshPublicKey.propagationMethod.noCloud)) || self.volumes.exists(v, has(v.cloudInitNoCloud))",message="noCloud key propagation needs a cloudInitNoCloud volume",fieldPath=".accessCredentials"
// +kubebuilder:validation:XValidation:rule="self.volumes.all(v, !(v.?dataVolume.hotpluggable.orValue(false) || v.?persistentVolumeClaim.hotpluggable.orValue(false)) || (v.name.size() <= 20 && self.domain.devices.disks.all(d, d.name != v.name || (!has(d.cdrom) && d.?disk.bus.orValue('virtio') == 'virtio'))))",message="a hotpluggable volume's name is at most 20 characters (its disk's serial) and its disk is a virtio disk",fieldPath=".volumes"
// +kubebuilder:validation:XValidation:rule="self.volumes.filter(v, has(v.cloudInitNoCloud)).size() <= 1",message="at most one cloudInitNoCloud volume",fieldPath=".volumes"
// +kubebuilder:validation:XValidation:rule="self.networks.filter(n, has(n.pod) || (has(n.multus) && n.multus.?default.orValue(false))).size() <= 1",message="at most one default network (pod, or multus with default: true)",fieldPath=".networks"
type InstanceSpec struct {
	Domain DomainSpec `json:"domain"`

	// Volumes back the disks: each volume has the name of one disk.
	// +listType=map
	// +listMapKey=name
	// +kubebuilder:validation:MaxItems=64
	// +kubebuilder:default={}
	// +optional
	Volumes []Volume `json:"volumes"`

	// Networks back the interfaces: each network has the name of one interface.
	// +listType=map
	// +listMapKey=name
	// +kubebuilder:validation:MaxItems=16
	// +kubebuilder:default={}
	// +optional
	Networks []Network `json:"networks"`

	// ReadinessProbe makes the pod (and so the VM) Ready.
	// +optional
	ReadinessProbe *Probe `json:"readinessProbe,omitempty"`

	// TerminationGracePeriodSeconds is how long a stop waits for the guest to power off
	// after the ACPI power button, before the VM is killed.
	// +kubebuilder:validation:Minimum=0
	// +optional
	TerminationGracePeriodSeconds *int64 `json:"terminationGracePeriodSeconds,omitempty"`

	// EvictionStrategy says what an eviction of the VM's pod does (kubectl drain evicts):
	// None (the default) stops the VM like any pod; LiveMigrate refuses the eviction (a
	// PodDisruptionBudget) and moves the guest to another node once its node is cordoned,
	// so a drain completes when the guest has left.
	// +kubebuilder:validation:Enum=None;LiveMigrate
	// +optional
	EvictionStrategy *EvictionStrategy `json:"evictionStrategy,omitempty"`

	// +optional
	NodeSelector map[string]string `json:"nodeSelector,omitempty"`
	// +optional
	Affinity *corev1.Affinity `json:"affinity,omitempty"`
	// +optional
	// +listType=atomic
	Tolerations []corev1.Toleration `json:"tolerations,omitempty"`
	// +optional
	PriorityClassName string `json:"priorityClassName,omitempty"`
	// Hostname of the pod (and, through cloud-init, of the guest). Defaults to the VM's name.
	// +kubebuilder:validation:MaxLength=63
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`
	// +optional
	Hostname string `json:"hostname,omitempty"`
	// +kubebuilder:validation:MaxLength=63
	// +optional
	Subdomain string `json:"subdomain,omitempty"`

	// AccessCredentials give the guest's users SSH public keys from Secrets (KubeVirt's
	// accessCredentials).
	// +kubebuilder:validation:MaxItems=16
	// +listType=atomic
	// +optional
	AccessCredentials []AccessCredential `json:"accessCredentials,omitempty"`
}

// EvictionStrategy is what an eviction of a VM's pod does.
type EvictionStrategy string

const (
	// EvictionStrategyNone lets the eviction stop the VM.
	EvictionStrategyNone EvictionStrategy = "None"
	// EvictionStrategyLiveMigrate moves the guest off a cordoned node instead.
	EvictionStrategyLiveMigrate EvictionStrategy = "LiveMigrate"
)

// AccessCredential is a credential the guest gets. Only SSH public keys: KubeVirt's
// userPassword would put passwords where vmpod keeps only public data.
type AccessCredential struct {
	SSHPublicKey SSHPublicKeyAccessCredential `json:"sshPublicKey"`
}

// SSHPublicKeyAccessCredential is a Secret of SSH public keys (every value of the Secret
// holds authorized_keys lines) and how they reach the guest.
type SSHPublicKeyAccessCredential struct {
	Source            SSHPublicKeyAccessCredentialSource            `json:"source"`
	PropagationMethod SSHPublicKeyAccessCredentialPropagationMethod `json:"propagationMethod"`
}

// SSHPublicKeyAccessCredentialSource is where the keys are.
type SSHPublicKeyAccessCredentialSource struct {
	Secret AccessCredentialSecretSource `json:"secret"`
}

// AccessCredentialSecretSource names a Secret in the VM's namespace.
type AccessCredentialSecretSource struct {
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	SecretName string `json:"secretName"`
}

// SSHPublicKeyAccessCredentialPropagationMethod is how the keys reach the guest.
// +kubebuilder:validation:XValidation:rule="[has(self.noCloud), has(self.qemuGuestAgent)].filter(x, x).size() == 1",message="set exactly one of noCloud, qemuGuestAgent"
type SSHPublicKeyAccessCredentialPropagationMethod struct {
	// NoCloud puts the keys in the cloud-init meta-data (public-keys): cloud-init gives them
	// to the guest's default user. Needs a cloudInitNoCloud volume.
	// +optional
	NoCloud *NoCloudSSHPublicKeyAccessCredentialPropagation `json:"noCloud,omitempty"`
	// QemuGuestAgent has the guest agent add the keys to the users' authorized_keys once
	// it answers and the accounts exist, every time the VM starts.
	// +optional
	QemuGuestAgent *QemuGuestAgentSSHPublicKeyAccessCredentialPropagation `json:"qemuGuestAgent,omitempty"`
}

// NoCloudSSHPublicKeyAccessCredentialPropagation has no settings.
type NoCloudSSHPublicKeyAccessCredentialPropagation struct{}

// QemuGuestAgentSSHPublicKeyAccessCredentialPropagation names the guest accounts.
type QemuGuestAgentSSHPublicKeyAccessCredentialPropagation struct {
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=16
	// +kubebuilder:validation:items:MaxLength=32
	// +kubebuilder:validation:items:Pattern=`^[A-Za-z_][A-Za-z0-9_.-]*$`
	// +listType=atomic
	Users []string `json:"users"`
}

// DomainSpec is the virtual hardware.
type DomainSpec struct {
	// +optional
	CPU *CPU `json:"cpu,omitempty"`
	// +optional
	Memory *Memory `json:"memory,omitempty"`
	// Resources of the pod's compute container. memory defaults to the guest memory and cpu
	// to the vCPU count divided by the controller's --cpu-allocation-ratio; the RuntimeClass
	// overhead (QEMU itself) is added by the API server, not here.
	// +kubebuilder:default={}
	// +optional
	Resources ResourceRequirements `json:"resources"`
	// +optional
	Machine *Machine `json:"machine,omitempty"`
	// +optional
	Firmware *Firmware `json:"firmware,omitempty"`
	// +optional
	Features *Features `json:"features,omitempty"`
	Devices  Devices   `json:"devices"`
}

// CPU is the guest's CPU topology.
// +kubebuilder:validation:XValidation:rule="!has(self.maxSockets) || self.maxSockets >= self.?sockets.orValue(1)",message="maxSockets must be at least sockets",fieldPath=".maxSockets"
type CPU struct {
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=512
	// +optional
	Cores uint32 `json:"cores,omitempty"`
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=512
	// +optional
	Sockets uint32 `json:"sockets,omitempty"`
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=512
	// +optional
	Threads uint32 `json:"threads,omitempty"`
	// MaxSockets leaves room to hot-plug sockets (of cores*threads vCPUs each) into the
	// running VM, as in KubeVirt: raising sockets up to it resizes the running VM's pod
	// in place (its CPU limit is its vCPU count) instead of needing a restart. Unset: no
	// room.
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=512
	// +optional
	MaxSockets uint32 `json:"maxSockets,omitempty"`
	// Model is the guest's CPU model: host-model (the default: the host's CPU as it is under
	// KVM, an emulated baseline under TCG), host-passthrough (the host's CPU; refused on a
	// node without KVM), or a QEMU model name such as Skylake-Client-IBRS, which a node boots
	// only if its admin lists it (hypervisor.cpu_models in /etc/vmpod/config.toml);
	// otherwise the pod fails to start, saying so.
	// +kubebuilder:validation:MaxLength=64
	// +kubebuilder:validation:Pattern=`^[A-Za-z0-9][A-Za-z0-9._-]*$`
	// +optional
	Model string `json:"model,omitempty"`
}

// Features are optional platform features, in KubeVirt's shape.
type Features struct {
	// ACPI is on unless enabled is false. Without ACPI the guest cannot be asked to power
	// off: stopping the VM waits out its grace period, then ends it.
	// +optional
	ACPI *FeatureState `json:"acpi,omitempty"`
	// SMM (System Management Mode) is on unless enabled is false; UEFI secure boot needs it.
	// +optional
	SMM *FeatureState `json:"smm,omitempty"`
	// HyperV enlightenments make Windows guests fast under KVM. A node without KVM boots
	// the guest without them.
	// +optional
	HyperV *FeatureHyperv `json:"hyperv,omitempty"`
	// KVM hides the hypervisor's signature from the guest.
	// +optional
	KVM *FeatureKVM `json:"kvm,omitempty"`
}

// FeatureState turns a feature on or off.
type FeatureState struct {
	// Enabled defaults to true.
	// +optional
	Enabled *bool `json:"enabled,omitempty"`
}

// FeatureHyperv lists the Hyper-V enlightenments the guest gets. Their dependencies
// (synic needs vpindex, synictimer synic, ipi and tlbflush vpindex, evmcs vapic) are
// checked once a preference has filled in what the VM leaves unset: a VM that breaks them
// reports InvalidSpec.
type FeatureHyperv struct {
	// +optional
	Relaxed *FeatureState `json:"relaxed,omitempty"`
	// +optional
	VAPIC *FeatureState `json:"vapic,omitempty"`
	// +optional
	Spinlocks *FeatureSpinlocks `json:"spinlocks,omitempty"`
	// +optional
	VPIndex *FeatureState `json:"vpindex,omitempty"`
	// +optional
	Runtime *FeatureState `json:"runtime,omitempty"`
	// +optional
	SyNIC *FeatureState `json:"synic,omitempty"`
	// +optional
	SyNICTimer *SyNICTimer `json:"synictimer,omitempty"`
	// +optional
	Reset *FeatureState `json:"reset,omitempty"`
	// +optional
	VendorID *FeatureVendorID `json:"vendorid,omitempty"`
	// +optional
	Frequencies *FeatureState `json:"frequencies,omitempty"`
	// +optional
	Reenlightenment *FeatureState `json:"reenlightenment,omitempty"`
	// +optional
	TLBFlush *FeatureState `json:"tlbflush,omitempty"`
	// +optional
	IPI *FeatureState `json:"ipi,omitempty"`
	// +optional
	EVMCS *FeatureState `json:"evmcs,omitempty"`
}

// FeatureSpinlocks is how often the guest retries a spinlock before it tells the hypervisor.
type FeatureSpinlocks struct {
	// +optional
	Enabled *bool `json:"enabled,omitempty"`
	// Retries defaults to 4096, KubeVirt's default and least value.
	// +kubebuilder:validation:Minimum=4096
	// +optional
	Retries *uint32 `json:"spinlocks,omitempty"`
}

// SyNICTimer is the synthetic timer; Direct delivers its expiry as a plain interrupt.
type SyNICTimer struct {
	// +optional
	Enabled *bool `json:"enabled,omitempty"`
	// +optional
	Direct *FeatureState `json:"direct,omitempty"`
}

// FeatureVendorID is the hypervisor vendor the guest sees.
type FeatureVendorID struct {
	// +optional
	Enabled *bool `json:"enabled,omitempty"`
	// +kubebuilder:validation:MaxLength=12
	// +kubebuilder:validation:Pattern=`^[A-Za-z0-9]+$`
	// +optional
	VendorID string `json:"vendorid,omitempty"`
}

// FeatureKVM hides KVM from the guest.
type FeatureKVM struct {
	// +optional
	Hidden bool `json:"hidden,omitempty"`
}

// Memory is the guest's memory.
// +kubebuilder:validation:XValidation:rule="!has(self.maxGuest) || !has(self.guest) || quantity(string(self.guest)).compareTo(quantity(string(self.maxGuest))) <= 0",message="maxGuest must be at least guest",fieldPath=".maxGuest"
type Memory struct {
	// Guest is the RAM the guest sees. Defaults to resources.requests.memory.
	// +kubebuilder:validation:XValidation:rule="quantity(string(self)).compareTo(quantity('16Mi')) >= 0",message="must be at least 16Mi"
	// +optional
	Guest *resource.Quantity `json:"guest,omitempty"`
	// MaxGuest leaves room to hot-plug memory into the running VM (a virtio-mem device of
	// the difference), as in KubeVirt: changing guest up to it resizes the running VM's
	// pod in place instead of needing a restart. Unset: no room.
	// +optional
	MaxGuest *resource.Quantity `json:"maxGuest,omitempty"`
}

// ResourceRequirements are the compute container's requests and limits (cpu, memory).
type ResourceRequirements struct {
	// +optional
	Requests corev1.ResourceList `json:"requests,omitempty"`
	// +optional
	Limits corev1.ResourceList `json:"limits,omitempty"`
}

// Machine is the QEMU machine type. Only q35: microvm, vmpod's other machine, boots a
// kernel directly and cannot boot a VM's disk through firmware.
type Machine struct {
	// +kubebuilder:validation:Enum=q35
	// +kubebuilder:default=q35
	// +optional
	Type string `json:"type,omitempty"`
}

// Firmware is how the guest boots.
type Firmware struct {
	// +optional
	Bootloader *Bootloader `json:"bootloader,omitempty"`
}

// Bootloader is BIOS (the default) or EFI.
// +kubebuilder:validation:XValidation:rule="!(has(self.bios) && has(self.efi))",message="choose bios or efi"
type Bootloader struct {
	// +optional
	BIOS *BIOS `json:"bios,omitempty"`
	// +optional
	EFI *EFI `json:"efi,omitempty"`
}

// BIOS boots with SeaBIOS.
type BIOS struct{}

// EFI boots with OVMF.
type EFI struct {
	// +optional
	SecureBoot *bool `json:"secureBoot,omitempty"`
}

// Devices are the guest's devices.
type Devices struct {
	// +listType=map
	// +listMapKey=name
	// +kubebuilder:validation:MaxItems=64
	// +kubebuilder:default={}
	// +optional
	Disks []Disk `json:"disks"`
	// +listType=map
	// +listMapKey=name
	// +kubebuilder:validation:MaxItems=16
	// +kubebuilder:default={}
	// +optional
	Interfaces []Interface `json:"interfaces"`
	// AutoattachPodInterface gives a VM without interfaces and networks one NIC on the pod
	// network, as KubeVirt does. Default true.
	// +optional
	AutoattachPodInterface *bool `json:"autoattachPodInterface,omitempty"`
	// +listType=map
	// +listMapKey=name
	// +kubebuilder:validation:MaxItems=16
	// +optional
	GPUs []GPU `json:"gpus,omitempty"`
	// +listType=map
	// +listMapKey=name
	// +kubebuilder:validation:MaxItems=16
	// +optional
	HostDevices []HostDevice `json:"hostDevices,omitempty"`
}

// Disk is a guest disk; its name is the name of the volume behind it.
// +kubebuilder:validation:XValidation:rule="!(has(self.disk) && has(self.cdrom))",message="choose disk or cdrom"
// +kubebuilder:validation:XValidation:rule="!has(self.cdrom) || !has(self.cdrom.bus) || self.cdrom.bus != 'virtio'",message="a cdrom needs bus sata or scsi",fieldPath=".cdrom.bus"
type Disk struct {
	// +kubebuilder:validation:MaxLength=63
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`
	Name string `json:"name"`
	// Disk attaches the volume as a hard disk (the default).
	// +optional
	Disk *DiskTarget `json:"disk,omitempty"`
	// CDRom attaches the volume as a read-only CD-ROM.
	// +optional
	CDRom *CDRomTarget `json:"cdrom,omitempty"`
	// BootOrder: lower boots first; disks without one are not boot devices.
	// +kubebuilder:validation:Minimum=1
	// +optional
	BootOrder *int32 `json:"bootOrder,omitempty"`
}

// DiskBus is the guest's disk controller.
// +kubebuilder:validation:Enum=virtio;sata;scsi
type DiskBus string

// DiskTarget is a hard disk.
type DiskTarget struct {
	// Bus unset is the preference's, else virtio. (No schema default: it would hide
	// "unset" from the preference.)
	// +optional
	Bus DiskBus `json:"bus,omitempty"`
	// +optional
	ReadOnly bool `json:"readonly,omitempty"`
}

// CDRomTarget is a CD-ROM drive.
type CDRomTarget struct {
	// Bus unset is the preference's, else sata.
	// +optional
	Bus DiskBus `json:"bus,omitempty"`
}

// Interface is a guest NIC; its name is the name of the network behind it. With the bridge
// binding (the default) the guest NIC is wired to the pod interface (tc mirred) and gets the
// pod's IP by DHCP; with masquerade it sits behind NAT in the pod (10.0.2.2), its traffic
// leaves with the pod's IP and the pod's IP (ports, or every port) is forwarded to it.
// +kubebuilder:validation:XValidation:rule="!(has(self.bridge) && has(self.masquerade))",message="an interface has one binding: bridge or masquerade"
// +kubebuilder:validation:XValidation:rule="!has(self.ports) || has(self.masquerade)",message="ports are forwarded only by the masquerade binding",fieldPath=".ports"
type Interface struct {
	// +kubebuilder:validation:MaxLength=63
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`
	Name string `json:"name"`
	// Model unset is the preference's, else virtio.
	// +kubebuilder:validation:Enum=virtio;e1000;e1000e
	// +optional
	Model string `json:"model,omitempty"`
	// MACAddress overrides the pod interface's MAC for the guest NIC.
	// +kubebuilder:validation:Pattern=`^[0-9a-fA-F]{2}([:-][0-9a-fA-F]{2}){5}$`
	// +optional
	MACAddress string `json:"macAddress,omitempty"`
	// Bridge selects the bridge binding (the default).
	// +optional
	Bridge *InterfaceBridge `json:"bridge,omitempty"`
	// Masquerade selects the NAT binding.
	// +optional
	Masquerade *InterfaceMasquerade `json:"masquerade,omitempty"`
	// Ports the masquerade binding forwards to the guest; none forwards every port.
	// +kubebuilder:validation:MaxItems=64
	// +listType=atomic
	// +optional
	Ports []Port `json:"ports,omitempty"`
}

// InterfaceBridge is the bridge binding; it has no settings.
type InterfaceBridge struct{}

// InterfaceMasquerade is the masquerade binding; it has no settings.
type InterfaceMasquerade struct{}

// Port is a pod port the masquerade binding forwards to the guest.
type Port struct {
	// +optional
	Name string `json:"name,omitempty"`
	// +kubebuilder:validation:Enum=TCP;UDP
	// +kubebuilder:default=TCP
	// +optional
	Protocol string `json:"protocol,omitempty"`
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=65535
	Port int32 `json:"port"`
}

// GPU is a GPU passed through to the guest, allocated as one unit of a device plugin resource.
type GPU struct {
	// +kubebuilder:validation:MaxLength=63
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`
	Name string `json:"name"`
	// DeviceName is the Kubernetes resource name, e.g. nvidia.com/GA102GL_A10.
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$`
	// +kubebuilder:validation:MaxLength=253
	DeviceName string `json:"deviceName"`
}

// HostDevice is a PCI device passed through to the guest, allocated as one unit of a device
// plugin resource.
type HostDevice struct {
	// +kubebuilder:validation:MaxLength=63
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`
	Name string `json:"name"`
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$`
	// +kubebuilder:validation:MaxLength=253
	DeviceName string `json:"deviceName"`
}

// Volume is a named source of a disk.
// +kubebuilder:validation:XValidation:rule="[has(self.containerDisk), has(self.dataVolume), has(self.persistentVolumeClaim), has(self.cloudInitNoCloud), has(self.emptyDisk)].filter(x, x).size() == 1",message="set exactly one of containerDisk, dataVolume, persistentVolumeClaim, cloudInitNoCloud, emptyDisk"
type Volume struct {
	// +kubebuilder:validation:MaxLength=63
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`
	Name         string `json:"name"`
	VolumeSource `json:",inline"`
}

// Hotpluggable says whether the volume is attached to the running VM rather than to its
// pod.
func (v *Volume) Hotpluggable() bool {
	return (v.DataVolume != nil && v.DataVolume.Hotpluggable) || (v.PersistentVolumeClaim != nil && v.PersistentVolumeClaim.Hotpluggable)
}

// VolumeSource is where a volume's data comes from.
type VolumeSource struct {
	// ContainerDisk is an ephemeral disk from an OCI image (the disk file in its /disk
	// directory). Writes are lost when the pod ends.
	// +optional
	ContainerDisk *ContainerDiskSource `json:"containerDisk,omitempty"`
	// DataVolume is a DataVolume's PVC; the VM starts once the DataVolume has Succeeded.
	// +optional
	DataVolume *DataVolumeVolumeSource `json:"dataVolume,omitempty"`
	// PersistentVolumeClaim holds the disk: a disk.img file (Filesystem) or the device (Block).
	// +optional
	PersistentVolumeClaim *PersistentVolumeClaimVolumeSource `json:"persistentVolumeClaim,omitempty"`
	// CloudInitNoCloud is cloud-init data the guest reads from a NoCloud (cidata) disk.
	// +optional
	CloudInitNoCloud *CloudInitNoCloudSource `json:"cloudInitNoCloud,omitempty"`
	// EmptyDisk is a blank disk made when the VM starts, in the pod's ephemeral storage:
	// it survives a reboot of the guest, not a restart of the VM.
	// +optional
	EmptyDisk *EmptyDiskSource `json:"emptyDisk,omitempty"`
}

// EmptyDiskSource is the size of a blank disk.
type EmptyDiskSource struct {
	// The range is checked when the pod is rendered: a CEL quantity rule in a list of 64
	// volumes exceeds the API server's cost budget.

	// Capacity is the disk's size, above 0 and at most 64Ti, rounded up to whole MiB; the
	// compute container requests it as ephemeral storage.
	Capacity resource.Quantity `json:"capacity"`
}

// ContainerDiskSource is a disk in an OCI image.
type ContainerDiskSource struct {
	// +kubebuilder:validation:MinLength=1
	Image string `json:"image"`
	// +kubebuilder:validation:Enum=Always;IfNotPresent;Never
	// +optional
	ImagePullPolicy corev1.PullPolicy `json:"imagePullPolicy,omitempty"`
	// ImagePullSecret names a Secret for pulling Image; it is added to the pod's
	// imagePullSecrets.
	// +optional
	ImagePullSecret string `json:"imagePullSecret,omitempty"`
}

// DataVolumeVolumeSource refers to a DataVolume in the VM's namespace.
type DataVolumeVolumeSource struct {
	// +kubebuilder:validation:MinLength=1
	Name string `json:"name"`
	// Hotpluggable: see PersistentVolumeClaimVolumeSource.
	// +optional
	Hotpluggable bool `json:"hotpluggable,omitempty"`
}

// PersistentVolumeClaimVolumeSource is a PVC in the VM's namespace.
type PersistentVolumeClaimVolumeSource struct {
	corev1.PersistentVolumeClaimVolumeSource `json:",inline"`
	// Hotpluggable volumes are attached to the running VM, not to its pod: added to the
	// spec while the VM runs, the guest gets the disk without a restart, and removed, it
	// loses it; a restarted VM gets them again once it runs. Its disk is a virtio disk
	// whose name (at most 20 characters) is its serial. The PVC reaches the node through
	// an attachment pod (docs/design/204).
	// +optional
	Hotpluggable bool `json:"hotpluggable,omitempty"`
}

// CloudInitNoCloudSource is NoCloud user and network data, inline or from Secrets.
// +kubebuilder:validation:XValidation:rule="[has(self.userData), has(self.userDataBase64), has(self.secretRef)].filter(x, x).size() == 1",message="set exactly one of userData, userDataBase64, secretRef"
// +kubebuilder:validation:XValidation:rule="[has(self.networkData), has(self.networkDataBase64), has(self.networkDataSecretRef)].filter(x, x).size() <= 1",message="set at most one of networkData, networkDataBase64, networkDataSecretRef"
// +kubebuilder:validation:XValidation:rule="!has(self.secretRef) || !(has(self.networkData) || has(self.networkDataBase64))",message="with secretRef, network data comes from the Secret too (its networkdata key)"
// +kubebuilder:validation:XValidation:rule="!has(self.networkDataSecretRef) || (has(self.secretRef) && self.networkDataSecretRef.name == self.secretRef.name)",message="networkDataSecretRef must name the same Secret as secretRef",fieldPath=".networkDataSecretRef"
type CloudInitNoCloudSource struct {
	// +kubebuilder:validation:MaxLength=65536
	// +optional
	UserData string `json:"userData,omitempty"`
	// +kubebuilder:validation:MaxLength=87384
	// +optional
	UserDataBase64 string `json:"userDataBase64,omitempty"`
	// SecretRef names a Secret with the keys userdata and (optionally) networkdata.
	// +optional
	SecretRef *LocalObjectReference `json:"secretRef,omitempty"`
	// +kubebuilder:validation:MaxLength=65536
	// +optional
	NetworkData string `json:"networkData,omitempty"`
	// +kubebuilder:validation:MaxLength=87384
	// +optional
	NetworkDataBase64 string `json:"networkDataBase64,omitempty"`
	// NetworkDataSecretRef is accepted for KubeVirt compatibility when it names the secretRef
	// Secret (one Secret volume carries both keys).
	// +optional
	NetworkDataSecretRef *LocalObjectReference `json:"networkDataSecretRef,omitempty"`
}

// LocalObjectReference names an object in the VM's namespace. (corev1's has no length
// bound, which CEL rules comparing names need.)
type LocalObjectReference struct {
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	Name string `json:"name"`
}

// Network is where an interface is plugged.
// +kubebuilder:validation:XValidation:rule="[has(self.pod), has(self.multus)].filter(x, x).size() == 1",message="set exactly one of pod, multus"
type Network struct {
	// +kubebuilder:validation:MaxLength=63
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`
	Name string `json:"name"`
	// Pod is the pod network (the pod's eth0).
	// +optional
	Pod *PodNetwork `json:"pod,omitempty"`
	// Multus is a NetworkAttachmentDefinition attached by Multus.
	// +optional
	Multus *MultusNetwork `json:"multus,omitempty"`
}

// PodNetwork is the pod's primary network.
type PodNetwork struct{}

// MultusNetwork is a Multus network.
type MultusNetwork struct {
	// NetworkName is a NetworkAttachmentDefinition, as <name> or <namespace>/<name>.
	// +kubebuilder:validation:MinLength=1
	NetworkName string `json:"networkName"`
	// Default makes it the pod's primary network instead of the cluster default.
	// +optional
	Default bool `json:"default,omitempty"`
}

// Probe is a readiness probe of the VM.
// +kubebuilder:validation:XValidation:rule="[has(self.guestAgentPing), has(self.tcpSocket), has(self.httpGet)].filter(x, x).size() == 1",message="set exactly one of guestAgentPing, tcpSocket, httpGet"
type Probe struct {
	// GuestAgentPing asks qemu-guest-agent in the guest for a ping.
	// +optional
	GuestAgentPing *GuestAgentPing `json:"guestAgentPing,omitempty"`
	// TCPSocket connects to the guest (which has the pod's IP).
	// +optional
	TCPSocket *corev1.TCPSocketAction `json:"tcpSocket,omitempty"`
	// HTTPGet gets a URL from the guest.
	// +optional
	HTTPGet *corev1.HTTPGetAction `json:"httpGet,omitempty"`
	// +optional
	InitialDelaySeconds int32 `json:"initialDelaySeconds,omitempty"`
	// +optional
	TimeoutSeconds int32 `json:"timeoutSeconds,omitempty"`
	// +optional
	PeriodSeconds int32 `json:"periodSeconds,omitempty"`
	// +optional
	SuccessThreshold int32 `json:"successThreshold,omitempty"`
	// +optional
	FailureThreshold int32 `json:"failureThreshold,omitempty"`
}

// GuestAgentPing is a qemu-guest-agent guest-ping.
type GuestAgentPing struct{}

// PrintableStatus is a one-word summary of a VM for kubectl get.
type PrintableStatus string

const (
	StatusStopped          PrintableStatus = "Stopped"
	StatusProvisioning     PrintableStatus = "Provisioning"
	StatusStarting         PrintableStatus = "Starting"
	StatusRunning          PrintableStatus = "Running"
	StatusPaused           PrintableStatus = "Paused"
	StatusStopping         PrintableStatus = "Stopping"
	StatusTerminating      PrintableStatus = "Terminating"
	StatusCrashLoopBackOff PrintableStatus = "CrashLoopBackOff"
	StatusUnschedulable    PrintableStatus = "ErrorUnschedulable"
	StatusErrImagePull     PrintableStatus = "ErrImagePull"
	StatusImagePullBackOff PrintableStatus = "ImagePullBackOff"
	StatusPvcNotFound      PrintableStatus = "ErrorPvcNotFound"
	StatusDataVolumeError  PrintableStatus = "DataVolumeError"
	StatusSucceeded        PrintableStatus = "Succeeded"
	StatusFailed           PrintableStatus = "Failed"
	StatusInvalidSpec      PrintableStatus = "ErrorInvalidSpec"
	StatusUnknown          PrintableStatus = "Unknown"
)

// VirtualMachine condition types.
const (
	// VMReady is True while the pod is Ready.
	VMReady = "Ready"
	// VMFailure is True when the controller cannot run the VM as specified (an invalid
	// rendering, a missing PVC, a failed DataVolume, a pod the API server refused).
	VMFailure = "Failure"
	// VMRestartRequired is True when the template changed after the running pod was created:
	// the change applies at the next start.
	VMRestartRequired = "RestartRequired"
	// VMDataVolumesReady is True when every DataVolume the VM uses has Succeeded.
	VMDataVolumesReady = "DataVolumesReady"
	// VMPaused is True while the running pod's VM is paused by a Pause request.
	VMPaused = "Paused"
)

// StartFailure tracks consecutive pod failures for the restart back-off.
type StartFailure struct {
	ConsecutiveFailCount int32     `json:"consecutiveFailCount"`
	LastFailedPodUID     types.UID `json:"lastFailedPodUID,omitempty"`
	// RetryAfterTimestamp is when the next pod may be created.
	// +optional
	RetryAfterTimestamp *metav1.Time `json:"retryAfterTimestamp,omitempty"`
}

// VirtualMachineStatus is what the controller observed.
type VirtualMachineStatus struct {
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// +optional
	PrintableStatus PrintableStatus `json:"printableStatus,omitempty"`
	// Created is true while a pod for the VM exists.
	// +optional
	Created bool `json:"created,omitempty"`
	// Ready is true while the pod is Ready.
	// +optional
	Ready bool `json:"ready,omitempty"`
	// +optional
	PodName string `json:"podName,omitempty"`
	// +optional
	PodUID types.UID `json:"podUID,omitempty"`
	// +optional
	NodeName string `json:"nodeName,omitempty"`
	// IPs of the pod, which are the guest's.
	// +optional
	// +listType=atomic
	IPs []string `json:"ips,omitempty"`
	// +optional
	StartFailure *StartFailure `json:"startFailure,omitempty"`
	// PausedPodUID is the pod whose VM a Pause request paused; an Unpause, or that pod
	// going, clears it. The Paused condition and status follow it.
	// +optional
	PausedPodUID types.UID `json:"pausedPodUID,omitempty"`
	// VolumeStatus is where each hotpluggable volume is on its way into the running VM.
	// +optional
	// +listType=map
	// +listMapKey=name
	VolumeStatus []VolumeStatus `json:"volumeStatus,omitempty"`
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// VolumePhase is how far a hotpluggable volume is on its way into the VM.
type VolumePhase string

const (
	// VolumePending: waiting for the attachment pod that mounts the PVC on the VM's node.
	VolumePending VolumePhase = "Pending"
	// VolumeAttachedToNode: the attachment pod runs; the disk is not plugged in yet.
	VolumeAttachedToNode VolumePhase = "AttachedToNode"
	// VolumeReady: the guest has the disk.
	VolumeReady VolumePhase = "Ready"
	// VolumeDetaching: removed from the spec, being unplugged from the guest.
	VolumeDetaching VolumePhase = "Detaching"
)

// VolumeStatus is a hotpluggable volume's way into the running VM.
type VolumeStatus struct {
	Name  string      `json:"name"`
	Phase VolumePhase `json:"phase"`
	// Reason and Message say why it is not Ready.
	// +optional
	Reason string `json:"reason,omitempty"`
	// +optional
	Message string `json:"message,omitempty"`
	// AttachmentPod is the pod that mounts the PVC on the VM's node.
	// +optional
	AttachmentPod string `json:"attachmentPod,omitempty"`
	// PodUID is the VM's pod whose guest has the disk (phase Ready or Detaching).
	// +optional
	PodUID types.UID `json:"podUID,omitempty"`
}

// VirtualMachine is a VM that runs as a pod of RuntimeClass vmpod.
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName=vm;vms,categories=vmpod
// +kubebuilder:printcolumn:name="RunStrategy",type=string,JSONPath=`.spec.runStrategy`
// +kubebuilder:printcolumn:name="Status",type=string,JSONPath=`.status.printableStatus`
// +kubebuilder:printcolumn:name="Ready",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].status`
// +kubebuilder:printcolumn:name="Node",type=string,JSONPath=`.status.nodeName`
// +kubebuilder:printcolumn:name="IP",type=string,JSONPath=`.status.ips[0]`,priority=1
// +kubebuilder:printcolumn:name="Pod",type=string,JSONPath=`.status.podName`,priority=1
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
// +kubebuilder:validation:XValidation:rule="self.metadata.name.size() <= 57",message="a VirtualMachine name is at most 57 characters (its pod is vmpod-<name>, a DNS label)"
type VirtualMachine struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec VirtualMachineSpec `json:"spec"`
	// +optional
	Status VirtualMachineStatus `json:"status,omitempty"`
}

// VirtualMachineList is a list of VirtualMachines.
// +kubebuilder:object:root=true
type VirtualMachineList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []VirtualMachine `json:"items"`
}

func init() {
	SchemeBuilder.Register(&VirtualMachine{}, &VirtualMachineList{})
}
