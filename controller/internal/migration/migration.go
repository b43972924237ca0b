// Package migration reconciles VirtualMachineMigrations: it starts a target pod for the VM
// (or the container pod, pod.go) on another node, has the shims move the guest into it
// (vmspec.MigrateAcceptCommand and vmspec.MigrateCommand, docs/design/209 and 212) and
// makes the target the VM's pod (or the pod's successor). The guest runs on in the source
// pod whenever the migration fails or is cancelled.
package migration

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/events"
	"k8s.io/client-go/util/retry"
	ctrlruntime "sigs.k8s.io/controller-runtime"
	ctrl "sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/vmpod/vmpod/api/vmspec"
	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
	"github.com/vmpod/vmpod/controller/internal/render"
)

// Exec runs a command in a pod's container with stdin, copying its stdout to stdout as it
// comes (the migrate exec prints a progress line a second); an error carries its stderr.
type Exec interface {
	Stream(ctx context.Context, namespace, pod, container string, command []string, stdin io.Reader, stdout io.Writer) error
}

const (
	// Finalizer holds a migration that is still running until its cancel has reached the
	// source's shim and its target pod is gone.
	Finalizer = "vmpod.dev/migration"
	// Label on a target pod names its migration.
	Label = "vmpod.dev/migration"
	// AttachmentLabel on an attachment pod made for a target pod names the migration, whose
	// pass its start wakes. Not Label: deleteTarget deletes what carries that, and an
	// attachment pod lends its volume to the guest's pod for as long as it runs.
	AttachmentLabel = "vmpod.dev/migration-attachment"
	// DefaultTargetWait bounds how long a target pod may take to be scheduled and started.
	DefaultTargetWait = 5 * time.Minute
	// progressEvery spaces the status updates of a running migration.
	progressEvery = 2 * time.Second
)

// Reconciler reconciles VirtualMachineMigrations.
type Reconciler struct {
	Client ctrl.Client
	// APIReader reads around the cache where a stale pod would mislead: whether a source's
	// guest has left decides whether a target pod may be deleted.
	APIReader ctrl.Reader
	Recorder  events.EventRecorder
	Exec      Exec
	// TargetWait bounds the target pod's scheduling and start (0: DefaultTargetWait).
	TargetWait time.Duration
	// Limits bound how many migrations run at once (zero fields: KubeVirt's defaults).
	Limits Limits
	// Policy is what a migration's spec leaves unset takes (nil: DefaultPolicy).
	Policy *Policy

	mu       sync.Mutex
	inFlight map[types.UID]*flight // migrate execs this process runs
	// handOverSince is when each container pod's hand-over first waited (handOver)
	handOverSince map[types.UID]time.Time
}

// Limits bound the migrations that run at once (past Pending, not finished), as
// KubeVirt's parallelMigrationsPerCluster and parallelOutboundMigrationsPerNode: a
// migration over either stays Pending until one ends. They count what the API server says
// when each migration starts; the reconciler starts one at a time.
type Limits struct {
	PerCluster      int
	OutboundPerNode int
}

// KubeVirt's defaults.
const (
	DefaultParallelPerCluster      = 5
	DefaultParallelOutboundPerNode = 2
)

// Policy is the cluster's migration policy, KubeVirt's spec.configuration.migrations: the
// knobs a VirtualMachineMigration's spec leaves unset take its values, and so do the
// migrations the controller makes itself (evacuations of a drained node).
type Policy struct {
	BandwidthMiB            int32
	CompletionTimeoutPerGiB int32
	ProgressTimeoutSeconds  int32
	AutoConverge            bool
	AllowPostCopy           bool
}

// DefaultPolicy is KubeVirt's defaults, as vmpod has them: 64 MiB/s, 800 s per GiB, 150 s
// without progress, auto-converge, no post-copy.
var DefaultPolicy = Policy{
	BandwidthMiB: vmspec.DefaultMigrationBandwidthMiB, CompletionTimeoutPerGiB: vmspec.DefaultMigrationCompletionPerGiB,
	ProgressTimeoutSeconds: vmspec.DefaultMigrationProgressTimeoutSec, AutoConverge: true,
}

// requestOptions are what the source's shim is asked for: the spec's knobs, the policy's
// where the spec sets none.
func (p Policy) requestOptions(s vmpodv1.VirtualMachineMigrationSpec) vmspec.MigrationRequestOptions {
	pick := func(spec, policy int32) int {
		if spec != 0 {
			return int(spec)
		}
		return int(policy)
	}
	o := vmspec.MigrationRequestOptions{
		BandwidthMiB:            pick(s.BandwidthMiB, p.BandwidthMiB),
		CompletionTimeoutPerGiB: pick(s.CompletionTimeoutPerGiB, p.CompletionTimeoutPerGiB),
		ProgressTimeoutSeconds:  pick(s.ProgressTimeoutSeconds, p.ProgressTimeoutSeconds),
		DowntimeLimitMs:         int(s.DowntimeLimitMs),
		AutoConverge:            p.AutoConverge,
		AllowPostCopy:           p.AllowPostCopy,
	}
	if s.AutoConverge != nil {
		o.AutoConverge = *s.AutoConverge
	}
	if s.AllowPostCopy != nil {
		o.AllowPostCopy = *s.AllowPostCopy
	}
	return o
}

// policy is the reconciler's Policy or the default.
func (r *Reconciler) policy() Policy {
	if r.Policy == nil {
		return DefaultPolicy
	}
	return *r.Policy
}

// flight is a migrate exec running in the background: its latest progress line, and its
// outcome once it has ended.
type flight struct {
	cancel context.CancelFunc
	mu     sync.Mutex
	last   vmspec.MigrationProgress
	done   bool
	err    error
}

// +kubebuilder:rbac:groups=vmpod.dev,resources=virtualmachinemigrations,verbs=get;list;watch;update;patch
// +kubebuilder:rbac:groups=vmpod.dev,resources=virtualmachinemigrations/status,verbs=get;update;patch
// +kubebuilder:rbac:groups=vmpod.dev,resources=virtualmachinemigrations/finalizers,verbs=update
// +kubebuilder:rbac:groups=vmpod.dev,resources=virtualmachines,verbs=get;list;watch
// +kubebuilder:rbac:groups=vmpod.dev,resources=virtualmachines/status,verbs=get;update;patch
// +kubebuilder:rbac:groups="",resources=pods,verbs=get;list;watch;create;delete;update;patch
// +kubebuilder:rbac:groups="",resources=pods/exec,verbs=get;create
// +kubebuilder:rbac:groups="",resources=persistentvolumeclaims,verbs=get;list;watch

// Reconcile moves one migration on by a phase.
func (r *Reconciler) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	res, err := r.reconcile(ctx, req)
	if errors.Is(err, errHandOverWaits) { // not a failure: no backoff
		return reconcile.Result{RequeueAfter: podPoll}, nil
	}
	return res, err
}

