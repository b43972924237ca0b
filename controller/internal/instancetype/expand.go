// Package instancetype expands a VirtualMachine's instance type and preference into its
// template, as KubeVirt does before it builds a VMI: the instance type's vCPUs and memory
// (the VM may not set its own: the CRD refuses that), then the preference's defaults for
// whatever the template left unset, then the preference's requirements checked against
// the result. See docs/design/111-instancetypes.md.
package instancetype

import (
	"context"
	"fmt"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
)

// NotFoundError is an instance type or preference the VM names that does not exist (yet).
type NotFoundError struct {
	Kind, Name string
}

func (e *NotFoundError) Error() string {
	return fmt.Sprintf("%s %s not found", e.Kind, e.Name)
}

// Reason is the VM condition's reason: InstancetypeNotFound or PreferenceNotFound.
func (e *NotFoundError) Reason() string {
	switch e.Kind {
	case vmpodv1.KindPreference, vmpodv1.KindClusterPreference:
		return "PreferenceNotFound"
	}
	return "InstancetypeNotFound"
}

// RequirementsError is a VM below its preference's requirements.
type RequirementsError struct {
	Preference string
	Problem    string
}

func (e *RequirementsError) Error() string {
	return fmt.Sprintf("preference %s: %s", e.Preference, e.Problem)
}

// Expand returns vm with its instance type and preference applied to a copy of its
// template; vm itself is not changed. A VM with neither is returned as it is.
func Expand(ctx context.Context, c client.Reader, vm *vmpodv1.VirtualMachine) (*vmpodv1.VirtualMachine, error) {
	if vm.Spec.Instancetype == nil && vm.Spec.Preference == nil {
		return vm, nil
	}
	out := vm.DeepCopy()
	var pref *vmpodv1.PreferenceSpec
	var prefName string
	if m := vm.Spec.Preference; m != nil {
		spec, err := preference(ctx, c, vm.Namespace, m)
		if err != nil {
			return nil, err
		}
		pref, prefName = spec, m.Name
	}
	if m := vm.Spec.Instancetype; m != nil {
		it, err := instancetype(ctx, c, vm.Namespace, m)
		if err != nil {
			return nil, err
		}
		applyInstancetype(&out.Spec.Template.Spec.Domain, it, pref)
	}
	if pref != nil {
		applyPreference(&out.Spec.Template.Spec, pref)
		if err := checkRequirements(&out.Spec.Template.Spec.Domain, pref.Requirements); err != nil {
			return nil, &RequirementsError{Preference: prefName, Problem: err.Error()}
		}
	}
	return out, nil
}

func instancetype(ctx context.Context, c client.Reader, namespace string, m *vmpodv1.InstancetypeMatcher) (*vmpodv1.InstancetypeSpec, error) {
	var obj client.Object
	var spec func() *vmpodv1.InstancetypeSpec
	key := types.NamespacedName{Name: m.Name}
	switch m.Kind {
	case vmpodv1.KindInstancetype:
		it := &vmpodv1.VirtualMachineInstancetype{}
		obj, spec, key.Namespace = it, func() *vmpodv1.InstancetypeSpec { return &it.Spec }, namespace
	case vmpodv1.KindClusterInstancetype, "":
		it := &vmpodv1.VirtualMachineClusterInstancetype{}
		obj, spec = it, func() *vmpodv1.InstancetypeSpec { return &it.Spec }
	default:
		return nil, fmt.Errorf("spec.instancetype.kind: %q is not an instance type kind", m.Kind)
	}
	if err := get(ctx, c, key, obj, kindOr(m.Kind, vmpodv1.KindClusterInstancetype)); err != nil {
		return nil, err
	}
	return spec(), nil
}

func preference(ctx context.Context, c client.Reader, namespace string, m *vmpodv1.PreferenceMatcher) (*vmpodv1.PreferenceSpec, error) {
	var obj client.Object
	var spec func() *vmpodv1.PreferenceSpec
	key := types.NamespacedName{Name: m.Name}
	switch m.Kind {
	case vmpodv1.KindPreference:
		p := &vmpodv1.VirtualMachinePreference{}
		obj, spec, key.Namespace = p, func() *vmpodv1.PreferenceSpec { return &p.Spec }, namespace
	case vmpodv1.KindClusterPreference, "":
		p := &vmpodv1.VirtualMachineClusterPreference{}
		obj, spec = p, func() *vmpodv1.PreferenceSpec { return &p.Spec }
	default:
		return nil, fmt.Errorf("spec.preference.kind: %q is not a preference kind", m.Kind)
	}
	if err := get(ctx, c, key, obj, kindOr(m.Kind, vmpodv1.KindClusterPreference)); err != nil {
		return nil, err
	}
	return spec(), nil
}

func get(ctx context.Context, c client.Reader, key types.NamespacedName, obj client.Object, kind string) error {
	err := c.Get(ctx, key, obj)
	switch {
	case apierrors.IsNotFound(err):
		return &NotFoundError{Kind: kind, Name: key.Name}
	case err != nil:
		return fmt.Errorf("get %s %s: %w", kind, key.Name, err)
	}
	return nil
}

func kindOr(kind, def string) string {
	if kind == "" {
		return def
	}
	return kind
}

