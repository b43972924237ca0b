package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// VirtualMachineMigrationSpec names what to move, a VM or a container pod, and how
// (KubeVirt's MigrationPolicy knobs, per migration; unset takes the cluster's policy, the
// controller's --migration-* flags, whose defaults are KubeVirt's).
// +kubebuilder:validation:XValidation:rule="self == oldSelf",message="a migration's spec cannot change: delete it (cancel) and create another"
// +kubebuilder:validation:XValidation:rule="has(self.vmName) != has(self.podName)",message="name exactly one of spec.vmName and spec.podName"
// +kubebuilder:validation:XValidation:rule="!has(self.podName) || !has(self.allowPostCopy) || !self.allowPostCopy",message="spec.allowPostCopy: a container pod does not move by post-copy (its containers' files must be at the target before its guest runs there)"
type VirtualMachineMigrationSpec struct {
	// VMName is a VirtualMachine in the migration's namespace.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	// +optional
	VMName string `json:"vmName,omitempty"`
	// PodName is a container pod of a vmpod RuntimeClass in the migration's namespace: its
	// guest, with its containers running, moves into a new pod on another node, which
	// takes over the pod's labels and owners; the pod then goes (docs/design/212). The
	// new pod has its own name and IP.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	// +optional
	PodName string `json:"podName,omitempty"`
	// BandwidthMiB caps the stream in MiB/s (default: the controller's
	// --migration-bandwidth-mib, 64).
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=1048576
	// +optional
	BandwidthMiB int32 `json:"bandwidthMiB,omitempty"`
	// AutoConverge throttles a guest that dirties memory faster than it is sent (default:
	// the controller's --migration-auto-converge, true).
	// +optional
	AutoConverge *bool `json:"autoConverge,omitempty"`
	// CompletionTimeoutPerGiB bounds the migration at this many seconds per GiB of guest
	// memory (default: the controller's --migration-completion-timeout-per-gib, 800).
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=86400
	// +optional
	CompletionTimeoutPerGiB int32 `json:"completionTimeoutPerGiB,omitempty"`
	// ProgressTimeoutSeconds cancels a migration whose remaining bytes have not dropped
	// for this long (default: the controller's --migration-progress-timeout, 150).
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=86400
	// +optional
	ProgressTimeoutSeconds int32 `json:"progressTimeoutSeconds,omitempty"`
	// DowntimeLimitMs is the longest the guest may stay stopped for the last copy; QEMU
	// keeps copying until the rest fits (default 300, QEMU's).
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=60000
	// +optional
	DowntimeLimitMs int32 `json:"downtimeLimitMs,omitempty"`
	// AllowPostCopy switches a migration that hits its completion or progress timeout to
	// post-copy instead of failing it (default: the controller's
	// --migration-allow-post-copy, false unless set, as KubeVirt's): the guest runs on in
	// the target pod at once and fetches the memory not yet sent as it touches it. It then
	// completes however fast the guest dirties memory, but cannot be cancelled, and if the
	// stream between the nodes breaks the guest is lost. The target node must let QEMU
	// handle its own page faults (vm.unprivileged_userfaultfd = 1).
	// +optional
	AllowPostCopy *bool `json:"allowPostCopy,omitempty"`
}

// MigrationPhase is where a migration is.
type MigrationPhase string

const (
	// MigrationPending: accepted, nothing started.
	MigrationPending MigrationPhase = "Pending"
	// MigrationScheduling: the target pod was created and waits for a node and its start.
	MigrationScheduling MigrationPhase = "Scheduling"
	// MigrationTargetReady: the target pod runs, waiting for the guest.
	MigrationTargetReady MigrationPhase = "TargetReady"
	// MigrationRunning: the guest's state is on its way.
	MigrationRunning MigrationPhase = "Running"
	// MigrationSucceeded: the guest runs in the target pod, the VM's pod now.
	MigrationSucceeded MigrationPhase = "Succeeded"
	// MigrationFailed: the guest runs on in the source pod (or the VM was not running).
	MigrationFailed MigrationPhase = "Failed"
	// MigrationCancelled: deleted before the guest moved; it runs on in the source pod. A
	// migration is cancelled by deleting it, so this phase shows only while the deletion
	// waits on another finalizer (or to a watch that sees the last update).
	MigrationCancelled MigrationPhase = "Cancelled"
)

// VirtualMachineMigrationStatus is how far the migration is, from the shims' account.
type VirtualMachineMigrationStatus struct {
	// +optional
	Phase MigrationPhase `json:"phase,omitempty"`
	// +optional
	SourcePod string `json:"sourcePod,omitempty"`
	// +optional
	SourceNode string `json:"sourceNode,omitempty"`
	// +optional
	TargetPod string `json:"targetPod,omitempty"`
	// +optional
	TargetNode string `json:"targetNode,omitempty"`
	// +optional
	StartTimestamp *metav1.Time `json:"startTimestamp,omitempty"`
	// +optional
	EndTimestamp *metav1.Time `json:"endTimestamp,omitempty"`
	// TotalBytes is the guest's memory; TransferredBytes and RemainingBytes QEMU's count.
	// +optional
	TotalBytes int64 `json:"totalBytes,omitempty"`
	// +optional
	TransferredBytes int64 `json:"transferredBytes,omitempty"`
	// +optional
	RemainingBytes int64 `json:"remainingBytes,omitempty"`
	// DirtyPagesRate is how many guest pages the guest dirtied per second, last reading.
	// +optional
	DirtyPagesRate int64 `json:"dirtyPagesRate,omitempty"`
	// DowntimeMs is how long the guest was stopped for the switch, QEMU's figure.
	// +optional
	DowntimeMs int64 `json:"downtimeMs,omitempty"`
	// FailureReason says why a Failed migration failed.
	// +optional
	FailureReason string `json:"failureReason,omitempty"`
}

// VirtualMachineMigration moves a running VirtualMachine's guest, or a container pod's
// with its containers, into a new pod on another node without stopping it (KubeVirt's
// VirtualMachineInstanceMigration). Deleting it while it runs cancels it; the guest runs
// on in its pod.
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName=vmim,categories=vmpod
// +kubebuilder:printcolumn:name="VM",type=string,JSONPath=`.spec.vmName`
// +kubebuilder:printcolumn:name="Pod",type=string,JSONPath=`.spec.podName`
// +kubebuilder:printcolumn:name="Phase",type=string,JSONPath=`.status.phase`
// +kubebuilder:printcolumn:name="Source",type=string,JSONPath=`.status.sourceNode`
// +kubebuilder:printcolumn:name="Target",type=string,JSONPath=`.status.targetNode`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type VirtualMachineMigration struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec VirtualMachineMigrationSpec `json:"spec"`
	// +optional
	Status VirtualMachineMigrationStatus `json:"status,omitzero"`
}

// VirtualMachineMigrationList is a list of VirtualMachineMigrations.
// +kubebuilder:object:root=true
type VirtualMachineMigrationList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []VirtualMachineMigration `json:"items"`
}

// Subject names what the migration moves: "VM <name>" or "pod <name>".
func (m *VirtualMachineMigration) Subject() string {
	if m.Spec.PodName != "" {
		return "pod " + m.Spec.PodName
	}
	return "VM " + m.Spec.VMName
}

// Finished says whether the migration has ended, one way or the other.
func (m *VirtualMachineMigration) Finished() bool {
	switch m.Status.Phase {
	case MigrationSucceeded, MigrationFailed, MigrationCancelled:
		return true
	}
	return false
}

func init() {
	SchemeBuilder.Register(&VirtualMachineMigration{}, &VirtualMachineMigrationList{})
}
