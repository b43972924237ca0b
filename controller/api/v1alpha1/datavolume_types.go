package v1alpha1

import (
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// DataVolumeSpec is a PVC and how to fill it.
// +kubebuilder:validation:XValidation:rule="has(self.source) != has(self.sourceRef)",message="set exactly one of source and sourceRef"
// +kubebuilder:validation:XValidation:rule="self.contentType != 'archive' || (has(self.source) && (has(self.source.http) || has(self.source.s3) || has(self.source.upload)))",message="contentType archive needs an http, s3 or upload source",fieldPath=".contentType"
// +kubebuilder:validation:XValidation:rule="self.contentType != 'archive' || !has(self.storage.volumeMode) || self.storage.volumeMode == 'Filesystem'",message="contentType archive extracts files: it needs volumeMode Filesystem",fieldPath=".contentType"
type DataVolumeSpec struct {
	// +optional
	Source DataVolumeSource `json:"source,omitzero"`
	// SourceRef clones what a DataSource names, as CDI's sourceRef does.
	// +optional
	SourceRef *DataVolumeSourceRef `json:"sourceRef,omitempty"`
	// ContentType kubevirt is a disk image (converted to raw), archive a tar archive
	// extracted into the volume.
	// +kubebuilder:validation:Enum=kubevirt;archive
	// +kubebuilder:default=kubevirt
	// +optional
	ContentType ContentType `json:"contentType,omitempty"`
	// Storage is the PVC to create.
	Storage StorageSpec `json:"storage"`
}

// DataVolumeSourceRef names the DataSource a DataVolume clones.
type DataVolumeSourceRef struct {
	// +kubebuilder:validation:Enum=DataSource
	Kind string `json:"kind"`
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	Name string `json:"name"`
	// Namespace of the DataSource; the DataVolume's by default.
	// +kubebuilder:validation:MaxLength=63
	// +optional
	Namespace string `json:"namespace,omitempty"`
}

// DataSourceKind is the one kind a sourceRef names.
const DataSourceKind = "DataSource"

// ContentType is what a DataVolume's source holds.
type ContentType string

const (
	ContentTypeKubeVirt ContentType = "kubevirt"
	ContentTypeArchive  ContentType = "archive"
)

// DataVolumeSource is where a DataVolume's data comes from.
// +kubebuilder:validation:XValidation:rule="[has(self.http), has(self.s3), has(self.registry), has(self.upload), has(self.pvc), has(self.blank)].filter(x, x).size() == 1",message="set exactly one of http, s3, registry, upload, pvc, blank"
type DataVolumeSource struct {
	// +optional
	HTTP *HTTPSource `json:"http,omitempty"`
	// +optional
	S3 *S3Source `json:"s3,omitempty"`
	// +optional
	Registry *RegistrySource `json:"registry,omitempty"`
	// Upload waits for the user to upload the image (kubectl vmpod image-upload).
	// +optional
	Upload *UploadSource `json:"upload,omitempty"`
	// PVC clones another PVC, of this namespace or (if that one allows it) another.
	// +optional
	PVC *PVCSource `json:"pvc,omitempty"`
	// Blank is an empty (sparse) disk of the PVC's size.
	// +optional
	Blank *BlankSource `json:"blank,omitempty"`
}

// HTTPSource downloads an image over HTTP(S). raw, qcow2, vmdk (single-file), vdi, vhd and
// vhdx, gzip- or xz-compressed or not, are accepted and converted to raw.
type HTTPSource struct {
	// +kubebuilder:validation:Pattern=`^https?://`
	// +kubebuilder:validation:MaxLength=4096
	URL string `json:"url"`
	// Checksum of the downloaded bytes (before decompression) as <algorithm>:<hex>; a
	// mismatch fails the import. A vmpod addition: CDI has no checksum.
	// +kubebuilder:validation:Pattern=`^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$`
	// +optional
	Checksum string `json:"checksum,omitempty"`
	// SecretRef names a Secret with keys accessKeyId and secretKey, sent as HTTP basic auth.
	// +optional
	SecretRef string `json:"secretRef,omitempty"`
	// CertConfigMap names a ConfigMap whose ca.pem (or any *.crt/*.pem keys) are the CAs
	// trusted for the server.
	// +optional
	CertConfigMap string `json:"certConfigMap,omitempty"`
	// ExtraHeaders are "Name: value" headers sent with the request.
	// +kubebuilder:validation:MaxItems=32
	// +listType=atomic
	// +optional
	ExtraHeaders []string `json:"extraHeaders,omitempty"`
	// SecretExtraHeaders name Secrets whose values are "Name: value" headers.
	// +kubebuilder:validation:MaxItems=8
	// +listType=atomic
	// +optional
	SecretExtraHeaders []string `json:"secretExtraHeaders,omitempty"`
}

// S3Source gets an object from an S3-compatible store, in any format an HTTPSource takes.
type S3Source struct {
	// URL is http(s)://<endpoint>/<bucket>/<object key>, path-style as in CDI.
	// +kubebuilder:validation:Pattern=`^https?://[^/?#]+/[^/?#]+/[^?#]+$`
	// +kubebuilder:validation:MaxLength=4096
	URL string `json:"url"`
	// SecretRef names a Secret with keys accessKeyId and secretKey: the request is signed
	// with them (AWS Signature Version 4). Without it the object is read anonymously.
	// +optional
	SecretRef string `json:"secretRef,omitempty"`
	// CertConfigMap names a ConfigMap of CA certificates trusted for the endpoint.
	// +optional
	CertConfigMap string `json:"certConfigMap,omitempty"`
	// Region to sign for. Defaults to the region of an AWS endpoint's name
	// (s3.<region>.amazonaws.com), else us-east-1 (MinIO's and Ceph RGW's default). A vmpod
	// addition: CDI takes the endpoint name's first label.
	// +kubebuilder:validation:Pattern=`^[a-z0-9][a-z0-9-]{0,62}$`
	// +optional
	Region string `json:"region,omitempty"`
	// Checksum of the object's bytes as <algorithm>:<hex>, as for HTTPSource.
	// +kubebuilder:validation:Pattern=`^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$`
	// +optional
	Checksum string `json:"checksum,omitempty"`
}

// RegistrySource pulls a containerDisk image and imports its disk (the file in /disk), in
// any format an HTTPSource takes.
type RegistrySource struct {
	// URL is docker://<image reference>.
	// +kubebuilder:validation:Pattern=`^docker://`
	// +kubebuilder:validation:MaxLength=4096
	URL string `json:"url"`
	// SecretRef names a Secret with keys accessKeyId and secretKey (registry credentials).
	// +optional
	SecretRef string `json:"secretRef,omitempty"`
	// +optional
	CertConfigMap string `json:"certConfigMap,omitempty"`
}

// UploadSource is an image the user uploads, in any format an HTTPSource takes. The
// DataVolume is UploadReady while its importer waits; the upload goes through the API
// server's port-forward to the importer pod, so uploading needs pods/portforward in the
// namespace (no upload proxy, no token).
type UploadSource struct{}

// PVCSource is a PVC to clone. A PVC in another namespace is cloned only if that
// namespace lets the DataVolume's namespace's default ServiceAccount create
// datavolumes/source there (ClusterRole vmpod-datavolume-cloner), as in CDI.
type PVCSource struct {
	// Namespace is the PVC's namespace (default: the DataVolume's).
	// +optional
	Namespace string `json:"namespace,omitempty"`
	// +kubebuilder:validation:MinLength=1
	Name string `json:"name"`
}

// BlankSource is an empty disk.
type BlankSource struct{}

// StorageSpec is the PVC a DataVolume creates.
type StorageSpec struct {
	// Defaults to [ReadWriteOnce].
	// +listType=atomic
	// +optional
	AccessModes []corev1.PersistentVolumeAccessMode `json:"accessModes,omitempty"`
	// +kubebuilder:validation:Enum=Filesystem;Block
	// +optional
	VolumeMode *corev1.PersistentVolumeMode `json:"volumeMode,omitempty"`
	// Resources.requests.storage is the PVC's size.
	// +kubebuilder:validation:XValidation:rule="has(self.requests) && 'storage' in self.requests",message="requests.storage is required"
	Resources corev1.VolumeResourceRequirements `json:"resources"`
	// +optional
	StorageClassName *string `json:"storageClassName,omitempty"`
}

// DataVolumePhase is where an import is.
type DataVolumePhase string

const (
	PhasePending          DataVolumePhase = "Pending"
	PhaseImportScheduled  DataVolumePhase = "ImportScheduled"
	PhaseImportInProgress DataVolumePhase = "ImportInProgress"
	PhaseUploadScheduled  DataVolumePhase = "UploadScheduled"
	PhaseUploadReady      DataVolumePhase = "UploadReady"
	PhaseCloneScheduled   DataVolumePhase = "CloneScheduled"
	PhaseCloneInProgress  DataVolumePhase = "CloneInProgress"
	PhaseSucceeded        DataVolumePhase = "Succeeded"
	PhaseFailed           DataVolumePhase = "Failed"
)

// DataVolume condition types.
const (
	// DVBound mirrors the PVC's binding.
	DVBound = "Bound"
	// DVRunning is True while an importer or cloner runs.
	DVRunning = "Running"
	// DVReady is True when the PVC holds the complete data.
	DVReady = "Ready"
)

// Annotations the importer writes on the PVC it fills; the DataVolume controller mirrors
// them into the DataVolume's status. The importer sets ImportPhaseAnnotation to Succeeded
// only after the data is complete and synced, so a PVC with it is never half-written. See
// docs/design/103-import-progress.md.
const (
	ImportPhaseAnnotation    = "vmpod.dev/import-phase" // Running, UploadReady, Succeeded or Failed
	ImportProgressAnnotation = "vmpod.dev/import-progress"
	ImportReasonAnnotation   = "vmpod.dev/import-reason"
	ImportMessageAnnotation  = "vmpod.dev/import-message"
)

// How an upload reaches the importer: kubectl vmpod image-upload PUTs the image to
// UploadPath on the importer pod's loopback port UploadPort, through the API server's
// port-forward (docs/design/103-import-progress.md). UploadFormPath takes it as the field
// "file" of a multipart/form-data POST, as CDI's upload-form endpoint does (a browser, curl -F).
const (
	UploadPort      = 8080
	UploadPath      = "/upload"
	UploadFormPath  = "/upload-form"
	UploadFormField = "file"
)

// How a clone from another namespace reaches its importer: a pod in the source namespace
// serves the source PVC's disk at ClonePath over TLS on ClonePort, behind a Service
// (docs/design/113-cross-namespace-clone.md).
const (
	ClonePort = 8443
	ClonePath = "/disk.img"
	// the keys of the source side's Secret, the files of the server's --tls-dir
	CloneCertKey  = "tls.crt"
	CloneKeyKey   = "tls.key"
	CloneTokenKey = "token"
)

// DataVolumeStatus is what the controller observed.
type DataVolumeStatus struct {
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// +optional
	Phase DataVolumePhase `json:"phase,omitempty"`
	// Progress is the share of the source read so far, "N/A" when its size is unknown.
	// +optional
	Progress string `json:"progress,omitempty"`
	// ClaimName is the PVC.
	// +optional
	ClaimName string `json:"claimName,omitempty"`
	// RestartCount counts failed importer pods that were retried.
	// +optional
	RestartCount int32 `json:"restartCount,omitempty"`
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// DataVolume is a PVC filled from a source: an HTTP(S) download, an S3 object, an upload, a registry image, a clone
// of another PVC, or nothing.
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName=dv;dvs,categories=vmpod
// +kubebuilder:printcolumn:name="Phase",type=string,JSONPath=`.status.phase`
// +kubebuilder:printcolumn:name="Progress",type=string,JSONPath=`.status.progress`
// +kubebuilder:printcolumn:name="Restarts",type=integer,JSONPath=`.status.restartCount`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
// +kubebuilder:validation:XValidation:rule="self.spec == oldSelf.spec",message="spec is immutable, as in CDI: a DataVolume is one import; make a new one to import again"
type DataVolume struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec DataVolumeSpec `json:"spec"`
	// +optional
	Status DataVolumeStatus `json:"status,omitempty"`
}

// DataVolumeList is a list of DataVolumes.
// +kubebuilder:object:root=true
type DataVolumeList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []DataVolume `json:"items"`
}

