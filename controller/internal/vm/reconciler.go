// Package vm reconciles VirtualMachines into Pods: it creates, replaces and deletes a VM's
// one pod as the runStrategy and start/stop/restart requests say, and reports the pod's
// state back in the VM's status. See docs/design/105-run-strategy.md.
package vm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/events"
	ctrl "sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
	"github.com/vmpod/vmpod/controller/internal/instancetype"
	"github.com/vmpod/vmpod/controller/internal/migration"
	"github.com/vmpod/vmpod/controller/internal/render"
)

// Backoff spaces the pods of a VM whose pods keep failing: the n-th consecutive failure
// waits Base*2^(n-1), at most Max. A pod that ran for ResetAfter before failing starts the
// count again. Kubelet's CrashLoopBackOff uses 10s, 5min, 10min.
type Backoff struct {
	Base, Max, ResetAfter time.Duration
}

// DefaultBackoff is the kubelet's crash-loop back-off.
var DefaultBackoff = Backoff{Base: 10 * time.Second, Max: 5 * time.Minute, ResetAfter: 10 * time.Minute}

// Delay is the wait after the n-th consecutive failure.
func (b Backoff) Delay(n int32) time.Duration {
	d := b.Base
	for i := int32(1); i < n && d < b.Max; i++ {
		d *= 2
	}
	return min(d, b.Max)
}

// Reconciler reconciles VirtualMachines.
type Reconciler struct {
	Client ctrl.Client
	// APIReader reads around the cache, which holds only vmpod's own pods: it tells a
	// foreign pod that has the VM's pod name apart from one the cache has not seen yet.
	APIReader ctrl.Reader
	Recorder  events.EventRecorder
	Render    render.Config
	Backoff   Backoff
	// Exec runs the shim's control commands (pause, unpause) in a VM's pod.
	Exec PodExec
}

// +kubebuilder:rbac:groups=vmpod.dev,resources=virtualmachines,verbs=get;list;watch;update;patch
// +kubebuilder:rbac:groups=vmpod.dev,resources=virtualmachines/status,verbs=get;update;patch
// (virtualmachines/finalizers: the objects the VM controls block its deletion, which OwnerReferencesPermissionEnforcement checks)
// +kubebuilder:rbac:groups=vmpod.dev,resources=virtualmachines/finalizers,verbs=update
// +kubebuilder:rbac:groups=vmpod.dev,resources=datavolumes,verbs=get;list;watch;create
// +kubebuilder:rbac:groups=vmpod.dev,resources=virtualmachineinstancetypes;virtualmachineclusterinstancetypes;virtualmachinepreferences;virtualmachineclusterpreferences,verbs=get
// +kubebuilder:rbac:groups="",resources=pods,verbs=get;list;watch;create;delete;patch
// +kubebuilder:rbac:groups="",resources=pods/exec,verbs=get;create
// (pods/finalizers: an attachment pod blocks its VM pod's deletion, which OwnerReferencesPermissionEnforcement checks)
// +kubebuilder:rbac:groups="",resources=pods/finalizers,verbs=update
// +kubebuilder:rbac:groups="",resources=persistentvolumeclaims,verbs=get;list;watch
// +kubebuilder:rbac:groups=events.k8s.io,resources=events,verbs=create;patch
// +kubebuilder:rbac:groups=policy,resources=poddisruptionbudgets,verbs=get;list;watch;create;update;delete
// +kubebuilder:rbac:groups="",resources=nodes,verbs=get;list;watch
// +kubebuilder:rbac:groups=vmpod.dev,resources=virtualmachinemigrations,verbs=get;list;watch;create

// Reconcile brings one VM's pod in line with its runStrategy and pending request.
func (r *Reconciler) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	vm := &vmpodv1.VirtualMachine{}
	if err := r.Client.Get(ctx, req.NamespacedName, vm); err != nil {
		if apierrors.IsNotFound(err) {
			return reconcile.Result{}, releaseOrphanAttachmentPods(ctx, r.Client, r.APIReader, req.NamespacedName)
		}
		return reconcile.Result{}, err
	}
	run := &run{Reconciler: r, vm: vm, status: *vm.Status.DeepCopy(), now: time.Now()}
	result, err := run.reconcile(ctx)
	if err != nil {
		return result, err
	}
	result.RequeueAfter = soonest(result.RequeueAfter, run.hotplugRetry)
	if err := run.writeStatus(ctx); err != nil {
		return reconcile.Result{}, err
	}
	if run.requestDone {
		if err := run.clearRequest(ctx); err != nil {
			return reconcile.Result{}, err
		}
	}
	return result, nil
}

