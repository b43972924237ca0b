package datavolume

import (
	"cmp"
	"context"
	"fmt"
	"time"

	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
)

// cloneSourceIndex indexes DataVolumes by the PVC (namespace/name) they clone, so a source PVC that appears
// or completes wakes its clones; sourceRefIndex by the DataSource (namespace/name) they
// clone through, so a DataSource that appears or changes, and its PVC, wake them.
const (
	cloneSourceIndex = "vmpod.dev/clone-source"
	sourceRefIndex   = "vmpod.dev/source-ref"
)

// SetupWithManager registers the reconciler and its watches.
func (r *Reconciler) SetupWithManager(ctx context.Context, mgr ctrl.Manager) error {
	err := mgr.GetFieldIndexer().IndexField(ctx, &vmpodv1.DataVolume{}, cloneSourceIndex, func(o client.Object) []string {
		dv := o.(*vmpodv1.DataVolume)
		if src := dv.Spec.Source.PVC; src != nil {
			return []string{cmp.Or(src.Namespace, dv.Namespace) + "/" + src.Name}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("index DataVolumes by clone source: %w", err)
	}
	err = mgr.GetFieldIndexer().IndexField(ctx, &vmpodv1.DataVolume{}, sourceRefIndex, func(o client.Object) []string {
		dv := o.(*vmpodv1.DataVolume)
		if ref := dv.Spec.SourceRef; ref != nil {
			return []string{cmp.Or(ref.Namespace, dv.Namespace) + "/" + ref.Name}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("index DataVolumes by DataSource: %w", err)
	}
	c := mgr.GetClient()
	list := func(ctx context.Context, opts ...client.ListOption) []reconcile.Request {
		dvs := &vmpodv1.DataVolumeList{}
		if err := c.List(ctx, dvs, opts...); err != nil {
			ctrl.LoggerFrom(ctx).Error(err, "list the DataVolumes a change concerns")
			return nil
		}
		reqs := make([]reconcile.Request, 0, len(dvs.Items))
		for _, dv := range dvs.Items {
			reqs = append(reqs, reconcile.Request{NamespacedName: types.NamespacedName{Namespace: dv.Namespace, Name: dv.Name}})
		}
		return reqs
	}
	throughDataSource := func(ctx context.Context, ds client.Object) []reconcile.Request {
		return list(ctx, client.MatchingFields{sourceRefIndex: ds.GetNamespace() + "/" + ds.GetName()})
	}
	clonesOf := handler.EnqueueRequestsFromMapFunc(func(ctx context.Context, pvc client.Object) []reconcile.Request {
		reqs := list(ctx, client.MatchingFields{cloneSourceIndex: pvc.GetNamespace() + "/" + pvc.GetName()})
		sources := &vmpodv1.DataSourceList{}
		if err := c.List(ctx, sources, client.InNamespace(pvc.GetNamespace())); err != nil {
			ctrl.LoggerFrom(ctx).Error(err, "list DataSources", "namespace", pvc.GetNamespace())
			return reqs
		}
		for i := range sources.Items {
			if ds := &sources.Items[i]; ds.Spec.Source.PVC.Name == pvc.GetName() && cmp.Or(ds.Spec.Source.PVC.Namespace, ds.Namespace) == pvc.GetNamespace() {
				reqs = append(reqs, throughDataSource(ctx, ds)...)
			}
		}
		return reqs
	})
	// the sweep runs on the leader only, like the reconcilers (RunnableFunc's default)
	err = mgr.Add(manager.RunnableFunc(func(ctx context.Context) error {
		every := cmp.Or(r.CloneSweepInterval, DefaultCloneSweepInterval)
		logger := ctrl.LoggerFrom(ctx).WithName("clone-sweep")
		for {
			if err := r.SweepCloneSources(ctrl.LoggerInto(ctx, logger)); err != nil {
				logger.Error(err, "sweep clone sources")
			}
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(every):
			}
		}
	}))
	if err != nil {
		return fmt.Errorf("add the clone source sweep: %w", err)
	}
	return ctrl.NewControllerManagedBy(mgr).
		Named("datavolume").
		For(&vmpodv1.DataVolume{}).
		Owns(&corev1.PersistentVolumeClaim{}).
		Owns(&batchv1.Job{}).
		Watches(&corev1.PersistentVolumeClaim{}, clonesOf).
		Watches(&vmpodv1.DataSource{}, handler.EnqueueRequestsFromMapFunc(throughDataSource)).
		Complete(r)
}
