package render

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"

	"github.com/vmpod/vmpod/api/vmspec"
	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
)

const (
	// HotplugVolumeLabel on an attachment pod names the VM's volume it mounts.
	HotplugVolumeLabel = "vmpod.dev/hotplug-volume"
	// AttachmentFinalizer holds an attachment pod (and the kubelet from unmounting its
	// volume) until the disk is out of the VM, or the VM's QEMU is gone.
	AttachmentFinalizer = "vmpod.dev/hotplug-detach"
)

// HotplugVolume is a hotpluggable volume of a VM: attached to the running VM through an
// attachment pod that mounts its PVC on the VM pod's node (docs/design/204).
type HotplugVolume struct {
	Name     string // the volume's, and its disk's
	Claim    string // the PVC
	ReadOnly bool
}

// HotplugVolumes are vm's hotpluggable volumes, in the order of its disks. The API
// server's schema has checked their names and disks; a disk bus a preference set is
// checked here, on the expanded VM.
func HotplugVolumes(vm *vmpodv1.VirtualMachine) ([]HotplugVolume, error) {
	spec := &vm.Spec.Template.Spec
	volumes := map[string]*vmpodv1.Volume{}
	for i := range spec.Volumes {
		volumes[spec.Volumes[i].Name] = &spec.Volumes[i]
	}
	var out []HotplugVolume
	for i, disk := range spec.Domain.Devices.Disks {
		v, ok := volumes[disk.Name]
		if !ok || !v.Hotpluggable() {
			continue
		}
		if disk.CDRom != nil || (disk.Disk != nil && disk.Disk.Bus != "" && disk.Disk.Bus != vmpodv1.DiskBus(vmspec.BusVirtio)) {
			return nil, fmt.Errorf("spec.template.spec.domain.devices.disks[%d]: volume %s is hotpluggable: its disk must be a virtio disk", i, v.Name)
		}
		readOnly := disk.Disk != nil && disk.Disk.ReadOnly
		if v.PersistentVolumeClaim != nil {
			readOnly = readOnly || v.PersistentVolumeClaim.ReadOnly
		}
		out = append(out, HotplugVolume{Name: v.Name, Claim: ClaimName(v), ReadOnly: readOnly})
	}
	return out, nil
}

// AttachmentPodName is the name of the attachment pod of vm's volume: its own prefix, so
// no VM's pod can have it, and a hash, so no two VMs' volumes share one.
func AttachmentPodName(vmName, volume string) string {
	sum := sha256.Sum256([]byte(vmName + "/" + volume))
	return "hp-" + vmName + "-" + volume + "-" + hex.EncodeToString(sum[:4])
}

