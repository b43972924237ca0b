// Package cri is what containerd's CRI plugin records about the pods it runs, as the shim
// reads it: the annotations it puts in every container's OCI spec, and a lookup of a
// pod's containers in containerd's metadata (how the shim reaches a volume another pod on
// the node mounts: docs/design/204).
package cri

import (
	"path/filepath"
	"slices"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// Annotations containerd's CRI plugin puts on every container of a pod (sandbox and app).
// Only containerd sets them: a pod's own annotations reach a spec only through the
// runtime handler's pod_annotations allow-list.
const (
	AnnotationContainerType    = "io.kubernetes.cri.container-type"
	AnnotationContainerName    = "io.kubernetes.cri.container-name"
	AnnotationSandboxID        = "io.kubernetes.cri.sandbox-id"
	AnnotationSandboxUID       = "io.kubernetes.cri.sandbox-uid"
	AnnotationSandboxNamespace = "io.kubernetes.cri.sandbox-namespace"
	AnnotationSandboxCPUQuota  = "io.kubernetes.cri.sandbox-cpu-quota"
	AnnotationSandboxCPUPer    = "io.kubernetes.cri.sandbox-cpu-period"
	AnnotationSandboxMemory    = "io.kubernetes.cri.sandbox-memory"

	ContainerTypeSandbox   = "sandbox"
	ContainerTypeContainer = "container"
)

// PrivilegedSandbox says whether spec is the sandbox of a privileged pod (one the kubelet
// marks so because a container of it is privileged). The sandbox's spec carries no flag
// for it: containerd's CRI plugin makes such a sandbox's /sys writable, and only such a
// sandbox's.
func PrivilegedSandbox(spec *specs.Spec) bool {
	if spec == nil || spec.Annotations[AnnotationContainerType] != ContainerTypeSandbox {
		return false
	}
	for _, m := range spec.Mounts {
		if filepath.Clean(m.Destination) == "/sys" {
			return slices.Contains(m.Options, "rw")
		}
	}
	return false
}

// kindLabel is the containerd label the CRI plugin sets to a container's type: the
// sandbox's own labels are the pod's (and its sandbox image's, which the admin chose);
// an app container's may come from its image.
const kindLabel = "io.cri-containerd.kind"
