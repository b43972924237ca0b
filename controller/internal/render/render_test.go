package render

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	podannotations "github.com/vmpod/vmpod/api/annotations"
	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/api/vmspec"
	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
)

var cfg = Config{RuntimeClassName: "vmpod", ComputeImage: "registry.k8s.io/pause:3.10", CPUAllocationRatio: 10}

func q(s string) *resource.Quantity { return ptr.To(resource.MustParse(s)) }

// fedora is a VM with one of everything.
func fedora() *vmpodv1.VirtualMachine {
	return &vmpodv1.VirtualMachine{
		ObjectMeta: metav1.ObjectMeta{Name: "fedora", Namespace: "ns", UID: "uid-1"},
		Spec: vmpodv1.VirtualMachineSpec{
			RunStrategy: vmpodv1.RunStrategyAlways,
			Template: vmpodv1.VirtualMachineTemplateSpec{
				ObjectMeta: vmpodv1.TemplateMeta{Labels: map[string]string{"app": "db"}, Annotations: map[string]string{"team": "a"}},
				Spec: vmpodv1.InstanceSpec{
					Domain: vmpodv1.DomainSpec{
						CPU:      &vmpodv1.CPU{Cores: 2, Sockets: 2, Model: "Skylake-Client-IBRS"},
						Memory:   &vmpodv1.Memory{Guest: q("1500Mi")},
						Firmware: &vmpodv1.Firmware{Bootloader: &vmpodv1.Bootloader{EFI: &vmpodv1.EFI{}}},
						Features: &vmpodv1.Features{
							ACPI: &vmpodv1.FeatureState{}, SMM: &vmpodv1.FeatureState{Enabled: ptr.To(true)}, KVM: &vmpodv1.FeatureKVM{Hidden: true},
							HyperV: &vmpodv1.FeatureHyperv{
								Relaxed: &vmpodv1.FeatureState{}, VAPIC: &vmpodv1.FeatureState{}, Spinlocks: &vmpodv1.FeatureSpinlocks{Retries: ptr.To[uint32](8191)},
								VPIndex: &vmpodv1.FeatureState{}, SyNIC: &vmpodv1.FeatureState{}, SyNICTimer: &vmpodv1.SyNICTimer{Direct: &vmpodv1.FeatureState{}},
								Reset: &vmpodv1.FeatureState{Enabled: ptr.To(false)}, VendorID: &vmpodv1.FeatureVendorID{VendorID: "vmpod"},
							},
						},
						Devices: vmpodv1.Devices{
							Disks: []vmpodv1.Disk{
								{Name: "root", Disk: &vmpodv1.DiskTarget{Bus: "virtio"}, BootOrder: ptr.To[int32](1)},
								{Name: "data", Disk: &vmpodv1.DiskTarget{Bus: "scsi"}},
								{Name: "fast"},
								{Name: "iso", CDRom: &vmpodv1.CDRomTarget{}},
								{Name: "ci", Disk: &vmpodv1.DiskTarget{Bus: "sata"}},
								{Name: "scratch", Disk: &vmpodv1.DiskTarget{}},
							},
							Interfaces: []vmpodv1.Interface{{Name: "default"}, {Name: "storage", Model: "e1000e", MACAddress: "02:00:00:00:00:07"}},
							GPUs:       []vmpodv1.GPU{{Name: "g1", DeviceName: "nvidia.com/A10"}, {Name: "g2", DeviceName: "nvidia.com/A10"}},
						},
					},
					Volumes: []vmpodv1.Volume{
						{Name: "root", VolumeSource: vmpodv1.VolumeSource{ContainerDisk: &vmpodv1.ContainerDiskSource{Image: "quay.io/x/fedora:42", ImagePullSecret: "pull"}}},
						{Name: "data", VolumeSource: vmpodv1.VolumeSource{DataVolume: &vmpodv1.DataVolumeVolumeSource{Name: "fedora-data"}}},
						{Name: "fast", VolumeSource: vmpodv1.VolumeSource{PersistentVolumeClaim: &vmpodv1.PersistentVolumeClaimVolumeSource{PersistentVolumeClaimVolumeSource: corev1.PersistentVolumeClaimVolumeSource{ClaimName: "nvme", ReadOnly: true}}}},
						{Name: "iso", VolumeSource: vmpodv1.VolumeSource{PersistentVolumeClaim: &vmpodv1.PersistentVolumeClaimVolumeSource{PersistentVolumeClaimVolumeSource: corev1.PersistentVolumeClaimVolumeSource{ClaimName: "installer"}}}},
						{Name: "ci", VolumeSource: vmpodv1.VolumeSource{CloudInitNoCloud: &vmpodv1.CloudInitNoCloudSource{SecretRef: &vmpodv1.LocalObjectReference{Name: "fedora-ci"}}}},
						{Name: "scratch", VolumeSource: vmpodv1.VolumeSource{EmptyDisk: &vmpodv1.EmptyDiskSource{Capacity: resource.MustParse("1.5Gi")}}},
					},
					Networks: []vmpodv1.Network{
						{Name: "default", Pod: &vmpodv1.PodNetwork{}},
						{Name: "storage", Multus: &vmpodv1.MultusNetwork{NetworkName: "infra/storage-net"}},
					},
					ReadinessProbe: &vmpodv1.Probe{GuestAgentPing: &vmpodv1.GuestAgentPing{}, PeriodSeconds: 5},
					NodeSelector:   map[string]string{"disk": "ssd"},
					AccessCredentials: []vmpodv1.AccessCredential{
						{SSHPublicKey: vmpodv1.SSHPublicKeyAccessCredential{
							Source:            vmpodv1.SSHPublicKeyAccessCredentialSource{Secret: vmpodv1.AccessCredentialSecretSource{SecretName: "team-keys"}},
							PropagationMethod: vmpodv1.SSHPublicKeyAccessCredentialPropagationMethod{NoCloud: &vmpodv1.NoCloudSSHPublicKeyAccessCredentialPropagation{}}}},
						{SSHPublicKey: vmpodv1.SSHPublicKeyAccessCredential{
							Source: vmpodv1.SSHPublicKeyAccessCredentialSource{Secret: vmpodv1.AccessCredentialSecretSource{SecretName: "ops-keys"}},
							PropagationMethod: vmpodv1.SSHPublicKeyAccessCredentialPropagationMethod{
								QemuGuestAgent: &vmpodv1.QemuGuestAgentSSHPublicKeyAccessCredentialPropagation{Users: []string{"fedora", "root"}}}}},
					},
				},
			},
		},
	}
}

