package convert

import (
	"bytes"
	"errors"
	"io"
	"os"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"

	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
)

// convertFile runs Stream on a testdata file and decodes its output.
func convertFile(t *testing.T, name string) (docs []map[string]any, warnings string, err error) {
	t.Helper()
	f, err := os.Open("testdata/" + name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	return convertReader(f)
}

// convertString runs Stream on a manifest.
func convertString(t *testing.T, manifest string) (docs []map[string]any, warnings string, err error) {
	t.Helper()
	return convertReader(strings.NewReader(manifest))
}

func convertReader(in io.Reader) (docs []map[string]any, warnings string, err error) {
	var out, warn bytes.Buffer
	if err := Stream(in, &out, &warn); err != nil {
		return nil, warn.String(), err
	}
	dec := utilyaml.NewYAMLOrJSONDecoder(&out, 4096)
	for {
		var m map[string]any
		if err := dec.Decode(&m); err != nil {
			break
		}
		docs = append(docs, m)
	}
	return docs, warn.String(), nil
}

func decode[T any](t *testing.T, m map[string]any) *T {
	t.Helper()
	b, _ := yaml.Marshal(m)
	out := new(T)
	if err := yaml.UnmarshalStrict(b, out); err != nil {
		t.Fatalf("the output is not a valid %T: %v\n%s", out, err, b)
	}
	return out
}

func TestConvertCirros(t *testing.T) {
	docs, warnings, err := convertFile(t, "kubevirt-vm-cirros.yaml")
	if err != nil {
		t.Fatalf("convert: %v", err)
	}
	if warnings != "" {
		t.Errorf("unexpected warnings:\n%s", warnings)
	}
	if len(docs) != 1 || docs[0]["apiVersion"] != "vmpod.dev/v1alpha1" || docs[0]["kind"] != "VirtualMachine" {
		t.Fatalf("docs = %v", docs)
	}
	if _, ok := docs[0]["status"]; ok {
		t.Errorf("output has a status")
	}
	vm := decode[vmpodv1.VirtualMachine](t, docs[0])
	if vm.Name != "cirros-net" || vm.Spec.RunStrategy != vmpodv1.RunStrategyAlways {
		t.Errorf("name %s runStrategy %s", vm.Name, vm.Spec.RunStrategy)
	}
	s := vm.Spec.Template.Spec
	if got := s.Volumes[0].ContainerDisk; got == nil || got.Image != "quay.io/kubevirt/cirros-container-disk-demo:v1.7.0" {
		t.Errorf("containerDisk = %+v", got)
	}
	if got := s.Volumes[1].CloudInitNoCloud; got == nil || !strings.Contains(got.UserData, "hello from cloud-init") {
		t.Errorf("cloudInitNoCloud = %+v", got)
	}
	if len(s.Networks) != 2 || s.Networks[1].Multus == nil || s.Networks[1].Multus.NetworkName != "storage-net" {
		t.Errorf("networks = %+v", s.Networks)
	}
	if i := s.Domain.Devices.Interfaces[1]; i.MACAddress != "02:00:00:1a:2b:3c" {
		t.Errorf("interface = %+v", i)
	}
	if m := s.Domain.Resources.Requests.Memory(); m.String() != "128Mi" {
		t.Errorf("memory request = %s", m)
	}
	if s.Domain.Machine != nil {
		t.Errorf("an empty machine type became %+v", s.Domain.Machine)
	}
	if *s.TerminationGracePeriodSeconds != 0 || vm.Spec.Template.ObjectMeta.Labels["kubevirt.io/vm"] != "cirros-net" {
		t.Errorf("grace %d labels %v", *s.TerminationGracePeriodSeconds, vm.Spec.Template.ObjectMeta.Labels)
	}
}

func TestConvertFedoraWarnsAboutWhatItDrops(t *testing.T) {
	docs, warnings, err := convertFile(t, "kubevirt-vm-fedora.yaml")
	if err != nil {
		t.Fatalf("convert: %v", err)
	}
	if len(docs) != 2 || docs[1]["kind"] != "Secret" {
		t.Fatalf("want the VM and the Secret passed through, got %d docs", len(docs))
	}
	vm := decode[vmpodv1.VirtualMachine](t, docs[0])
	if vm.Spec.RunStrategy != vmpodv1.RunStrategyRerunOnFailure {
		t.Errorf("runStrategy %s", vm.Spec.RunStrategy)
	}
	dvt := vm.Spec.DataVolumeTemplates[0]
	if dvt.Metadata.Name != "fedora-db-root" || dvt.Spec.Source.HTTP == nil || dvt.Spec.Source.HTTP.ExtraHeaders[0] != "X-Mirror: eu" {
		t.Errorf("dataVolumeTemplate = %+v", dvt)
	}
	if q := dvt.Spec.Storage.Resources.Requests.Storage(); q.String() != "8Gi" || dvt.Spec.Storage.AccessModes[0] != corev1.ReadWriteOnce {
		t.Errorf("storage from the legacy pvc form = %+v", dvt.Spec.Storage)
	}
	d := vm.Spec.Template.Spec.Domain
	if d.Machine.Type != "q35" || d.Firmware.Bootloader.EFI == nil || *d.Firmware.Bootloader.EFI.SecureBoot || d.CPU.Cores != 2 || d.Memory.Guest.String() != "2Gi" ||
		d.CPU.MaxSockets != 4 || d.Memory.MaxGuest.String() != "8Gi" {
		t.Errorf("domain = %+v", d)
	}
	if cd := d.Devices.Disks[1].CDRom; cd == nil || cd.Bus != "sata" {
		t.Errorf("cdrom = %+v", cd)
	}
	if p := vm.Spec.Template.Spec.ReadinessProbe; p == nil || p.GuestAgentPing == nil || p.InitialDelaySeconds != 60 || p.PeriodSeconds != 10 {
		t.Errorf("readinessProbe = %+v", p)
	}
	if ref := vm.Spec.Template.Spec.Volumes[1].CloudInitNoCloud.SecretRef; ref == nil || ref.Name != "fedora-db-cloudinit" {
		t.Errorf("cloud-init secretRef = %+v", ref)
	}
	if i := vm.Spec.Template.Spec.Domain.Devices.Interfaces[0]; i.Masquerade == nil || len(i.Ports) != 1 || i.Ports[0].Port != 5432 {
		t.Errorf("masquerade interface %+v, want the binding and port 5432 carried", i)
	}
	if e := vm.Spec.Template.Spec.Volumes[2].EmptyDisk; e == nil || e.Capacity.String() != "2Gi" {
		t.Errorf("emptyDisk = %+v", e)
	}
	ac := vm.Spec.Template.Spec.AccessCredentials
	if len(ac) != 2 || ac[0].SSHPublicKey.Source.Secret.SecretName != "my-pub-key" || ac[0].SSHPublicKey.PropagationMethod.NoCloud == nil ||
		ac[1].SSHPublicKey.PropagationMethod.QemuGuestAgent == nil || strings.Join(ac[1].SSHPublicKey.PropagationMethod.QemuGuestAgent.Users, ",") != "fedora,admin" {
		t.Errorf("accessCredentials = %+v", ac)
	}
	if d.CPU.Model != "host-passthrough" || d.Features == nil || d.Features.ACPI == nil || d.Features.ACPI.Enabled != nil ||
		d.Features.SMM == nil || d.Features.SMM.Enabled == nil || !*d.Features.SMM.Enabled || d.Features.HyperV != nil {
		t.Errorf("cpu model %q, features %+v: want host-passthrough, acpi {} and smm enabled", d.CPU.Model, d.Features)
	}
	if e := vm.Spec.Template.Spec.EvictionStrategy; e == nil || *e != vmpodv1.EvictionStrategyLiveMigrate {
		t.Errorf("evictionStrategy = %v, want LiveMigrate carried", e)
	}
	// every field the converter does not carry is named, and nothing else
	if n := strings.Count(warnings, "\n"); n != 1 {
		t.Errorf("%d warnings, want 1:\n%s", n, warnings)
	}
	for _, w := range []string{
		"spec.template.spec.domain.machine.type: pc-q35-rhel9.4.0 becomes q35",
	} {
		if !strings.Contains(warnings, w) {
			t.Errorf("warnings lack %q:\n%s", w, warnings)
		}
	}
}

func TestConvertDataVolumes(t *testing.T) {
	docs, warnings, err := convertFile(t, "cdi-datavolumes.yaml")
	if err != nil {
		t.Fatalf("convert: %v", err)
	}
	reg := decode[vmpodv1.DataVolume](t, docs[0])
	if reg.Spec.Source.Registry == nil || reg.Spec.Source.Registry.URL != "docker://quay.io/kubevirt/alpine-container-disk-demo:v1.7.0" ||
		*reg.Spec.Storage.VolumeMode != corev1.PersistentVolumeBlock {
		t.Errorf("registry DataVolume = %+v", reg.Spec)
	}
	clone := decode[vmpodv1.DataVolume](t, docs[1])
	if clone.Spec.Source.PVC == nil || clone.Spec.Source.PVC.Name != "alpine-root" || *clone.Spec.Storage.StorageClassName != "fast" {
		t.Errorf("clone DataVolume = %+v", clone.Spec)
	}
	s3 := decode[vmpodv1.DataVolume](t, docs[2])
	if want := (vmpodv1.S3Source{URL: "https://s3.us-west-2.amazonaws.com/mybucket/fedora.qcow2", SecretRef: "endpoint-secret", CertConfigMap: "tls-certs"}); s3.Spec.Source.S3 == nil || *s3.Spec.Source.S3 != want {
		t.Errorf("S3 DataVolume = %+v", s3.Spec.Source)
	}
	if up := decode[vmpodv1.DataVolume](t, docs[3]); up.Spec.Source.Upload == nil {
		t.Errorf("upload DataVolume = %+v", up.Spec.Source)
	}
	for _, w := range []string{"pullMethod: vmpod's importer pulls the image itself", "spec.preallocation:", "cdi.kubevirt.io/storage.bind.immediate.requested: a KubeVirt annotation"} {
		if !strings.Contains(warnings, w) {
			t.Errorf("warnings lack %q:\n%s", w, warnings)
		}
	}
}

func TestConvertRefusesWhatWouldChangeTheVM(t *testing.T) {
	_, _, err := convertFile(t, "kubevirt-vm-unsupported.yaml")
	if err == nil {
		t.Fatal("converted a VM with a hostDisk, a LUN, SR-IOV and an inferred instancetype")
	}
	for _, want := range []string{
		"spec.instancetype.inferFromVolume: inferring from a volume's labels is not supported",
		"spec.template.spec.volumes[0]: volume source hostDisk is not supported by vmpod",
		"spec.template.spec.volumes[1]: volume source ephemeral is not supported",
		"spec.template.spec.domain.devices.disks[1].lun: LUN passthrough is not supported",
		"spec.template.spec.domain.devices.interfaces[0].sriov: SR-IOV interfaces are not supported",
		"spec.template.spec.accessCredentials[0]: access credential userPassword is not supported by vmpod (supported: sshPublicKey)",
		"spec.template.spec.accessCredentials[1].sshPublicKey.propagationMethod: propagation method configDrive is not supported by vmpod (supported: noCloud, qemuGuestAgent)",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
}

func TestObjectErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		yaml string
		want string
	}{
		{"no run strategy", "apiVersion: kubevirt.io/v1\nkind: VirtualMachine\nmetadata: {name: x}\nspec: {template: {spec: {domain: {devices: {}}}}}", "set running or runStrategy"},
		{"both", "apiVersion: kubevirt.io/v1\nkind: VirtualMachine\nmetadata: {name: x}\nspec: {running: true, runStrategy: Always, template: {spec: {domain: {}}}}", "both running and runStrategy"},
		{"wrong type", "apiVersion: kubevirt.io/v1\nkind: VirtualMachine\nmetadata: {name: x}\nspec: {running: \"yes\", template: {spec: {domain: {}}}}", "spec.running: must be true or false"},
		{"no size", "apiVersion: cdi.kubevirt.io/v1beta1\nkind: DataVolume\nmetadata: {name: d}\nspec: {source: {blank: {}}, storage: {}}", "vmpod needs the size"},
		{"gcs", "apiVersion: cdi.kubevirt.io/v1beta1\nkind: DataVolume\nmetadata: {name: d}\nspec: {source: {gcs: {url: \"gs://b/k\"}}, storage: {resources: {requests: {storage: 1Gi}}}}", "spec.source: DataVolume source gcs is not supported"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var obj map[string]any
			if err := yaml.Unmarshal([]byte(tc.yaml), &obj); err != nil {
				t.Fatal(err)
			}
			_, err := Object(obj)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
}

func TestConvertVirtualMachineInstance(t *testing.T) {
	docs, warnings, err := convertFile(t, "kubevirt-vmi.yaml")
	if err != nil {
		t.Fatalf("convert: %v", err)
	}
	if len(docs) != 1 || docs[0]["kind"] != "VirtualMachine" {
		t.Fatalf("want one VirtualMachine, got %v", docs)
	}
	vm := decode[vmpodv1.VirtualMachine](t, docs[0])
	if vm.Name != "scratch-vm" || vm.Spec.RunStrategy != vmpodv1.RunStrategyOnce || vm.Spec.Template.ObjectMeta.Labels["app"] != "scratch" {
		t.Errorf("name %s, runStrategy %s, template labels %v: want scratch-vm, Once, the VMI's labels", vm.Name, vm.Spec.RunStrategy, vm.Spec.Template.ObjectMeta.Labels)
	}
	if _, ok := vm.Annotations["kubevirt.io/latest-observed-api-version"]; ok || vm.Annotations["team"] != "platform" {
		t.Errorf("annotations %v: want KubeVirt's dropped and the user's kept", vm.Annotations)
	}
	s := vm.Spec.Template.Spec
	var disks, volumes []string
	for _, d := range s.Domain.Devices.Disks {
		disks = append(disks, d.Name)
	}
	for _, v := range s.Volumes {
		volumes = append(volumes, v.Name)
	}
	// names become DNS labels on both sides of each pair; the cloud-init volume got its disk
	if strings.Join(disks, ",") != "rootdisk,cloud-init" || strings.Join(volumes, ",") != "rootdisk,cloud-init" {
		t.Errorf("disks %v volumes %v", disks, volumes)
	}
	if s.Domain.Devices.Interfaces[0].Name != "vpc-net-0" || s.Networks[0].Name != "vpc-net-0" {
		t.Errorf("interface %q network %q, want vpc-net-0", s.Domain.Devices.Interfaces[0].Name, s.Networks[0].Name)
	}
	if ci := s.Volumes[1].CloudInitNoCloud; ci.UserData != "#cloud-config\n" || !strings.Contains(ci.NetworkData, "dhcp4") {
		t.Errorf("cloud-init %+v: want an empty cloud-config and the network data", ci)
	}
	for _, w := range []string{
		"kind: a VirtualMachineInstance runs once",
		`name "vpc_net_0" becomes "vpc-net-0"`,
		`name "rootDisk" becomes "rootdisk"`,
		"userData: empty",
		"metadata.annotations.kubevirt.io/latest-observed-api-version: a KubeVirt annotation",
	} {
		if !strings.Contains(warnings, w) {
			t.Errorf("warnings lack %q:\n%s", w, warnings)
		}
	}
}

// A KubeVirt migration of a VM's instance becomes a VirtualMachineMigration of the VM; what
// vmpod cannot honour (a node selector for the target, another cluster) is refused by name.
func TestConvertMigration(t *testing.T) {
	docs, warnings, err := convertString(t, `apiVersion: kubevirt.io/v1
kind: VirtualMachineInstanceMigration
metadata:
  name: move-db
  namespace: prod
spec:
  vmiName: db
`)
	if err != nil || len(docs) != 1 || warnings != "" {
		t.Fatalf("convert: %v, %d documents, warnings %q", err, len(docs), warnings)
	}
	m := docs[0]
	spec, _ := m["spec"].(map[string]any)
	meta, _ := m["metadata"].(map[string]any)
	if m["apiVersion"] != "vmpod.dev/v1alpha1" || m["kind"] != "VirtualMachineMigration" || meta["name"] != "move-db" || meta["namespace"] != "prod" || spec["vmName"] != "db" {
		t.Errorf("converted to %v", m)
	}
	for manifest, want := range map[string]string{
		"apiVersion: kubevirt.io/v1\nkind: VirtualMachineInstanceMigration\nmetadata: {name: m}\nspec: {vmiName: db, addedNodeSelector: {zone: a}}\n": "spec.addedNodeSelector: vmpod chooses the target node itself",
		"apiVersion: kubevirt.io/v1\nkind: VirtualMachineInstanceMigration\nmetadata: {name: m}\nspec: {}\n":                                          "spec.vmiName: missing",
		"apiVersion: kubevirt.io/v1\nkind: VirtualMachineInstanceMigration\nmetadata: {name: m}\n":                                                    "spec: missing",
	} {
		if _, _, err := convertString(t, manifest); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: %v, want an error containing %q", manifest, err, want)
		}
	}
}

func TestConvertRefusesKindsWithoutEquivalent(t *testing.T) {
	docs, _, err := convertFile(t, "kubevirt-not-converted.yaml")
	if err == nil || docs != nil {
		t.Fatalf("converted KubeVirt kinds vmpod has no equivalent of: %v, %d documents", err, len(docs))
	}
	if !errors.Is(err, ErrNotConverted) {
		t.Errorf("error %v does not wrap ErrNotConverted", err)
	}
	for _, want := range []string{
		"VirtualMachinePool workers: not converted: VM replica sets and pools",
		"MigrationPolicy fast: not converted: migration policies are not supported: a VirtualMachineMigration carries the same knobs",
		"KubeVirt kubevirt: not converted: an installation's configuration",
		"DataImportCron fedora-nightly: not converted: import crons",
		"VirtualMachineSnapshot before-upgrade: not converted: snapshots",
		"spec.template.metadata.annotations.hooks.kubevirt.io/hookSidecars: sidecar hooks",
		"spec.template.metadata.annotations.smbios.vm.kubevirt.io/baseBoardManufacturer: SMBIOS",
		"spec.template.spec.domain.firmware.kernelBoot: booting a kernel",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
}

func TestDNSLabel(t *testing.T) {
	for in, want := range map[string]string{
		"vpc_net_0": "vpc-net-0", "rootDisk": "rootdisk", "_x_": "x", "a.b": "a-b", "___": "",
		strings.Repeat("a", 70): strings.Repeat("a", 63), strings.Repeat("a", 62) + "_b": strings.Repeat("a", 62),
	} {
		if got := dnsLabel(in); got != want {
			t.Errorf("dnsLabel(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestConvertInstancetypesAndPreferences(t *testing.T) {
	docs, warnings, err := convertFile(t, "kubevirt-instancetypes.yaml")
	if err != nil {
		t.Fatalf("convert: %v", err)
	}
	if len(docs) != 5 {
		t.Fatalf("%d documents, want 5", len(docs))
	}
	cit := decode[vmpodv1.VirtualMachineClusterInstancetype](t, docs[0])
	if cit.Kind != vmpodv1.KindClusterInstancetype || cit.Spec.CPU.Guest != 1 || cit.Spec.Memory.Guest.String() != "4Gi" {
		t.Errorf("cluster instancetype = %+v", cit)
	}
	it := decode[vmpodv1.VirtualMachineInstancetype](t, docs[1])
	if it.Spec.CPU.Guest != 4 || it.Spec.CPU.Model != "host-passthrough" || it.Spec.Memory.Guest.Value() != 8<<30 ||
		it.Spec.CPU.MaxSockets != 8 || it.Spec.Memory.MaxGuest.String() != "16Gi" {
		t.Errorf("instancetype = %+v", it.Spec)
	}
	fedora := decode[vmpodv1.VirtualMachineClusterPreference](t, docs[2])
	p := fedora.Spec
	if p.CPU.PreferredCPUTopology != vmpodv1.TopologySockets || p.Devices.PreferredDiskBus != "virtio" || !*p.Firmware.PreferredUseEFI ||
		*p.PreferredTerminationGracePeriodSeconds != 180 || p.Requirements.Memory.Guest.String() != "2Gi" || p.Requirements.CPU.Guest != 1 {
		t.Errorf("preference fedora = %+v", p)
	}
	windows := decode[vmpodv1.VirtualMachinePreference](t, docs[3])
	if w := windows.Spec; w.CPU.PreferredCPUTopology != vmpodv1.TopologyCores || w.Devices.PreferredCdromBus != "sata" || w.Machine.PreferredMachineType != "q35" {
		t.Errorf("preference windows = %+v", w)
	}
	if f := windows.Spec.Features; f == nil || f.PreferredACPI == nil || f.PreferredSMM == nil || f.PreferredHyperv == nil ||
		f.PreferredHyperv.Relaxed == nil || f.PreferredHyperv.SyNICTimer == nil || f.PreferredHyperv.SyNICTimer.Direct == nil ||
		*f.PreferredHyperv.Spinlocks.Retries != 8191 || f.PreferredHyperv.EVMCS != nil {
		t.Errorf("preference windows' features = %+v", f)
	}
	vm := decode[vmpodv1.VirtualMachine](t, docs[4])
	if m := vm.Spec.Instancetype; m == nil || m.Name != "u1.medium" || m.Kind != vmpodv1.KindClusterInstancetype {
		t.Errorf("instancetype matcher = %+v", m)
	}
	if m := vm.Spec.Preference; m == nil || m.Name != "fedora" || m.Kind != vmpodv1.KindClusterPreference {
		t.Errorf("preference matcher = %+v", m)
	}
	if vm.Spec.Template.Spec.Domain.Memory != nil || len(vm.Spec.Template.Spec.Domain.Devices.Disks) != 1 {
		t.Errorf("domain = %+v: want no memory of its own and the containerdisk's default disk", vm.Spec.Template.Spec.Domain)
	}
	for _, w := range []string{
		"spec.devices.preferredDiskDedicatedIoThread: not supported by vmpod; dropped",
		"spec.instancetype.revisionName: vmpod applies the object as it is",
	} {
		if !strings.Contains(warnings, w) {
			t.Errorf("warnings lack %q:\n%s", w, warnings)
		}
	}
}

// A Windows VM keeps its Hyper-V enlightenments, secure boot with SMM and its CPU model;
// what vmpod's machine does not have (the clock section, a TPM) is named.
func TestConvertWindowsKeepsItsEnlightenments(t *testing.T) {
	docs, warnings, err := convertFile(t, "kubevirt-vm-windows.yaml")
	if err != nil {
		t.Fatalf("convert: %v", err)
	}
	vm := decode[vmpodv1.VirtualMachine](t, docs[0])
	d := vm.Spec.Template.Spec.Domain
	if d.CPU.Model != "" || d.CPU.Cores != 2 {
		t.Errorf("cpu %+v: host-model is the default (no model)", d.CPU)
	}
	f := d.Features
	if f == nil || f.ACPI == nil || f.SMM == nil || f.HyperV == nil || f.KVM != nil {
		t.Fatalf("features %+v", f)
	}
	h := f.HyperV
	for name, s := range map[string]*vmpodv1.FeatureState{"relaxed": h.Relaxed, "vapic": h.VAPIC, "vpindex": h.VPIndex, "runtime": h.Runtime,
		"reset": h.Reset, "synic": h.SyNIC, "frequencies": h.Frequencies, "reenlightenment": h.Reenlightenment, "tlbflush": h.TLBFlush, "ipi": h.IPI} {
		if s == nil || s.Enabled != nil {
			t.Errorf("hyperv.%s = %+v, want {}", name, s)
		}
	}
	if h.EVMCS != nil || h.Spinlocks == nil || *h.Spinlocks.Retries != 8191 || h.SyNICTimer == nil || h.SyNICTimer.Direct == nil ||
		h.VendorID == nil || h.VendorID.VendorID != "KVMKVMKVM" {
		t.Errorf("hyperv = %+v", h)
	}
	if n := strings.Count(warnings, "\n"); n != 2 {
		t.Errorf("%d warnings, want 2:\n%s", n, warnings)
	}
	for _, w := range []string{"spec.template.spec.domain.clock: not supported by vmpod; dropped", "spec.template.spec.domain.devices.tpm: not supported by vmpod; dropped"} {
		if !strings.Contains(warnings, w) {
			t.Errorf("warnings lack %q:\n%s", w, warnings)
		}
	}
}

// Features vmpod cannot give are refused or named, never carried silently.
func TestConvertFeatureBadInput(t *testing.T) {
	for _, tc := range []struct {
		features, cpuModel string
		errs, warnings     []string
	}{
		{features: `{"apic": {"enabled": false}}`, errs: []string{"features.apic.enabled: a guest without an APIC is not supported"}},
		{features: `{"hyperv": {"spinlocks": {"spinlocks": 100}}}`, errs: []string{"features.hyperv.spinlocks.spinlocks: 100: want 4096 or more"}},
		{features: `{"hyperv": {"relaxed": {"enabled": "yes"}}}`, errs: []string{"features.hyperv.relaxed.enabled: must be true or false"}},
		{cpuModel: `"Skylake,+vmx"`, errs: []string{`cpu.model: "Skylake,+vmx" is not a CPU model name`}},
		{features: `{"hypervPassthrough": {"enabled": true}, "pvspinlock": {}, "hyperv": {"tlbflush": {"direct": {}}, "stimer": {}}}`,
			warnings: []string{"features.hypervPassthrough: every enlightenment", "features.pvspinlock: paravirtual spinlocks",
				"features.hyperv.tlbflush.direct: not supported", "features.hyperv.stimer: not supported by vmpod; dropped"}},
		{cpuModel: `"Skylake-Client-IBRS"`, warnings: []string{"cpu.model: Skylake-Client-IBRS boots only on nodes whose vmpod config lists it"}},
	} {
		domain := `"memory": {"guest": "1Gi"}`
		if tc.features != "" {
			domain += `, "features": ` + tc.features
		}
		if tc.cpuModel != "" {
			domain += `, "cpu": {"model": ` + tc.cpuModel + `}`
		}
		manifest := `{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "f"},
			"spec": {"runStrategy": "Halted", "template": {"spec": {"domain": {` + domain + `, "devices": {}}}}}}`
		_, warnings, err := convertString(t, manifest)
		if len(tc.errs) > 0 && err == nil {
			t.Errorf("%s%s: converted", tc.features, tc.cpuModel)
		}
		for _, e := range tc.errs {
			if err == nil || !strings.Contains(err.Error(), e) {
				t.Errorf("%s%s: error %v, want %q", tc.features, tc.cpuModel, err, e)
			}
		}
		if len(tc.errs) == 0 && err != nil {
			t.Errorf("%s%s: %v", tc.features, tc.cpuModel, err)
		}
		for _, w := range tc.warnings {
			if !strings.Contains(warnings, w) {
				t.Errorf("%s%s: warnings lack %q:\n%s", tc.features, tc.cpuModel, w, warnings)
			}
		}
	}
}

// A DataSource and a DataVolume template cloning it by sourceRef convert; a sourceRef
// to another namespace's DataSource and a pvc source in another namespace are carried as
// they are (the controller checks the clone is allowed); a snapshot source is refused.
func TestConvertDataSources(t *testing.T) {
	docs, warnings, err := convertFile(t, "cdi-datasource.yaml")
	if err != nil {
		t.Fatalf("convert: %v", err)
	}
	if len(docs) != 3 {
		t.Fatalf("%d documents, want 3", len(docs))
	}
	ds := decode[vmpodv1.DataSource](t, docs[1])
	if ds.Kind != vmpodv1.DataSourceKind || ds.Spec.Source.PVC != (vmpodv1.DataSourcePVC{Name: "fedora-42-golden"}) {
		t.Errorf("DataSource = %+v", ds)
	}
	vm := decode[vmpodv1.VirtualMachine](t, docs[2])
	if ref := vm.Spec.DataVolumeTemplates[0].Spec.SourceRef; ref == nil || *ref != (vmpodv1.DataVolumeSourceRef{Kind: "DataSource", Name: "fedora"}) {
		t.Errorf("template sourceRef = %+v", ref)
	}
	if warnings != "" {
		t.Errorf("warnings for a same-namespace golden image:\n%s", warnings)
	}

	docs, warnings, err = convertString(t, `{"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume", "metadata": {"name": "d", "namespace": "vms"},
		"spec": {"sourceRef": {"kind": "DataSource", "name": "fedora", "namespace": "os-images"}, "storage": {"resources": {"requests": {"storage": "8Gi"}}}}}`)
	if err != nil || warnings != "" || len(docs) != 1 {
		t.Fatalf("cross-namespace sourceRef: %v, %d documents, warnings %q", err, len(docs), warnings)
	}
	if ref := decode[vmpodv1.DataVolume](t, docs[0]).Spec.SourceRef; *ref != (vmpodv1.DataVolumeSourceRef{Kind: "DataSource", Name: "fedora", Namespace: "os-images"}) {
		t.Errorf("cross-namespace sourceRef = %+v", ref)
	}
	docs, warnings, err = convertString(t, `{"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume", "metadata": {"name": "d"},
		"spec": {"source": {"pvc": {"name": "golden", "namespace": "os-images"}}, "storage": {"resources": {"requests": {"storage": "8Gi"}}}}}`)
	if err != nil || warnings != "" || len(docs) != 1 {
		t.Fatalf("cross-namespace pvc source: %v, %d documents, warnings %q", err, len(docs), warnings)
	}
	if src := decode[vmpodv1.DataVolume](t, docs[0]).Spec.Source.PVC; *src != (vmpodv1.PVCSource{Namespace: "os-images", Name: "golden"}) {
		t.Errorf("cross-namespace pvc source = %+v", src)
	}
	for manifest, want := range map[string]string{
		`{"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataSource", "metadata": {"name": "s"}, "spec": {"source": {"snapshot": {"name": "snap"}}}}`:                                                 "DataSource source snapshot is not supported by vmpod (supported: pvc)",
		`{"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume", "metadata": {"name": "d"}, "spec": {"sourceRef": {"kind": "DataVolume", "name": "x"}, "storage": {}}}`:                          `spec.sourceRef.kind: "DataVolume" is not supported (DataSource)`,
		`{"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume", "metadata": {"name": "d"}, "spec": {"source": {"blank": {}}, "sourceRef": {"kind": "DataSource", "name": "x"}, "storage": {}}}`: "more than one data source: source, sourceRef",
		`{"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume", "metadata": {"name": "d"}, "spec": {"contentType": "kubevirt", "storage": {}}}`:                                                 "spec.source: missing (or sourceRef)",
	} {
		if _, _, err := convertString(t, manifest); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want %q", manifest, err, want)
		}
	}
}

// TestConvertHotpluggableVolumes: KubeVirt's hotpluggable dataVolume and
// persistentVolumeClaim volumes (what virtctl addvolume --persist writes) keep the flag.
func TestConvertHotpluggableVolumes(t *testing.T) {
	docs, warnings, err := convertString(t, `apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata: {name: hot}
spec:
  runStrategy: Always
  template:
    spec:
      domain:
        devices:
          disks:
          - {name: root, disk: {bus: virtio}}
          - {name: scratch, disk: {bus: virtio}, serial: scratch}
          - {name: logs, disk: {bus: virtio}}
        resources: {requests: {memory: 1Gi}}
      volumes:
      - {name: root, dataVolume: {name: root}}
      - {name: scratch, dataVolume: {name: scratch, hotpluggable: true}}
      - {name: logs, persistentVolumeClaim: {claimName: logs, hotpluggable: true}}
`)
	if err != nil {
		t.Fatalf("convert: %v", err)
	}
	vm := decode[vmpodv1.VirtualMachine](t, docs[0])
	vols := vm.Spec.Template.Spec.Volumes
	if len(vols) != 3 || vols[0].Hotpluggable() || !vols[1].Hotpluggable() || !vols[2].Hotpluggable() || vols[2].PersistentVolumeClaim.ClaimName != "logs" {
		t.Errorf("volumes %+v: want scratch and logs hotpluggable, root not", vols)
	}
	if strings.Contains(warnings, "hotpluggable") {
		t.Errorf("warnings about hotpluggable:\n%s", warnings)
	}
}

// TestConvertEvictionStrategy: None and LiveMigrate are carried; KubeVirt's other
// strategies are named in a warning and the VM gets the default (stopped on eviction).
func TestConvertEvictionStrategy(t *testing.T) {
	for _, tc := range []struct{ strategy, want, warning string }{
		{"LiveMigrate", "LiveMigrate", ""},
		{"None", "None", ""},
		{"LiveMigrateIfPossible", "", "spec.template.spec.evictionStrategy: LiveMigrateIfPossible is not supported"},
		{"External", "", "spec.template.spec.evictionStrategy: External is not supported"},
	} {
		manifest := `apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata: {name: vm}
spec:
  runStrategy: Always
  template:
    spec:
      evictionStrategy: ` + tc.strategy + `
      domain:
        devices: {disks: [{name: root, disk: {bus: virtio}}]}
      volumes: [{name: root, containerDisk: {image: quay.io/containerdisks/fedora:40}}]
`
		docs, warnings, err := convertString(t, manifest)
		if err != nil {
			t.Fatalf("%s: convert: %v", tc.strategy, err)
		}
		vm := decode[vmpodv1.VirtualMachine](t, docs[0])
		got := ""
		if e := vm.Spec.Template.Spec.EvictionStrategy; e != nil {
			got = string(*e)
		}
		if got != tc.want {
			t.Errorf("%s: evictionStrategy %q, want %q", tc.strategy, got, tc.want)
		}
		if tc.warning == "" && warnings != "" || !strings.Contains(warnings, tc.warning) {
			t.Errorf("%s: warnings %q, want %q", tc.strategy, warnings, tc.warning)
		}
	}
}
