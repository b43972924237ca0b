package v1alpha1_test

// The CRDs' validation (OpenAPI schema and CEL rules) as the real kube-apiserver applies it:
// invalid objects are rejected with the field path of the problem.

import (
	"context"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
	"github.com/vmpod/vmpod/controller/internal/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

func validVM(ns string) *vmpodv1.VirtualMachine {
	return &vmpodv1.VirtualMachine{
		ObjectMeta: metav1.ObjectMeta{Name: "vm", Namespace: ns},
		Spec: vmpodv1.VirtualMachineSpec{
			RunStrategy: vmpodv1.RunStrategyAlways,
			Template: vmpodv1.VirtualMachineTemplateSpec{Spec: vmpodv1.InstanceSpec{
				Domain: vmpodv1.DomainSpec{
					Memory: &vmpodv1.Memory{Guest: ptr.To(resource.MustParse("256Mi"))},
					Devices: vmpodv1.Devices{
						Disks:      []vmpodv1.Disk{{Name: "root"}, {Name: "ci"}},
						Interfaces: []vmpodv1.Interface{{Name: "default"}},
					},
				},
				Volumes: []vmpodv1.Volume{
					{Name: "root", VolumeSource: vmpodv1.VolumeSource{ContainerDisk: &vmpodv1.ContainerDiskSource{Image: "quay.io/x/y:1"}}},
					{Name: "ci", VolumeSource: vmpodv1.VolumeSource{CloudInitNoCloud: &vmpodv1.CloudInitNoCloudSource{UserData: "#cloud-config\n"}}},
				},
				Networks: []vmpodv1.Network{{Name: "default", Pod: &vmpodv1.PodNetwork{}}},
			}},
		},
	}
}

// sshKeys is an access credential of the Secret name, propagated by noCloud or the agent.
func sshKeys(secret string, noCloud *vmpodv1.NoCloudSSHPublicKeyAccessCredentialPropagation, agent *vmpodv1.QemuGuestAgentSSHPublicKeyAccessCredentialPropagation) vmpodv1.AccessCredential {
	return vmpodv1.AccessCredential{SSHPublicKey: vmpodv1.SSHPublicKeyAccessCredential{
		Source:            vmpodv1.SSHPublicKeyAccessCredentialSource{Secret: vmpodv1.AccessCredentialSecretSource{SecretName: secret}},
		PropagationMethod: vmpodv1.SSHPublicKeyAccessCredentialPropagationMethod{NoCloud: noCloud, QemuGuestAgent: agent}}}
}

func validDV(ns string) *vmpodv1.DataVolume {
	return &vmpodv1.DataVolume{
		ObjectMeta: metav1.ObjectMeta{Name: "dv", Namespace: ns},
		Spec: vmpodv1.DataVolumeSpec{
			Source:  vmpodv1.DataVolumeSource{HTTP: &vmpodv1.HTTPSource{URL: "https://example.com/disk.qcow2"}},
			Storage: vmpodv1.StorageSpec{Resources: corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{"storage": resource.MustParse("1Gi")}}},
		},
	}
}