func (r *Reconciler) reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	m := &vmpodv1.VirtualMachineMigration{}
	if err := r.Client.Get(ctx, req.NamespacedName, m); err != nil {
		return reconcile.Result{}, ctrl.IgnoreNotFound(err)
	}
	if m.DeletionTimestamp != nil {
		return reconcile.Result{}, r.cancel(ctx, m)
	}
	if m.Finished() {
		if controllerutil.RemoveFinalizer(m, Finalizer) { // a finish whose last write failed
			return reconcile.Result{}, r.Client.Update(ctx, m)
		}
		return reconcile.Result{}, nil
	}
	if controllerutil.AddFinalizer(m, Finalizer) {
		if err := r.Client.Update(ctx, m); err != nil {
			return reconcile.Result{}, err
		}
	}
	switch m.Status.Phase {
	case "", vmpodv1.MigrationPending:
		return r.start(ctx, m)
	case vmpodv1.MigrationScheduling:
		return r.awaitTarget(ctx, m)
	case vmpodv1.MigrationTargetReady:
		return r.send(ctx, m)
	case vmpodv1.MigrationRunning:
		return r.follow(ctx, m)
	}
	return reconcile.Result{}, nil
}

// start checks that the VM (or container pod) can move and creates its target pod, a copy
// of the running pod's (for a VM the same VM spec, so the same machine, with the target
// role) on another node.
func (r *Reconciler) start(ctx context.Context, m *vmpodv1.VirtualMachineMigration) (reconcile.Result, error) {
	var (
		regarding ctrl.Object // what the migration's events are about: the VM, or the pod
		source    *corev1.Pod
		why       string
		err       error
	)
	if m.Spec.PodName != "" {
		source, why, err = r.podSource(ctx, m)
		regarding = source
	} else {
		var vm *vmpodv1.VirtualMachine
		vm, source, why, err = r.sourceOf(ctx, m)
		regarding = vm
	}
	if err != nil {
		return reconcile.Result{}, err
	}
	if why != "" {
		return reconcile.Result{}, r.finish(ctx, m, vmpodv1.MigrationFailed, why)
	}
	if other, err := r.otherMigration(ctx, m); err != nil || other != "" {
		if err != nil {
			return reconcile.Result{}, err
		}
		return reconcile.Result{}, r.finish(ctx, m, vmpodv1.MigrationFailed, "migration "+other+" of this "+strings.Fields(m.Subject())[0]+" runs")
	}
	if busy, err := r.overLimit(ctx, source.Spec.NodeName); err != nil || busy != "" {
		if err != nil {
			return reconcile.Result{}, err
		}
		if m.Status.Phase != vmpodv1.MigrationPending {
			r.Recorder.Eventf(m, nil, corev1.EventTypeNormal, "MigrationQueued", "Migrate", "waiting: %s", busy)
			m.Status.Phase = vmpodv1.MigrationPending
			if err := r.Client.Status().Update(ctx, m); err != nil {
				return reconcile.Result{}, err
			}
		}
		return reconcile.Result{RequeueAfter: 5 * time.Second}, nil
	}
	target, why, err := r.targetFor(ctx, m, source)
	if err != nil || why != "" {
		if err != nil {
			return reconcile.Result{}, err
		}
		return reconcile.Result{}, r.finish(ctx, m, vmpodv1.MigrationFailed, why)
	}
	if err := r.Client.Create(ctx, target); err != nil && !apierrors.IsAlreadyExists(err) {
		if apierrors.IsForbidden(err) || apierrors.IsInvalid(err) { // a quota, an admission policy: no retry helps
			return reconcile.Result{}, r.finish(ctx, m, vmpodv1.MigrationFailed, fmt.Sprintf("create target pod %s: %v", target.Name, err))
		}
		return reconcile.Result{}, fmt.Errorf("create target pod %s: %w", target.Name, err)
	}
	r.Recorder.Eventf(regarding, target, corev1.EventTypeNormal, "MigrationScheduling", "CreateTargetPod",
		"migration %s: created target pod %s (away from node %s)", m.Name, target.Name, source.Spec.NodeName)
	m.Status.Phase = vmpodv1.MigrationScheduling
	m.Status.SourcePod, m.Status.SourceNode, m.Status.TargetPod = source.Name, source.Spec.NodeName, target.Name
	m.Status.StartTimestamp = &metav1.Time{Time: time.Now()}
	return reconcile.Result{}, r.Client.Status().Update(ctx, m)
}

// targetFor is the target pod for the source's guest, or why the guest cannot move.
func (r *Reconciler) targetFor(ctx context.Context, m *vmpodv1.VirtualMachineMigration, source *corev1.Pod) (*corev1.Pod, string, error) {
	if m.Spec.PodName != "" {
		if why := podUnmovable(source); why != "" {
			return nil, why, nil
		}
		hold := probeHold(&source.Spec, r.policy().requestOptions(m.Spec).CompletionTimeoutPerGiB, r.targetWait())
		return containerTarget(m, source, hold), "", nil
	}
	if why, err := Unmovable(ctx, r.Client, source); err != nil || why != "" {
		return nil, why, err
	}
	spec, err := vmspec.Parse([]byte(source.Annotations[vmspec.Annotation]))
	if err != nil {
		return nil, "", err // Unmovable parsed it
	}
	target, err := targetPod(m, source, spec)
	if err != nil {
		return nil, err.Error(), nil
	}
	return target, "", nil
}

// targetWait is how long a target pod may take to start.
func (r *Reconciler) targetWait() time.Duration {
	if r.TargetWait == 0 {
		return DefaultTargetWait
	}
	return r.TargetWait
}

// sourceOf is the VM and its running pod, or why the VM cannot migrate now.
func (r *Reconciler) sourceOf(ctx context.Context, m *vmpodv1.VirtualMachineMigration) (*vmpodv1.VirtualMachine, *corev1.Pod, string, error) {
	vm := &vmpodv1.VirtualMachine{}
	if err := r.Client.Get(ctx, types.NamespacedName{Namespace: m.Namespace, Name: m.Spec.VMName}, vm); err != nil {
		if apierrors.IsNotFound(err) {
			return nil, nil, fmt.Sprintf("spec.vmName: VirtualMachine %s not found", m.Spec.VMName), nil
		}
		return nil, nil, "", err
	}
	if vm.Status.PodName == "" {
		return vm, nil, "the VM is not running", nil
	}
	pod := &corev1.Pod{}
	if err := r.Client.Get(ctx, types.NamespacedName{Namespace: m.Namespace, Name: vm.Status.PodName}, pod); err != nil {
		if apierrors.IsNotFound(err) {
			return vm, nil, "the VM is not running", nil
		}
		return nil, nil, "", err
	}
	switch {
	case !metav1.IsControlledBy(pod, vm):
		return vm, nil, fmt.Sprintf("pod %s is not the VM's", pod.Name), nil
	case pod.DeletionTimestamp != nil || pod.Status.Phase != corev1.PodRunning || !computeRunning(pod):
		return vm, nil, fmt.Sprintf("the VM is not running (pod %s: %s)", pod.Name, pod.Status.Phase), nil
	case NotNow(vm, pod) != "":
		return vm, nil, NotNow(vm, pod), nil
	case pod.Spec.NodeName == "":
		return vm, nil, fmt.Sprintf("pod %s has no node", pod.Name), nil
	}
	return vm, pod, "", nil
}

