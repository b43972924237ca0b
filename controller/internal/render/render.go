// Package render turns a VirtualMachine into the Pod that runs it: the vmpod.dev/vm
// annotation (api/vmspec), the pod's volumes at the paths the shim looks for, resources,
// labels and owner reference. It is a pure function of its inputs; the reconciler decides
// when to call it.
package render

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	podannotations "github.com/vmpod/vmpod/api/annotations"
	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/api/vmspec"
	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
)

const (
	// VMNameLabel is set on a VM's pods to its name.
	VMNameLabel = "vmpod.dev/vm-name"
	// TemplateHashAnnotation on a pod is the hash of what it was rendered from, so a
	// template change shows as RestartRequired instead of going unnoticed. Not under
	// vmpod.dev/: containerd hands the shim every vmpod.dev/* pod annotation, and the shim
	// refuses keys it does not know (the first pod on a real kubelet failed on exactly that).
	TemplateHashAnnotation = "controller.vmpod.dev/template-hash"
	// PodNamePrefix + the VM's name is the pod's name.
	PodNamePrefix = "vmpod-"

	// Multus annotations (k8s.v1.cni.cncf.io network-attachment-definition spec).
	MultusNetworksAnnotation       = "k8s.v1.cni.cncf.io/networks"
	MultusDefaultNetworkAnnotation = "v1.multus-cni.io/default-network"

	// DefaultTerminationGracePeriodSeconds is KubeVirt's: time for an ACPI power-off.
	DefaultTerminationGracePeriodSeconds = 180
)

// Config is what the cluster admin chose for every VM pod.
type Config struct {
	// RuntimeClassName is the RuntimeClass of VM pods (vmpod).
	RuntimeClassName string
	// ComputeImage is the compute container's image. Its content is never run: the shim
	// runs the VM in its place, so any small image the nodes have (the pause image) will do.
	ComputeImage string
	// CPUAllocationRatio: a vCPU requests 1/ratio of a CPU unless resources.requests.cpu is
	// set (KubeVirt's default is 10).
	CPUAllocationRatio int64
}

// Claim is what rendering needs to know about a PVC the VM uses.
type Claim struct {
	Block bool // volumeMode Block
}

// PodName is the name of a VM's pod.
func PodName(vmName string) string { return PodNamePrefix + vmName }