func TestVirtualMachineValidation(t *testing.T) {
	env := testenv.Get(t)
	ns := env.Namespace(t)
	ctx := context.Background()
	if err := env.Client.Create(ctx, validVM(ns), &clientDryRun); err != nil {
		t.Fatalf("a valid VM was rejected: %v", err)
	}
	sized := validVM(ns) // its size from an instancetype: no memory of its own
	sized.Spec.Instancetype = &vmpodv1.InstancetypeMatcher{Name: "u1.small"}
	sized.Spec.Template.Spec.Domain.Memory = nil
	if err := env.Client.Create(ctx, sized, &clientDryRun); err != nil {
		t.Fatalf("a valid VM with an instancetype was rejected: %v", err)
	}
	spec := func(vm *vmpodv1.VirtualMachine) *vmpodv1.InstanceSpec { return &vm.Spec.Template.Spec }
	for _, tc := range []struct {
		name   string
		modify func(*vmpodv1.VirtualMachine)
		want   []string // each must appear in the error
	}{
		{"unknown run strategy", func(vm *vmpodv1.VirtualMachine) { vm.Spec.RunStrategy = "Sometimes" },
			[]string{`spec.runStrategy: Unsupported value: "Sometimes"`}},
		{"disk without volume", func(vm *vmpodv1.VirtualMachine) {
			spec(vm).Domain.Devices.Disks = append(spec(vm).Domain.Devices.Disks, vmpodv1.Disk{Name: "data"})
		}, []string{"spec.template.spec.domain.devices.disks: Invalid value", "every disk needs a volume of the same name"}},
		{"volume without disk", func(vm *vmpodv1.VirtualMachine) { spec(vm).Domain.Devices.Disks = spec(vm).Domain.Devices.Disks[:1] },
			[]string{"spec.template.spec.volumes: Invalid value", "every volume needs a disk"}},
		{"two volume sources", func(vm *vmpodv1.VirtualMachine) {
			spec(vm).Volumes[0].DataVolume = &vmpodv1.DataVolumeVolumeSource{Name: "dv"}
		}, []string{"spec.template.spec.volumes[0]: Invalid value", "set exactly one of containerDisk, dataVolume, persistentVolumeClaim, cloudInitNoCloud"}},
		{"noCloud keys without cloud-init", func(vm *vmpodv1.VirtualMachine) {
			spec(vm).Domain.Devices.Disks = spec(vm).Domain.Devices.Disks[:1]
			spec(vm).Volumes = spec(vm).Volumes[:1]
			spec(vm).AccessCredentials = []vmpodv1.AccessCredential{sshKeys("keys", &vmpodv1.NoCloudSSHPublicKeyAccessCredentialPropagation{}, nil)}
		}, []string{"spec.template.spec.accessCredentials: Invalid value", "noCloud key propagation needs a cloudInitNoCloud volume"}},
		{"two key propagations", func(vm *vmpodv1.VirtualMachine) {
			spec(vm).AccessCredentials = []vmpodv1.AccessCredential{
				sshKeys("keys", &vmpodv1.NoCloudSSHPublicKeyAccessCredentialPropagation{}, &vmpodv1.QemuGuestAgentSSHPublicKeyAccessCredentialPropagation{Users: []string{"root"}})}
		}, []string{"spec.template.spec.accessCredentials[0].sshPublicKey.propagationMethod: Invalid value", "set exactly one of noCloud, qemuGuestAgent"}},
		{"bad key credentials", func(vm *vmpodv1.VirtualMachine) {
			spec(vm).AccessCredentials = []vmpodv1.AccessCredential{
				sshKeys("", nil, &vmpodv1.QemuGuestAgentSSHPublicKeyAccessCredentialPropagation{Users: []string{"-rf", ""}}),
				sshKeys("keys", nil, &vmpodv1.QemuGuestAgentSSHPublicKeyAccessCredentialPropagation{}),
			}
		}, []string{"spec.template.spec.accessCredentials[0].sshPublicKey.source.secret.secretName: Invalid value",
			`spec.template.spec.accessCredentials[0].sshPublicKey.propagationMethod.qemuGuestAgent.users[0]: Invalid value: "-rf"`,
			"spec.template.spec.accessCredentials[1].sshPublicKey.propagationMethod.qemuGuestAgent.users: Required value"}},
		{"empty cdrom", func(vm *vmpodv1.VirtualMachine) {
			spec(vm).Domain.Devices.Disks = append(spec(vm).Domain.Devices.Disks, vmpodv1.Disk{Name: "scratch", CDRom: &vmpodv1.CDRomTarget{Bus: "sata"}})
			spec(vm).Volumes = append(spec(vm).Volumes, vmpodv1.Volume{Name: "scratch", VolumeSource: vmpodv1.VolumeSource{EmptyDisk: &vmpodv1.EmptyDiskSource{Capacity: resource.MustParse("1Gi")}}})
		}, []string{"spec.template.spec.volumes: Invalid value", "an emptyDisk volume's disk is a writable disk"}},
		{"duplicate disk", func(vm *vmpodv1.VirtualMachine) {
			spec(vm).Domain.Devices.Disks = append(spec(vm).Domain.Devices.Disks, vmpodv1.Disk{Name: "root"})
		}, []string{"spec.template.spec.domain.devices.disks[2]: Duplicate value"}},
		{"disk and cdrom", func(vm *vmpodv1.VirtualMachine) {
			spec(vm).Domain.Devices.Disks[0].Disk = &vmpodv1.DiskTarget{}
			spec(vm).Domain.Devices.Disks[0].CDRom = &vmpodv1.CDRomTarget{Bus: "sata"}
		}, []string{"spec.template.spec.domain.devices.disks[0]: Invalid value", "choose disk or cdrom"}},
		{"virtio cdrom", func(vm *vmpodv1.VirtualMachine) {
			spec(vm).Domain.Devices.Disks[0].CDRom = &vmpodv1.CDRomTarget{Bus: "virtio"}
		},
			[]string{"spec.template.spec.domain.devices.disks[0].cdrom.bus", "a cdrom needs bus sata or scsi"}},
		{"bad bus", func(vm *vmpodv1.VirtualMachine) {
			spec(vm).Domain.Devices.Disks[0].Disk = &vmpodv1.DiskTarget{Bus: "ide"}
		},
			[]string{`spec.template.spec.domain.devices.disks[0].disk.bus: Unsupported value: "ide"`}},
		{"no memory", func(vm *vmpodv1.VirtualMachine) { spec(vm).Domain.Memory = nil },
			[]string{"spec.template.spec.domain: Invalid value", "set memory.guest or resources.requests.memory"}},
		{"instancetype and cpu", func(vm *vmpodv1.VirtualMachine) {
			vm.Spec.Instancetype = &vmpodv1.InstancetypeMatcher{Name: "u1.small"}
			spec(vm).Domain.Memory = nil
			spec(vm).Domain.CPU = &vmpodv1.CPU{Cores: 2}
		}, []string{"spec.template.spec.domain.cpu: Invalid value", "the instancetype sets the vCPUs"}},
		{"instancetype and memory", func(vm *vmpodv1.VirtualMachine) {
			vm.Spec.Instancetype = &vmpodv1.InstancetypeMatcher{Name: "u1.small"}
			spec(vm).Domain.Resources.Requests = corev1.ResourceList{"memory": resource.MustParse("1Gi")}
		}, []string{"spec.template.spec.domain.memory: Invalid value", "remove domain.memory.guest",
			"spec.template.spec.domain.resources: Invalid value", "remove resources.requests.memory"}},
		{"instancetype kind", func(vm *vmpodv1.VirtualMachine) {
			spec(vm).Domain.Memory = nil
			vm.Spec.Instancetype = &vmpodv1.InstancetypeMatcher{Name: "u1.small", Kind: "VirtualMachineClusterPreference"}
		}, []string{`spec.instancetype.kind: Unsupported value: "VirtualMachineClusterPreference"`}},
		{"tiny memory", func(vm *vmpodv1.VirtualMachine) { spec(vm).Domain.Memory.Guest = ptr.To(resource.MustParse("1Mi")) },
			[]string{"spec.template.spec.domain.memory.guest", "must be at least 16Mi"}},
		{"microvm", func(vm *vmpodv1.VirtualMachine) { spec(vm).Domain.Machine = &vmpodv1.Machine{Type: "microvm"} },
			[]string{`spec.template.spec.domain.machine.type: Unsupported value: "microvm"`}},
		{"bridge and masquerade", func(vm *vmpodv1.VirtualMachine) {
			spec(vm).Domain.Devices.Interfaces[0].Bridge = &vmpodv1.InterfaceBridge{}
			spec(vm).Domain.Devices.Interfaces[0].Masquerade = &vmpodv1.InterfaceMasquerade{}
		}, []string{"an interface has one binding: bridge or masquerade"}},
		{"ports on a bridge", func(vm *vmpodv1.VirtualMachine) {
			spec(vm).Domain.Devices.Interfaces[0].Ports = []vmpodv1.Port{{Port: 80}}
		}, []string{"spec.template.spec.domain.devices.interfaces[0].ports", "ports are forwarded only by the masquerade binding"}},
		{"interface without network", func(vm *vmpodv1.VirtualMachine) { spec(vm).Networks[0].Name = "other" },
			[]string{"spec.template.spec.domain.devices.interfaces: Invalid value", "every interface needs a network", "spec.template.spec.networks: Invalid value"}},
		{"two pod networks", func(vm *vmpodv1.VirtualMachine) {
			spec(vm).Domain.Devices.Interfaces = append(spec(vm).Domain.Devices.Interfaces, vmpodv1.Interface{Name: "second"})
			spec(vm).Networks = append(spec(vm).Networks, vmpodv1.Network{Name: "second", Pod: &vmpodv1.PodNetwork{}})
		}, []string{"spec.template.spec.networks: Invalid value", "at most one default network"}},
		{"bad MAC", func(vm *vmpodv1.VirtualMachine) { spec(vm).Domain.Devices.Interfaces[0].MACAddress = "02:00:00" },
			[]string{"spec.template.spec.domain.devices.interfaces[0].macAddress: Invalid value"}},
		{"cloud-init twice", func(vm *vmpodv1.VirtualMachine) {
			spec(vm).Volumes[1].CloudInitNoCloud.SecretRef = &vmpodv1.LocalObjectReference{Name: "s"}
		}, []string{"spec.template.spec.volumes[1].cloudInitNoCloud: Invalid value", "set exactly one of userData, userDataBase64, secretRef"}},
		{"bad GPU resource", func(vm *vmpodv1.VirtualMachine) {
			spec(vm).Domain.Devices.GPUs = []vmpodv1.GPU{{Name: "g", DeviceName: "/dev/nvidia0"}}
		}, []string{"spec.template.spec.domain.devices.gpus[0].deviceName: Invalid value"}},
		{"annotation smuggled through the template", func(vm *vmpodv1.VirtualMachine) {
			vm.Spec.Template.ObjectMeta.Annotations = map[string]string{"vmpod.dev/vm": `{"version":"v1alpha1"}`}
		}, []string{"spec.template.metadata: Invalid value", "rendered by the controller"}},
		{"cpu model with flags", func(vm *vmpodv1.VirtualMachine) { spec(vm).Domain.CPU = &vmpodv1.CPU{Model: "qemu64,+vmx"} },
			[]string{"spec.template.spec.domain.cpu.model: Invalid value"}},
		{"enlightenment values", func(vm *vmpodv1.VirtualMachine) {
			spec(vm).Domain.Features = &vmpodv1.Features{HyperV: &vmpodv1.FeatureHyperv{
				Spinlocks: &vmpodv1.FeatureSpinlocks{Retries: ptr.To[uint32](100)}, VendorID: &vmpodv1.FeatureVendorID{VendorID: "a,b"}}}
		}, []string{"spec.template.spec.domain.features.hyperv.spinlocks.spinlocks: Invalid value", "spec.template.spec.domain.features.hyperv.vendorid.vendorid: Invalid value"}},
		{"long name", func(vm *vmpodv1.VirtualMachine) { vm.Name = strings.Repeat("a", 58) },
			[]string{"at most 57 characters"}},
		{"duplicate DataVolume templates", func(vm *vmpodv1.VirtualMachine) {
			t := vmpodv1.DataVolumeTemplateSpec{Metadata: vmpodv1.DataVolumeTemplateMeta{Name: "d"}, Spec: validDV("").Spec}
			vm.Spec.DataVolumeTemplates = []vmpodv1.DataVolumeTemplateSpec{t, t}
		}, []string{"spec.dataVolumeTemplates: Invalid value", "names must be unique"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			vm := validVM(ns)
			tc.modify(vm)
			expectRejected(t, env.Client.Create(ctx, vm, &clientDryRun), tc.want)
		})
	}
}

