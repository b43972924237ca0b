// Package datavolume reconciles DataVolumes: it creates the PVC, runs a vmpod-importer Job
// that fills it (download, clone or blank), and mirrors the importer's progress and result,
// which the importer writes as annotations on the PVC, into the DataVolume's status.
// See docs/design/103-import-progress.md.
package datavolume

import (
	"cmp"
	"context"
	"fmt"
	"maps"
	"slices"
	"time"

	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	nodev1 "k8s.io/api/node/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/events"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
)

// Reconciler reconciles DataVolumes.
type Reconciler struct {
	Client client.Client
	// APIReader reads objects outside the DataVolume's namespace and Secrets, uncached: the
	// manager may watch one namespace only, and no Secret is ever cached.
	APIReader client.Reader
	Recorder  events.EventRecorder
	// ImporterImage runs cmd/vmpod-importer (with qemu-img) in the worker Jobs.
	ImporterImage string
	// RuntimeClassName is the RuntimeClass VM pods run under. Importer pods get its
	// scheduling (node selector, tolerations): a WaitForFirstConsumer volume binds on the
	// importer's node, and only a node the RuntimeClass selects can then run the VM.
	RuntimeClassName string
	// CloneSweepInterval is how often SweepCloneSources runs (DefaultCloneSweepInterval if 0).
	CloneSweepInterval time.Duration
}

// +kubebuilder:rbac:groups=vmpod.dev,resources=datavolumes,verbs=get;list;watch;patch
// +kubebuilder:rbac:groups=vmpod.dev,resources=datavolumes/finalizers,verbs=update
// +kubebuilder:rbac:groups=vmpod.dev,resources=datavolumes/status,verbs=get;update;patch
// +kubebuilder:rbac:groups=vmpod.dev,resources=datasources,verbs=get;list;watch
// +kubebuilder:rbac:groups="",resources=persistentvolumeclaims,verbs=get;list;watch;create;patch
// +kubebuilder:rbac:groups=batch,resources=jobs,verbs=get;list;watch;create;delete
// +kubebuilder:rbac:groups=node.k8s.io,resources=runtimeclasses,verbs=get;list;watch
// +kubebuilder:rbac:groups="",resources=serviceaccounts,verbs=create
// +kubebuilder:rbac:groups=rbac.authorization.k8s.io,resources=roles;rolebindings,verbs=create
// +kubebuilder:rbac:groups=events.k8s.io,resources=events,verbs=create;patch
// +kubebuilder:rbac:groups=authorization.k8s.io,resources=subjectaccessreviews,verbs=create
// +kubebuilder:rbac:groups="",resources=services,verbs=get;create;delete
// +kubebuilder:rbac:groups="",resources=secrets,verbs=get;create;update;delete
// +kubebuilder:rbac:groups="",resources=pods,verbs=get;create;delete

// Reconcile moves one DataVolume along: PVC, worker Job, status.
func (r *Reconciler) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	dv := &vmpodv1.DataVolume{}
	if err := r.Client.Get(ctx, req.NamespacedName, dv); err != nil {
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	if dv.DeletionTimestamp != nil {
		// the PVC and Job go with it (owner references); a clone's source side in another
		// namespace, which owner references cannot reach, goes now
		return reconcile.Result{}, r.releaseCloneSource(ctx, dv)
	}
	status := dv.Status.DeepCopy()
	requeue, err := r.reconcile(ctx, dv, status)
	if err != nil {
		return reconcile.Result{}, err
	}
	status.ObservedGeneration = dv.Generation
	status.ClaimName = dv.Name
	if old := dv.Status.Phase; old != status.Phase {
		r.phaseEvent(dv, status)
		log.FromContext(ctx).Info("phase", "from", old, "to", status.Phase, "progress", status.Progress)
	}
	if !equality.Semantic.DeepEqual(&dv.Status, status) {
		dv.Status = *status
		if err := r.Client.Status().Update(ctx, dv); err != nil {
			return reconcile.Result{}, fmt.Errorf("update status: %w", err)
		}
	}
	return reconcile.Result{RequeueAfter: requeue}, nil
}