// run is one pass of Reconcile over one VM.
type run struct {
	*Reconciler
	vm     *vmpodv1.VirtualMachine
	status vmpodv1.VirtualMachineStatus // what will be written
	now    time.Time

	pod         *corev1.Pod // the VM's pod, nil if none
	request     *vmpodv1.StateChangeRequest
	requestRaw  string   // the annotation value request was parsed from
	requestDone bool     // remove the request annotation after this pass
	blocked     *blocker // why no pod can be created now
	// expanded is the VM with its instance type and preference applied (vm itself when it
	// has neither): what a pod is rendered from. expandErr says why there is none.
	expanded    *vmpodv1.VirtualMachine
	expandErr   error
	wantRunning bool
	setPause    bool // carry out a Pause (pauseVM) or Unpause request in the running pod
	pauseVM     bool
	// hotplugRetry is when to try a failed disk attach or detach again (0: not needed)
	hotplugRetry time.Duration
}

// blocker is a reason the VM cannot get a pod now.
type blocker struct {
	status  vmpodv1.PrintableStatus
	reason  string
	message string
	failure bool // sets the Failure condition: it needs a human, not time
}

func (r *run) reconcile(ctx context.Context) (reconcile.Result, error) {
	if r.vm.DeletionTimestamp != nil {
		return reconcile.Result{}, nil // the pod and DataVolumes go with the VM (owner references)
	}
	if err := r.ensureDataVolumes(ctx); err != nil {
		return reconcile.Result{}, err
	}
	if err := r.getPod(ctx); err != nil {
		return reconcile.Result{}, err
	}
	r.expanded, r.expandErr = instancetype.Expand(ctx, r.APIReader, r.vm)
	r.recordFailure()
	r.readRequest(ctx)
	r.decide(ctx)
	if r.setPause {
		if err := r.pause(ctx); err != nil {
			return reconcile.Result{}, err
		}
	}
	// a hotplug that fails does not hold the VM's life back: its error comes after
	var hotplugErr error
	r.hotplugRetry, hotplugErr = r.hotplug(ctx)
	result, err := r.converge(ctx)
	if err == nil {
		err = hotplugErr
	}
	if err == nil {
		err = r.resize(ctx)
	}
	if err == nil {
		err = r.ensureDisruptionBudgets(ctx)
	}
	if err == nil {
		var evac reconcile.Result
		evac, err = r.evacuate(ctx)
		result.RequeueAfter = soonest(result.RequeueAfter, evac.RequeueAfter)
	}
	return result, err
}

// converge brings the VM's pod in line with its runStrategy and pending request.
func (r *run) converge(ctx context.Context) (reconcile.Result, error) {

	switch {
	case r.pod != nil && r.pod.DeletionTimestamp != nil:
		// wait for the old pod to go; its deletion event brings us back
	case r.pod != nil && migration.MigratedAway(r.pod):
		// the guest runs on in a migration's target pod: the migration controller makes
		// that the VM's pod and deletes this one, whose end is no reason to start another
	case r.wantRunning && r.pod != nil && finished(r.pod):
		// A failed pod stays, with its logs (the serial console), until its back-off ends:
		// the pod is then the record of the failure, not a status field a stale cache
		// could hide from the next pass.
		if wait := r.backoffRemaining(); wait > 0 {
			return reconcile.Result{RequeueAfter: wait}, nil
		}
		// Until the status that accounts for this pod's end (a failure counted, a crash loop
		// ended by a clean shutdown) is stored, the pod is its only record: deleting it in
		// the same pass would lose that outcome if the status write then conflicts.
		if !equality.Semantic.DeepEqual(r.vm.Status.StartFailure, r.status.StartFailure) {
			return reconcile.Result{RequeueAfter: time.Second}, nil
		}
		return reconcile.Result{}, r.deletePod(ctx, "Replacing", fmt.Sprintf("pod ended (%s); starting a new one", r.pod.Status.Phase))
	case r.wantRunning && r.pod == nil:
		return r.createPod(ctx)
	case !r.wantRunning && r.pod != nil && (!finished(r.pod) || r.vm.Spec.RunStrategy == vmpodv1.RunStrategyHalted):
		if r.request != nil && r.request.Action == vmpodv1.StateChangeRestart {
			return reconcile.Result{}, r.deletePod(ctx, "Restarting", "restart requested")
		}
		return reconcile.Result{}, r.deletePod(ctx, "Stopping", "stopping the VM")
	}
	return reconcile.Result{}, nil
}