// Pod renders the pod for vm. claims has an entry for the claim name of every dataVolume
// and persistentVolumeClaim volume. Errors are problems with the VM's spec.
func Pod(vm *vmpodv1.VirtualMachine, claims map[string]Claim, cfg Config) (*corev1.Pod, error) {
	spec := &vm.Spec.Template.Spec
	r := &renderer{vm: vm, cfg: cfg, claims: claims, limits: corev1.ResourceList{}}
	r.vmspec = vmspec.VM{Version: vmspec.Version}
	if vmspec.IsUUID(string(vm.UID)) { // the API server's UIDs are; a test's may not be
		r.vmspec.UUID = string(vm.UID)
	}
	if err := r.domain(&spec.Domain); err != nil {
		return nil, err
	}
	if err := r.volumes(spec); err != nil {
		return nil, err
	}
	if err := r.accessCredentials(spec); err != nil {
		return nil, err
	}
	if err := r.networks(spec); err != nil {
		return nil, err
	}
	r.devices(&spec.Domain.Devices)
	annotation, err := r.vmspec.Encode()
	if err != nil {
		return nil, fmt.Errorf("render %s annotation: %w", vmspec.Annotation, err)
	}
	resources, err := r.resources(&spec.Domain)
	if err != nil {
		return nil, err
	}

	labels := maps.Clone(vm.Spec.Template.ObjectMeta.Labels)
	if labels == nil {
		labels = map[string]string{}
	}
	labels[VMNameLabel] = vm.Name
	annotations := maps.Clone(vm.Spec.Template.ObjectMeta.Annotations)
	if annotations == nil {
		annotations = map[string]string{}
	}
	maps.Copy(annotations, r.annotations)
	// a vmpod.dev/ key the shim does not know would fail every sandbox the kubelet starts:
	// refuse it here, where the user sees it on the VM
	for k := range annotations {
		if strings.HasPrefix(k, podannotations.Prefix) && !slices.Contains(podannotations.Known(), k) {
			return nil, fmt.Errorf("spec.template.metadata.annotations[%s]: not a vmpod annotation (known: %s)", k, strings.Join(podannotations.Known(), ", "))
		}
	}
	annotations[vmspec.Annotation] = string(annotation)

	hostname := spec.Hostname
	if hostname == "" && len(vm.Name) <= 63 {
		hostname = vm.Name
	}
	grace := spec.TerminationGracePeriodSeconds
	if grace == nil {
		grace = ptr.To[int64](DefaultTerminationGracePeriodSeconds)
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name:        PodName(vm.Name),
			Namespace:   vm.Namespace,
			Labels:      labels,
			Annotations: annotations,
			OwnerReferences: []metav1.OwnerReference{*metav1.NewControllerRef(vm,
				vmpodv1.GroupVersion.WithKind("VirtualMachine"))},
		},
		Spec: corev1.PodSpec{
			RuntimeClassName: ptr.To(cfg.RuntimeClassName),
			// The controller owns restarts (runStrategy, back-off); the kubelet restarting
			// the compute container in place would reboot the VM behind its back.
			RestartPolicy:                 corev1.RestartPolicyNever,
			TerminationGracePeriodSeconds: grace,
			Hostname:                      hostname,
			Subdomain:                     spec.Subdomain,
			NodeSelector:                  spec.NodeSelector,
			Affinity:                      spec.Affinity,
			Tolerations:                   spec.Tolerations,
			PriorityClassName:             spec.PriorityClassName,
			ImagePullSecrets:              r.pullSecrets,
			// Nothing runs in the compute container that could use a token or service env.
			AutomountServiceAccountToken: ptr.To(false),
			EnableServiceLinks:           ptr.To(false),
			Volumes:                      r.podVolumes,
			Containers: []corev1.Container{{
				Name:           vmspec.ComputeContainer,
				Image:          cfg.ComputeImage,
				Resources:      resources,
				VolumeMounts:   r.mounts,
				VolumeDevices:  r.devs,
				ReadinessProbe: readinessProbe(spec.ReadinessProbe),
				// The serial console is the container's log and its stdin (kubectl attach).
				Stdin:                    true,
				TTY:                      true,
				TerminationMessagePolicy: corev1.TerminationMessageFallbackToLogsOnError,
			}},
		},
	}
	pod.Annotations[TemplateHashAnnotation] = hashOf(shapeOf(pod, r.vmspec))
	return pod, nil
}

// shapeOf is what of pod a live resize cannot change, for its hash. For each dimension
// the VM declares room in (CPU: cpu.maxSockets, memory: maxMemoryMiB), the VM spec's size
// and the compute container's quantities are left out — but which requests and limits
// exist stays in, since a resize cannot add or remove one. A VM whose sockets or memory
// change within its room then keeps its hash, and its pod is resized (Resize) instead of
// needing a restart; a change of anything else, the room included, still needs one.
func shapeOf(pod *corev1.Pod, vm vmspec.VM) *corev1.Pod {
	var names []corev1.ResourceName
	if vm.CPUResizable() {
		names = append(names, corev1.ResourceCPU)
		vm.CPU.Sockets = 0
	}
	if vm.MemoryResizable() {
		names = append(names, corev1.ResourceMemory)
		vm.MemoryMiB = 0
	}
	if len(names) == 0 {
		return pod
	}
	shape := pod.DeepCopy()
	b, err := json.Marshal(vm)
	if err != nil {
		panic(fmt.Sprintf("render: marshal the VM spec for its hash: %v", err)) // it has marshalled once already
	}
	shape.Annotations[vmspec.Annotation] = string(b)
	res := &shape.Spec.Containers[0].Resources
	for _, l := range []corev1.ResourceList{res.Requests, res.Limits} {
		for _, name := range names {
			if _, ok := l[name]; ok {
				l[name] = resource.Quantity{}
			}
		}
	}
	return shape
}