// Unmovable says why the guest of a VM pod cannot move to another node whatever the
// moment, or "": its VM spec (vmspec.VM.Migratable: node-local disks, bindings, devices)
// or a claim another node cannot open while this one has it.
func Unmovable(ctx context.Context, c ctrl.Reader, pod *corev1.Pod) (string, error) {
	spec, err := vmspec.Parse([]byte(pod.Annotations[vmspec.Annotation]))
	if err != nil {
		return fmt.Sprintf("pod %s: annotation %s: %v", pod.Name, vmspec.Annotation, err), nil
	}
	if err := spec.Migratable(); err != nil {
		return "the VM cannot migrate: " + strings.ReplaceAll(err.Error(), "\n", "; "), nil
	}
	lent, err := attachmentPods(ctx, c, pod)
	if err != nil {
		return "", err
	}
	for _, p := range append([]*corev1.Pod{pod}, lent...) {
		why, err := unshared(ctx, c, p)
		switch {
		case err != nil:
			return "", err
		case why == "":
			continue
		case p != pod:
			why = fmt.Sprintf("hot-plugged %s (attachment pod %s)", why, p.Name)
		}
		return "the VM cannot migrate: " + why, nil
	}
	return "", nil
}

// attachmentPods are the pods that lend vmPod the volumes of its hot-plugged disks
// (docs/design/204), but those on their way out.
func attachmentPods(ctx context.Context, c ctrl.Reader, vmPod *corev1.Pod) ([]*corev1.Pod, error) {
	pods := &corev1.PodList{}
	if err := c.List(ctx, pods, ctrl.InNamespace(vmPod.Namespace), ctrl.MatchingLabels{vmspec.AttachmentForLabel: string(vmPod.UID)}, ctrl.HasLabels{render.HotplugVolumeLabel}); err != nil {
		return nil, fmt.Errorf("list the attachment pods of pod %s: %w", vmPod.Name, err)
	}
	var lent []*corev1.Pod
	for i := range pods.Items {
		if p := &pods.Items[i]; p.DeletionTimestamp == nil && metav1.IsControlledBy(p, vmPod) {
			lent = append(lent, p)
		}
	}
	slices.SortFunc(lent, func(a, b *corev1.Pod) int { return strings.Compare(a.Name, b.Name) })
	return lent, nil
}

// unshared says why a claim the source pod mounts cannot be opened on another node at the
// same time (KubeVirt's rule: live migration needs ReadWriteMany), or "". The access modes
// of a bound claim are its volume's; an unbound one's are what it asked for.
func unshared(ctx context.Context, c ctrl.Reader, source *corev1.Pod) (string, error) {
	for _, v := range source.Spec.Volumes {
		if v.PersistentVolumeClaim == nil {
			continue
		}
		pvc := &corev1.PersistentVolumeClaim{}
		if err := c.Get(ctx, types.NamespacedName{Namespace: source.Namespace, Name: v.PersistentVolumeClaim.ClaimName}, pvc); err != nil {
			if apierrors.IsNotFound(err) {
				return fmt.Sprintf("volume %s: PersistentVolumeClaim %s not found", v.Name, v.PersistentVolumeClaim.ClaimName), nil
			}
			return "", fmt.Errorf("volume %s: %w", v.Name, err)
		}
		modes := pvc.Status.AccessModes
		if len(modes) == 0 {
			modes = pvc.Spec.AccessModes
		}
		if !slices.Contains(modes, corev1.ReadWriteMany) {
			return fmt.Sprintf("volume %s: PersistentVolumeClaim %s is %s, not ReadWriteMany: another node cannot open its disk while this one has it (put it on shared storage)",
				v.Name, pvc.Name, accessModes(modes)), nil
		}
	}
	return "", nil
}

func accessModes(modes []corev1.PersistentVolumeAccessMode) string {
	if len(modes) == 0 {
		return "without access modes"
	}
	s := make([]string, len(modes))
	for i, m := range modes {
		s[i] = string(m)
	}
	return strings.Join(s, ",")
}

// NotNow says why the VM's guest cannot leave pod for the time being (a state its owner
// can change), or "".
func NotNow(vm *vmpodv1.VirtualMachine, pod *corev1.Pod) string {
	switch {
	case vm.Status.PausedPodUID == pod.UID:
		return "the VM is paused (unpause it first)"
	}
	for _, v := range vm.Status.VolumeStatus {
		// the target plugs what the source has (the guest's shape): a disk on its way in or
		// out would be in one of them only
		switch {
		case v.Phase != vmpodv1.VolumeReady:
			return fmt.Sprintf("hot-plugged volume %s is %s: migrate once it is attached or gone", v.Name, v.Phase)
		case v.PodUID != pod.UID:
			return fmt.Sprintf("hot-plugged volume %s is not attached to pod %s yet (it was to an earlier pod of the VM)", v.Name, pod.Name)
		}
	}
	return ""
}

// otherMigration names an unfinished migration of the same VM (or pod) created before m
// (the older one goes on), or "".
func (r *Reconciler) otherMigration(ctx context.Context, m *vmpodv1.VirtualMachineMigration) (string, error) {
	all := &vmpodv1.VirtualMachineMigrationList{}
	if err := r.Client.List(ctx, all, ctrl.InNamespace(m.Namespace)); err != nil {
		return "", err
	}
	for _, o := range all.Items {
		if o.UID == m.UID || o.Spec.VMName != m.Spec.VMName || o.Spec.PodName != m.Spec.PodName || o.Finished() || o.DeletionTimestamp != nil {
			continue
		}
		if o.CreationTimestamp.Before(&m.CreationTimestamp) || (o.CreationTimestamp.Equal(&m.CreationTimestamp) && o.Name < m.Name) ||
			o.Status.Phase != "" && o.Status.Phase != vmpodv1.MigrationPending {
			return o.Name, nil
		}
	}
	return "", nil
}