// reconcile moves dv along, writing what it saw into s. A non-zero duration asks for
// another pass then: it waits on something no watch reports (another namespace's objects,
// an authorization an admin may grant).
func (r *Reconciler) reconcile(ctx context.Context, orig *vmpodv1.DataVolume, s *vmpodv1.DataVolumeStatus) (time.Duration, error) {
	if s.Phase == vmpodv1.PhaseSucceeded || s.Phase == vmpodv1.PhaseFailed {
		return 0, r.cleanup(ctx, orig, s) // terminal: the spec is immutable
	}
	// One read of the worker Job decides both whether a clone is still to be authorized and
	// whether to make it.
	job, err := r.getWorker(ctx, orig)
	if err != nil {
		return 0, err
	}
	if job != nil && !metav1.IsControlledBy(job, orig) {
		// an earlier DataVolume's, not collected yet, or someone else's: never adopted
		msg := fmt.Sprintf("waiting for Job %s, which does not belong to this DataVolume, to go", job.Name)
		setCondition(s, orig, vmpodv1.DVRunning, false, "WorkerExists", msg)
		setCondition(s, orig, vmpodv1.DVReady, false, "WorkerExists", msg)
		return pollCrossNamespace, nil
	}
	// dv is what the DataVolume asks for, with a sourceRef resolved to its PVC; orig is the
	// object itself, which takes the finalizer
	dv := orig
	switch ref := dv.Spec.SourceRef; {
	case ref != nil && job != nil:
		// the clone runs with the source resolved when its Job was made: a DataSource
		// changed or deleted since must not stop it (and is not read again)
		dv = dv.DeepCopy()
		dv.Spec.SourceRef, dv.Spec.Source = nil, vmpodv1.DataVolumeSource{PVC: &vmpodv1.PVCSource{Name: ref.Name}}
	case ref != nil:
		if ns := ref.Namespace; ns != "" && ns != dv.Namespace {
			// only who may clone from a namespace reads its DataSources: whether one exists,
			// and where its PVC is, is not told to others
			if ok, err := r.authorizeClone(ctx, orig, s, ns); err != nil || !ok {
				return r.denied(ctx, orig, err)
			}
		}
		resolved, err := r.resolveSourceRef(ctx, dv, s)
		if err != nil || resolved == nil {
			return pollElsewhere(err, ref.Namespace, dv), err
		}
		dv = resolved
	}
	remote := dv.Spec.Source.PVC != nil && cmp.Or(dv.Spec.Source.PVC.Namespace, dv.Namespace) != dv.Namespace
	if remote && job == nil {
		// before anything is made for it; once its Job runs, the clone goes on
		if ok, err := r.authorizeClone(ctx, orig, s, dv.Spec.Source.PVC.Namespace); err != nil || !ok {
			return r.denied(ctx, orig, err)
		}
	}
	pvc, err := r.ensurePVC(ctx, dv, s)
	if err != nil || pvc == nil {
		return 0, err
	}
	setBound(s, pvc)

	// The importer's own report on the PVC decides success: it writes Succeeded only after
	// the data is complete and synced.
	switch pvc.Annotations[vmpodv1.ImportPhaseAnnotation] {
	case string(vmpodv1.PhaseSucceeded):
		s.Phase, s.Progress = vmpodv1.PhaseSucceeded, "100.00%"
		setCondition(s, dv, vmpodv1.DVRunning, false, "Completed", "the import completed")
		setCondition(s, dv, vmpodv1.DVReady, true, "Succeeded", "the PVC holds the complete data")
		return 0, r.cleanup(ctx, orig, s)
	case string(vmpodv1.PhaseFailed):
		fail(s, dv, pvc.Annotations[vmpodv1.ImportReasonAnnotation], pvc.Annotations[vmpodv1.ImportMessageAnnotation])
		return 0, r.cleanup(ctx, orig, s)
	}

	if job == nil {
		var source *corev1.PersistentVolumeClaim
		var served *RemoteClone
		if dv.Spec.Source.PVC != nil {
			if source, err = r.cloneSource(ctx, dv, s); err != nil || source == nil {
				return pollElsewhere(err, dv.Spec.Source.PVC.Namespace, dv), err
			}
		}
		if remote {
			if served, err = r.serveCloneSource(ctx, orig, source, s); err != nil || served == nil {
				return pollElsewhere(err, source.Namespace, dv), err
			}
			source = nil // pulled from the source pod, not mounted
		}
		if job, err = r.createWorker(ctx, dv, pvc, source, served); err != nil {
			return 0, err
		}
	}
	s.RestartCount = job.Status.Failed
	if c := jobCondition(job, batchv1.JobFailed); c != nil {
		// the importer retried transient failures until the Job gave up, or could not
		// report at all (killed, OOM, image pull): the Job's verdict stands, with the last
		// attempt's reason if it left one
		reason, msg := "ImporterFailed", fmt.Sprintf("importer Job %s failed: %s: %s", job.Name, c.Reason, c.Message)
		if r := pvc.Annotations[vmpodv1.ImportReasonAnnotation]; r != "" {
			reason, msg = r, msg+"; last attempt: "+pvc.Annotations[vmpodv1.ImportMessageAnnotation]
		}
		fail(s, dv, reason, msg)
		return 0, r.cleanup(ctx, orig, s)
	}

	scheduled, inProgress := vmpodv1.PhaseImportScheduled, vmpodv1.PhaseImportInProgress
	switch {
	case dv.Spec.Source.PVC != nil:
		scheduled, inProgress = vmpodv1.PhaseCloneScheduled, vmpodv1.PhaseCloneInProgress
	case dv.Spec.Source.Upload != nil:
		scheduled = vmpodv1.PhaseUploadScheduled
	}
	switch pvc.Annotations[vmpodv1.ImportPhaseAnnotation] {
	case "Running":
		s.Phase = inProgress
		s.Progress = pvc.Annotations[vmpodv1.ImportProgressAnnotation]
		setCondition(s, dv, vmpodv1.DVRunning, true, "Running", pvc.Annotations[vmpodv1.ImportMessageAnnotation])
	case string(vmpodv1.PhaseUploadReady):
		s.Phase, s.Progress = vmpodv1.PhaseUploadReady, "N/A"
		setCondition(s, dv, vmpodv1.DVRunning, true, "UploadReady", pvc.Annotations[vmpodv1.ImportMessageAnnotation])
	default:
		s.Phase, s.Progress = scheduled, "N/A"
		setCondition(s, dv, vmpodv1.DVRunning, false, "Pending", "importer Job "+job.Name+" created")
	}
	setCondition(s, dv, vmpodv1.DVReady, false, string(s.Phase), "the PVC is being filled")
	return 0, nil
}