// applyInstancetype sets the domain's vCPUs (spread by the preference's topology), CPU
// model and memory. The CRD has refused a template that sets its own cpu or memory.
func applyInstancetype(d *vmpodv1.DomainSpec, it *vmpodv1.InstancetypeSpec, pref *vmpodv1.PreferenceSpec) {
	topology := vmpodv1.TopologySockets
	if pref != nil && pref.CPU != nil && pref.CPU.PreferredCPUTopology != "" {
		topology = pref.CPU.PreferredCPUTopology
	}
	cpu := &vmpodv1.CPU{Sockets: 1, Cores: 1, Threads: 1, Model: it.CPU.Model, MaxSockets: it.CPU.MaxSockets}
	switch topology {
	case vmpodv1.TopologyCores:
		cpu.Cores = it.CPU.Guest
	case vmpodv1.TopologyThreads:
		cpu.Threads = it.CPU.Guest
	default:
		cpu.Sockets = it.CPU.Guest
	}
	d.CPU = cpu
	guest := it.Memory.Guest.DeepCopy()
	d.Memory = &vmpodv1.Memory{Guest: &guest}
	if it.Memory.MaxGuest != nil {
		d.Memory.MaxGuest = ptr.To(it.Memory.MaxGuest.DeepCopy())
	}
}

// applyPreference fills what the template left unset.
func applyPreference(s *vmpodv1.InstanceSpec, p *vmpodv1.PreferenceSpec) {
	d := &s.Domain
	if dp := p.Devices; dp != nil {
		for i := range d.Devices.Disks {
			disk := &d.Devices.Disks[i]
			switch {
			case disk.CDRom != nil && disk.CDRom.Bus == "":
				disk.CDRom.Bus = dp.PreferredCdromBus
			case disk.Disk != nil && disk.Disk.Bus == "":
				disk.Disk.Bus = dp.PreferredDiskBus
			case disk.Disk == nil && disk.CDRom == nil && dp.PreferredDiskBus != "":
				disk.Disk = &vmpodv1.DiskTarget{Bus: dp.PreferredDiskBus}
			}
		}
		for i := range d.Devices.Interfaces {
			if iface := &d.Devices.Interfaces[i]; iface.Model == "" {
				iface.Model = dp.PreferredInterfaceModel
			}
		}
	}
	if fp := p.Firmware; fp != nil && d.Firmware == nil && fp.PreferredUseEFI != nil && *fp.PreferredUseEFI {
		d.Firmware = &vmpodv1.Firmware{Bootloader: &vmpodv1.Bootloader{EFI: &vmpodv1.EFI{SecureBoot: fp.PreferredUseSecureBoot}}}
	}
	if mp := p.Machine; mp != nil && mp.PreferredMachineType != "" && (d.Machine == nil || d.Machine.Type == "") {
		d.Machine = &vmpodv1.Machine{Type: mp.PreferredMachineType}
	}
	if fp := p.Features; fp != nil {
		applyFeaturePreferences(d, fp)
	}
	if p.PreferredTerminationGracePeriodSeconds != nil && s.TerminationGracePeriodSeconds == nil {
		v := *p.PreferredTerminationGracePeriodSeconds
		s.TerminationGracePeriodSeconds = &v
	}
}

// applyFeaturePreferences fills each feature the VM leaves unset, and under hyperv each
// enlightenment, as KubeVirt does: a VM that lists some enlightenments still gets the
// preference's others.
func applyFeaturePreferences(d *vmpodv1.DomainSpec, fp *vmpodv1.FeaturePreferences) {
	if d.Features == nil {
		d.Features = &vmpodv1.Features{}
	}
	f := d.Features
	fill(&f.ACPI, fp.PreferredACPI)
	fill(&f.SMM, fp.PreferredSMM)
	fill(&f.KVM, fp.PreferredKVM)
	ph := fp.PreferredHyperv
	if ph == nil {
		return
	}
	if f.HyperV == nil {
		f.HyperV = &vmpodv1.FeatureHyperv{}
	}
	h := f.HyperV
	for _, s := range []struct{ vm, pref **vmpodv1.FeatureState }{
		{&h.Relaxed, &ph.Relaxed}, {&h.VAPIC, &ph.VAPIC}, {&h.VPIndex, &ph.VPIndex}, {&h.Runtime, &ph.Runtime},
		{&h.SyNIC, &ph.SyNIC}, {&h.Reset, &ph.Reset}, {&h.Frequencies, &ph.Frequencies},
		{&h.Reenlightenment, &ph.Reenlightenment}, {&h.TLBFlush, &ph.TLBFlush}, {&h.IPI, &ph.IPI}, {&h.EVMCS, &ph.EVMCS},
	} {
		fill(s.vm, *s.pref)
	}
	fill(&h.Spinlocks, ph.Spinlocks)
	fill(&h.SyNICTimer, ph.SyNICTimer)
	fill(&h.VendorID, ph.VendorID)
}

// fill sets *dst to a copy of pref if the VM left it unset.
func fill[T any, PT interface {
	*T
	DeepCopy() PT
}](dst *PT, pref PT) {
	if *dst == nil && pref != nil {
		*dst = pref.DeepCopy()
	}
}

// checkRequirements compares the expanded domain with the preference's minimums.
func checkRequirements(d *vmpodv1.DomainSpec, r *vmpodv1.PreferenceRequirements) error {
	if r == nil {
		return nil
	}
	if r.CPU != nil {
		vcpus := uint32(1)
		if c := d.CPU; c != nil {
			vcpus = max(c.Sockets, 1) * max(c.Cores, 1) * max(c.Threads, 1)
		}
		if vcpus < r.CPU.Guest {
			return fmt.Errorf("requires %d vCPUs, the VM has %d", r.CPU.Guest, vcpus)
		}
	}
	if r.Memory != nil {
		var have resource.Quantity // the guest's memory, as render.Pod will size it
		if d.Memory != nil && d.Memory.Guest != nil {
			have = *d.Memory.Guest
		} else if m := d.Resources.Requests.Memory(); m != nil {
			have = *m
		}
		if have.Cmp(r.Memory.Guest) < 0 {
			return fmt.Errorf("requires %s of memory, the VM has %s", r.Memory.Guest.String(), have.String())
		}
	}
	return nil
}