// overLimit says which limit a new migration out of node would pass, or "".
func (r *Reconciler) overLimit(ctx context.Context, node string) (string, error) {
	perCluster, perNode := r.Limits.PerCluster, r.Limits.OutboundPerNode
	if perCluster <= 0 {
		perCluster = DefaultParallelPerCluster
	}
	if perNode <= 0 {
		perNode = DefaultParallelOutboundPerNode
	}
	// from the API server: a drain starts its node's evacuations in one burst, faster than
	// the cache sees each one leave Pending
	all := &vmpodv1.VirtualMachineMigrationList{}
	if err := r.APIReader.List(ctx, all); err != nil {
		return "", fmt.Errorf("list migrations: %w", err)
	}
	running, fromNode := 0, 0
	for _, o := range all.Items {
		if o.Finished() || o.Status.Phase == "" || o.Status.Phase == vmpodv1.MigrationPending {
			continue
		}
		running++
		if o.Status.SourceNode == node {
			fromNode++
		}
	}
	switch {
	case running >= perCluster:
		return fmt.Sprintf("%d migrations run in the cluster (at most %d at once)", running, perCluster), nil
	case fromNode >= perNode:
		return fmt.Sprintf("%d migrations leave node %s (at most %d at once)", fromNode, node, perNode), nil
	}
	return "", nil
}

// targetPod is the source pod again, for the guest to arrive in: another name, no node,
// required to run on another node, the target role in its VM spec, and the size the
// source's VM has (appliedSize).
func targetPod(m *vmpodv1.VirtualMachineMigration, source *corev1.Pod, vm *vmspec.VM) (*corev1.Pod, error) {
	vm.Migration = &vmspec.Migration{Role: vmspec.RoleTarget}
	ann, err := vm.Encode()
	if err != nil {
		return nil, err
	}
	t := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{
		Name:            TargetPodName(source.Name, m.UID),
		Namespace:       source.Namespace,
		Labels:          map[string]string{},
		Annotations:     map[string]string{},
		OwnerReferences: source.OwnerReferences, // the VM's: the pod goes with it
	}, Spec: *source.Spec.DeepCopy()}
	for k, v := range source.Labels {
		t.Labels[k] = v
	}
	t.Labels[Label] = m.Name
	for k, v := range source.Annotations {
		t.Annotations[k] = v
	}
	t.Annotations[vmspec.Annotation] = string(ann)
	t.Spec.NodeName = ""
	admitted(&t.Spec)
	appliedSize(&t.Spec, source)
	// a source that arrived by migration carries the rule that kept it off its own
	// source's node: that node may take the guest back now
	if prev := source.Annotations[AwayFromAnnotation]; prev != "" {
		dropAwayFrom(&t.Spec, prev)
	}
	awayFrom(&t.Spec, source.Spec.NodeName)
	t.Annotations[AwayFromAnnotation] = source.Spec.NodeName
	return t, nil
}

// admitted clears what admission set on the source from the objects its spec names, so
// that it sets them again from those objects as they are now: the RuntimeClass's overhead
// and the PriorityClass's value (a pod created with others than theirs is refused).
func admitted(spec *corev1.PodSpec) {
	spec.Overhead, spec.Priority = nil, nil
}

// appliedSize gives spec's compute container the CPU and memory the kubelet reports as
// applied to the source's, where they differ from what its spec asks: a resize the
// kubelet deferred (no room on the node) is in the source's spec, not in its VM. The guest
// moves at the size it has — the target's shim refuses any other (docs/design/209) — and
// the VM controller resizes the target once it is the VM's pod, on a node that may have
// the room.
func appliedSize(spec *corev1.PodSpec, source *corev1.Pod) {
	var applied *corev1.ResourceRequirements
	for _, st := range source.Status.ContainerStatuses {
		if st.Name == vmspec.ComputeContainer {
			applied = st.Resources
		}
	}
	if applied == nil { // a kubelet that does not report them resizes nothing either
		return
	}
	for i := range spec.Containers {
		c := &spec.Containers[i]
		if c.Name != vmspec.ComputeContainer {
			continue
		}
		for _, name := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
			setQuantity(&c.Resources.Limits, name, applied.Limits)
			setQuantity(&c.Resources.Requests, name, applied.Requests)
		}
	}
}

// setQuantity sets (*to)[name] to from's, if from has one.
func setQuantity(to *corev1.ResourceList, name corev1.ResourceName, from corev1.ResourceList) {
	q, ok := from[name]
	if !ok {
		return
	}
	if *to == nil {
		*to = corev1.ResourceList{}
	}
	(*to)[name] = q
}

// AwayFromAnnotation on a target pod names the node its node affinity keeps it off (the
// source's), so the next migration's target can drop that rule. The controller's own
// bookkeeping: outside vmpod.dev/, the node's contract, which refuses keys it does not know.
const AwayFromAnnotation = "controller.vmpod.dev/migration-away-from"

// dropAwayFrom removes awayFrom(spec, node)'s requirement from every required term (a
// user's own identical rule too: the VM's template still has it for the next new pod).
func dropAwayFrom(spec *corev1.PodSpec, node string) {
	if spec.Affinity == nil || spec.Affinity.NodeAffinity == nil || spec.Affinity.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution == nil {
		return
	}
	terms := spec.Affinity.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution.NodeSelectorTerms
	for i := range terms {
		terms[i].MatchExpressions = slices.DeleteFunc(terms[i].MatchExpressions, func(r corev1.NodeSelectorRequirement) bool {
			return r.Key == corev1.LabelHostname && r.Operator == corev1.NodeSelectorOpNotIn && slices.Equal(r.Values, []string{node})
		})
	}
}

// TargetPodName is the target pod's name: the source's and a piece of the migration's UID.
func TargetPodName(source string, migration types.UID) string {
	suffix := strings.ReplaceAll(string(migration), "-", "")
	if len(suffix) > 5 {
		suffix = suffix[:5]
	}
	base := strings.TrimSuffix(source, "-mig-"+suffix)
	if i := strings.LastIndex(base, "-mig-"); i > 0 {
		base = base[:i] // a pod that arrived by migration: one suffix, not one per hop
	}
	if len(base) > 253-10 {
		base = base[:253-10]
	}
	return base + "-mig-" + suffix
}

// awayFrom requires the pod's node not to be node: a NotIn term added to every required
// node selector term (terms are ORed), or the only term.
func awayFrom(spec *corev1.PodSpec, node string) {
	notIn := corev1.NodeSelectorRequirement{Key: corev1.LabelHostname, Operator: corev1.NodeSelectorOpNotIn, Values: []string{node}}
	if spec.Affinity == nil {
		spec.Affinity = &corev1.Affinity{}
	}
	if spec.Affinity.NodeAffinity == nil {
		spec.Affinity.NodeAffinity = &corev1.NodeAffinity{}
	}
	na := spec.Affinity.NodeAffinity
	if na.RequiredDuringSchedulingIgnoredDuringExecution == nil {
		na.RequiredDuringSchedulingIgnoredDuringExecution = &corev1.NodeSelector{}
	}
	sel := na.RequiredDuringSchedulingIgnoredDuringExecution
	if len(sel.NodeSelectorTerms) == 0 {
		sel.NodeSelectorTerms = []corev1.NodeSelectorTerm{{}}
	}
	for i := range sel.NodeSelectorTerms {
		sel.NodeSelectorTerms[i].MatchExpressions = append(sel.NodeSelectorTerms[i].MatchExpressions, notIn)
	}
}