func TestDataVolumeValidation(t *testing.T) {
	env := testenv.Get(t)
	ns := env.Namespace(t)
	ctx := context.Background()
	block := corev1.PersistentVolumeBlock
	for _, tc := range []struct {
		name   string
		modify func(*vmpodv1.DataVolume)
		want   []string
	}{
		{"two sources", func(dv *vmpodv1.DataVolume) { dv.Spec.Source.Blank = &vmpodv1.BlankSource{} },
			[]string{"spec.source: Invalid value", "set exactly one of http, s3, registry, upload, pvc, blank"}},
		{"s3 without an object key", func(dv *vmpodv1.DataVolume) {
			dv.Spec.Source = vmpodv1.DataVolumeSource{S3: &vmpodv1.S3Source{URL: "https://s3.example.com/bucket"}}
		}, []string{"spec.source.s3.url: Invalid value"}},
		{"s3 region", func(dv *vmpodv1.DataVolume) {
			dv.Spec.Source = vmpodv1.DataVolumeSource{S3: &vmpodv1.S3Source{URL: "https://s3.example.com/bucket/disk.qcow2", Region: "EU West"}}
		}, []string{"spec.source.s3.region: Invalid value"}},
		{"no source", func(dv *vmpodv1.DataVolume) { dv.Spec.Source = vmpodv1.DataVolumeSource{} },
			[]string{"spec: Invalid value", "set exactly one of source and sourceRef"}},
		{"source and sourceRef", func(dv *vmpodv1.DataVolume) {
			dv.Spec.SourceRef = &vmpodv1.DataVolumeSourceRef{Kind: vmpodv1.DataSourceKind, Name: "fedora"}
		}, []string{"spec: Invalid value", "set exactly one of source and sourceRef"}},
		{"sourceRef to a PVC", func(dv *vmpodv1.DataVolume) {
			dv.Spec.Source = vmpodv1.DataVolumeSource{}
			dv.Spec.SourceRef = &vmpodv1.DataVolumeSourceRef{Kind: "PersistentVolumeClaim", Name: "fedora"}
		}, []string{"spec.sourceRef.kind: Unsupported value"}},
		{"archive through a DataSource", func(dv *vmpodv1.DataVolume) {
			dv.Spec.ContentType = vmpodv1.ContentTypeArchive
			dv.Spec.Source = vmpodv1.DataVolumeSource{}
			dv.Spec.SourceRef = &vmpodv1.DataVolumeSourceRef{Kind: vmpodv1.DataSourceKind, Name: "fedora"}
		}, []string{"spec.contentType: Invalid value", "archive needs an http, s3 or upload source"}},
		{"ftp", func(dv *vmpodv1.DataVolume) { dv.Spec.Source.HTTP.URL = "ftp://example.com/x" },
			[]string{"spec.source.http.url: Invalid value"}},
		{"bad checksum", func(dv *vmpodv1.DataVolume) { dv.Spec.Source.HTTP.Checksum = "md5:abc" },
			[]string{"spec.source.http.checksum: Invalid value"}},
		{"no size", func(dv *vmpodv1.DataVolume) { dv.Spec.Storage.Resources.Requests = nil },
			[]string{"spec.storage.resources: Invalid value", "requests.storage is required"}},
		{"archive from a registry", func(dv *vmpodv1.DataVolume) {
			dv.Spec.ContentType = vmpodv1.ContentTypeArchive
			dv.Spec.Source = vmpodv1.DataVolumeSource{Registry: &vmpodv1.RegistrySource{URL: "docker://x/y"}}
		}, []string{"spec.contentType: Invalid value", "archive needs an http, s3 or upload source"}},
		{"archive into a block volume", func(dv *vmpodv1.DataVolume) {
			dv.Spec.ContentType = vmpodv1.ContentTypeArchive
			dv.Spec.Storage.VolumeMode = &block
		}, []string{"spec.contentType: Invalid value", "needs volumeMode Filesystem"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dv := validDV(ns)
			tc.modify(dv)
			expectRejected(t, env.Client.Create(ctx, dv, &clientDryRun), tc.want)
		})
	}

	t.Run("spec is immutable", func(t *testing.T) {
		dv := validDV(ns)
		if err := env.Client.Create(ctx, dv); err != nil {
			t.Fatalf("create: %v", err)
		}
		dv.Spec.Source.HTTP.URL = "https://example.com/other.qcow2"
		err := env.Client.Update(ctx, dv)
		if err == nil || !strings.Contains(err.Error(), "spec is immutable") {
			t.Fatalf("update of the spec: err = %v, want spec is immutable", err)
		}
	})
}