// Resize is the compute container's cpu and memory of want, if pod, rendered with the
// same hash, has others and want does not go below the size pod's VM booted with (the
// shim cannot go there: a restart can): what a live resize of pod gives it. Nil if there
// is nothing to change or it cannot be done in place.
func Resize(pod, want *corev1.Pod) *corev1.ResourceRequirements {
	if TemplateHash(pod) != TemplateHash(want) || len(pod.Spec.Containers) == 0 || len(want.Spec.Containers) == 0 || BelowBoot(pod, want) {
		return nil
	}
	have, next := pod.Spec.Containers[0].Resources, want.Spec.Containers[0].Resources
	out := &corev1.ResourceRequirements{Requests: corev1.ResourceList{}, Limits: corev1.ResourceList{}}
	changed := false
	for _, name := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
		// the same hash: the same keys exist on both
		for _, pair := range []struct{ have, next, out corev1.ResourceList }{{have.Requests, next.Requests, out.Requests}, {have.Limits, next.Limits, out.Limits}} {
			n, ok := pair.next[name]
			if !ok {
				continue
			}
			pair.out[name] = n
			if h := pair.have[name]; h.Cmp(n) != 0 {
				changed = true
			}
		}
	}
	if !changed {
		return nil
	}
	return out
}

// BelowBoot says whether want asks for fewer sockets or less memory than the VM of pod
// booted with: the shim refuses that, so it takes a restart.
func BelowBoot(pod, want *corev1.Pod) bool {
	booted, err1 := vmspec.Parse([]byte(pod.Annotations[vmspec.Annotation]))
	next, err2 := vmspec.Parse([]byte(want.Annotations[vmspec.Annotation]))
	if err1 != nil || err2 != nil {
		return false // not a VM pod this controller rendered: the hash decides
	}
	return next.CPU.Sockets < booted.CPU.Sockets || next.MemoryMiB < booted.MemoryMiB
}

// TemplateHash is the hash a pod rendered now would carry.
func TemplateHash(pod *corev1.Pod) string { return pod.Annotations[TemplateHashAnnotation] }

// renderer accumulates the pod and vmspec parts while walking the VM's spec.
type renderer struct {
	vm          *vmpodv1.VirtualMachine
	cfg         Config
	claims      map[string]Claim
	vmspec      vmspec.VM
	podVolumes  []corev1.Volume
	mounts      []corev1.VolumeMount
	devs        []corev1.VolumeDevice
	pullSecrets []corev1.LocalObjectReference
	annotations map[string]string
	limits      corev1.ResourceList // device plugin resources
	guestMemory resource.Quantity
}

