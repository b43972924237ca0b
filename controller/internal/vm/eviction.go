package vm

import (
	"context"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
	"github.com/vmpod/vmpod/controller/internal/migration"
	"github.com/vmpod/vmpod/controller/internal/render"
)

// A VM with evictionStrategy LiveMigrate is never evicted: a PodDisruptionBudget refuses
// every eviction of its pods, so `kubectl drain` (which evicts) retries until the pod is
// gone. What moves the guest is the node's cordon, which a drain sets first: the VM
// controller sees its pod on an unschedulable node and creates a VirtualMachineMigration;
// when it succeeds the migration controller deletes the source pod and the drain's next
// eviction finds nothing to evict. KubeVirt does the same with an admission webhook on
// pods/eviction; vmpod has no webhook (docs/design/210).

const (
	// EvacuationLabel ("true") marks a migration the controller created to empty a node;
	// EvacuationNodeAnnotation names the node (a node name may be longer than a label value).
	EvacuationLabel          = "vmpod.dev/evacuation"
	EvacuationNodeAnnotation = "vmpod.dev/evacuation-node"
	// budgetMinAvailable is one more than the pods a VM has outside a migration and as many
	// as it has during one: no eviction of the VM's pods is ever allowed, in particular not
	// of the source pod while a target pod that already counts as healthy waits for the
	// guest. (KubeVirt raises minAvailable from 1 to 2 for a migration instead: one write
	// that could come too late.)
	budgetMinAvailable = 2
)

// evacuationBackoff spaces the attempts to move a VM off a cordoned node after failed
// ones: 1, 2, 4, 8, then every 10 minutes.
var evacuationBackoff = Backoff{Base: time.Minute, Max: 10 * time.Minute}

// DisruptionBudgetName is the name of the PodDisruptionBudget guarding the VM's pods.
func DisruptionBudgetName(vm string) string { return budgetName("vmpod-", vm) }

// AttachmentBudgetName is the name of the PodDisruptionBudget guarding the VM's disk
// attachment pods: its prefix is no "vmpod-<name>" (a VM named hotplug-x would otherwise
// have x's).
func AttachmentBudgetName(vm string) string { return budgetName("vmpod.hotplug-", vm) }

func budgetName(prefix, vm string) string {
	if len(vm) > 253-len(prefix) {
		vm = vm[:253-len(prefix)]
	}
	return prefix + vm
}

// liveMigrates says whether the VM's pods move instead of being evicted.
func liveMigrates(vm *vmpodv1.VirtualMachine) bool {
	s := vm.Spec.Template.Spec.EvictionStrategy
	return s != nil && *s == vmpodv1.EvictionStrategyLiveMigrate
}

// ensureDisruptionBudgets creates the PodDisruptionBudgets of a LiveMigrate VM (owned by
// the VM: they go with it) and deletes them once the VM's strategy is another. One guards
// the VM's pods; the other its disk attachment pods (which carry its name too), every
// eviction of which is refused as well: a drain (whose pod selector may take the VM's
// name) would otherwise have a hot-plugged disk pulled out of the guest and plugged in
// again before the guest can move with it; the controller lets the source's go once the
// guest has moved.
func (r *run) ensureDisruptionBudgets(ctx context.Context) error {
	vmPods := policyv1.PodDisruptionBudgetSpec{
		MinAvailable: ptr.To(intstr.FromInt32(budgetMinAvailable)),
		Selector: &metav1.LabelSelector{
			MatchLabels: map[string]string{render.VMNameLabel: r.vm.Name},
			MatchExpressions: []metav1.LabelSelectorRequirement{
				{Key: render.HotplugVolumeLabel, Operator: metav1.LabelSelectorOpDoesNotExist},
			},
		},
	}
	attachmentPods := policyv1.PodDisruptionBudgetSpec{
		MaxUnavailable: ptr.To(intstr.FromInt32(0)),
		Selector: &metav1.LabelSelector{
			MatchLabels: map[string]string{render.VMNameLabel: r.vm.Name},
			MatchExpressions: []metav1.LabelSelectorRequirement{
				{Key: render.HotplugVolumeLabel, Operator: metav1.LabelSelectorOpExists},
			},
		},
	}
	if err := r.ensureBudget(ctx, DisruptionBudgetName(r.vm.Name), "its pods", vmPods); err != nil {
		return err
	}
	return r.ensureBudget(ctx, AttachmentBudgetName(r.vm.Name), "its disk attachment pods", attachmentPods)
}