// awaitTarget waits for the target pod's VM container to run (a container pod's: every
// container).
func (r *Reconciler) awaitTarget(ctx context.Context, m *vmpodv1.VirtualMachineMigration) (reconcile.Result, error) {
	target, err := r.targetPod(ctx, m)
	waiting := "" // the target's attachment pods that do not run yet
	poll := 10 * time.Second
	if m.Spec.PodName != "" && err == nil {
		poll = podPoll
		if running, failed := podTargetRuns(target); failed != "" {
			return reconcile.Result{}, r.finish(ctx, m, vmpodv1.MigrationFailed, failed)
		} else if running {
			m.Status.Phase, m.Status.TargetNode = vmpodv1.MigrationTargetReady, target.Spec.NodeName
			return reconcile.Result{}, r.Client.Status().Update(ctx, m)
		}
	}
	switch {
	case apierrors.IsNotFound(err):
		return reconcile.Result{}, r.finish(ctx, m, vmpodv1.MigrationFailed, "the target pod "+m.Status.TargetPod+" is gone")
	case err != nil:
		return reconcile.Result{}, err
	case target.Status.Phase == corev1.PodFailed || target.Status.Phase == corev1.PodSucceeded:
		return reconcile.Result{}, r.finish(ctx, m, vmpodv1.MigrationFailed, fmt.Sprintf("the target pod %s ended (%s) before the guest moved%s", target.Name, target.Status.Phase, terminated(target)))
	case m.Spec.PodName == "" && target.Status.Phase == corev1.PodRunning && computeRunning(target):
		var failed string
		if waiting, failed, err = r.lendTarget(ctx, m, target); err != nil || failed != "" {
			if err != nil {
				return reconcile.Result{}, err
			}
			return reconcile.Result{}, r.finish(ctx, m, vmpodv1.MigrationFailed, failed)
		}
		if waiting == "" {
			m.Status.Phase, m.Status.TargetNode = vmpodv1.MigrationTargetReady, target.Spec.NodeName
			return reconcile.Result{}, r.Client.Status().Update(ctx, m)
		}
		log.FromContext(ctx).Info("waiting for the target's attachment pods", "migration", m.Name, "why", waiting)
	}
	wait := r.targetWait()
	if left := time.Until(m.Status.StartTimestamp.Add(wait)); left > 0 {
		return reconcile.Result{RequeueAfter: min(left, poll)}, nil
	}
	why := fmt.Sprintf("the target pod %s did not start within %v", target.Name, wait)
	if waiting != "" {
		why = fmt.Sprintf("the target pod %s's attachment pods did not start within %v: %s", target.Name, wait, waiting)
	}
	for _, c := range target.Status.Conditions {
		if c.Type == corev1.PodScheduled && c.Status == corev1.ConditionFalse {
			why += ": " + c.Message
		}
	}
	return reconcile.Result{}, r.finish(ctx, m, vmpodv1.MigrationFailed, why)
}

// lendTarget gives the target pod an attachment pod on its node for each of the source's
// (the volumes of the guest's hot-plugged disks, which the target plugs before the guest
// arrives), and says what it still waits for ("" once all of them run) or why the
// migration cannot go on (failed).
func (r *Reconciler) lendTarget(ctx context.Context, m *vmpodv1.VirtualMachineMigration, target *corev1.Pod) (waiting, failed string, err error) {
	source := &corev1.Pod{}
	if err := r.Client.Get(ctx, types.NamespacedName{Namespace: m.Namespace, Name: m.Status.SourcePod}, source); err != nil {
		if apierrors.IsNotFound(err) {
			return "", "the source pod " + m.Status.SourcePod + " is gone", nil
		}
		return "", "", fmt.Errorf("source pod %s: %w", m.Status.SourcePod, err)
	}
	lent, err := attachmentPods(ctx, r.Client, source)
	if err != nil || len(lent) == 0 {
		return "", "", err
	}
	vm := &vmpodv1.VirtualMachine{}
	if err := r.Client.Get(ctx, types.NamespacedName{Namespace: m.Namespace, Name: m.Spec.VMName}, vm); err != nil {
		if apierrors.IsNotFound(err) {
			return "", "VirtualMachine " + m.Spec.VMName + " is gone", nil
		}
		return "", "", fmt.Errorf("VirtualMachine %s: %w", m.Spec.VMName, err)
	}
	var wait []string
	for _, src := range lent {
		want, err := render.TargetAttachmentPod(vm, target, src)
		if err != nil {
			return "", fmt.Sprintf("the target pod's attachment pod for %s: %v", src.Name, err), nil
		}
		want.Labels[AttachmentLabel] = m.Name // it running wakes the migration
		have := &corev1.Pod{}
		err = r.Client.Get(ctx, ctrl.ObjectKeyFromObject(want), have)
		switch {
		case apierrors.IsNotFound(err):
			err := r.Client.Create(ctx, want)
			switch {
			case apierrors.IsForbidden(err) || apierrors.IsInvalid(err): // a quota, an admission policy: no retry helps
				return "", fmt.Sprintf("create attachment pod %s for the target pod: %v", want.Name, err), nil
			case err == nil:
				r.Recorder.Eventf(m, want, corev1.EventTypeNormal, "SuccessfulCreate", "CreateAttachmentPod",
					"attachment pod %s lends volume %s to the target pod %s", want.Name, want.Labels[render.HotplugVolumeLabel], target.Name)
			case !apierrors.IsAlreadyExists(err): // (a cache that has yet to see it)
				return "", "", fmt.Errorf("create attachment pod %s: %w", want.Name, err)
			}
			wait = append(wait, want.Name+" created")
		case err != nil:
			return "", "", err
		case have.Status.Phase != corev1.PodRunning || have.DeletionTimestamp != nil:
			wait = append(wait, fmt.Sprintf("%s %s", have.Name, have.Status.Phase))
		}
	}
	return strings.Join(wait, ", "), "", nil
}

// targetPod is the migration's target pod. One the cache does not have is asked of the API
// server before it counts as gone: the cache can lag behind the create this controller
// made a moment ago (the migration's status update, which wakes the next pass, travels
// on another watch than the pod's), and a migration failed for that "lost" its target
// within a second of making it (seen in the cluster suite).
func (r *Reconciler) targetPod(ctx context.Context, m *vmpodv1.VirtualMachineMigration) (*corev1.Pod, error) {
	key := types.NamespacedName{Namespace: m.Namespace, Name: m.Status.TargetPod}
	target := &corev1.Pod{}
	err := r.Client.Get(ctx, key, target)
	if apierrors.IsNotFound(err) {
		err = r.APIReader.Get(ctx, key, target)
	}
	return target, err
}