func (r *renderer) domain(d *vmpodv1.DomainSpec) error {
	cpu := vmspec.CPU{Sockets: 1, Cores: 1, Threads: 1}
	if d.CPU != nil {
		for dst, src := range map[*int]uint32{&cpu.Sockets: d.CPU.Sockets, &cpu.Cores: d.CPU.Cores, &cpu.Threads: d.CPU.Threads} {
			if src > 0 {
				*dst = int(src)
			}
		}
		cpu.Model = d.CPU.Model
		// the room is declared even when all used: the VM stays resizable (smaller again)
		cpu.MaxSockets = int(d.CPU.MaxSockets)
	}
	r.vmspec.CPU = cpu
	r.vmspec.Features = features(d.Features)

	switch {
	case d.Memory != nil && d.Memory.Guest != nil:
		r.guestMemory = d.Memory.Guest.DeepCopy()
	case d.Resources.Requests.Memory() != nil && !d.Resources.Requests.Memory().IsZero():
		r.guestMemory = d.Resources.Requests.Memory().DeepCopy()
	default:
		return fmt.Errorf("spec.template.spec.domain: set memory.guest or resources.requests.memory")
	}
	// round up to whole MiB: QEMU sizes RAM in MiB
	r.vmspec.MemoryMiB = (r.guestMemory.Value() + (1<<20 - 1)) >> 20
	if d.Memory != nil && d.Memory.MaxGuest != nil {
		// Memory that can grow does so in whole hotplug blocks, as the shim follows
		// changes of the memory limit in them: guest memory and room are rounded up to
		// blocks, and the limit is the rounded guest memory.
		block := int64(vmspec.GrowthBlockMiB)
		r.vmspec.MemoryMiB = (r.vmspec.MemoryMiB + block - 1) / block * block
		maxMiB := (d.Memory.MaxGuest.Value() + block<<20 - 1) / (block << 20) * block
		r.vmspec.MaxMemoryMiB = max(maxMiB, r.vmspec.MemoryMiB) // declared even when all used
		r.guestMemory = *resource.NewQuantity(r.vmspec.MemoryMiB<<20, resource.BinarySI)
	}

	r.vmspec.Machine = machine.Q35
	if d.Machine != nil && d.Machine.Type != "" {
		r.vmspec.Machine = machine.Type(d.Machine.Type)
	}
	r.vmspec.Firmware = vmspec.Firmware{Type: vmspec.FirmwareBIOS}
	if d.Firmware != nil && d.Firmware.Bootloader != nil && d.Firmware.Bootloader.EFI != nil {
		// KubeVirt turns Secure Boot on unless it is explicitly off.
		r.vmspec.Firmware = vmspec.Firmware{Type: vmspec.FirmwareUEFI,
			SecureBoot: ptr.Deref(d.Firmware.Bootloader.EFI.SecureBoot, true)}
	}
	return nil
}

// features is the VM spec's form of KubeVirt-shaped features: a feature listed without
// enabled: false is on.
func features(f *vmpodv1.Features) vmspec.Features {
	var out vmspec.Features
	if f == nil {
		return out // ACPI and SMM default to on in the spec
	}
	on := func(s *vmpodv1.FeatureState) bool { return s != nil && ptr.Deref(s.Enabled, true) }
	if f.ACPI != nil {
		out.ACPI = ptr.To(on(f.ACPI))
	}
	if f.SMM != nil {
		out.SMM = ptr.To(on(f.SMM))
	}
	out.KVMHidden = f.KVM != nil && f.KVM.Hidden
	if h := f.HyperV; h != nil {
		hv := &machine.HyperV{
			Relaxed: on(h.Relaxed), VAPIC: on(h.VAPIC), VPIndex: on(h.VPIndex), Runtime: on(h.Runtime),
			SynIC: on(h.SyNIC), Reset: on(h.Reset), Frequencies: on(h.Frequencies),
			Reenlightenment: on(h.Reenlightenment), TLBFlush: on(h.TLBFlush), IPI: on(h.IPI), EVMCS: on(h.EVMCS),
		}
		if t := h.SyNICTimer; t != nil && ptr.Deref(t.Enabled, true) {
			hv.SynICTimer, hv.SynICTimerDirect = true, on(t.Direct)
		}
		if sl := h.Spinlocks; sl != nil && ptr.Deref(sl.Enabled, true) {
			hv.Spinlocks = int(ptr.Deref(sl.Retries, 4096))
		}
		if v := h.VendorID; v != nil && ptr.Deref(v.Enabled, true) {
			hv.VendorID = v.VendorID
		}
		if *hv != (machine.HyperV{}) {
			out.HyperV = hv
		}
	}
	return out
}