// ensureBudget makes the VM's PodDisruptionBudget name (guarding what) have spec while the
// VM live-migrates, and removes it otherwise.
func (r *run) ensureBudget(ctx context.Context, name, what string, spec policyv1.PodDisruptionBudgetSpec) error {
	key := types.NamespacedName{Namespace: r.vm.Namespace, Name: name}
	have := &policyv1.PodDisruptionBudget{}
	err := r.Client.Get(ctx, key, have)
	switch {
	case apierrors.IsNotFound(err):
		have = nil
	case err != nil:
		return fmt.Errorf("get PodDisruptionBudget %s: %w", key.Name, err)
	case !metav1.IsControlledBy(have, r.vm):
		if liveMigrates(r.vm) {
			r.event(corev1.EventTypeWarning, "DisruptionBudgetNameTaken", "GuardPods",
				"PodDisruptionBudget %s exists and does not belong to this VM: %s are not guarded from eviction", key.Name, what)
		}
		return nil
	}
	if !liveMigrates(r.vm) {
		if have == nil {
			return nil
		}
		if err := r.Client.Delete(ctx, have); ctrl.IgnoreNotFound(err) != nil {
			return fmt.Errorf("delete PodDisruptionBudget %s: %w", key.Name, err)
		}
		return nil
	}
	want := &policyv1.PodDisruptionBudget{
		ObjectMeta: metav1.ObjectMeta{Namespace: key.Namespace, Name: key.Name, Labels: map[string]string{render.VMNameLabel: r.vm.Name}},
		Spec:       spec,
	}
	if err := controllerutil.SetControllerReference(r.vm, want, r.Client.Scheme()); err != nil {
		return err
	}
	if have == nil {
		if err := r.Client.Create(ctx, want); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("create PodDisruptionBudget %s: %w", key.Name, err)
		}
		return nil
	}
	if equality.Semantic.DeepEqual(have.Spec, want.Spec) {
		return nil
	}
	have.Spec = want.Spec
	if err := r.Client.Update(ctx, have); err != nil {
		return fmt.Errorf("update PodDisruptionBudget %s: %w", key.Name, err)
	}
	return nil
}