// targetAttachments are the target pod's attachment pods, by volume (its hot-plugged
// disk's name): what the target's accept names for the disks the source's pods lend.
func (r *Reconciler) targetAttachments(ctx context.Context, m *vmpodv1.VirtualMachineMigration) (map[string]string, error) {
	target, err := r.targetPod(ctx, m)
	if err != nil {
		return nil, fmt.Errorf("target pod %s: %w", m.Status.TargetPod, err)
	}
	lent, err := attachmentPods(ctx, r.Client, target)
	if err != nil || len(lent) == 0 {
		return nil, err
	}
	byVolume := map[string]string{}
	for _, p := range lent {
		byVolume[p.Labels[render.HotplugVolumeLabel]] = string(p.UID)
	}
	return byVolume, nil
}

// send marks the migration Running and has the shims move the guest in the background:
// the migrate exec lasts as long as the migration (follow reads its progress). Running is
// stored first, so a controller that dies before its exec starts finds no flight of its
// own on its next pass and ends the migration as failed (recover).
func (r *Reconciler) send(ctx context.Context, m *vmpodv1.VirtualMachineMigration) (reconcile.Result, error) {
	attachments, err := r.targetAttachments(ctx, m)
	if apierrors.IsNotFound(err) {
		return reconcile.Result{}, r.finish(ctx, m, vmpodv1.MigrationFailed, "the target pod "+m.Status.TargetPod+" is gone")
	}
	if err != nil {
		return reconcile.Result{}, err
	}
	container, err := r.controlContainer(ctx, m)
	if err != nil {
		return reconcile.Result{}, err
	}
	m.Status.Phase = vmpodv1.MigrationRunning
	if err := r.Client.Status().Update(ctx, m); err != nil {
		return reconcile.Result{}, err
	}
	r.launch(ctx, m.DeepCopy(), container, attachments)
	return reconcile.Result{RequeueAfter: progressEvery}, nil
}

// controlContainer is the container whose execs the shims answer for the migration: a VM
// pod's compute container, a container pod's first (the shim answers on each; the
// target's containers are the source's).
func (r *Reconciler) controlContainer(ctx context.Context, m *vmpodv1.VirtualMachineMigration) (string, error) {
	if m.Spec.PodName == "" {
		return vmspec.ComputeContainer, nil
	}
	pod := &corev1.Pod{}
	var err error
	for _, name := range []string{m.Status.SourcePod, m.Status.TargetPod} {
		if err = r.APIReader.Get(ctx, types.NamespacedName{Namespace: m.Namespace, Name: name}, pod); err == nil && len(pod.Spec.Containers) > 0 {
			return pod.Spec.Containers[0].Name, nil
		}
	}
	return "", fmt.Errorf("neither the source pod %s nor the target pod %s: %w", m.Status.SourcePod, m.Status.TargetPod, err)
}

// launch runs, in the background, the target's accept and then the source's migrate, each
// an exec in container. attachments name the target's attachment pods, by volume.
func (r *Reconciler) launch(ctx context.Context, m *vmpodv1.VirtualMachineMigration, container string, attachments map[string]string) {
	lg := log.FromContext(ctx).WithValues("subject", m.Subject(), "from", m.Status.SourcePod, "to", m.Status.TargetPod)
	ctx, cancel := context.WithCancel(context.Background())
	f := &flight{cancel: cancel}
	r.mu.Lock()
	if r.inFlight == nil {
		r.inFlight = map[types.UID]*flight{}
	}
	r.inFlight[m.UID] = f
	r.mu.Unlock()
	end := func(err error) {
		f.mu.Lock()
		f.done, f.err = true, err
		f.mu.Unlock()
	}
	go func() {
		defer cancel()
		targetTLS, sourceTLS, err := vmspec.NewMigrationCredentials()
		if err != nil {
			end(err)
			return
		}
		opts := r.policy().requestOptions(m.Spec)
		if m.Spec.PodName != "" {
			// a container pod's shares must be at the target before its guest runs there
			// (the API refuses the spec's true; this is the policy's)
			opts.AllowPostCopy = false
		}
		accept, _ := json.Marshal(vmspec.MigrationAccept{TLS: targetTLS, PostCopy: opts.AllowPostCopy, Attachments: attachments})
		var out bytes.Buffer
		if err := r.Exec.Stream(ctx, m.Namespace, m.Status.TargetPod, container, []string{vmspec.MigrateAcceptCommand}, bytes.NewReader(accept), &out); err != nil {
			end(fmt.Errorf("the target pod %s: %w", m.Status.TargetPod, err))
			return
		}
		var listening vmspec.MigrationListening
		if err := json.Unmarshal(out.Bytes(), &listening); err != nil {
			end(fmt.Errorf("the target pod %s answered %q: %w", m.Status.TargetPod, out.String(), err))
			return
		}
		req, _ := json.Marshal(vmspec.MigrationRequest{Target: listening.Address, TLS: sourceTLS, Options: opts})
		lg.Info("migrating", "address", listening.Address)
		pr, pw := io.Pipe()
		read := make(chan struct{})
		go func() {
			defer close(read)
			sc := bufio.NewScanner(pr)
			for sc.Scan() {
				var p vmspec.MigrationProgress
				if json.Unmarshal(sc.Bytes(), &p) == nil {
					f.mu.Lock()
					f.last = p
					f.mu.Unlock()
				}
			}
			_, _ = io.Copy(io.Discard, pr)
		}()
		err = r.Exec.Stream(ctx, m.Namespace, m.Status.SourcePod, container, []string{vmspec.MigrateCommand}, bytes.NewReader(req), pw)
		_ = pw.Close()
		<-read // the last line is read before the outcome is told
		end(err)
	}()
}

func (r *Reconciler) flightOf(uid types.UID) *flight {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.inFlight[uid]
}

func (r *Reconciler) land(uid types.UID) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.inFlight, uid)
	delete(r.handOverSince, uid)
}