func (r *renderer) volumes(spec *vmpodv1.InstanceSpec) error {
	volumes := map[string]*vmpodv1.Volume{}
	for i := range spec.Volumes {
		volumes[spec.Volumes[i].Name] = &spec.Volumes[i]
	}
	for i, disk := range spec.Domain.Devices.Disks {
		v, ok := volumes[disk.Name]
		if !ok {
			return fmt.Errorf("spec.template.spec.domain.devices.disks[%d]: no volume named %q", i, disk.Name)
		}
		if v.CloudInitNoCloud != nil {
			if err := r.cloudInit(v, disk); err != nil {
				return err
			}
			continue
		}
		if v.Hotpluggable() {
			continue // attached to the running VM, not its pod (HotplugVolumes)
		}
		d := vmspec.Disk{Name: disk.Name, Volume: v.Name, Device: vmspec.DeviceDisk, Bus: vmspec.BusVirtio,
			BootOrder: int(ptr.Deref(disk.BootOrder, 0))}
		switch {
		case disk.CDRom != nil:
			d.Device, d.Bus, d.ReadOnly = vmspec.DeviceCDROM, vmspec.BusSATA, true
			if disk.CDRom.Bus != "" {
				d.Bus = vmspec.Bus(disk.CDRom.Bus)
			}
		case disk.Disk != nil:
			d.ReadOnly = disk.Disk.ReadOnly
			if disk.Disk.Bus != "" {
				d.Bus = vmspec.Bus(disk.Disk.Bus)
			}
		}
		switch {
		case v.EmptyDisk != nil:
			if d.Device != vmspec.DeviceDisk || d.ReadOnly {
				return fmt.Errorf("spec.template.spec.domain.devices.disks[%d]: volume %s is an emptyDisk: a writable disk, not a cdrom or read-only", i, v.Name)
			}
			c := v.EmptyDisk.Capacity
			if c.Sign() <= 0 || c.Cmp(*resource.NewQuantity(vmspec.MaxEmptyDiskMiB<<20, resource.BinarySI)) > 0 {
				return fmt.Errorf("spec.template.spec.volumes[%s].emptyDisk.capacity: must be more than 0 and at most %dTi, got %s", v.Name, vmspec.MaxEmptyDiskMiB>>20, c.String())
			}
			d.Source, d.Volume, d.SizeMiB = vmspec.SourceEmpty, "", (c.Value()+(1<<20-1))>>20
		case v.ContainerDisk != nil:
			d.Source = vmspec.SourceImage
			r.podVolumes = append(r.podVolumes, corev1.Volume{Name: v.Name, VolumeSource: corev1.VolumeSource{
				Image: &corev1.ImageVolumeSource{Reference: v.ContainerDisk.Image, PullPolicy: v.ContainerDisk.ImagePullPolicy}}})
			r.mount(v.Name, true)
			if s := v.ContainerDisk.ImagePullSecret; s != "" && !slices.Contains(r.pullSecrets, corev1.LocalObjectReference{Name: s}) {
				r.pullSecrets = append(r.pullSecrets, corev1.LocalObjectReference{Name: s})
			}
		case v.DataVolume != nil, v.PersistentVolumeClaim != nil:
			claim, readOnly := ClaimName(v), v.PersistentVolumeClaim != nil && v.PersistentVolumeClaim.ReadOnly
			c, ok := r.claims[claim]
			if !ok {
				return fmt.Errorf("spec.template.spec.volumes[%s]: PVC %q is not known", v.Name, claim)
			}
			d.ReadOnly = d.ReadOnly || readOnly
			r.podVolumes = append(r.podVolumes, corev1.Volume{Name: v.Name, VolumeSource: corev1.VolumeSource{
				PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: claim, ReadOnly: readOnly}}})
			if c.Block {
				d.Source = vmspec.SourceBlock
				r.devs = append(r.devs, corev1.VolumeDevice{Name: v.Name, DevicePath: vmspec.BlockDevicePath(v.Name)})
			} else {
				d.Source = vmspec.SourceFile
				r.mount(v.Name, readOnly)
			}
		}
		r.vmspec.Disks = append(r.vmspec.Disks, d)
	}
	return nil
}

