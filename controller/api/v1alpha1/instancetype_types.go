package v1alpha1

import (
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Instance types and preferences, after KubeVirt's instancetype.kubevirt.io: an instance
// type is the size of a VM (its vCPUs and memory), which a VM that refers to one must not
// set itself; a preference is defaults for what the VM leaves unset (buses, NIC model,
// firmware, CPU topology) and the least it needs. The controller expands both into the
// VM's template before it renders the pod (controller/internal/instancetype); see
// docs/design/111-instancetypes.md.

// Kinds a VM's instancetype and preference matchers name.
const (
	KindInstancetype        = "VirtualMachineInstancetype"
	KindClusterInstancetype = "VirtualMachineClusterInstancetype"
	KindPreference          = "VirtualMachinePreference"
	KindClusterPreference   = "VirtualMachineClusterPreference"
)

// InstancetypeMatcher names the instance type a VM takes its size from.
type InstancetypeMatcher struct {
	// +kubebuilder:validation:MinLength=1
	Name string `json:"name"`
	// Kind is VirtualMachineClusterInstancetype (the default) or VirtualMachineInstancetype
	// (in the VM's namespace).
	// +kubebuilder:validation:Enum=VirtualMachineClusterInstancetype;VirtualMachineInstancetype
	// +kubebuilder:default=VirtualMachineClusterInstancetype
	// +optional
	Kind string `json:"kind,omitempty"`
}

// PreferenceMatcher names the preference a VM takes its defaults from.
type PreferenceMatcher struct {
	// +kubebuilder:validation:MinLength=1
	Name string `json:"name"`
	// Kind is VirtualMachineClusterPreference (the default) or VirtualMachinePreference (in
	// the VM's namespace).
	// +kubebuilder:validation:Enum=VirtualMachineClusterPreference;VirtualMachinePreference
	// +kubebuilder:default=VirtualMachineClusterPreference
	// +optional
	Kind string `json:"kind,omitempty"`
}

// InstancetypeSpec is the size of a VM.
type InstancetypeSpec struct {
	CPU    InstancetypeCPU    `json:"cpu"`
	Memory InstancetypeMemory `json:"memory"`
}

// InstancetypeCPU is the guest's vCPU count (its topology is the preference's) and CPU
// model.
type InstancetypeCPU struct {
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=512
	Guest uint32 `json:"guest"`
	// Model is the guest's CPU model, as domain.cpu.model (which a VM with an instance
	// type cannot set): host-model (the default), host-passthrough or a QEMU model name the
	// node allows.
	// +kubebuilder:validation:MaxLength=64
	// +kubebuilder:validation:Pattern=`^[A-Za-z0-9][A-Za-z0-9._-]*$`
	// +optional
	Model string `json:"model,omitempty"`
	// MaxSockets is the VM's room to hot-plug sockets, as domain.cpu.maxSockets: a VM
	// switched to an instance type of more sockets within it is resized in place (with the
	// sockets topology; other topologies change the socket's size, which needs a restart).
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=512
	// +optional
	MaxSockets uint32 `json:"maxSockets,omitempty"`
}

// CPURequirement is the least vCPUs a preference accepts.
type CPURequirement struct {
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=512
	Guest uint32 `json:"guest"`
}

// InstancetypeMemory is the guest's RAM and its room to grow.
// +kubebuilder:validation:XValidation:rule="!has(self.maxGuest) || quantity(string(self.guest)).compareTo(quantity(string(self.maxGuest))) <= 0",message="maxGuest must be at least guest",fieldPath=".maxGuest"
type InstancetypeMemory struct {
	// +kubebuilder:validation:XValidation:rule="quantity(string(self)).compareTo(quantity('16Mi')) >= 0",message="must be at least 16Mi"
	Guest resource.Quantity `json:"guest"`
	// MaxGuest is the VM's room to hot-plug memory, as domain.memory.maxGuest.
	// +optional
	MaxGuest *resource.Quantity `json:"maxGuest,omitempty"`
}

// MemoryRequirement is the least memory a preference accepts.
type MemoryRequirement struct {
	// +kubebuilder:validation:XValidation:rule="quantity(string(self)).compareTo(quantity('16Mi')) >= 0",message="must be at least 16Mi"
	Guest resource.Quantity `json:"guest"`
}

// CPUTopology is how a preference spreads vCPUs.
// +kubebuilder:validation:Enum=sockets;cores;threads
type CPUTopology string

const (
	// TopologySockets: one core of one thread per socket (KubeVirt's default).
	TopologySockets CPUTopology = "sockets"
	// TopologyCores: one socket of single-thread cores.
	TopologyCores CPUTopology = "cores"
	// TopologyThreads: one socket, one core, every vCPU a thread.
	TopologyThreads CPUTopology = "threads"
)

// PreferenceSpec is a VM's defaults: each applies only where the VM sets nothing.
type PreferenceSpec struct {
	// +optional
	CPU *CPUPreferences `json:"cpu,omitempty"`
	// +optional
	Devices *DevicePreferences `json:"devices,omitempty"`
	// +optional
	Firmware *FirmwarePreferences `json:"firmware,omitempty"`
	// +optional
	Machine *MachinePreferences `json:"machine,omitempty"`
	// +optional
	Features *FeaturePreferences `json:"features,omitempty"`
	// +kubebuilder:validation:Minimum=0
	// +optional
	PreferredTerminationGracePeriodSeconds *int64 `json:"preferredTerminationGracePeriodSeconds,omitempty"`
	// Requirements are the least the VM (with its instance type) must have: a VM below
	// them does not start, and says why.
	// +optional
	Requirements *PreferenceRequirements `json:"requirements,omitempty"`
}

// CPUPreferences are CPU defaults.
type CPUPreferences struct {
	// PreferredCPUTopology spreads the instance type's vCPUs; default sockets.
	// +optional
	PreferredCPUTopology CPUTopology `json:"preferredCPUTopology,omitempty"`
}

// DevicePreferences are device defaults.
type DevicePreferences struct {
	// +kubebuilder:validation:Enum=virtio;sata;scsi
	// +optional
	PreferredDiskBus DiskBus `json:"preferredDiskBus,omitempty"`
	// +kubebuilder:validation:Enum=sata;scsi
	// +optional
	PreferredCdromBus DiskBus `json:"preferredCdromBus,omitempty"`
	// +kubebuilder:validation:Enum=virtio;e1000;e1000e
	// +optional
	PreferredInterfaceModel string `json:"preferredInterfaceModel,omitempty"`
}

// FirmwarePreferences are firmware defaults, for a VM with no firmware of its own.
type FirmwarePreferences struct {
	// +optional
	PreferredUseEFI *bool `json:"preferredUseEfi,omitempty"`
	// +optional
	PreferredUseSecureBoot *bool `json:"preferredUseSecureBoot,omitempty"`
}

// FeaturePreferences are platform feature defaults: each applies where the VM's
// domain.features leaves that feature (or, under hyperv, that enlightenment) unset.
type FeaturePreferences struct {
	// +optional
	PreferredACPI *FeatureState `json:"preferredAcpi,omitempty"`
	// +optional
	PreferredSMM *FeatureState `json:"preferredSmm,omitempty"`
	// +optional
	PreferredHyperv *FeatureHyperv `json:"preferredHyperv,omitempty"`
	// +optional
	PreferredKVM *FeatureKVM `json:"preferredKvm,omitempty"`
}

// MachinePreferences are machine defaults.
type MachinePreferences struct {
	// +kubebuilder:validation:Enum=q35
	// +optional
	PreferredMachineType string `json:"preferredMachineType,omitempty"`
}

// PreferenceRequirements are minimums.
type PreferenceRequirements struct {
	// +optional
	CPU *CPURequirement `json:"cpu,omitempty"`
	// +optional
	Memory *MemoryRequirement `json:"memory,omitempty"`
}

// VirtualMachineInstancetype is an instance type in a namespace.
// +kubebuilder:object:root=true
// +kubebuilder:resource:shortName=vminstancetype;vmit,categories=vmpod
// +kubebuilder:printcolumn:name="vCPUs",type=integer,JSONPath=`.spec.cpu.guest`
// +kubebuilder:printcolumn:name="Memory",type=string,JSONPath=`.spec.memory.guest`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type VirtualMachineInstancetype struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              InstancetypeSpec `json:"spec"`
}