// ensurePVC returns the DataVolume's PVC, creating it. A PVC of that name that the
// DataVolume does not own fails it: importing over someone else's data is not an option.
func (r *Reconciler) ensurePVC(ctx context.Context, dv *vmpodv1.DataVolume, s *vmpodv1.DataVolumeStatus) (*corev1.PersistentVolumeClaim, error) {
	pvc := &corev1.PersistentVolumeClaim{}
	err := r.Client.Get(ctx, types.NamespacedName{Namespace: dv.Namespace, Name: dv.Name}, pvc)
	switch {
	case err == nil && !metav1.IsControlledBy(pvc, dv):
		fail(s, dv, "ClaimExists", fmt.Sprintf("PVC %s exists and does not belong to this DataVolume", pvc.Name))
		return nil, nil
	case err == nil:
		return pvc, nil
	case !apierrors.IsNotFound(err):
		return nil, fmt.Errorf("get PVC %s: %w", dv.Name, err)
	}
	st := dv.Spec.Storage
	pvc = &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: dv.Name, Namespace: dv.Namespace, Labels: map[string]string{DataVolumeLabel: dv.Name},
			OwnerReferences: []metav1.OwnerReference{*metav1.NewControllerRef(dv, vmpodv1.GroupVersion.WithKind("DataVolume"))}},
		Spec: corev1.PersistentVolumeClaimSpec{
			AccessModes:      st.AccessModes,
			VolumeMode:       st.VolumeMode,
			Resources:        *st.Resources.DeepCopy(),
			StorageClassName: st.StorageClassName,
		},
	}
	if len(pvc.Spec.AccessModes) == 0 {
		pvc.Spec.AccessModes = []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce}
	}
	if err := r.Client.Create(ctx, pvc); err != nil {
		return nil, fmt.Errorf("create PVC %s: %w", pvc.Name, err)
	}
	log.FromContext(ctx).Info("created PVC", "pvc", pvc.Name)
	r.Recorder.Eventf(dv, pvc, corev1.EventTypeNormal, "SuccessfulCreate", "CreatePVC", "created PVC %s", pvc.Name)
	s.Phase, s.Progress = vmpodv1.PhasePending, "N/A"
	return pvc, nil
}