// getPod finds the VM's pod: the one its status names (a migration's target, once the
// guest moved there), else the one of its own name. A pod of that name that the VM does
// not control is never touched: it blocks the VM.
func (r *run) getPod(ctx context.Context) error {
	name := render.PodName(r.vm.Name)
	if r.vm.Status.PodName != "" {
		name = r.vm.Status.PodName
	}
	pod := &corev1.Pod{}
	err := r.Client.Get(ctx, types.NamespacedName{Namespace: r.vm.Namespace, Name: name}, pod)
	switch {
	case apierrors.IsNotFound(err):
		return nil
	case err != nil:
		return fmt.Errorf("get pod %s: %w", name, err)
	case !metav1.IsControlledBy(pod, r.vm):
		r.blocked = &blocker{vmpodv1.StatusUnknown, "PodNameTaken",
			fmt.Sprintf("pod %s exists and does not belong to this VM", pod.Name), true}
		return nil
	}
	r.pod = pod
	return nil
}

// recordFailure counts a newly failed pod for the back-off.
func (r *run) recordFailure() {
	if r.pod == nil || r.pod.Status.Phase != corev1.PodFailed {
		if r.pod != nil && r.pod.Status.Phase == corev1.PodSucceeded {
			r.status.StartFailure = nil // a clean shutdown ends a crash loop
		}
		return
	}
	if sf := r.status.StartFailure; sf != nil && sf.LastFailedPodUID == r.pod.UID {
		return // already counted
	}
	started, ended := podTimes(r.pod, r.now)
	count := int32(1)
	if sf := r.status.StartFailure; sf != nil && ended.Sub(started) < r.Backoff.ResetAfter {
		count = sf.ConsecutiveFailCount + 1
	}
	// metav1.Time has whole seconds on the wire: round up so the retry is never early
	retry := ended.Add(r.Backoff.Delay(count)).Truncate(time.Second).Add(time.Second)
	r.status.StartFailure = &vmpodv1.StartFailure{ConsecutiveFailCount: count, LastFailedPodUID: r.pod.UID,
		RetryAfterTimestamp: &metav1.Time{Time: retry}}
}

// podTimes is when a pod's VM started and ended (the compute container's, or the pod's).
func podTimes(pod *corev1.Pod, now time.Time) (started, ended time.Time) {
	started, ended = now, now
	if pod.Status.StartTime != nil {
		started = pod.Status.StartTime.Time
	}
	for _, cs := range pod.Status.ContainerStatuses {
		if t := cs.State.Terminated; t != nil {
			if !t.StartedAt.IsZero() {
				started = t.StartedAt.Time
			}
			if !t.FinishedAt.IsZero() {
				ended = t.FinishedAt.Time
			}
		}
	}
	return started, ended
}

// readRequest parses the state change request annotation; a malformed one is dropped.
func (r *run) readRequest(ctx context.Context) {
	raw, ok := r.vm.Annotations[vmpodv1.StateChangeRequestAnnotation]
	if !ok {
		return
	}
	r.requestRaw = raw
	req := &vmpodv1.StateChangeRequest{}
	if err := json.Unmarshal([]byte(raw), req); err != nil || !validAction(req.Action) {
		r.event(corev1.EventTypeWarning, "InvalidRequest", "Ignore",
			"ignoring %s=%q: want {\"action\": \"Start\"|\"Stop\"|\"Restart\"|\"Pause\"|\"Unpause\"}", vmpodv1.StateChangeRequestAnnotation, raw)
		log.FromContext(ctx).Info("dropping malformed state change request", "value", raw)
		r.requestDone = true
		return
	}
	r.request = req
}

func validAction(a vmpodv1.StateChangeAction) bool {
	switch a {
	case vmpodv1.StateChangeStart, vmpodv1.StateChangeStop, vmpodv1.StateChangeRestart,
		vmpodv1.StateChangePause, vmpodv1.StateChangeUnpause:
		return true
	}
	return false
}

