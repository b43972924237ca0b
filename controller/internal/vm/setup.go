package vm

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
	"github.com/vmpod/vmpod/controller/internal/render"
)

// claimIndex indexes VMs by the PVC names their volumes use (a DataVolume's PVC has its
// name), so a PVC or DataVolume change wakes the VMs waiting for it.
const claimIndex = "vmpod.dev/claims"

// nodeIndex indexes VMs by the node their pod runs on.
const nodeIndex = "vmpod.dev/node"

// SetupWithManager registers the reconciler and its watches.
func (r *Reconciler) SetupWithManager(ctx context.Context, mgr ctrl.Manager) error {
	err := mgr.GetFieldIndexer().IndexField(ctx, &vmpodv1.VirtualMachine{}, claimIndex, func(o client.Object) []string {
		var names []string
		for i := range o.(*vmpodv1.VirtualMachine).Spec.Template.Spec.Volumes {
			if n := render.ClaimName(&o.(*vmpodv1.VirtualMachine).Spec.Template.Spec.Volumes[i]); n != "" {
				names = append(names, n)
			}
		}
		return names
	})
	if err != nil {
		return fmt.Errorf("index VirtualMachines by claim: %w", err)
	}
	byClaim := handler.EnqueueRequestsFromMapFunc(func(ctx context.Context, o client.Object) []reconcile.Request {
		names := []string{o.GetName()}
		// a PVC owned by a DataVolume: VMs may name either
		if owner := metaOwner(o, "DataVolume"); owner != "" && owner != o.GetName() {
			names = append(names, owner)
		}
		var reqs []reconcile.Request
		for _, n := range names {
			vms := &vmpodv1.VirtualMachineList{}
			if err := mgr.GetClient().List(ctx, vms, client.InNamespace(o.GetNamespace()), client.MatchingFields{claimIndex: n}); err != nil {
				ctrl.LoggerFrom(ctx).Error(err, "list VirtualMachines using a claim", "claim", n)
				continue
			}
			for _, vm := range vms.Items {
				reqs = append(reqs, reconcile.Request{NamespacedName: types.NamespacedName{Namespace: vm.Namespace, Name: vm.Name}})
			}
		}
		return reqs
	})
	// a cordoned node wakes the LiveMigrate VMs on it (evacuate)
	err = mgr.GetFieldIndexer().IndexField(ctx, &vmpodv1.VirtualMachine{}, nodeIndex, func(o client.Object) []string {
		if n := o.(*vmpodv1.VirtualMachine).Status.NodeName; n != "" {
			return []string{n}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("index VirtualMachines by node: %w", err)
	}
	byNode := handler.EnqueueRequestsFromMapFunc(func(ctx context.Context, o client.Object) []reconcile.Request {
		if !o.(*corev1.Node).Spec.Unschedulable {
			return nil
		}
		vms := &vmpodv1.VirtualMachineList{}
		if err := mgr.GetClient().List(ctx, vms, client.MatchingFields{nodeIndex: o.GetName()}); err != nil {
			ctrl.LoggerFrom(ctx).Error(err, "list VirtualMachines on a node", "node", o.GetName())
			return nil
		}
		var reqs []reconcile.Request
		for _, vm := range vms.Items {
			if liveMigrates(&vm) {
				reqs = append(reqs, reconcile.Request{NamespacedName: types.NamespacedName{Namespace: vm.Namespace, Name: vm.Name}})
			}
		}
		return reqs
	})
	// a migration's end wakes its VM: an evacuation that failed is tried again
	byMigration := handler.EnqueueRequestsFromMapFunc(func(_ context.Context, o client.Object) []reconcile.Request {
		vm := o.(*vmpodv1.VirtualMachineMigration).Spec.VMName
		if vm == "" { // a container pod's
			return nil
		}
		return []reconcile.Request{{NamespacedName: types.NamespacedName{Namespace: o.GetNamespace(), Name: vm}}}
	})
	// attachment pods belong to the VM's pod (they go with it), and name the VM in a label
	byAttachment := handler.EnqueueRequestsFromMapFunc(func(ctx context.Context, o client.Object) []reconcile.Request {
		vm, ok := o.GetLabels()[render.VMNameLabel]
		if _, hp := o.GetLabels()[render.HotplugVolumeLabel]; !ok || !hp {
			return nil
		}
		return []reconcile.Request{{NamespacedName: types.NamespacedName{Namespace: o.GetNamespace(), Name: vm}}}
	})
	return ctrl.NewControllerManagedBy(mgr).
		Named("virtualmachine").
		// a VM's pause or disk attach waits on its guest (up to minutes for a detach):
		// other VMs must not wait behind it
		WithOptions(controller.Options{MaxConcurrentReconciles: 4}).
		For(&vmpodv1.VirtualMachine{}).
		Owns(&corev1.Pod{}).
		Owns(&policyv1.PodDisruptionBudget{}).
		Watches(&corev1.Node{}, byNode).
		Watches(&vmpodv1.VirtualMachineMigration{}, byMigration).
		Watches(&corev1.Pod{}, byAttachment).
		Watches(&vmpodv1.DataVolume{}, byClaim).
		Watches(&corev1.PersistentVolumeClaim{}, byClaim).
		Complete(r)
}

func metaOwner(o client.Object, kind string) string {
	for _, ref := range o.GetOwnerReferences() {
		if ref.Kind == kind && ref.Controller != nil && *ref.Controller {
			return ref.Name
		}
	}
	return ""
}
