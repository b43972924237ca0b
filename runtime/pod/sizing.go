package pod

import (
	"fmt"
	"strconv"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/vmpod/vmpod/runtime/cri"
	"github.com/vmpod/vmpod/runtime/nodeconfig"
)

// Size is a VM's vCPUs and memory.
type Size struct {
	VCPUs     int
	MemoryMiB int
}

// sizeFor derives the VM size from the pod's resources: CRI's sandbox-cpu-quota/period and
// sandbox-memory annotations (the pod's limits) or, without CRI, the container's own
// limits; within the node's bounds, the memory plus the guest's own overhead.
func sizeFor(spec *specs.Spec, s nodeconfig.Sizing) (Size, error) {
	quota, period, memBytes, err := podLimits(spec)
	if err != nil {
		return Size{}, err
	}
	pod := claim{cpuMilli: cpuMilli(quota, period), memBytes: max(memBytes, 0)}
	size := sizeForClaims([]claim{pod}, s)
	size.VCPUs = min(size.VCPUs, s.MaxVCPUs)
	size.MemoryMiB = min(size.MemoryMiB, s.MaxMemoryMiB)
	return size, nil
}

func podLimits(spec *specs.Spec) (quota, period, memBytes int64, err error) {
	parse := func(key string) (int64, error) {
		v, ok := spec.Annotations[key]
		if !ok || v == "" {
			return 0, nil
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("annotation %s=%q: not an integer", key, v)
		}
		return n, nil
	}
	if quota, err = parse(cri.AnnotationSandboxCPUQuota); err != nil {
		return
	}
	if period, err = parse(cri.AnnotationSandboxCPUPer); err != nil {
		return
	}
	if memBytes, err = parse(cri.AnnotationSandboxMemory); err != nil {
		return
	}
	if _, cri := spec.Annotations[cri.AnnotationSandboxID]; cri || spec.Linux == nil || spec.Linux.Resources == nil {
		return quota, period, memBytes, nil
	}
	// Not a CRI pod (e.g. ctr run): the container's own limits size its VM.
	r := spec.Linux.Resources
	if r.CPU != nil && r.CPU.Quota != nil && r.CPU.Period != nil {
		quota, period = *r.CPU.Quota, int64(*r.CPU.Period)
	}
	if r.Memory != nil && r.Memory.Limit != nil {
		memBytes = *r.Memory.Limit
	}
	return quota, period, memBytes, nil
}