var claims = map[string]Claim{"fedora-data": {}, "nvme": {Block: true}, "installer": {}}

func TestPod(t *testing.T) {
	pod, err := Pod(fedora(), claims, cfg)
	if err != nil {
		t.Fatalf("Pod: %v", err)
	}
	if pod.Name != "vmpod-fedora" || pod.Namespace != "ns" {
		t.Errorf("pod %s/%s, want ns/vmpod-fedora", pod.Namespace, pod.Name)
	}
	if ref := metav1.GetControllerOf(pod); ref == nil || ref.UID != "uid-1" || ref.Kind != "VirtualMachine" {
		t.Errorf("controller ref = %+v", ref)
	}
	if pod.Labels["app"] != "db" || pod.Labels[VMNameLabel] != "fedora" || pod.Annotations["team"] != "a" {
		t.Errorf("template metadata not carried over: labels %v annotations %v", pod.Labels, pod.Annotations)
	}
	s := pod.Spec
	if *s.RuntimeClassName != "vmpod" || s.RestartPolicy != corev1.RestartPolicyNever || *s.TerminationGracePeriodSeconds != 180 ||
		s.Hostname != "fedora" || s.NodeSelector["disk"] != "ssd" || *s.AutomountServiceAccountToken {
		t.Errorf("pod spec fields: %+v", s)
	}
	if !reflect.DeepEqual(s.ImagePullSecrets, []corev1.LocalObjectReference{{Name: "pull"}}) {
		t.Errorf("imagePullSecrets = %v", s.ImagePullSecrets)
	}
	c := s.Containers[0]
	if c.Name != vmspec.ComputeContainer || c.Image != cfg.ComputeImage {
		t.Errorf("container %s image %s", c.Name, c.Image)
	}

	// 4 vCPUs at ratio 10 request 400m; memory is the guest's; 2 GPUs of one resource.
	wantReq := corev1.ResourceList{"cpu": resource.MustParse("400m"), "memory": resource.MustParse("1500Mi"), "nvidia.com/A10": resource.MustParse("2"),
		"ephemeral-storage": resource.MustParse("1536Mi")} // the empty disk
	wantLim := corev1.ResourceList{"memory": resource.MustParse("1500Mi"), "nvidia.com/A10": resource.MustParse("2")}
	if !equality.Semantic.DeepEqual(c.Resources.Requests, wantReq) || !equality.Semantic.DeepEqual(c.Resources.Limits, wantLim) {
		t.Errorf("resources = %v / %v, want %v / %v", c.Resources.Requests, c.Resources.Limits, wantReq, wantLim)
	}

	wantVolumes := map[string]string{"root": "image:quay.io/x/fedora:42", "data": "pvc:fedora-data", "fast": "pvc:nvme", "iso": "pvc:installer", "ci": "secret:fedora-ci",
		"access-credential-0": "secret:team-keys", "access-credential-1": "secret:ops-keys"}
	for _, v := range s.Volumes {
		var got string
		switch {
		case v.Image != nil:
			got = "image:" + v.Image.Reference
		case v.PersistentVolumeClaim != nil:
			got = "pvc:" + v.PersistentVolumeClaim.ClaimName
		case v.Secret != nil:
			got = "secret:" + v.Secret.SecretName
		}
		if got != wantVolumes[v.Name] {
			t.Errorf("volume %s = %s, want %s", v.Name, got, wantVolumes[v.Name])
		}
		delete(wantVolumes, v.Name)
	}
	if len(wantVolumes) != 0 {
		t.Errorf("missing pod volumes %v", wantVolumes)
	}
	mounts := map[string]string{}
	for _, m := range c.VolumeMounts {
		mounts[m.Name] = m.MountPath
	}
	wantMounts := map[string]string{"root": "/vmpod/volumes/root", "data": "/vmpod/volumes/data", "iso": "/vmpod/volumes/iso", "ci": "/vmpod/volumes/ci",
		"access-credential-0": "/vmpod/volumes/access-credential-0", "access-credential-1": "/vmpod/volumes/access-credential-1"}
	if !reflect.DeepEqual(mounts, wantMounts) {
		t.Errorf("mounts = %v, want %v", mounts, wantMounts)
	}
	if !reflect.DeepEqual(c.VolumeDevices, []corev1.VolumeDevice{{Name: "fast", DevicePath: "/vmpod/devices/fast"}}) {
		t.Errorf("devices = %v", c.VolumeDevices)
	}
	if p := c.ReadinessProbe; p == nil || p.Exec == nil || p.Exec.Command[0] != vmspec.GuestAgentPingCommand || p.PeriodSeconds != 5 {
		t.Errorf("readiness probe = %+v", p)
	}

	var nets []map[string]string
	if err := json.Unmarshal([]byte(pod.Annotations[MultusNetworksAnnotation]), &nets); err != nil ||
		!reflect.DeepEqual(nets, []map[string]string{{"name": "storage-net", "namespace": "infra", "interface": "net1"}}) {
		t.Errorf("multus annotation %q (%v)", pod.Annotations[MultusNetworksAnnotation], err)
	}

	// The annotation is what the shim will Parse.
	vm, err := vmspec.Parse([]byte(pod.Annotations[vmspec.Annotation]))
	if err != nil {
		t.Fatalf("the rendered annotation does not parse: %v\n%s", err, pod.Annotations[vmspec.Annotation])
	}
	want := &vmspec.VM{
		Version: vmspec.Version, CPU: vmspec.CPU{Sockets: 2, Cores: 2, Threads: 1, Model: "Skylake-Client-IBRS"}, MemoryMiB: 1500,
		Machine: machine.Q35, Firmware: vmspec.Firmware{Type: vmspec.FirmwareUEFI, SecureBoot: true},
		Features: vmspec.Features{ACPI: ptr.To(true), SMM: ptr.To(true), KVMHidden: true,
			HyperV: &machine.HyperV{Relaxed: true, VAPIC: true, Spinlocks: 8191, VPIndex: true, SynIC: true, SynICTimer: true,
				SynICTimerDirect: true, VendorID: "vmpod"}},
		Disks: []vmspec.Disk{
			{Name: "root", Volume: "root", Source: vmspec.SourceImage, Device: vmspec.DeviceDisk, Bus: vmspec.BusVirtio, BootOrder: 1},
			{Name: "data", Volume: "data", Source: vmspec.SourceFile, Device: vmspec.DeviceDisk, Bus: vmspec.BusSCSI},
			{Name: "fast", Volume: "fast", Source: vmspec.SourceBlock, Device: vmspec.DeviceDisk, Bus: vmspec.BusVirtio, ReadOnly: true},
			{Name: "iso", Volume: "iso", Source: vmspec.SourceFile, Device: vmspec.DeviceCDROM, Bus: vmspec.BusSATA, ReadOnly: true},
			{Name: "scratch", Source: vmspec.SourceEmpty, Device: vmspec.DeviceDisk, Bus: vmspec.BusVirtio, SizeMiB: 1536},
		},
		Interfaces: []vmspec.Interface{
			{Name: "default", PodInterface: "eth0", Model: vmspec.ModelVirtio, Binding: vmspec.BindingBridge},
			{Name: "storage", PodInterface: "net1", Model: vmspec.ModelE1000E, MACAddress: "02:00:00:00:00:07", Binding: vmspec.BindingBridge},
		},
		CloudInit: &vmspec.CloudInit{SecretVolume: "ci", Bus: vmspec.BusSATA},
		AccessCredentials: []vmspec.AccessCredential{
			{SecretVolume: "access-credential-0", Propagation: vmspec.PropagateNoCloud},
			{SecretVolume: "access-credential-1", Propagation: vmspec.PropagateGuestAgent, Users: []string{"fedora", "root"}},
		},
		GPUs: []vmspec.HostDevice{{Name: "g1", ResourceName: "nvidia.com/A10"}, {Name: "g2", ResourceName: "nvidia.com/A10"}},
	}
	if !reflect.DeepEqual(vm, want) {
		t.Errorf("annotation =\n%+v\nwant\n%+v", vm, want)
	}
}