// decide sets wantRunning from the runStrategy and the pending request, and whether the
// request is done. A request stays until it has taken effect (a Start until a pod runs),
// so it survives controller restarts and conflicts.
func (r *run) decide(ctx context.Context) {
	strategy := r.vm.Spec.RunStrategy
	active := r.pod != nil && r.pod.DeletionTimestamp == nil && !finished(r.pod)
	switch strategy {
	case vmpodv1.RunStrategyAlways:
		r.wantRunning = true
	case vmpodv1.RunStrategyRerunOnFailure:
		r.wantRunning = r.pod == nil || r.pod.Status.Phase != corev1.PodSucceeded
	case vmpodv1.RunStrategyOnce:
		r.wantRunning = r.pod == nil || active // a finished pod is the record that it ran
	case vmpodv1.RunStrategyManual:
		r.wantRunning = active
	case vmpodv1.RunStrategyHalted:
		r.wantRunning = false
	}
	if r.request == nil {
		return
	}
	ignore := func(why string) {
		r.event(corev1.EventTypeWarning, "RequestIgnored", string(r.request.Action), "%s request ignored: %s", r.request.Action, why)
		r.requestDone = true
	}
	switch r.request.Action {
	case vmpodv1.StateChangeStart:
		switch strategy {
		case vmpodv1.RunStrategyHalted:
			ignore("runStrategy is Halted; set it to Always (kubectl vmpod start does)")
		case vmpodv1.RunStrategyOnce:
			ignore("a runStrategy Once VM runs once; change the runStrategy to run it again")
		default:
			r.wantRunning = true
			r.requestDone = active
		}
	case vmpodv1.StateChangeStop:
		switch strategy {
		case vmpodv1.RunStrategyManual:
			r.wantRunning = false
			r.requestDone = true
		case vmpodv1.RunStrategyHalted:
			r.requestDone = true
		default:
			ignore(fmt.Sprintf("runStrategy %s would start the VM again; set it to Halted (kubectl vmpod stop does)", strategy))
		}
	case vmpodv1.StateChangeRestart:
		switch {
		case strategy == vmpodv1.RunStrategyHalted:
			ignore("runStrategy is Halted")
		case r.pod != nil && r.pod.UID == r.request.PodUID:
			// the old pod is still here: stop it, then (below) start a new one
			if !finished(r.pod) && r.pod.DeletionTimestamp == nil {
				r.wantRunning = false
			} else {
				r.wantRunning = true
			}
		default:
			r.wantRunning = true
			r.requestDone = active
		}
	case vmpodv1.StateChangePause, vmpodv1.StateChangeUnpause:
		if !active {
			ignore("the VM is not running")
			break
		}
		r.pauseVM = r.request.Action == vmpodv1.StateChangePause
		r.setPause = true
	}
	if r.requestDone {
		log.FromContext(ctx).Info("state change request done", "action", r.request.Action)
	}
}

// backoffRemaining is how long a failed pod must wait to be replaced; a start or restart
// request skips the wait.
func (r *run) backoffRemaining() time.Duration {
	sf := r.status.StartFailure
	userAsked := r.request != nil && r.request.Action != vmpodv1.StateChangeStop
	if r.pod.Status.Phase != corev1.PodFailed || sf == nil || sf.RetryAfterTimestamp == nil || userAsked {
		return 0
	}
	return sf.RetryAfterTimestamp.Sub(r.now)
}

func finished(pod *corev1.Pod) bool {
	return pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed
}

func (r *run) deletePod(ctx context.Context, reason, note string) error {
	uid := r.pod.UID
	err := r.Client.Delete(ctx, r.pod, ctrl.Preconditions{UID: &uid})
	if ctrl.IgnoreNotFound(err) != nil {
		return fmt.Errorf("delete pod %s: %w", r.pod.Name, err)
	}
	log.FromContext(ctx).Info("deleted pod", "pod", r.pod.Name, "reason", reason)
	r.event(corev1.EventTypeNormal, reason, "DeletePod", "%s: deleted pod %s", note, r.pod.Name)
	r.pod.DeletionTimestamp = &metav1.Time{Time: r.now} // for the status below
	return nil
}