// follow copies a running migration's progress into its status and, once the migrate
// exec has ended, makes the target the VM's pod or gives up on it.
func (r *Reconciler) follow(ctx context.Context, m *vmpodv1.VirtualMachineMigration) (reconcile.Result, error) {
	f := r.flightOf(m.UID)
	if f == nil {
		// this process did not start it (a restart): the source's pod says how it ended
		return reconcile.Result{}, r.recover(ctx, m)
	}
	f.mu.Lock()
	last, done, execErr := f.last, f.done, f.err
	f.mu.Unlock()
	m.Status.TotalBytes, m.Status.TransferredBytes, m.Status.RemainingBytes = int64(last.TotalBytes), int64(last.TransferredBytes), int64(last.RemainingBytes)
	m.Status.DirtyPagesRate, m.Status.DowntimeMs = int64(last.DirtyPagesRate), last.DowntimeMs
	if !done {
		return reconcile.Result{RequeueAfter: progressEvery}, r.Client.Status().Update(ctx, m)
	}
	// the flight is kept until its outcome is stored: a failed write must not turn into
	// a recovery that cannot see the exec's word
	moved, err := r.guestMoved(ctx, m, f)
	if err != nil {
		return reconcile.Result{}, err
	}
	if moved {
		err = r.succeed(ctx, m)
	} else {
		why := fmt.Sprintf("the source pod %s: %v", m.Status.SourcePod, execErr)
		if execErr == nil {
			why = fmt.Sprintf("the source pod %s ended the migration %s: %s", m.Status.SourcePod, last.Status, last.Error)
		}
		err = r.finish(ctx, m, vmpodv1.MigrationFailed, why)
	}
	if err == nil {
		r.land(m.UID)
	}
	return reconcile.Result{}, err
}

// guestMoved says whether the guest has left the source pod: the migrate exec's own
// outcome when it completed, else the source's shim's word (vmspec.MigrateCancelCommand
// ends what may still run there and says where the guest is), else the source pod's
// record read from the API server. An exec that failed may have lost only its stream
// while the shims went on and switched over: deleting the target then would lose the
// guest.
func (r *Reconciler) guestMoved(ctx context.Context, m *vmpodv1.VirtualMachineMigration, f *flight) (bool, error) {
	if f != nil {
		f.mu.Lock()
		completed := f.done && f.err == nil && f.last.Status == "completed"
		f.mu.Unlock()
		if completed {
			return true, nil
		}
	}
	var out bytes.Buffer
	container, err := r.controlContainer(ctx, m)
	if err == nil {
		err = r.Exec.Stream(ctx, m.Namespace, m.Status.SourcePod, container, []string{vmspec.MigrateCancelCommand}, nil, &out)
	}
	var answer vmspec.MigrationCancelled
	if err == nil {
		if err = json.Unmarshal(out.Bytes(), &answer); err == nil {
			return answer.GuestMoved, nil
		}
	}
	log.FromContext(ctx).Info("the source's shim cannot say where the guest is; reading its pod", "pod", m.Status.SourcePod, "error", err)
	if m.Spec.PodName != "" {
		return r.podGuestMoved(ctx, m, err)
	}
	return r.sourceMigratedAway(ctx, m)
}

// recover ends a migration whose exec this process does not have (it restarted since it
// started the exec): a guest that moved means success, anything else a failure, after
// the source's shim was told to cancel.
func (r *Reconciler) recover(ctx context.Context, m *vmpodv1.VirtualMachineMigration) error {
	moved, err := r.guestMoved(ctx, m, nil)
	if err != nil {
		return err
	}
	if moved {
		return r.succeed(ctx, m)
	}
	return r.finish(ctx, m, vmpodv1.MigrationFailed, "the controller restarted while the guest moved; it runs on in the source pod")
}

// succeed makes the target the VM's pod and deletes the source's, whose guest has left;
// a container pod's target takes the source's place (handOver).
func (r *Reconciler) succeed(ctx context.Context, m *vmpodv1.VirtualMachineMigration) error {
	if m.Spec.PodName != "" {
		target, err := r.handOver(ctx, m)
		if errors.Is(err, errTargetGone) {
			return r.finish(ctx, m, vmpodv1.MigrationFailed, fmt.Sprintf("the guest moved into the target pod %s, which is gone since: the guest is lost", m.Status.TargetPod))
		}
		if err != nil {
			return err
		}
		r.Recorder.Eventf(target, nil, corev1.EventTypeNormal, "Migrated", "Migrate", "migration %s: the guest moved from pod %s (node %s) to this pod (node %s), downtime %d ms",
			m.Name, m.Status.SourcePod, m.Status.SourceNode, target.Spec.NodeName, m.Status.DowntimeMs)
		return r.finish(ctx, m, vmpodv1.MigrationSucceeded, "")
	}
	target := &corev1.Pod{}
	if err := r.Client.Get(ctx, types.NamespacedName{Namespace: m.Namespace, Name: m.Status.TargetPod}, target); err != nil {
		return fmt.Errorf("the target pod %s: %w", m.Status.TargetPod, err)
	}
	vm := &vmpodv1.VirtualMachine{}
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		if err := r.Client.Get(ctx, types.NamespacedName{Namespace: m.Namespace, Name: m.Spec.VMName}, vm); err != nil {
			return err
		}
		vm.Status.PodName, vm.Status.PodUID, vm.Status.NodeName = target.Name, target.UID, target.Spec.NodeName
		return r.Client.Status().Update(ctx, vm)
	})
	if err != nil {
		return fmt.Errorf("make %s the VM's pod: %w", target.Name, err)
	}
	source := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: m.Namespace, Name: m.Status.SourcePod}}
	if err := r.Client.Delete(ctx, source); ctrl.IgnoreNotFound(err) != nil {
		return fmt.Errorf("delete the source pod %s: %w", source.Name, err)
	}
	// a target whose commit got lost keeps the guest paused; the source is gone now, so it
	// may run (an unpause of a running guest changes nothing)
	if err := r.Exec.Stream(ctx, m.Namespace, target.Name, vmspec.ComputeContainer, []string{vmspec.UnpauseCommand}, nil, io.Discard); err != nil {
		log.FromContext(ctx).Error(err, "unpause the migrated guest", "pod", target.Name)
	}
	r.Recorder.Eventf(vm, target, corev1.EventTypeNormal, "Migrated", "Migrate", "migration %s: the guest moved from %s (node %s) to %s (node %s), downtime %d ms",
		m.Name, m.Status.SourcePod, m.Status.SourceNode, target.Name, target.Spec.NodeName, m.Status.DowntimeMs)
	return r.finish(ctx, m, vmpodv1.MigrationSucceeded, "")
}

// finish ends the migration: a failure deletes the target pod (the guest runs on in the
// source), and either drops the finalizer.
func (r *Reconciler) finish(ctx context.Context, m *vmpodv1.VirtualMachineMigration, phase vmpodv1.MigrationPhase, why string) error {
	if phase == vmpodv1.MigrationFailed {
		if err := r.deleteTarget(ctx, m); err != nil {
			return err
		}
		log.FromContext(ctx).Info("migration failed", "subject", m.Subject(), "reason", why)
		r.Recorder.Eventf(m, nil, corev1.EventTypeWarning, "MigrationFailed", "Migrate", "%s", why)
	}
	m.Status.Phase, m.Status.FailureReason = phase, why
	m.Status.EndTimestamp = &metav1.Time{Time: time.Now()}
	if err := r.Client.Status().Update(ctx, m); err != nil {
		return err
	}
	if controllerutil.RemoveFinalizer(m, Finalizer) {
		return r.Client.Update(ctx, m)
	}
	return nil
}