// VirtualMachineInstancetypeList is a list of VirtualMachineInstancetypes.
// +kubebuilder:object:root=true
type VirtualMachineInstancetypeList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []VirtualMachineInstancetype `json:"items"`
}

// VirtualMachineClusterInstancetype is an instance type for every namespace.
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Cluster,shortName=vmclusterinstancetype;vmcit,categories=vmpod
// +kubebuilder:printcolumn:name="vCPUs",type=integer,JSONPath=`.spec.cpu.guest`
// +kubebuilder:printcolumn:name="Memory",type=string,JSONPath=`.spec.memory.guest`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type VirtualMachineClusterInstancetype struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              InstancetypeSpec `json:"spec"`
}

// VirtualMachineClusterInstancetypeList is a list of VirtualMachineClusterInstancetypes.
// +kubebuilder:object:root=true
type VirtualMachineClusterInstancetypeList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []VirtualMachineClusterInstancetype `json:"items"`
}

// VirtualMachinePreference is a preference in a namespace.
// +kubebuilder:object:root=true
// +kubebuilder:resource:shortName=vmpref,categories=vmpod
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type VirtualMachinePreference struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              PreferenceSpec `json:"spec"`
}

// VirtualMachinePreferenceList is a list of VirtualMachinePreferences.
// +kubebuilder:object:root=true
type VirtualMachinePreferenceList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []VirtualMachinePreference `json:"items"`
}

// VirtualMachineClusterPreference is a preference for every namespace.
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Cluster,shortName=vmcpref,categories=vmpod
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type VirtualMachineClusterPreference struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              PreferenceSpec `json:"spec"`
}

// VirtualMachineClusterPreferenceList is a list of VirtualMachineClusterPreferences.
// +kubebuilder:object:root=true
type VirtualMachineClusterPreferenceList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []VirtualMachineClusterPreference `json:"items"`
}

func init() {
	SchemeBuilder.Register(&VirtualMachineInstancetype{}, &VirtualMachineInstancetypeList{},
		&VirtualMachineClusterInstancetype{}, &VirtualMachineClusterInstancetypeList{},
		&VirtualMachinePreference{}, &VirtualMachinePreferenceList{},
		&VirtualMachineClusterPreference{}, &VirtualMachineClusterPreferenceList{})
}
