package pod

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/api/vmspec"
	"github.com/vmpod/vmpod/devices"
)

// PCI passthrough the Kubernetes way (docs/design/206): a device plugin or DRA driver
// allocates, and the container's OCI spec carries the VFIO nodes (/dev/vfio/<group>, or
// an iommufd /dev/vfio/devices/vfioN) a CDI spec injected. The shim goes by those nodes,
// never by names or paths a pod author writes.

// vfioContainerNode is VFIO's container device, which every user of a group also gets:
// it names no PCI function.
const vfioContainerNode = "/dev/vfio/vfio"

// vfioNodes are the VFIO group and device nodes of spec.
func vfioNodes(spec *specs.Spec) []devices.CharDevice {
	if spec.Linux == nil {
		return nil
	}
	var out []devices.CharDevice
	for _, d := range spec.Linux.Devices {
		if d.Type == "c" && strings.HasPrefix(d.Path, "/dev/vfio/") && d.Path != vfioContainerNode {
			out = append(out, devices.CharDevice{Path: d.Path, Major: uint32(d.Major), Minor: uint32(d.Minor)})
		}
	}
	return out
}

// hostDevicesFor claims the PCI functions behind the VFIO nodes of a VM pod's compute
// container for vm's gpus and hostDevices: each entry is one allocated unit, so the
// container must have been given at least as many nodes; KubeVirt's PCI_RESOURCE_<NAME>
// variables, where a device plugin sets them, must name functions among those. It
// returns the functions and the 64-bit PCI window their BARs need.
func hostDevicesFor(spec *specs.Spec, vm *vmspec.VM, sysfs devices.Sysfs, allowBind []string) ([]devices.PCIAddress, uint64, error) {
	want := len(vm.GPUs) + len(vm.HostDevices)
	if want == 0 {
		return nil, 0, nil
	}
	nodes := vfioNodes(spec)
	if len(nodes) < want {
		return nil, 0, fmt.Errorf("gpus/hostDevices: %d asked for, but the compute container was given %d VFIO devices (is the device plugin or DRA driver of %s running, and the resource in the container's limits?): %w",
			want, len(nodes), resourceNames(vm), errdefs.ErrFailedPrecondition)
	}
	claim, err := sysfs.CheckVFIO(nodes, allowBind)
	if err != nil {
		return nil, 0, fmt.Errorf("gpus/hostDevices: %w: %w", err, errdefs.ErrFailedPrecondition)
	}
	fns := claim.Functions
	if spec.Process != nil {
		for _, env := range spec.Process.Env {
			name, value, _ := strings.Cut(env, "=")
			if !strings.HasPrefix(name, "PCI_RESOURCE_") {
				continue
			}
			for _, s := range strings.Split(value, ",") {
				a, err := devices.ParsePCIAddress(strings.TrimSpace(s))
				if err != nil {
					return nil, 0, fmt.Errorf("gpus/hostDevices: env %s: %w: %w", name, err, errdefs.ErrInvalidArgument)
				}
				if !slices.Contains(fns, a) {
					return nil, 0, fmt.Errorf("gpus/hostDevices: env %s names %s, which none of the container's VFIO devices gives: %w", name, a, errdefs.ErrFailedPrecondition)
				}
			}
		}
	}
	var bars uint64
	for _, a := range fns {
		n, err := sysfs.BAR64Bytes(a)
		if err != nil {
			return nil, 0, fmt.Errorf("gpus/hostDevices: %w", err)
		}
		bars += n
	}
	// every check passed: only now may a function leave its host driver
	if err := claim.Bind(); err != nil {
		return nil, 0, fmt.Errorf("gpus/hostDevices: %w: %w", err, errdefs.ErrFailedPrecondition)
	}
	return fns, devices.PCIHole64For(bars), nil
}

func resourceNames(vm *vmspec.VM) string {
	var names []string
	for _, d := range append(slices.Clone(vm.GPUs), vm.HostDevices...) {
		if !slices.Contains(names, d.ResourceName) {
			names = append(names, d.ResourceName)
		}
	}
	return strings.Join(names, ", ")
}

// plugHostDevices hot-plugs into a container pod's q35 VM the PCI functions behind the
// VFIO nodes of a container's spec (a device plugin's or DRA driver's allocation, injected
// by CDI) that it does not have yet, and returns the spec without those nodes: their host
// major:minor mean nothing in the guest, which has the device itself. The functions stay
// the pod's until it ends.
func (p *containerPod) plugHostDevices(ctx context.Context, spec *specs.Spec) (*specs.Spec, error) {
	nodes := vfioNodes(spec)
	if len(nodes) == 0 {
		return spec, nil
	}
	if p.machine != machine.Q35 {
		return nil, fmt.Errorf("linux.devices %s: PCI passthrough needs a q35 pod (annotation vmpod.dev/machine: q35), this one is %s: %w", nodes[0].Path, p.machine, errdefs.ErrFailedPrecondition)
	}
	// one container's claim at a time: two sharing a group must not both rebind it
	p.hostDevMu.Lock()
	defer p.hostDevMu.Unlock()
	claim, err := devices.Sysfs{}.CheckVFIO(nodes, p.vfioBind)
	if err != nil {
		return nil, fmt.Errorf("linux.devices: %w: %w", err, errdefs.ErrFailedPrecondition)
	}
	fns := claim.Functions
	var bars uint64
	for _, a := range fns {
		n, err := devices.Sysfs{}.BAR64Bytes(a)
		if err != nil {
			return nil, fmt.Errorf("linux.devices: %w", err)
		}
		bars += n
	}
	if devices.PCIHole64For(bars) != 0 {
		return nil, fmt.Errorf("linux.devices: %v have %d GiB of 64-bit BARs, more than a running VM's window maps: pass them to a VM pod (gpus/hostDevices), which sizes its window at boot: %w", fns, bars>>30, errdefs.ErrFailedPrecondition)
	}
	if err := claim.Bind(); err != nil {
		return nil, fmt.Errorf("linux.devices: %w: %w", err, errdefs.ErrFailedPrecondition)
	}
	for _, a := range fns {
		if slices.Contains(p.hostDevices, a) {
			continue
		}
		id := fmt.Sprintf("hostdev%d", len(p.hostDevices))
		if err := p.guest.Machine().PlugVFIO(ctx, id, a); err != nil {
			return nil, fmt.Errorf("linux.devices: %w", err)
		}
		p.hostDevices = append(p.hostDevices, a)
	}
	g := *spec
	linux := *spec.Linux
	linux.Devices = slices.DeleteFunc(slices.Clone(spec.Linux.Devices), func(d specs.LinuxDevice) bool {
		return d.Type == "c" && strings.HasPrefix(d.Path, "/dev/vfio/")
	})
	g.Linux = &linux
	return &g, nil
}
