package plugin

import (
	"context"
	"fmt"
	"slices"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/retry"
	"sigs.k8s.io/controller-runtime/pkg/client"

	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
)

// AddVolume adds the DataVolume or PVC claim to the VM as a hotpluggable volume with a
// virtio disk, both named claim (virtctl addvolume): a running VM gets the disk without a
// restart, and a stopped one at its next start. The VM's spec is the only record (vmpod
// has no VMI), so the volume always persists, as virtctl's --persist.
func AddVolume(ctx context.Context, c client.Client, key types.NamespacedName, claim string) (string, error) {
	source := vmpodv1.VolumeSource{}
	switch err := c.Get(ctx, types.NamespacedName{Namespace: key.Namespace, Name: claim}, &vmpodv1.DataVolume{}); {
	case err == nil:
		source.DataVolume = &vmpodv1.DataVolumeVolumeSource{Name: claim, Hotpluggable: true}
	case !apierrors.IsNotFound(err):
		return "", fmt.Errorf("get DataVolume %s: %w", claim, err)
	default:
		if err := c.Get(ctx, types.NamespacedName{Namespace: key.Namespace, Name: claim}, &corev1.PersistentVolumeClaim{}); err != nil {
			return "", fmt.Errorf("--volume-name %s: neither a DataVolume nor a PVC in namespace %s: %w", claim, key.Namespace, err)
		}
		source.PersistentVolumeClaim = &vmpodv1.PersistentVolumeClaimVolumeSource{
			PersistentVolumeClaimVolumeSource: corev1.PersistentVolumeClaimVolumeSource{ClaimName: claim}, Hotpluggable: true}
	}
	err := editSpec(ctx, c, key, func(spec *vmpodv1.InstanceSpec) error {
		if slices.ContainsFunc(spec.Volumes, func(v vmpodv1.Volume) bool { return v.Name == claim }) ||
			slices.ContainsFunc(spec.Domain.Devices.Disks, func(d vmpodv1.Disk) bool { return d.Name == claim }) {
			return fmt.Errorf("VirtualMachine %s has a volume or disk named %s already", key.Name, claim)
		}
		spec.Volumes = append(spec.Volumes, vmpodv1.Volume{Name: claim, VolumeSource: source})
		spec.Domain.Devices.Disks = append(spec.Domain.Devices.Disks, vmpodv1.Disk{Name: claim, Disk: &vmpodv1.DiskTarget{Bus: "virtio"}})
		return nil
	})
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("VirtualMachine %s: volume %s added (hotpluggable; the guest sees virtio disk serial %s)", key.Name, claim, claim), nil
}

// RemoveVolume removes the hotpluggable volume name and its disk from the VM (virtctl
// removevolume): a running VM loses the disk without a restart. A volume of the VM's pod
// is refused: only a restart could take it away.
func RemoveVolume(ctx context.Context, c client.Client, key types.NamespacedName, name string) (string, error) {
	err := editSpec(ctx, c, key, func(spec *vmpodv1.InstanceSpec) error {
		i := slices.IndexFunc(spec.Volumes, func(v vmpodv1.Volume) bool { return v.Name == name })
		switch {
		case i < 0:
			return fmt.Errorf("VirtualMachine %s has no volume %s", key.Name, name)
		case !spec.Volumes[i].Hotpluggable():
			return fmt.Errorf("volume %s of VirtualMachine %s is not hotpluggable: it belongs to the VM's pod; remove it from the spec and restart the VM", name, key.Name)
		}
		spec.Volumes = slices.Delete(spec.Volumes, i, i+1)
		spec.Domain.Devices.Disks = slices.DeleteFunc(spec.Domain.Devices.Disks, func(d vmpodv1.Disk) bool { return d.Name == name })
		return nil
	})
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("VirtualMachine %s: volume %s removed", key.Name, name), nil
}

// editSpec changes the VM's template spec, again on a conflict with another writer.
func editSpec(ctx context.Context, c client.Client, key types.NamespacedName, change func(*vmpodv1.InstanceSpec) error) error {
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		vm := &vmpodv1.VirtualMachine{}
		if err := c.Get(ctx, key, vm); err != nil {
			return fmt.Errorf("get VirtualMachine %s: %w", key, err)
		}
		if err := change(&vm.Spec.Template.Spec); err != nil {
			return err
		}
		return c.Update(ctx, vm)
	})
}
