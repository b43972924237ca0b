package vmspec

import "errors"

// The execs that plug a disk into a running VM pod and take it out again, answered by the
// shim in the compute container as PauseCommand is (authorized as any exec: pods/exec).
//
//	vmpod.dev/attach-disk '{"name": "data", "volume": "data", "source": "file"}'
//	vmpod.dev/detach-disk data
//
// The disk is a volume the compute container already mounts (at VolumeMountPath or
// BlockDevicePath) that no boot disk uses, or one an attachment pod on the same node mounts
// at that path (HotplugDisk.AttachmentPod); it goes on a free PCIe root port as a virtio
// disk whose serial is its name, and it lasts as long as the VM runs: a disk that must
// come back after a restart belongs in the VM's spec (the controller attaches a
// VirtualMachine's hotpluggable volumes again to its next pod).
//
// Both are idempotent, so a controller that lost track can say again what it wants: an
// attach of the disk already attached under that name from the same image succeeds, and
// a detach of a disk that is not attached succeeds, saying so.
const (
	AttachDiskCommand = "vmpod.dev/attach-disk"
	DetachDiskCommand = "vmpod.dev/detach-disk"

	// MaxHotplugDiskName is a virtio disk serial's size: a hot-plugged disk's name is its
	// serial whole, so no two disks look alike in /dev/disk/by-id.
	MaxHotplugDiskName = 20
	// CloudInitDiskName is the cloud-init disk's name (and serial).
	CloudInitDiskName = "cloudinit"

	// AttachmentForLabel on an attachment pod is the UID of the VM pod it lends its volumes
	// to: the pod's consent, without which the shim plugs none of them (a pods/exec right
	// on a VM pod is no right to another pod's volumes). The shim reads it from the pod
	// sandbox's labels in containerd, which only the pod's own labels set.
	AttachmentForLabel = "vmpod.dev/attachment-for"
)

// HotplugDisk is an AttachDiskCommand's argument: the disk, and where its volume is.
type HotplugDisk struct {
	Disk
	// AttachmentPod is the UID of a pod on the VM pod's node, in its namespace, labelled
	// AttachmentForLabel with the VM pod's UID, one of whose containers mounts the volume
	// (at VolumeMountPath or BlockDevicePath, as the compute container would). Empty: the
	// compute container mounts it. It is how a PVC reaches a running VM, whose own pod's
	// volumes cannot change (docs/design/204).
	AttachmentPod string `json:"attachmentPod,omitempty"`
}

// ParseHotplugDisk decodes and checks the disk of an AttachDiskCommand for vm: strict as
// Parse, a file or block volume, a virtio disk (the bus that hot-plugs on q35), no boot
// order, a name and volume no disk of vm has, and an attachment pod named by something
// that can be a label value (a UID). Errors name the field (disk.<field>).
func ParseHotplugDisk(data []byte, vm *VM) (HotplugDisk, error) {
	var d HotplugDisk
	if err := decodeStrict(data, &d, "disk"); err != nil {
		return d, err
	}
	if d.Device == "" {
		d.Device = DeviceDisk
	}
	if d.Bus == "" {
		d.Bus = BusVirtio
	}
	v := &validator{}
	names := map[string]int{}
	for i, b := range vm.Disks {
		names[b.Name] = i
	}
	if v.label("disk.name", d.Name) {
		switch i, dup := names[d.Name]; {
		case dup:
			v.add("disk.name", "%q is the name of disks[%d]", d.Name, i)
		case len(d.Name) > MaxHotplugDiskName:
			// the guest finds the disk by its serial, which is its name: whole, unique
			v.add("disk.name", "%q is %d characters: a hot-plugged disk's name is its serial, at most %d", d.Name, len(d.Name), MaxHotplugDiskName)
		case d.Name == CloudInitDiskName:
			v.add("disk.name", "%q is the cloud-init disk's", d.Name)
		}
	}
	if d.AttachmentPod != "" {
		v.podUID("disk.attachmentPod", d.AttachmentPod)
	}
	if v.label("disk.volume", d.Volume) {
		for i, b := range vm.Disks {
			if b.Volume == d.Volume {
				v.add("disk.volume", "volume %q is disks[%d]'s", d.Volume, i)
			}
		}
	}
	switch d.Source {
	case SourceFile, SourceBlock:
	default:
		v.add("disk.source", "must be file or block (a volume the compute container mounts), got %q", d.Source)
	}
	if d.Device != DeviceDisk {
		v.add("disk.device", "must be disk, got %q", d.Device)
	}
	if d.Bus != BusVirtio {
		v.add("disk.bus", "must be virtio (the bus q35 hot-plugs), got %q", d.Bus)
	}
	if d.BootOrder != 0 {
		v.add("disk.bootOrder", "a hot-plugged disk does not boot, got %d", d.BootOrder)
	}
	if d.SizeMiB != 0 {
		v.add("disk.sizeMiB", "only an empty disk has a size, got %d", d.SizeMiB)
	}
	return d, errors.Join(v.errs...)
}