func TestPodDefaults(t *testing.T) {
	vm := &vmpodv1.VirtualMachine{ObjectMeta: metav1.ObjectMeta{Name: "tiny", Namespace: "ns"}}
	vm.Spec.Template.Spec.Domain.Resources.Requests = corev1.ResourceList{"memory": resource.MustParse("100M")}
	vm.Spec.Template.Spec.Volumes = []vmpodv1.Volume{{Name: "ci", VolumeSource: vmpodv1.VolumeSource{
		CloudInitNoCloud: &vmpodv1.CloudInitNoCloudSource{UserDataBase64: "I2Nsb3VkLWNvbmZpZwo="}}}}
	vm.Spec.Template.Spec.Domain.Devices.Disks = []vmpodv1.Disk{{Name: "ci"}}
	pod, err := Pod(vm, nil, cfg)
	if err != nil {
		t.Fatalf("Pod: %v", err)
	}
	spec, err := vmspec.Parse([]byte(pod.Annotations[vmspec.Annotation]))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	// 100M = 95.37 MiB, rounded up; one NIC on the pod network; base64 user data decoded
	if spec.MemoryMiB != 96 || spec.CPU.VCPUs() != 1 || spec.Machine != machine.Q35 || spec.Firmware.Type != vmspec.FirmwareBIOS {
		t.Errorf("defaults: %+v", spec)
	}
	if len(spec.Interfaces) != 1 || spec.Interfaces[0].PodInterface != "eth0" {
		t.Errorf("autoattached interfaces = %+v", spec.Interfaces)
	}
	if spec.CloudInit == nil || spec.CloudInit.UserData != "#cloud-config\n" {
		t.Errorf("cloud-init = %+v", spec.CloudInit)
	}
	res := pod.Spec.Containers[0].Resources
	if cpu := res.Requests.Cpu(); cpu.MilliValue() != 100 {
		t.Errorf("cpu request %v, want 100m (1 vCPU / 10)", cpu)
	}
	if _, ok := res.Limits["cpu"]; ok {
		t.Errorf("cpu limit set without being asked for: %v", res.Limits)
	}
	if len(pod.Spec.Containers[0].VolumeMounts) != 0 {
		t.Errorf("inline cloud-init needs no volume, got mounts %v", pod.Spec.Containers[0].VolumeMounts)
	}
}