// AttachmentPod renders the pod that mounts hv's PVC on the node of vmPod, the running
// VM's pod, and lends it to that pod (vmspec.AttachmentForLabel): it runs nothing but the
// pause image (the compute image), as no user, with no token, and goes with vmPod (its
// owner: the garbage collector deletes it when vmPod goes).
func AttachmentPod(vm *vmpodv1.VirtualMachine, vmPod *corev1.Pod, hv HotplugVolume, claim Claim, cfg Config) *corev1.Pod {
	var mounts []corev1.VolumeMount
	var devs []corev1.VolumeDevice
	if claim.Block {
		devs = []corev1.VolumeDevice{{Name: hv.Name, DevicePath: vmspec.BlockDevicePath(hv.Name)}}
	} else {
		mounts = []corev1.VolumeMount{{Name: hv.Name, MountPath: vmspec.VolumeMountPath(hv.Name), ReadOnly: hv.ReadOnly}}
	}
	small := corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("10m"), corev1.ResourceMemory: resource.MustParse("16Mi")}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name:      AttachmentPodName(vm.Name, hv.Name),
			Namespace: vm.Namespace,
			Labels: map[string]string{
				VMNameLabel:               vm.Name,
				HotplugVolumeLabel:        hv.Name,
				vmspec.AttachmentForLabel: string(vmPod.UID),
			},
			OwnerReferences: []metav1.OwnerReference{*metav1.NewControllerRef(vmPod, corev1.SchemeGroupVersion.WithKind("Pod"))},
			Finalizers:      []string{AttachmentFinalizer},
		},
		Spec: corev1.PodSpec{
			// the VM pod's node, through the scheduler (a nodeName would skip the volume
			// binding a WaitForFirstConsumer PVC needs)
			Affinity: &corev1.Affinity{NodeAffinity: &corev1.NodeAffinity{
				RequiredDuringSchedulingIgnoredDuringExecution: &corev1.NodeSelector{NodeSelectorTerms: []corev1.NodeSelectorTerm{{
					MatchFields: []corev1.NodeSelectorRequirement{{Key: "metadata.name", Operator: corev1.NodeSelectorOpIn, Values: []string{vmPod.Spec.NodeName}}},
				}}},
			}},
			// wherever the VM runs, its volumes must follow
			Tolerations:                   []corev1.Toleration{{Operator: corev1.TolerationOpExists}},
			PriorityClassName:             vmPod.Spec.PriorityClassName,
			RestartPolicy:                 corev1.RestartPolicyAlways,
			TerminationGracePeriodSeconds: ptr.To[int64](1),
			AutomountServiceAccountToken:  ptr.To(false),
			EnableServiceLinks:            ptr.To(false),
			SecurityContext: &corev1.PodSecurityContext{
				RunAsNonRoot:   ptr.To(true),
				RunAsUser:      ptr.To[int64](65535),
				SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
			},
			Volumes: []corev1.Volume{{Name: hv.Name, VolumeSource: corev1.VolumeSource{
				PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: hv.Claim, ReadOnly: hv.ReadOnly}}}},
			Containers: []corev1.Container{{
				Name:          "attach",
				Image:         cfg.ComputeImage,
				VolumeMounts:  mounts,
				VolumeDevices: devs,
				Resources:     corev1.ResourceRequirements{Requests: small, Limits: small},
				SecurityContext: &corev1.SecurityContext{
					AllowPrivilegeEscalation: ptr.To(false),
					ReadOnlyRootFilesystem:   ptr.To(true),
					Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
				},
			}},
		},
	}
}

// TargetAttachmentPod renders, for a migration's target pod, the attachment pod that src
// is for the source: the same claim and image, on the target's node, lent to the target
// and named for it (both hold the volume until the guest has moved; docs/design/209).
func TargetAttachmentPod(vm *vmpodv1.VirtualMachine, target, src *corev1.Pod) (*corev1.Pod, error) {
	hv := HotplugVolume{Name: src.Labels[HotplugVolumeLabel]}
	if hv.Name == "" || len(src.Spec.Volumes) != 1 || src.Spec.Volumes[0].PersistentVolumeClaim == nil || len(src.Spec.Containers) != 1 {
		return nil, fmt.Errorf("pod %s is not an attachment pod of one volume", src.Name)
	}
	pvc := src.Spec.Volumes[0].PersistentVolumeClaim
	hv.Claim, hv.ReadOnly = pvc.ClaimName, pvc.ReadOnly
	claim := Claim{Block: len(src.Spec.Containers[0].VolumeDevices) > 0}
	p := AttachmentPod(vm, target, hv, claim, Config{ComputeImage: src.Spec.Containers[0].Image})
	p.Name = TargetAttachmentPodName(vm.Name, hv.Name, target.UID)
	return p, nil
}

// TargetAttachmentPodName is the name of the attachment pod of vm's volume for the
// migration target pod with UID target: apart from the source's, which still runs.
func TargetAttachmentPodName(vmName, volume string, target types.UID) string {
	sum := sha256.Sum256([]byte(target))
	return AttachmentPodName(vmName, volume) + "-" + hex.EncodeToString(sum[:4])
}

// HotplugDisk is the disk the shim plugs for hv, from the volume attachmentPod mounts.
func HotplugDisk(hv HotplugVolume, claim Claim, attachmentPod *corev1.Pod) vmspec.HotplugDisk {
	d := vmspec.HotplugDisk{
		Disk: vmspec.Disk{Name: hv.Name, Volume: hv.Name, Source: vmspec.SourceFile, Device: vmspec.DeviceDisk,
			Bus: vmspec.BusVirtio, ReadOnly: hv.ReadOnly},
		AttachmentPod: string(attachmentPod.UID),
	}
	if claim.Block {
		d.Source = vmspec.SourceBlock
	}
	return d
}