// evacuate starts a migration of a LiveMigrate VM whose pod runs on a cordoned node, unless
// one runs already, the last attempt failed less than its back-off ago, or the guest can
// never move.
func (r *run) evacuate(ctx context.Context) (reconcile.Result, error) {
	if !liveMigrates(r.vm) || r.pod == nil || r.pod.DeletionTimestamp != nil || r.pod.Status.Phase != corev1.PodRunning || r.pod.Spec.NodeName == "" {
		return reconcile.Result{}, nil
	}
	node := &corev1.Node{}
	if err := r.Client.Get(ctx, types.NamespacedName{Name: r.pod.Spec.NodeName}, node); err != nil {
		return reconcile.Result{}, ctrl.IgnoreNotFound(err)
	}
	if !node.Spec.Unschedulable {
		return reconcile.Result{}, nil
	}
	// read past the cache: the migration watch wakes this VM as soon as its evacuation is
	// created, before the cache may hold it, and a second evacuation would race the first
	// (seen once in the unit tests under -race: the first one's target pod was gone)
	all := &vmpodv1.VirtualMachineMigrationList{}
	if err := r.APIReader.List(ctx, all, ctrl.InNamespace(r.vm.Namespace)); err != nil {
		return reconcile.Result{}, fmt.Errorf("list migrations: %w", err)
	}
	// evacuations that failed since this pod was created: the back-off's count (by time, not
	// by pod name: a migration refused up front names no source pod, and a VM's restarted
	// pod has the name of the one before)
	var lastFailure time.Time
	var failures int32
	for _, m := range all.Items {
		if m.Spec.VMName != r.vm.Name {
			continue
		}
		if !m.Finished() {
			return reconcile.Result{}, nil // it moves already (or is about to)
		}
		if m.Labels[EvacuationLabel] != "" && m.Status.Phase == vmpodv1.MigrationFailed && m.Status.EndTimestamp != nil &&
			!m.Status.EndTimestamp.Before(&r.pod.CreationTimestamp) {
			failures++
			if m.Status.EndTimestamp.After(lastFailure) {
				lastFailure = m.Status.EndTimestamp.Time
			}
		}
	}
	if wait := lastFailure.Add(evacuationBackoff.Delay(failures)).Sub(r.now); failures > 0 && wait > 0 {
		return reconcile.Result{RequeueAfter: wait}, nil
	}
	// a guest that can never move (a containerDisk, a ReadWriteOnce claim) holds the drain
	// up, as KubeVirt's LiveMigrate does: say why instead of failing a migration a minute
	why, err := migration.Unmovable(ctx, r.Client, r.pod)
	if err != nil {
		return reconcile.Result{}, err
	}
	if why != "" {
		r.event(corev1.EventTypeWarning, "EvacuationBlocked", "Migrate", "node %s is cordoned but the guest cannot leave it (%s): evictions stay refused; stop the VM or set evictionStrategy None", node.Name, why)
		return reconcile.Result{RequeueAfter: evacuationBackoff.Max}, nil
	}
	// states a migration refuses for now: say so, look again later
	if why = migration.NotNow(r.vm, r.pod); why != "" {
		r.event(corev1.EventTypeWarning, "EvacuationBlocked", "Migrate", "node %s is cordoned but the guest cannot leave it now (%s): evictions stay refused", node.Name, why)
		return reconcile.Result{RequeueAfter: evacuationBackoff.Base}, nil
	}
	// the caches may lag a migration that just moved the guest: another would move it again
	live := &vmpodv1.VirtualMachine{}
	if err := r.APIReader.Get(ctx, ctrl.ObjectKeyFromObject(r.vm), live); err != nil {
		return reconcile.Result{}, fmt.Errorf("read VM %s: %w", r.vm.Name, err)
	}
	if live.Status.PodName != r.pod.Name || migration.MigratedAway(r.pod) {
		return reconcile.Result{RequeueAfter: time.Second}, nil
	}
	m := &vmpodv1.VirtualMachineMigration{
		ObjectMeta: metav1.ObjectMeta{
			Namespace:    r.vm.Namespace,
			GenerateName: evacuationPrefix(r.vm.Name),
			Labels:       map[string]string{EvacuationLabel: "true"},
			Annotations:  map[string]string{EvacuationNodeAnnotation: node.Name},
		},
		Spec: vmpodv1.VirtualMachineMigrationSpec{VMName: r.vm.Name},
	}
	// owned, not controlled: it goes with the VM, and `kubectl vmpod migrate` may create others
	if err := controllerutil.SetOwnerReference(r.vm, m, r.Client.Scheme()); err != nil {
		return reconcile.Result{}, err
	}
	if err := r.Client.Create(ctx, m); err != nil {
		return reconcile.Result{}, fmt.Errorf("create a migration off node %s: %w", node.Name, err)
	}
	log.FromContext(ctx).Info("evacuating a cordoned node", "node", node.Name, "migration", m.Name)
	r.event(corev1.EventTypeNormal, "Evacuating", "Migrate", "node %s is cordoned: migration %s moves the guest off it (evictionStrategy LiveMigrate)", node.Name, m.Name)
	return reconcile.Result{}, nil
}

// evacuationPrefix is the generateName of a VM's evacuation migrations.
func evacuationPrefix(vm string) string {
	const suffix = "-evacuation-"
	if len(vm) > 253-5-len(suffix) {
		vm = vm[:253-5-len(suffix)]
	}
	return vm + suffix
}