// ClaimName is the PVC behind a dataVolume or persistentVolumeClaim volume ("" otherwise).
// A DataVolume's PVC has the DataVolume's name.
func ClaimName(v *vmpodv1.Volume) string {
	switch {
	case v.DataVolume != nil:
		return v.DataVolume.Name
	case v.PersistentVolumeClaim != nil:
		return v.PersistentVolumeClaim.ClaimName
	}
	return ""
}

func (r *renderer) cloudInit(v *vmpodv1.Volume, disk vmpodv1.Disk) error {
	src := v.CloudInitNoCloud
	ci := &vmspec.CloudInit{UserData: src.UserData, NetworkData: src.NetworkData, Bus: vmspec.BusVirtio}
	if disk.Disk != nil && disk.Disk.Bus != "" {
		ci.Bus = vmspec.Bus(disk.Disk.Bus)
	} else if disk.CDRom != nil && disk.CDRom.Bus != "" {
		ci.Bus = vmspec.Bus(disk.CDRom.Bus)
	}
	for _, b64 := range []struct {
		field string
		in    string
		out   *string
	}{{"userDataBase64", src.UserDataBase64, &ci.UserData}, {"networkDataBase64", src.NetworkDataBase64, &ci.NetworkData}} {
		if b64.in == "" {
			continue
		}
		data, err := base64.StdEncoding.DecodeString(b64.in)
		if err != nil {
			return fmt.Errorf("spec.template.spec.volumes[%s].cloudInitNoCloud.%s: %w", v.Name, b64.field, err)
		}
		*b64.out = string(data)
	}
	if src.SecretRef != nil {
		ci.SecretVolume = v.Name
		r.podVolumes = append(r.podVolumes, corev1.Volume{Name: v.Name, VolumeSource: corev1.VolumeSource{
			Secret: &corev1.SecretVolumeSource{SecretName: src.SecretRef.Name}}})
		r.mount(v.Name, true)
	}
	r.vmspec.CloudInit = ci
	return nil
}

// accessCredentialVolume names the pod volume of accessCredentials[i]'s Secret.
func accessCredentialVolume(i int) string { return fmt.Sprintf("access-credential-%d", i) }

// accessCredentials mounts each credential's Secret in the compute container, where the
// shim reads the keys when the VM starts (as it reads a cloud-init Secret): the keys never
// pass through the annotation. Keys added to the Secret reach the guest agent's users at
// the next start; cloud-init applies noCloud keys once per instance, as with KubeVirt.
func (r *renderer) accessCredentials(spec *vmpodv1.InstanceSpec) error {
	for i, c := range spec.AccessCredentials {
		name := accessCredentialVolume(i)
		if slices.ContainsFunc(spec.Volumes, func(v vmpodv1.Volume) bool { return v.Name == name }) {
			return fmt.Errorf("spec.template.spec.volumes[%s]: the name is taken by accessCredentials[%d]'s Secret volume; rename the volume", name, i)
		}
		ac := vmspec.AccessCredential{SecretVolume: name, Propagation: vmspec.PropagateNoCloud}
		if a := c.SSHPublicKey.PropagationMethod.QemuGuestAgent; a != nil {
			ac.Propagation, ac.Users = vmspec.PropagateGuestAgent, slices.Clone(a.Users)
		}
		optional := false
		r.podVolumes = append(r.podVolumes, corev1.Volume{Name: name, VolumeSource: corev1.VolumeSource{
			Secret: &corev1.SecretVolumeSource{SecretName: c.SSHPublicKey.Source.Secret.SecretName, Optional: &optional}}})
		r.mount(name, true)
		r.vmspec.AccessCredentials = append(r.vmspec.AccessCredentials, ac)
	}
	return nil
}

func (r *renderer) mount(volume string, readOnly bool) {
	r.mounts = append(r.mounts, corev1.VolumeMount{Name: volume, MountPath: vmspec.VolumeMountPath(volume), ReadOnly: readOnly})
}