// cloneSource returns the PVC to clone once it exists and, if a DataVolume fills it, the
// DataVolume has Succeeded; nil while waiting.
func (r *Reconciler) cloneSource(ctx context.Context, dv *vmpodv1.DataVolume, s *vmpodv1.DataVolumeStatus) (*corev1.PersistentVolumeClaim, error) {
	key := types.NamespacedName{Namespace: cmp.Or(dv.Spec.Source.PVC.Namespace, dv.Namespace), Name: dv.Spec.Source.PVC.Name}
	name := key.String()
	src := &corev1.PersistentVolumeClaim{}
	err := r.reader(dv, key.Namespace).Get(ctx, key, src)
	wait := func(reason, msg string) (*corev1.PersistentVolumeClaim, error) {
		s.Phase, s.Progress = vmpodv1.PhaseCloneScheduled, "N/A"
		setCondition(s, dv, vmpodv1.DVRunning, false, reason, msg)
		setCondition(s, dv, vmpodv1.DVReady, false, reason, msg)
		return nil, nil
	}
	switch {
	case apierrors.IsNotFound(err):
		return wait("SourcePVCNotFound", "waiting for source PVC "+name)
	case err != nil:
		return nil, fmt.Errorf("get source PVC %s: %w", name, err)
	}
	if owner := metav1.GetControllerOf(src); owner != nil && owner.Kind == "DataVolume" &&
		src.Annotations[vmpodv1.ImportPhaseAnnotation] != string(vmpodv1.PhaseSucceeded) {
		return wait("SourceNotReady", "waiting for DataVolume "+owner.Name+" to fill source PVC "+name)
	}
	return src, nil
}

// resolveSourceRef turns a sourceRef into the clone it stands for: a copy of dv whose source
// is the DataSource's PVC, read at every pass until the clone starts. It returns nil while
// the DataSource does not exist (the DataVolume waits for it) and when its PVC cannot be
// cloned (the DataVolume has failed, saying why).
func (r *Reconciler) resolveSourceRef(ctx context.Context, dv *vmpodv1.DataVolume, s *vmpodv1.DataVolumeStatus) (*vmpodv1.DataVolume, error) {
	ref := dv.Spec.SourceRef
	key := types.NamespacedName{Namespace: cmp.Or(ref.Namespace, dv.Namespace), Name: ref.Name}
	ds := &vmpodv1.DataSource{}
	err := r.reader(dv, key.Namespace).Get(ctx, key, ds)
	switch {
	case apierrors.IsNotFound(err):
		msg := "waiting for DataSource " + key.String()
		s.Phase, s.Progress = vmpodv1.PhaseCloneScheduled, "N/A"
		setCondition(s, dv, vmpodv1.DVRunning, false, "DataSourceNotFound", msg)
		setCondition(s, dv, vmpodv1.DVReady, false, "DataSourceNotFound", msg)
		return nil, nil
	case err != nil:
		return nil, fmt.Errorf("get DataSource %s: %w", key, err)
	}
	pvc := ds.Spec.Source.PVC
	out := dv.DeepCopy()
	out.Spec.SourceRef = nil
	out.Spec.Source = vmpodv1.DataVolumeSource{PVC: &vmpodv1.PVCSource{Namespace: cmp.Or(pvc.Namespace, ds.Namespace), Name: pvc.Name}}
	return out, nil
}