func TestPodErrors(t *testing.T) {
	for _, tc := range []struct {
		name   string
		modify func(*vmpodv1.VirtualMachine)
		claims map[string]Claim
		want   string
	}{
		{"no memory", func(vm *vmpodv1.VirtualMachine) { vm.Spec.Template.Spec.Domain.Memory = nil }, claims,
			"spec.template.spec.domain: set memory.guest or resources.requests.memory"},
		{"unknown claim", func(*vmpodv1.VirtualMachine) {}, map[string]Claim{"fedora-data": {}}, `volumes[fast]: PVC "nvme" is not known`},
		{"disk without volume", func(vm *vmpodv1.VirtualMachine) { vm.Spec.Template.Spec.Volumes = vm.Spec.Template.Spec.Volumes[1:] }, claims,
			`disks[0]: no volume named "root"`},
		{"microvm", func(vm *vmpodv1.VirtualMachine) {
			vm.Spec.Template.Spec.Domain.Machine = &vmpodv1.Machine{Type: "microvm"}
		}, claims, "machine: microvm boots only a kernel"},
		{"limit below request", func(vm *vmpodv1.VirtualMachine) {
			vm.Spec.Template.Spec.Domain.Resources.Limits = corev1.ResourceList{"memory": resource.MustParse("1Gi")}
		}, claims, "memory limit 1Gi is below the request 1500Mi"},
		{"bad base64", func(vm *vmpodv1.VirtualMachine) {
			vm.Spec.Template.Spec.Volumes[4].CloudInitNoCloud = &vmpodv1.CloudInitNoCloudSource{UserDataBase64: "%%%"}
		}, claims, "volumes[ci].cloudInitNoCloud.userDataBase64: illegal base64"},
		{"empty disk of no size", func(vm *vmpodv1.VirtualMachine) {
			vm.Spec.Template.Spec.Volumes[5].EmptyDisk.Capacity = resource.MustParse("0")
		}, claims, "volumes[scratch].emptyDisk.capacity: must be more than 0 and at most 64Ti, got 0"},
		{"empty cdrom", func(vm *vmpodv1.VirtualMachine) {
			vm.Spec.Template.Spec.Domain.Devices.Disks[5] = vmpodv1.Disk{Name: "scratch", CDRom: &vmpodv1.CDRomTarget{}}
		}, claims, "domain.devices.disks[5]: volume scratch is an emptyDisk: a writable disk, not a cdrom"},
		{"secure boot without SMM", func(vm *vmpodv1.VirtualMachine) {
			vm.Spec.Template.Spec.Domain.Features.SMM.Enabled = ptr.To(false)
		}, claims, "features.smm: secure boot needs SMM"},
		{"enlightenment without its prerequisite", func(vm *vmpodv1.VirtualMachine) {
			vm.Spec.Template.Spec.Domain.Features.HyperV.VPIndex = &vmpodv1.FeatureState{Enabled: ptr.To(false)}
		}, claims, "features.hyperv: synic needs vpindex"},
		{"credential volume name taken", func(vm *vmpodv1.VirtualMachine) {
			vm.Spec.Template.Spec.Volumes[5].Name = "access-credential-1"
			vm.Spec.Template.Spec.Domain.Devices.Disks[5].Name = "access-credential-1"
		}, claims, "volumes[access-credential-1]: the name is taken by accessCredentials[1]'s Secret volume"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			vm := fedora()
			tc.modify(vm)
			_, err := Pod(vm, tc.claims, cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want it to contain %q", err, tc.want)
			}
		})
	}
}

