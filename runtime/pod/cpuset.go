package pod

import (
	"context"
	"fmt"
	"os"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"k8s.io/utils/cpuset"
)

// Exclusive CPUs (the kubelet's static CPU manager, NRI plugins) arrive as a container's
// linux.resources.cpu.cpus: host CPU numbers, which mean nothing in the guest. The VM is
// the pod's CPU boundary, so its vCPU threads are pinned to the union of its containers'
// host cpusets, and in the guest a container keeps every vCPU (they all run on the CPUs
// the pod was given). Host NUMA nodes (cpu.mems) likewise mean nothing in the guest.
// docs/design/011.

// hostCPUsFile lists the host's online CPUs; a cpuset must name only those.
var hostCPUsFile = "/sys/devices/system/cpu/online"

// hostCPUs is the host cpuset r asks for; an empty set when it asks for none. Refused:
// a malformed list, a CPU the host does not have online.
func hostCPUs(r *specs.LinuxResources) (cpuset.CPUSet, error) {
	if r == nil || r.CPU == nil || r.CPU.Cpus == "" {
		return cpuset.New(), nil
	}
	set, err := cpuset.Parse(r.CPU.Cpus)
	if err != nil {
		return cpuset.New(), fmt.Errorf("linux.resources.cpu.cpus %q: %w", r.CPU.Cpus, err)
	}
	b, err := os.ReadFile(hostCPUsFile)
	if err != nil {
		return cpuset.New(), fmt.Errorf("linux.resources.cpu.cpus: host CPUs: %w", err)
	}
	online, err := cpuset.Parse(strings.TrimSpace(string(b)))
	if err != nil {
		return cpuset.New(), fmt.Errorf("linux.resources.cpu.cpus: %s: %w", hostCPUsFile, err)
	}
	if !set.IsSubsetOf(online) {
		return cpuset.New(), fmt.Errorf("linux.resources.cpu.cpus %q: CPUs %s are not online on this host (online: %s)",
			r.CPU.Cpus, set.Difference(online), online)
	}
	return set, nil
}

// guestResources is r as the guest applies it: without host CPU and NUMA node numbers.
// r itself is not changed.
func guestResources(r *specs.LinuxResources) *specs.LinuxResources {
	if r == nil || r.CPU == nil || (r.CPU.Cpus == "" && r.CPU.Mems == "") {
		return r
	}
	g, cpu := *r, *r.CPU
	cpu.Cpus, cpu.Mems = "", ""
	g.CPU = &cpu
	return &g
}

// podCPUs is the union of the containers' host cpusets.
func (p *containerPod) podCPUs() cpuset.CPUSet {
	p.mu.Lock()
	defer p.mu.Unlock()
	u := cpuset.New()
	for _, c := range p.containers {
		u = u.Union(c.cpus)
	}
	return u
}

// pinVCPUs pins the VM's vCPUs to the pod's CPUs when they changed since the last time
// (or always: after vCPUs were added, which start unpinned).
func (p *containerPod) pinVCPUs(ctx context.Context, always bool) error {
	p.pinMu.Lock()
	defer p.pinMu.Unlock()
	select {
	case <-p.guest.Done():
		return nil // no vCPUs left to pin
	default:
	}
	want := p.podCPUs()
	if !always && want.String() == p.pinned.String() { // (Equals tells nil from empty)
		return nil
	}
	p.mu.Lock()
	online := p.size.VCPUs
	p.mu.Unlock()
	if err := p.guest.Machine().PinVCPUs(ctx, want, online); err != nil {
		return err
	}
	p.pinned = want
	return nil
}