// A migration names a VM or a pod, never both or neither; a pod's does not allow post-copy.
func TestMigrationValidation(t *testing.T) {
	env := testenv.Get(t)
	ns := env.Namespace(t)
	ctx := context.Background()
	meta := metav1.ObjectMeta{Name: "m", Namespace: ns}
	for _, tc := range []struct {
		name string
		spec vmpodv1.VirtualMachineMigrationSpec
		want []string
	}{
		{"neither", vmpodv1.VirtualMachineMigrationSpec{}, []string{"name exactly one of spec.vmName and spec.podName"}},
		{"both", vmpodv1.VirtualMachineMigrationSpec{VMName: "vm", PodName: "pod"}, []string{"name exactly one of spec.vmName and spec.podName"}},
		{"a pod by post-copy", vmpodv1.VirtualMachineMigrationSpec{PodName: "pod", AllowPostCopy: ptr.To(true)}, []string{"spec.allowPostCopy: a container pod does not move by post-copy"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := &vmpodv1.VirtualMachineMigration{ObjectMeta: meta, Spec: tc.spec}
			expectRejected(t, env.Client.Create(ctx, m, &clientDryRun), tc.want)
		})
	}
	for _, spec := range []vmpodv1.VirtualMachineMigrationSpec{{VMName: "vm", AllowPostCopy: ptr.To(true)}, {PodName: "pod", AllowPostCopy: ptr.To(false)}} {
		if err := env.Client.Create(ctx, &vmpodv1.VirtualMachineMigration{ObjectMeta: meta, Spec: spec}, &clientDryRun); err != nil {
			t.Errorf("migration %+v refused: %v", spec, err)
		}
	}
}