// deleteTarget deletes the migration's target pods (by its label: one created before its
// name reached the status too) unless one is the VM's pod (a container pod's target
// handed over has the label no more).
func (r *Reconciler) deleteTarget(ctx context.Context, m *vmpodv1.VirtualMachineMigration) error {
	vm := &vmpodv1.VirtualMachine{}
	if m.Spec.VMName != "" {
		if err := r.APIReader.Get(ctx, types.NamespacedName{Namespace: m.Namespace, Name: m.Spec.VMName}, vm); ctrl.IgnoreNotFound(err) != nil {
			return err
		}
	}
	pods := &corev1.PodList{}
	if err := r.APIReader.List(ctx, pods, ctrl.InNamespace(m.Namespace), ctrl.MatchingLabels{Label: m.Name}); err != nil {
		return fmt.Errorf("list the target pods: %w", err)
	}
	for i := range pods.Items {
		t := &pods.Items[i]
		if (vm.Status.PodName != "" && t.Name == vm.Status.PodName) || t.DeletionTimestamp != nil {
			continue
		}
		if err := r.Client.Delete(ctx, t); ctrl.IgnoreNotFound(err) != nil {
			return fmt.Errorf("delete the target pod %s: %w", t.Name, err)
		}
	}
	return nil
}

// cancel ends a deleted migration: a running one is cancelled in the source's shim and
// the target pod goes, so the guest runs on in the source. A migration that completed
// before the cancel took effect is seen through instead: its guest is in the target now.
func (r *Reconciler) cancel(ctx context.Context, m *vmpodv1.VirtualMachineMigration) error {
	if !controllerutil.ContainsFinalizer(m, Finalizer) {
		return nil
	}
	if !m.Finished() {
		moved := false
		if m.Status.Phase == vmpodv1.MigrationRunning {
			f := r.flightOf(m.UID)
			var err error
			// the shim's cancel returns once the migration has ended, saying where the
			// guest is
			if moved, err = r.guestMoved(ctx, m, f); err != nil {
				return err
			}
			if f != nil {
				f.cancel()
			}
		}
		if moved {
			if err := r.succeed(ctx, m); err != nil {
				return err
			}
		} else if err := r.cancelled(ctx, m); err != nil {
			return err
		}
		r.land(m.UID)
	}
	controllerutil.RemoveFinalizer(m, Finalizer)
	return ctrl.IgnoreNotFound(r.Client.Update(ctx, m))
}

// cancelled records a cancel that left the guest in the source: the target pod goes and
// the phase says Cancelled (its last write: the deletion then completes). The event goes on
// the VM too, which outlives the migration object.
func (r *Reconciler) cancelled(ctx context.Context, m *vmpodv1.VirtualMachineMigration) error {
	if err := r.deleteTarget(ctx, m); err != nil {
		return err
	}
	where := m.Status.SourcePod
	if where == "" {
		where = "its pod (the migration had not started)"
	}
	m.Status.Phase = vmpodv1.MigrationCancelled
	m.Status.EndTimestamp = &metav1.Time{Time: time.Now()}
	if err := r.Client.Status().Update(ctx, m); err != nil {
		return ctrl.IgnoreNotFound(err)
	}
	r.Recorder.Eventf(m, nil, corev1.EventTypeNormal, "MigrationCancelled", "Migrate", "cancelled: the guest runs on in %s", where)
	vm := &vmpodv1.VirtualMachine{}
	if m.Spec.VMName == "" {
		return nil
	}
	if err := r.Client.Get(ctx, types.NamespacedName{Namespace: m.Namespace, Name: m.Spec.VMName}, vm); err == nil {
		r.Recorder.Eventf(vm, m, corev1.EventTypeNormal, "MigrationCancelled", "Migrate", "migration %s cancelled: the guest runs on in %s", m.Name, where)
	}
	return nil
}

// sourceMigratedAway says whether the source pod's guest has left (its container ended
// Migrated), reading the pod from the API server: the cache may not have the end yet.
func (r *Reconciler) sourceMigratedAway(ctx context.Context, m *vmpodv1.VirtualMachineMigration) (bool, error) {
	for range 3 {
		source := &corev1.Pod{}
		err := r.APIReader.Get(ctx, types.NamespacedName{Namespace: m.Namespace, Name: m.Status.SourcePod}, source)
		switch {
		case apierrors.IsNotFound(err):
			return false, nil
		case err != nil:
			return false, err
		case MigratedAway(source):
			return true, nil
		case computeRunning(source):
			return false, nil // still the guest's
		}
		time.Sleep(time.Second) // ended, but how is not reported yet
	}
	return false, nil
}

// computeRunning says whether the pod's VM container runs.
func computeRunning(pod *corev1.Pod) bool {
	for _, cs := range pod.Status.ContainerStatuses {
		if cs.Name == vmspec.ComputeContainer {
			return cs.State.Running != nil
		}
	}
	return false
}

// MigratedAway says whether the pod's guest moved to another pod: its VM container ended
// with the shim's Migrated termination message.
func MigratedAway(pod *corev1.Pod) bool {
	for _, cs := range pod.Status.ContainerStatuses {
		if t := cs.State.Terminated; cs.Name == vmspec.ComputeContainer && t != nil {
			return t.ExitCode == 0 && strings.HasPrefix(t.Message, vmspec.MigratedReason+":")
		}
	}
	return false
}

// terminated is ": <message>" of the pod's VM container's end, or "".
func terminated(pod *corev1.Pod) string {
	for _, cs := range pod.Status.ContainerStatuses {
		if t := cs.State.Terminated; cs.Name == vmspec.ComputeContainer && t != nil && t.Message != "" {
			return ": " + strings.TrimSpace(t.Message)
		}
	}
	return ""
}

// SetupWithManager registers the reconciler; a target pod's changes, and its attachment
// pods', wake its migration.
func (r *Reconciler) SetupWithManager(mgr ctrlruntime.Manager) error {
	byTarget := handler.EnqueueRequestsFromMapFunc(func(_ context.Context, o ctrl.Object) []reconcile.Request {
		name, ok := o.GetLabels()[Label]
		if !ok {
			name, ok = o.GetLabels()[AttachmentLabel]
		}
		if !ok {
			return nil
		}
		return []reconcile.Request{{NamespacedName: types.NamespacedName{Namespace: o.GetNamespace(), Name: name}}}
	})
	return ctrlruntime.NewControllerManagedBy(mgr).
		Named("virtualmachinemigration").
		// a migration's exec runs in the background: a pass never waits for the guest
		For(&vmpodv1.VirtualMachineMigration{}).
		Watches(&corev1.Pod{}, byTarget).
		Complete(r)
}
