// Package v1alpha1 is the vmpod.dev/v1alpha1 API: VirtualMachine and DataVolume.
//
// The shapes follow KubeVirt's kubevirt.io/v1 VirtualMachine and CDI's
// cdi.kubevirt.io/v1beta1 DataVolume closely enough that their manifests convert field by
// field (kubectl vmpod convert); what vmpod does not implement is left out rather than
// accepted and ignored.
// +kubebuilder:object:generate=true
// +groupName=vmpod.dev
package v1alpha1

import (
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/controller-runtime/pkg/scheme"
)

var (
	// GroupVersion is the API group and version of these types.
	GroupVersion = schema.GroupVersion{Group: "vmpod.dev", Version: "v1alpha1"}

	// SchemeBuilder adds these types to a scheme.
	SchemeBuilder = &scheme.Builder{GroupVersion: GroupVersion}

	// AddToScheme adds these types to a scheme.
	AddToScheme = SchemeBuilder.AddToScheme
)