func (r *run) createPod(ctx context.Context) (reconcile.Result, error) {
	if r.blocked != nil {
		return reconcile.Result{}, nil
	}
	claims, err := r.claims(ctx)
	if err != nil || r.blocked != nil {
		return reconcile.Result{}, err
	}
	if r.expandErr != nil {
		return r.expansionFailed()
	}
	// The cache may not have the VM's latest status yet: a migration that just made
	// another pod the VM's would otherwise get a second copy of the guest booted here.
	live := &vmpodv1.VirtualMachine{}
	if err := r.APIReader.Get(ctx, ctrl.ObjectKeyFromObject(r.vm), live); err != nil {
		return reconcile.Result{}, fmt.Errorf("read VM %s: %w", r.vm.Name, err)
	}
	if live.Status.PodName != r.vm.Status.PodName {
		return reconcile.Result{RequeueAfter: time.Second}, nil
	}
	pod, err := render.Pod(r.expanded, claims, r.Render)
	if err != nil {
		r.blocked = &blocker{vmpodv1.StatusInvalidSpec, "InvalidSpec", err.Error(), true}
		r.event(corev1.EventTypeWarning, "InvalidSpec", "RenderPod", "%v", err)
		return reconcile.Result{}, nil // nothing to retry until the spec changes
	}
	switch err := r.Client.Create(ctx, pod); {
	case apierrors.IsAlreadyExists(err):
		live := &corev1.Pod{}
		if gerr := r.APIReader.Get(ctx, ctrl.ObjectKeyFromObject(pod), live); gerr == nil && !metav1.IsControlledBy(live, r.vm) {
			r.blocked = &blocker{vmpodv1.StatusUnknown, "PodNameTaken", fmt.Sprintf("pod %s exists and does not belong to this VM", pod.Name), true}
			r.event(corev1.EventTypeWarning, "PodNameTaken", "CreatePod", "pod %s exists and does not belong to this VM", pod.Name)
			return reconcile.Result{RequeueAfter: r.Backoff.Max}, nil
		}
		return reconcile.Result{RequeueAfter: time.Second}, nil // the cache had not seen it yet
	case apierrors.IsInvalid(err) || apierrors.IsForbidden(err):
		// rejected by validation or admission (quota, RuntimeClass missing, PodSecurity):
		// retrying the same pod would fail the same way until something changes
		r.blocked = &blocker{vmpodv1.StatusFailed, "FailedCreate", err.Error(), true}
		r.event(corev1.EventTypeWarning, "FailedCreate", "CreatePod", "create pod %s: %v", pod.Name, err)
		return reconcile.Result{RequeueAfter: r.Backoff.Max}, nil
	case err != nil:
		return reconcile.Result{}, fmt.Errorf("create pod %s: %w", pod.Name, err)
	}
	log.FromContext(ctx).Info("created pod", "pod", pod.Name)
	r.event(corev1.EventTypeNormal, "SuccessfulCreate", "CreatePod", "created pod %s", pod.Name)
	r.pod = pod
	return reconcile.Result{}, nil
}

// expansionFailed blocks the pod of a VM whose instance type or preference cannot be
// applied. A missing one may yet be created (it is looked up, not watched: poll for it);
// unmet requirements wait for the spec to change.
func (r *run) expansionFailed() (reconcile.Result, error) {
	var nf *instancetype.NotFoundError
	var unmet *instancetype.RequirementsError
	switch err := r.expandErr; {
	case errors.As(err, &nf):
		reason := nf.Reason()
		r.blocked = &blocker{vmpodv1.StatusInvalidSpec, reason, err.Error(), true}
		r.event(corev1.EventTypeWarning, reason, "ExpandInstancetype", "%v", err)
		return reconcile.Result{RequeueAfter: instancetypeRetry}, nil
	case errors.As(err, &unmet):
		r.blocked = &blocker{vmpodv1.StatusInvalidSpec, "PreferenceRequirementsNotMet", err.Error(), true}
		r.event(corev1.EventTypeWarning, "PreferenceRequirementsNotMet", "ExpandInstancetype", "%v", err)
		return reconcile.Result{}, nil
	default:
		return reconcile.Result{}, fmt.Errorf("expand instancetype and preference: %w", err)
	}
}

// instancetypeRetry is how often a VM waiting for its instance type or preference looks again.
const instancetypeRetry = 10 * time.Second

// event records an event on the VM, related to its pod if there is one.
func (r *run) event(eventType, reason, action, note string, args ...any) {
	var related *corev1.Pod
	if r.pod != nil && r.pod.UID != "" {
		related = r.pod
	}
	if related != nil {
		r.Recorder.Eventf(r.vm, related, eventType, reason, action, note, args...)
	} else {
		r.Recorder.Eventf(r.vm, nil, eventType, reason, action, note, args...)
	}
}

func (r *run) writeStatus(ctx context.Context) error {
	r.fillStatus()
	if equality.Semantic.DeepEqual(r.vm.Status, r.status) {
		return nil
	}
	r.vm.Status = r.status
	if err := r.Client.Status().Update(ctx, r.vm); err != nil {
		return fmt.Errorf("update status: %w", err)
	}
	return nil
}

// clearRequest removes the request annotation, unless it changed since it was read: a
// newer request must not be lost.
func (r *run) clearRequest(ctx context.Context) error {
	if r.vm.Annotations[vmpodv1.StateChangeRequestAnnotation] != r.requestRaw {
		return nil // replaced while we worked (the status update returned the new one)
	}
	patch := ctrl.MergeFromWithOptions(r.vm.DeepCopy(), ctrl.MergeFromWithOptimisticLock{})
	delete(r.vm.Annotations, vmpodv1.StateChangeRequestAnnotation)
	if err := r.Client.Patch(ctx, r.vm, patch); err != nil {
		return fmt.Errorf("remove %s: %w", vmpodv1.StateChangeRequestAnnotation, err)
	}
	return nil
}
