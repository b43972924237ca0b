package plugin

import (
	"context"
	"fmt"
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
)

// Migrate creates a VirtualMachineMigration of the VM (virtctl migrate): the controller
// moves the running guest to a pod on another node.
func Migrate(ctx context.Context, c client.Client, vm types.NamespacedName) (string, error) {
	v := &vmpodv1.VirtualMachine{}
	if err := c.Get(ctx, vm, v); err != nil {
		return "", fmt.Errorf("VM %s: %w", vm.Name, err)
	}
	m := &vmpodv1.VirtualMachineMigration{
		ObjectMeta: metav1.ObjectMeta{GenerateName: vm.Name + "-migration-", Namespace: vm.Namespace},
		Spec:       vmpodv1.VirtualMachineMigrationSpec{VMName: vm.Name},
	}
	if err := c.Create(ctx, m); err != nil {
		return "", fmt.Errorf("create a migration of VM %s: %w", vm.Name, err)
	}
	return fmt.Sprintf("VM %s: migration %s created (kubectl get vmim %s -w follows it)", vm.Name, m.Name, m.Name), nil
}

// MigrateCancel deletes the VM's unfinished migrations (virtctl migrate-cancel): the guest
// runs on where it is.
func MigrateCancel(ctx context.Context, c client.Client, vm types.NamespacedName) (string, error) {
	list := &vmpodv1.VirtualMachineMigrationList{}
	if err := c.List(ctx, list, client.InNamespace(vm.Namespace)); err != nil {
		return "", fmt.Errorf("list migrations: %w", err)
	}
	var cancelled []string
	for i := range list.Items {
		m := &list.Items[i]
		if m.Spec.VMName != vm.Name || m.Finished() || m.DeletionTimestamp != nil {
			continue
		}
		if err := c.Delete(ctx, m); client.IgnoreNotFound(err) != nil {
			return "", fmt.Errorf("cancel migration %s: %w", m.Name, err)
		}
		cancelled = append(cancelled, m.Name)
	}
	if len(cancelled) == 0 {
		return fmt.Sprintf("VM %s: no migration in flight", vm.Name), nil
	}
	return fmt.Sprintf("VM %s: cancelled migration %s", vm.Name, strings.Join(cancelled, ", ")), nil
}