// DataVolumeTemplateSpec is a DataVolume a VirtualMachine creates.
type DataVolumeTemplateSpec struct {
	Metadata DataVolumeTemplateMeta `json:"metadata"`
	Spec     DataVolumeSpec         `json:"spec"`
}

// DataVolumeTemplateMeta names a templated DataVolume.
type DataVolumeTemplateMeta struct {
	// +kubebuilder:validation:MaxLength=63
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`
	Name string `json:"name"`
	// +optional
	Labels map[string]string `json:"labels,omitempty"`
	// +optional
	Annotations map[string]string `json:"annotations,omitempty"`
}

// DataSourceSpec names the data a DataSource publishes: a PVC, as in CDI.
type DataSourceSpec struct {
	Source DataSourceSource `json:"source"`
}

// DataSourceSource is a DataSource's data.
type DataSourceSource struct {
	PVC DataSourcePVC `json:"pvc"`
}

// DataSourcePVC is the PVC a DataSource publishes.
type DataSourcePVC struct {
	// Namespace of the PVC; the DataSource's by default.
	// +kubebuilder:validation:MaxLength=63
	// +optional
	Namespace string `json:"namespace,omitempty"`
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	Name string `json:"name"`
}

// DataSource is a name for a PVC of golden data (an OS image) that DataVolumes clone by
// reference (sourceRef), so the PVC behind the name can be replaced (CDI's DataSource).
// +kubebuilder:object:root=true
// +kubebuilder:resource:shortName=das,categories=vmpod
// +kubebuilder:printcolumn:name="PVC",type=string,JSONPath=`.spec.source.pvc.name`
// +kubebuilder:printcolumn:name="PVC Namespace",type=string,JSONPath=`.spec.source.pvc.namespace`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type DataSource struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec DataSourceSpec `json:"spec"`
}

// DataSourceList is a list of DataSources.
// +kubebuilder:object:root=true
type DataSourceList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []DataSource `json:"items"`
}

func init() {
	SchemeBuilder.Register(&DataVolume{}, &DataVolumeList{}, &DataSource{}, &DataSourceList{})
}