func (r *renderer) networks(spec *vmpodv1.InstanceSpec) error {
	ifaces, nets := spec.Domain.Devices.Interfaces, spec.Networks
	if len(ifaces) == 0 && len(nets) == 0 && ptr.Deref(spec.Domain.Devices.AutoattachPodInterface, true) {
		ifaces = []vmpodv1.Interface{{Name: "default", Model: string(vmspec.ModelVirtio)}}
		nets = []vmpodv1.Network{{Name: "default", Pod: &vmpodv1.PodNetwork{}}}
	}
	byName := map[string]*vmpodv1.Network{}
	for i := range nets {
		byName[nets[i].Name] = &nets[i]
	}
	type attachment struct {
		Name      string `json:"name"`
		Namespace string `json:"namespace,omitempty"`
		Interface string `json:"interface"`
	}
	var secondary []attachment
	for i, iface := range ifaces {
		n, ok := byName[iface.Name]
		if !ok {
			return fmt.Errorf("spec.template.spec.domain.devices.interfaces[%d]: no network named %q", i, iface.Name)
		}
		podIface := "eth0"
		if n.Multus != nil {
			if n.Multus.Default {
				r.setAnnotation(MultusDefaultNetworkAnnotation, n.Multus.NetworkName)
			} else {
				// Multus names secondary interfaces net1, net2, ... unless told; telling it
				// makes the name part of the contract instead of an ordering accident.
				podIface = "net" + strconv.Itoa(len(secondary)+1)
				ns, name := splitNamespace(n.Multus.NetworkName)
				secondary = append(secondary, attachment{Name: name, Namespace: ns, Interface: podIface})
			}
		}
		model := vmspec.Model(iface.Model)
		if model == "" {
			model = vmspec.ModelVirtio
		}
		r.vmspec.Interfaces = append(r.vmspec.Interfaces, vmspec.Interface{
			Name: iface.Name, PodInterface: podIface, Model: model, MACAddress: iface.MACAddress,
			Binding: binding(iface), Ports: ports(iface.Ports)})
	}
	if len(secondary) > 0 {
		b, err := json.Marshal(secondary)
		if err != nil {
			return fmt.Errorf("render %s: %w", MultusNetworksAnnotation, err)
		}
		r.setAnnotation(MultusNetworksAnnotation, string(b))
	}
	return nil
}

func (r *renderer) setAnnotation(k, v string) {
	if r.annotations == nil {
		r.annotations = map[string]string{}
	}
	r.annotations[k] = v
}

func splitNamespace(s string) (ns, name string) {
	if ns, name, ok := strings.Cut(s, "/"); ok {
		return ns, name
	}
	return "", s
}

// devices adds GPUs and host devices to the annotation, and one unit of each one's resource
// to the compute container: the device plugin allocates it, the shim passes it through.
func (r *renderer) devices(d *vmpodv1.Devices) {
	add := func(name, resourceName string, list *[]vmspec.HostDevice) {
		*list = append(*list, vmspec.HostDevice{Name: name, ResourceName: resourceName})
		q := r.limits[corev1.ResourceName(resourceName)]
		q.Add(resource.MustParse("1"))
		r.limits[corev1.ResourceName(resourceName)] = q
	}
	for _, g := range d.GPUs {
		add(g.Name, g.DeviceName, &r.vmspec.GPUs)
	}
	for _, h := range d.HostDevices {
		add(h.Name, h.DeviceName, &r.vmspec.HostDevices)
	}
}

