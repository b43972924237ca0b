package datavolume

import (
	"context"
	"fmt"

	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
)

// cloneSourceIndex indexes DataVolumes by the PVC they clone, so a source PVC that appears
// or completes wakes its clones.
const cloneSourceIndex = "vmpod.dev/clone-source"

// SetupWithManager registers the reconciler and its watches.
func (r *Reconciler) SetupWithManager(ctx context.Context, mgr ctrl.Manager) error {
	err := mgr.GetFieldIndexer().IndexField(ctx, &vmpodv1.DataVolume{}, cloneSourceIndex, func(o client.Object) []string {
		if src := o.(*vmpodv1.DataVolume).Spec.Source.PVC; src != nil {
			return []string{src.Name}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("index DataVolumes by clone source: %w", err)
	}
	clonesOf := handler.EnqueueRequestsFromMapFunc(func(ctx context.Context, o client.Object) []reconcile.Request {
		dvs := &vmpodv1.DataVolumeList{}
		if err := mgr.GetClient().List(ctx, dvs, client.InNamespace(o.GetNamespace()), client.MatchingFields{cloneSourceIndex: o.GetName()}); err != nil {
			ctrl.LoggerFrom(ctx).Error(err, "list DataVolumes cloning a PVC", "pvc", o.GetName())
			return nil
		}
		reqs := make([]reconcile.Request, 0, len(dvs.Items))
		for _, dv := range dvs.Items {
			reqs = append(reqs, reconcile.Request{NamespacedName: types.NamespacedName{Namespace: dv.Namespace, Name: dv.Name}})
		}
		return reqs
	})
	return ctrl.NewControllerManagedBy(mgr).
		Named("datavolume").
		For(&vmpodv1.DataVolume{}).
		Owns(&corev1.PersistentVolumeClaim{}).
		Owns(&batchv1.Job{}).
		Watches(&corev1.PersistentVolumeClaim{}, clonesOf).
		Complete(r)
}