func TestTemplateHash(t *testing.T) {
	a, _ := Pod(fedora(), claims, cfg)
	b, _ := Pod(fedora(), claims, cfg)
	if TemplateHash(a) == "" || TemplateHash(a) != TemplateHash(b) {
		t.Fatalf("hash not stable: %q %q", TemplateHash(a), TemplateHash(b))
	}
	vm := fedora()
	vm.Spec.Template.Spec.Domain.Memory.Guest = q("2Gi")
	c, _ := Pod(vm, claims, cfg)
	if TemplateHash(c) == TemplateHash(a) {
		t.Errorf("a memory change kept the hash %q", TemplateHash(a))
	}
}

// A VM with room (maxSockets, maxGuest) renders it into the pod's VM spec, in whole
// memory blocks, with CPU and memory limits equal to its size; sockets and guest memory
// changed within the room keep the hash, and Resize gives the new cpu and memory. A
// change of the room changes the hash.
func TestGrowthRoom(t *testing.T) {
	growable := func(sockets uint32, guest string) *vmpodv1.VirtualMachine {
		vm := fedora()
		d := &vm.Spec.Template.Spec.Domain
		d.CPU.Sockets, d.CPU.MaxSockets = sockets, 4
		d.Memory = &vmpodv1.Memory{Guest: q(guest), MaxGuest: q("3001Mi")}
		return vm
	}
	a, err := Pod(growable(2, "1501Mi"), claims, cfg)
	if err != nil {
		t.Fatal(err)
	}
	spec, err := vmspec.Parse([]byte(a.Annotations[vmspec.Annotation]))
	if err != nil {
		t.Fatal(err)
	}
	// guest memory and room rounded up to 2 MiB blocks; the limit is the rounded guest
	if spec.CPU.MaxSockets != 4 || spec.CPU.VCPUs() != 4 || spec.MemoryMiB != 1502 || spec.MaxMemoryMiB != 3002 {
		t.Errorf("VM spec cpu %+v, memory %d of %d MiB; want 2x2 of 4 sockets, 1502 of 3002 MiB", spec.CPU, spec.MemoryMiB, spec.MaxMemoryMiB)
	}
	res := a.Spec.Containers[0].Resources
	if res.Limits.Cpu().String() != "4" || res.Limits.Memory().Value() != 1502<<20 || res.Requests.Memory().Value() != 1502<<20 {
		t.Errorf("compute resources %v: want a CPU limit of the 4 vCPUs and 1502 MiB of memory", res)
	}

	b, _ := Pod(growable(3, "2Gi"), claims, cfg)
	if TemplateHash(b) != TemplateHash(a) {
		t.Errorf("sockets and memory within the room changed the hash")
	}
	got := Resize(a, b)
	if got == nil || got.Limits.Cpu().String() != "6" || got.Limits.Memory().String() != "2Gi" || got.Requests.Memory().String() != "2Gi" {
		t.Fatalf("Resize %v: want cpu 6, memory 2Gi", got)
	}
	if _, ok := got.Limits["nvidia.com/A10"]; ok {
		t.Error("Resize touches device resources")
	}
	if Resize(b, b) != nil {
		t.Error("Resize of a pod to itself changes something")
	}
	vm := growable(3, "2Gi")
	vm.Spec.Template.Spec.Domain.CPU.MaxSockets = 8
	c, _ := Pod(vm, claims, cfg)
	if TemplateHash(c) == TemplateHash(a) || Resize(a, c) != nil {
		t.Errorf("a change of the room kept the hash, or is resized in place")
	}
	// all the room used: still resizable in place, and back down to where it booted
	full, _ := Pod(growable(4, "3001Mi"), claims, cfg)
	if TemplateHash(full) != TemplateHash(a) || Resize(a, full) == nil || Resize(full, a) != nil {
		t.Errorf("the whole room: hash kept %v, resize up %v, down below boot %v (want kept, a resize, none)",
			TemplateHash(full) == TemplateHash(a), Resize(a, full), Resize(full, a))
	}
	if !BelowBoot(full, a) || BelowBoot(a, full) {
		t.Error("BelowBoot does not compare with the size the pod booted with")
	}
	// room in one dimension only: the other one's change needs a restart
	cpuOnly := func(sockets uint32, guest string) *vmpodv1.VirtualMachine {
		vm := growable(sockets, guest)
		vm.Spec.Template.Spec.Domain.Memory.MaxGuest = nil
		return vm
	}
	x, _ := Pod(cpuOnly(2, "1500Mi"), claims, cfg)
	y, _ := Pod(cpuOnly(3, "1500Mi"), claims, cfg)
	z, _ := Pod(cpuOnly(2, "2Gi"), claims, cfg)
	if TemplateHash(x) != TemplateHash(y) || TemplateHash(x) == TemplateHash(z) {
		t.Errorf("CPU room only: a sockets change kept the hash %v, a memory change kept it %v (want true, false)",
			TemplateHash(x) == TemplateHash(y), TemplateHash(x) == TemplateHash(z))
	}
	memOnly := growable(2, "1500Mi")
	memOnly.Spec.Template.Spec.Domain.CPU.MaxSockets = 0
	m1, _ := Pod(memOnly, claims, cfg)
	memOnly.Spec.Template.Spec.Domain.CPU.Sockets = 3
	m2, _ := Pod(memOnly, claims, cfg)
	if TemplateHash(m1) == TemplateHash(m2) {
		t.Error("memory room only: a sockets change kept the hash")
	}
	// without room, sockets change the hash (a restart), as before
	d, _ := Pod(fedora(), claims, cfg)
	vm = fedora()
	vm.Spec.Template.Spec.Domain.CPU.Sockets = 3
	e, _ := Pod(vm, claims, cfg)
	if TemplateHash(d) == TemplateHash(e) {
		t.Error("a VM without room kept its hash over a sockets change")
	}
	if _, ok := d.Spec.Containers[0].Resources.Limits["cpu"]; ok {
		t.Error("a VM without CPU room got a CPU limit")
	}
}

// The rendered pod's vmpod.dev/* annotations are what containerd hands the shim: every one
// must pass the shim's own check (api/annotations), or every sandbox of the VM fails. A
// template annotation the shim would refuse is refused here, naming it.
func TestPodAnnotationsPassTheShim(t *testing.T) {
	pod, err := Pod(fedora(), claims, cfg)
	if err != nil {
		t.Fatalf("Pod: %v", err)
	}
	if _, err := podannotations.Parse(pod.Annotations, podannotations.Known()); err != nil {
		t.Errorf("the shim would refuse the rendered pod: %v", err)
	}
	vm := fedora()
	vm.Spec.Template.ObjectMeta.Annotations = map[string]string{"vmpod.dev/bogus": "x"}
	if _, err := Pod(vm, claims, cfg); err == nil || !strings.Contains(err.Error(), "annotations[vmpod.dev/bogus]") {
		t.Errorf("template annotation vmpod.dev/bogus: %v, want an error naming it", err)
	}
}
