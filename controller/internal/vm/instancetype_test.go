package vm_test

import (
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/vmpod/vmpod/api/vmspec"
	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
	"github.com/vmpod/vmpod/controller/internal/testenv"
)

// TestInstancetypeAndPreference: a VM sized by a cluster instance type and defaulted by a
// namespaced preference gets their vCPUs, memory, topology, buses, NIC model and firmware in
// its pod; what the VM sets itself wins over the preference. A VM naming an instance type
// that does not exist says so and gets its pod once it is created; one below its
// preference's requirements does not start.
func TestInstancetypeAndPreference(t *testing.T) {
	f := setup(t)
	it := &vmpodv1.VirtualMachineClusterInstancetype{ObjectMeta: metav1.ObjectMeta{Name: "u1-" + f.ns},
		Spec: vmpodv1.InstancetypeSpec{CPU: vmpodv1.InstancetypeCPU{Guest: 4, Model: "Nehalem"}, Memory: vmpodv1.InstancetypeMemory{Guest: resource.MustParse("2Gi")}}}
	f.create(it)
	t.Cleanup(func() { _ = f.c.Delete(f.ctx, it) })
	f.create(&vmpodv1.VirtualMachinePreference{ObjectMeta: metav1.ObjectMeta{Name: "linux", Namespace: f.ns},
		Spec: vmpodv1.PreferenceSpec{
			CPU:      &vmpodv1.CPUPreferences{PreferredCPUTopology: vmpodv1.TopologyCores},
			Devices:  &vmpodv1.DevicePreferences{PreferredDiskBus: "scsi", PreferredInterfaceModel: "e1000e"},
			Firmware: &vmpodv1.FirmwarePreferences{PreferredUseEFI: ptr.To(true), PreferredUseSecureBoot: ptr.To(false)},
			Features: &vmpodv1.FeaturePreferences{PreferredSMM: &vmpodv1.FeatureState{Enabled: ptr.To(false)},
				PreferredHyperv: &vmpodv1.FeatureHyperv{Relaxed: &vmpodv1.FeatureState{}, VAPIC: &vmpodv1.FeatureState{}}},
			PreferredTerminationGracePeriodSeconds: ptr.To[int64](42),
			Requirements:                           &vmpodv1.PreferenceRequirements{Memory: &vmpodv1.MemoryRequirement{Guest: resource.MustParse("1Gi")}},
		}})

	sized := func(name string) *vmpodv1.VirtualMachine {
		v := f.cirros(name, vmpodv1.RunStrategyAlways)
		v.Spec.Instancetype = &vmpodv1.InstancetypeMatcher{Name: it.Name}
		v.Spec.Preference = &vmpodv1.PreferenceMatcher{Name: "linux", Kind: vmpodv1.KindPreference}
		v.Spec.Template.Spec.Domain.Resources.Requests = nil
		v.Spec.Template.Spec.Domain.Devices.Disks[0].Disk.Bus = "" // the preference's
		v.Spec.Template.Spec.Domain.Devices.Interfaces = []vmpodv1.Interface{{Name: "default"}}
		v.Spec.Template.Spec.Networks = []vmpodv1.Network{{Name: "default", Pod: &vmpodv1.PodNetwork{}}}
		return v
	}
	web := sized("web")
	// the VM's own enlightenment setting wins; the preference fills the others
	web.Spec.Template.Spec.Domain.Features = &vmpodv1.Features{HyperV: &vmpodv1.FeatureHyperv{Relaxed: &vmpodv1.FeatureState{Enabled: ptr.To(false)}}}
	f.create(web)
	pod := f.waitPod("web", "")
	spec, err := vmspec.Parse([]byte(pod.Annotations[vmspec.Annotation]))
	if err != nil {
		t.Fatalf("annotation: %v", err)
	}
	if spec.CPU != (vmspec.CPU{Sockets: 1, Cores: 4, Threads: 1, Model: "Nehalem"}) || spec.MemoryMiB != 2048 {
		t.Errorf("cpu %+v memory %d MiB: want the instance type's 4 vCPUs as cores (the preference's topology), its model and 2Gi", spec.CPU, spec.MemoryMiB)
	}
	if len(spec.Disks) != 1 || spec.Disks[0].Bus != vmspec.BusSCSI {
		t.Errorf("disks %+v: want the preference's scsi bus where the VM set none", spec.Disks)
	}
	if spec.Interfaces[0].Model != vmspec.ModelE1000E || spec.Firmware.Type != vmspec.FirmwareUEFI || spec.Firmware.SecureBoot {
		t.Errorf("nic model %s, firmware %+v: want the preference's e1000e and EFI without Secure Boot", spec.Interfaces[0].Model, spec.Firmware)
	}
	if hv := spec.Features.HyperV; hv == nil || hv.Relaxed || !hv.VAPIC || *spec.Features.SMM || !*spec.Features.ACPI {
		t.Errorf("features %+v (hyperv %+v): want the VM's relaxed off, the preference's vapic and SMM off, ACPI by default", spec.Features, hv)
	}
	if g := pod.Spec.TerminationGracePeriodSeconds; g == nil || *g < 42 {
		t.Errorf("grace period %v, want the preference's 42 s (plus the shim's margin)", g)
	}
	if m := pod.Spec.Containers[0].Resources.Requests["memory"]; m.Cmp(resource.MustParse("2Gi")) != 0 {
		t.Errorf("memory request %s, want the instance type's 2Gi", m.String())
	}

	// an instance type that does not exist yet: the VM says so, and starts once it does;
	// its own firmware wins over the preference's
	missing := sized("later")
	missing.Spec.Instancetype.Name = "u2-" + f.ns
	missing.Spec.Template.Spec.Domain.Firmware = &vmpodv1.Firmware{Bootloader: &vmpodv1.Bootloader{BIOS: &vmpodv1.BIOS{}}}
	f.create(missing)
	testenv.Eventually(t, timeout, "the VM to report its missing instance type", func() (bool, string) {
		c := meta.FindStatusCondition(f.vm("later").Status.Conditions, vmpodv1.VMFailure)
		return c != nil && c.Reason == "InstancetypeNotFound" && strings.Contains(c.Message, "u2-"+f.ns), f.describe("later")
	})
	later := it.DeepCopy()
	later.ObjectMeta = metav1.ObjectMeta{Name: "u2-" + f.ns}
	f.create(later)
	t.Cleanup(func() { _ = f.c.Delete(f.ctx, later) })
	if spec, err := vmspec.Parse([]byte(f.waitPod("later", "").Annotations[vmspec.Annotation])); err != nil || spec.Firmware.Type != vmspec.FirmwareBIOS {
		t.Errorf("later: %v, firmware %+v: want the VM's own BIOS", err, spec)
	}

	// below the preference's requirements: no pod, and the reason
	small := sized("small")
	small.Spec.Instancetype = nil
	small.Spec.Template.Spec.Domain.Memory = &vmpodv1.Memory{Guest: ptr.To(resource.MustParse("512Mi"))}
	f.create(small)
	testenv.Eventually(t, timeout, "the VM to report its unmet requirements", func() (bool, string) {
		c := meta.FindStatusCondition(f.vm("small").Status.Conditions, vmpodv1.VMFailure)
		return c != nil && c.Reason == "PreferenceRequirementsNotMet" && strings.Contains(c.Message, "requires 1Gi of memory"), f.describe("small")
	})
	if p := f.pod("small"); p != nil {
		t.Errorf("a VM below its preference's requirements got pod %s", p.Name)
	}
}