// cleanup ends a clone's source side in another namespace and deletes a succeeded
// import's Job (and so its pod); a failed one's stays for its logs.
func (r *Reconciler) cleanup(ctx context.Context, dv *vmpodv1.DataVolume, s *vmpodv1.DataVolumeStatus) error {
	if err := r.releaseCloneSource(ctx, dv); err != nil {
		return err
	}
	if s.Phase != vmpodv1.PhaseSucceeded {
		return nil
	}
	job := &batchv1.Job{ObjectMeta: metav1.ObjectMeta{Namespace: dv.Namespace, Name: WorkerName(dv)}}
	err := r.Client.Delete(ctx, job, client.PropagationPolicy(metav1.DeletePropagationBackground))
	if client.IgnoreNotFound(err) != nil {
		return fmt.Errorf("delete Job %s: %w", job.Name, err)
	}
	if err == nil {
		log.FromContext(ctx).Info("deleted the finished importer Job", "job", job.Name)
	}
	return nil
}

func (r *Reconciler) phaseEvent(dv *vmpodv1.DataVolume, s *vmpodv1.DataVolumeStatus) {
	switch s.Phase {
	case vmpodv1.PhaseSucceeded:
		r.Recorder.Eventf(dv, nil, corev1.EventTypeNormal, "ImportSucceeded", "Import", "PVC %s holds the complete data", dv.Name)
	case vmpodv1.PhaseFailed:
		c := meta.FindStatusCondition(s.Conditions, vmpodv1.DVReady)
		r.Recorder.Eventf(dv, nil, corev1.EventTypeWarning, "ImportFailed", "Import", "%s: %s", c.Reason, c.Message)
	case vmpodv1.PhaseUploadReady:
		r.Recorder.Eventf(dv, nil, corev1.EventTypeNormal, "UploadReady", "Import", "the importer waits for an upload: kubectl vmpod image-upload dv %s --image-path=FILE", dv.Name)
	case vmpodv1.PhaseImportScheduled, vmpodv1.PhaseCloneScheduled, vmpodv1.PhaseUploadScheduled:
		// what it waits for, or the Job it made
		msg := "worker Job " + WorkerName(dv)
		if c := meta.FindStatusCondition(s.Conditions, vmpodv1.DVRunning); c != nil {
			msg = c.Message
		}
		r.Recorder.Eventf(dv, nil, corev1.EventTypeNormal, string(s.Phase), "Import", "%s", msg)
	}
}

func fail(s *vmpodv1.DataVolumeStatus, dv *vmpodv1.DataVolume, reason, message string) {
	if reason == "" {
		reason = "ImportFailed"
	}
	s.Phase = vmpodv1.PhaseFailed
	setCondition(s, dv, vmpodv1.DVRunning, false, reason, message)
	setCondition(s, dv, vmpodv1.DVReady, false, reason, message)
}

func setBound(s *vmpodv1.DataVolumeStatus, pvc *corev1.PersistentVolumeClaim) {
	bound := pvc.Status.Phase == corev1.ClaimBound
	reason := string(pvc.Status.Phase)
	if reason == "" {
		reason = string(corev1.ClaimPending)
	}
	c := metav1.Condition{Type: vmpodv1.DVBound, Status: metav1.ConditionFalse, Reason: reason, Message: "PVC " + pvc.Name + " is " + reason}
	if bound {
		c.Status = metav1.ConditionTrue
	}
	meta.SetStatusCondition(&s.Conditions, c)
}

func setCondition(s *vmpodv1.DataVolumeStatus, dv *vmpodv1.DataVolume, t string, ok bool, reason, msg string) {
	c := metav1.Condition{Type: t, Status: metav1.ConditionFalse, Reason: reason, Message: msg, ObservedGeneration: dv.Generation}
	if ok {
		c.Status = metav1.ConditionTrue
	}
	meta.SetStatusCondition(&s.Conditions, c)
}