// resources: memory requests and limits default to the guest's memory (the VM cannot use
// more; QEMU's own overhead is the RuntimeClass overhead, added by the API server). cpu
// requests default to vCPUs/CPUAllocationRatio, with no cpu limit unless one is set.
func (r *renderer) resources(d *vmpodv1.DomainSpec) (corev1.ResourceRequirements, error) {
	req := d.Resources.Requests.DeepCopy()
	lim := d.Resources.Limits.DeepCopy()
	if req == nil {
		req = corev1.ResourceList{}
	}
	if lim == nil {
		lim = corev1.ResourceList{}
	}
	if _, ok := req[corev1.ResourceMemory]; !ok {
		req[corev1.ResourceMemory] = r.guestMemory
	}
	if _, ok := lim[corev1.ResourceMemory]; !ok {
		m := req[corev1.ResourceMemory]
		if m.Cmp(r.guestMemory) < 0 {
			m = r.guestMemory
		}
		lim[corev1.ResourceMemory] = m
	}
	if _, ok := req[corev1.ResourceEphemeralStorage]; !ok {
		// empty disks live in the compute container's writable layer: the scheduler
		// must find the room a guest may fill (the kubelet counts what it writes)
		var mib int64
		for _, disk := range r.vmspec.Disks {
			mib += disk.SizeMiB
		}
		if mib > 0 {
			req[corev1.ResourceEphemeralStorage] = *resource.NewQuantity(mib<<20, resource.BinarySI)
		}
	}
	if _, ok := lim[corev1.ResourceCPU]; !ok && r.vmspec.CPUResizable() {
		// a VM that can grow vCPUs has as many CPUs of limit as vCPUs: the shim follows
		// a change of the limit (docs/design/208); the RuntimeClass overhead leaves QEMU's
		// own threads room on top at the pod level
		lim[corev1.ResourceCPU] = *resource.NewQuantity(int64(r.vmspec.CPU.VCPUs()), resource.DecimalSI)
	}
	if _, ok := req[corev1.ResourceCPU]; !ok {
		ratio := max(r.cfg.CPUAllocationRatio, 1)
		milli := max(int64(r.vmspec.CPU.VCPUs())*1000/ratio, 1)
		req[corev1.ResourceCPU] = *resource.NewMilliQuantity(milli, resource.DecimalSI)
	}
	for name, q := range r.limits {
		req[name], lim[name] = q, q
	}
	for name := range req {
		if l, ok := lim[name]; ok && l.Cmp(req[name]) < 0 {
			return corev1.ResourceRequirements{}, fmt.Errorf("spec.template.spec.domain.resources: %s limit %s is below the request %s",
				name, l.String(), ptr.To(req[name]).String())
		}
	}
	return corev1.ResourceRequirements{Requests: req, Limits: lim}, nil
}

func readinessProbe(p *vmpodv1.Probe) *corev1.Probe {
	if p == nil {
		return nil
	}
	probe := &corev1.Probe{InitialDelaySeconds: p.InitialDelaySeconds, TimeoutSeconds: p.TimeoutSeconds,
		PeriodSeconds: p.PeriodSeconds, SuccessThreshold: p.SuccessThreshold, FailureThreshold: p.FailureThreshold}
	switch {
	case p.GuestAgentPing != nil:
		probe.Exec = &corev1.ExecAction{Command: []string{vmspec.GuestAgentPingCommand}}
	case p.TCPSocket != nil:
		probe.TCPSocket = p.TCPSocket.DeepCopy()
	case p.HTTPGet != nil:
		probe.HTTPGet = p.HTTPGet.DeepCopy()
	}
	return probe
}

// hashOf hashes the rendered pod's labels, annotations and spec.
func hashOf(pod *corev1.Pod) string {
	b, err := json.Marshal(struct {
		L, A map[string]string
		S    *corev1.PodSpec
	}{pod.Labels, pod.Annotations, &pod.Spec})
	if err != nil {
		panic(fmt.Sprintf("render: marshal pod for its hash: %v", err)) // a PodSpec always marshals
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:8])
}

// binding is the interface's vmspec binding: masquerade if asked for, else bridge.
func binding(iface vmpodv1.Interface) vmspec.Binding {
	if iface.Masquerade != nil {
		return vmspec.BindingMasquerade
	}
	return vmspec.BindingBridge
}

func ports(in []vmpodv1.Port) []vmspec.Port {
	var out []vmspec.Port
	for _, p := range in {
		out = append(out, vmspec.Port{Name: p.Name, Protocol: vmspec.Protocol(p.Protocol), Port: int(p.Port)})
	}
	return out
}