// clientDryRun validates on the server without storing.
var clientDryRun = client.CreateOptions{DryRun: []string{metav1.DryRunAll}}

// expectRejected checks that the API server refused an object with every wanted text (the
// field path and the rule's message) in its error.
func expectRejected(t *testing.T, err error, want []string) {
	t.Helper()
	if err == nil {
		t.Fatalf("the API server accepted it")
	}
	t.Log(err)
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error lacks %q:\n%v", w, err)
		}
	}
}

// Memory written as a bare number of bytes (a quantity is an int or a string, and KubeVirt's
// instance types write `guest: 8589934592`) passes the CRDs' quantity rules; the room
// below the guest memory is refused either way.
func TestQuantityRulesTakeIntegers(t *testing.T) {
	env := testenv.Get(t)
	ns := env.Namespace(t)
	ctx := context.Background()
	instancetype := func(guest, maxGuest any) *unstructured.Unstructured {
		return &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": vmpodv1.GroupVersion.String(), "kind": vmpodv1.KindInstancetype,
			"metadata": map[string]any{"generateName": "it-", "namespace": ns},
			"spec":     map[string]any{"cpu": map[string]any{"guest": int64(1)}, "memory": map[string]any{"guest": guest, "maxGuest": maxGuest}},
		}}
	}
	if err := env.Client.Create(ctx, instancetype(int64(2<<30), int64(4<<30)), &clientDryRun); err != nil {
		t.Errorf("an instance type of integer quantities: %v", err)
	}
	if err := env.Client.Create(ctx, instancetype("2Gi", "4Gi"), &clientDryRun); err != nil {
		t.Errorf("an instance type of string quantities: %v", err)
	}
	err := env.Client.Create(ctx, instancetype(int64(2<<30), "1Gi"), &clientDryRun)
	expectRejected(t, err, []string{"maxGuest must be at least guest"})
}