func jobCondition(job *batchv1.Job, t batchv1.JobConditionType) *batchv1.JobCondition {
	for i := range job.Status.Conditions {
		if c := &job.Status.Conditions[i]; c.Type == t && c.Status == corev1.ConditionTrue {
			return c
		}
	}
	return nil
}

// getWorker returns the worker Job, nil if there is none yet.
func (r *Reconciler) getWorker(ctx context.Context, dv *vmpodv1.DataVolume) (*batchv1.Job, error) {
	job := &batchv1.Job{}
	err := r.Client.Get(ctx, types.NamespacedName{Namespace: dv.Namespace, Name: WorkerName(dv)}, job)
	switch {
	case apierrors.IsNotFound(err):
		return nil, nil
	case err != nil:
		return nil, fmt.Errorf("get Job %s: %w", WorkerName(dv), err)
	}
	return job, nil
}

// createWorker creates the worker Job and the identity it runs as: a ServiceAccount whose
// Role may only read and annotate this one PVC, because the importer parses untrusted
// images and must not be able to mark other PVCs complete.
func (r *Reconciler) createWorker(ctx context.Context, dv *vmpodv1.DataVolume, pvc, source *corev1.PersistentVolumeClaim, served *RemoteClone) (*batchv1.Job, error) {
	name := WorkerName(dv)
	identity := []client.Object{
		&corev1.ServiceAccount{ObjectMeta: workerMeta(dv)},
		&rbacv1.Role{ObjectMeta: workerMeta(dv), Rules: []rbacv1.PolicyRule{{
			APIGroups: []string{""}, Resources: []string{"persistentvolumeclaims"}, ResourceNames: []string{pvc.Name}, Verbs: []string{"get", "patch"}}}},
		&rbacv1.RoleBinding{ObjectMeta: workerMeta(dv),
			RoleRef:  rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: name},
			Subjects: []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: name, Namespace: dv.Namespace}}},
	}
	for _, o := range identity {
		if err := r.Client.Create(ctx, o); err != nil && !apierrors.IsAlreadyExists(err) {
			return nil, fmt.Errorf("create importer %T %s: %w", o, name, err)
		}
	}
	job := &batchv1.Job{ObjectMeta: workerMeta(dv), Spec: WorkerJobSpec(dv, pvc, source, served, name, r.ImporterImage)}
	if err := r.scheduleWithVMs(ctx, &job.Spec.Template.Spec); err != nil {
		return nil, err
	}
	err := r.Client.Create(ctx, job)
	if apierrors.IsAlreadyExists(err) {
		// made by the pass before this one, which the cache has not seen yet
		err = r.APIReader.Get(ctx, client.ObjectKeyFromObject(job), job)
	}
	if err != nil {
		return nil, fmt.Errorf("create Job %s: %w", name, err)
	}
	log.FromContext(ctx).Info("created importer Job", "job", name, "image", r.ImporterImage)
	return job, nil
}

// scheduleWithVMs gives the importer pod the RuntimeClass's scheduling. A missing
// RuntimeClass is an error (the Job would land where no VM can use the volume); one
// without scheduling leaves the pod unconstrained.
func (r *Reconciler) scheduleWithVMs(ctx context.Context, pod *corev1.PodSpec) error {
	if r.RuntimeClassName == "" {
		return nil
	}
	rc := &nodev1.RuntimeClass{}
	if err := r.Client.Get(ctx, client.ObjectKey{Name: r.RuntimeClassName}, rc); err != nil {
		return fmt.Errorf("RuntimeClass %s (the importer runs on its nodes): %w", r.RuntimeClassName, err)
	}
	if rc.Scheduling == nil {
		return nil
	}
	pod.NodeSelector = maps.Clone(rc.Scheduling.NodeSelector)
	pod.Tolerations = slices.Clone(rc.Scheduling.Tolerations)
	return nil
}
