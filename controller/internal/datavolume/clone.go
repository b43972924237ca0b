package datavolume

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/log"

	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
	"github.com/vmpod/vmpod/controller/internal/selfsigned"
)

// A clone from another namespace (docs/design/113-cross-namespace-clone.md): a pod in the
// source namespace serves the source PVC's disk over TLS to the clone's importer Job, which
// pulls it as a raw download. Owner references cannot cross namespaces, so the finalizer
// holds the DataVolume until the source side is deleted, and the annotation (written with
// it, before anything is made) says in which namespace.
const (
	cloneFinalizer           = "vmpod.dev/clone-source"
	cloneNamespaceAnnotation = "vmpod.dev/clone-source-namespace"

	// CloneForLabel marks the source side's Service, Secret and Pod with the UID of the
	// DataVolume they serve; CloneForAnnotation names it (namespace/name) for people.
	CloneForLabel      = "vmpod.dev/clone-for"
	CloneForAnnotation = "vmpod.dev/clone-for-datavolume"

	// ClonerClusterRole (config/rbac) grants create on datavolumes/source: bound in a
	// source namespace to a namespace's default ServiceAccount, it lets that namespace's
	// DataVolumes clone from there.
	ClonerClusterRole = "vmpod-datavolume-cloner"

	// How long a source side may serve: its certificate's validity (the importer trusts no
	// other, so the token is useless after it) and its pod's active deadline. It bounds the
	// access a clone grants even if its DataVolume's author kept the cleanup from running.
	cloneServeLimit = 24 * time.Hour

	// DefaultCloneSweepInterval is how often source sides whose DataVolume no longer
	// wants them are looked for (see SweepCloneSources).
	DefaultCloneSweepInterval = 2 * time.Minute

	// How often a clone waiting on something no watch reports looks again: objects in
	// another namespace (the manager may watch one namespace only) and an authorization an
	// admin may grant.
	pollCrossNamespace = 5 * time.Second
	pollAuthorization  = 10 * time.Second
)

// The target side's Secret (named like the worker): the source server's certificate, and the
// header that carries the token.
const (
	cloneCAKey     = "ca.crt"
	cloneHeaderKey = "authorization"
)

// RemoteClone is a clone source in another namespace, served by the pod there.
type RemoteClone struct {
	URL string // https://<the Service's ClusterIP>:ClonePort/ClonePath
	// Secret, in the DataVolume's namespace, holds the server's certificate (ca.crt) and
	// the Authorization header (authorization).
	Secret string
}

// CloneSourceName names the Service, Secret and Pod that serve dv's clone in the source
// namespace: unique per DataVolume, whichever namespace it is in.
func CloneSourceName(dv *vmpodv1.DataVolume) string { return "vmpod-clone-" + string(dv.UID) }

// reader reads namespace ns for dv: the cache in dv's own namespace, the API server in others.
func (r *Reconciler) reader(dv *vmpodv1.DataVolume, ns string) client.Reader {
	if ns == "" || ns == dv.Namespace {
		return r.Client
	}
	return r.APIReader
}

// pollElsewhere is the requeue for a pass that waits on namespace ns.
func pollElsewhere(err error, ns string, dv *vmpodv1.DataVolume) time.Duration {
	if err != nil || ns == "" || ns == dv.Namespace {
		return 0
	}
	return pollCrossNamespace
}

// authorizeClone asks the API server whether the DataVolume's namespace's default
// ServiceAccount may create datavolumes/source in the source namespace: CDI's rule for the
// clones of VM templates. vmpod has no admission webhook to see who created a DataVolume, so
// the rule holds for every clone; it depends on nothing the DataVolume's author sets but the
// source itself, and it is asked before anything is made, at every pass until the Job runs.
func (r *Reconciler) authorizeClone(ctx context.Context, dv *vmpodv1.DataVolume, s *vmpodv1.DataVolumeStatus, ns string) (bool, error) {
	sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
		User:   "system:serviceaccount:" + dv.Namespace + ":default",
		Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + dv.Namespace, "system:authenticated"},
		ResourceAttributes: &authorizationv1.ResourceAttributes{
			Namespace: ns, Verb: "create", Group: vmpodv1.GroupVersion.Group, Resource: "datavolumes", Subresource: "source"},
	}}
	if err := r.Client.Create(ctx, sar); err != nil {
		return false, fmt.Errorf("SubjectAccessReview of a clone from namespace %s: %w", ns, err)
	}
	if sar.Status.Allowed {
		return true, nil
	}
	msg := fmt.Sprintf("ServiceAccount %s/default may not clone from namespace %s (create datavolumes/source there); an admin of %s grants it: "+
		"kubectl create rolebinding clone-to-%s -n %s --clusterrole=%s --serviceaccount=%s:default",
		dv.Namespace, ns, ns, dv.Namespace, ns, ClonerClusterRole, dv.Namespace)
	s.Phase, s.Progress = vmpodv1.PhaseCloneScheduled, "N/A"
	setCondition(s, dv, vmpodv1.DVRunning, false, "CloneNotAuthorized", msg)
	setCondition(s, dv, vmpodv1.DVReady, false, "CloneNotAuthorized", msg)
	log.FromContext(ctx).Info("clone not authorized", "namespace", ns, "reason", sar.Status.Reason)
	return false, nil
}

// denied ends a pass whose clone is not (or no longer) authorized: a grant withdrawn before
// the Job was made takes the source side down too. It asks again later.
func (r *Reconciler) denied(ctx context.Context, dv *vmpodv1.DataVolume, err error) (time.Duration, error) {
	if err != nil {
		return 0, err
	}
	return pollAuthorization, r.releaseCloneSource(ctx, dv)
}

// serveCloneSource makes the source side serve source (another namespace's PVC) and the
// target side's Secret to reach it. It returns nil while the source pod is not ready.
// orig is the DataVolume object itself, which takes the finalizer first.
func (r *Reconciler) serveCloneSource(ctx context.Context, orig *vmpodv1.DataVolume, source *corev1.PersistentVolumeClaim, s *vmpodv1.DataVolumeStatus) (*RemoteClone, error) {
	if err := r.holdForCloneSource(ctx, orig, source.Namespace); err != nil {
		return nil, err
	}
	name := CloneSourceName(orig)
	objMeta := func() metav1.ObjectMeta {
		return metav1.ObjectMeta{Name: name, Namespace: source.Namespace,
			Labels:      map[string]string{CloneForLabel: string(orig.UID)},
			Annotations: map[string]string{CloneForAnnotation: orig.Namespace + "/" + orig.Name}}
	}

	// the Service first: its ClusterIP, known at once, is what the certificate names
	svc := &corev1.Service{ObjectMeta: objMeta(), Spec: corev1.ServiceSpec{
		Selector: map[string]string{CloneForLabel: string(orig.UID)},
		Ports:    []corev1.ServicePort{{Name: "https", Port: vmpodv1.ClonePort, TargetPort: intstr.FromInt32(vmpodv1.ClonePort)}},
	}}
	if err := r.getOrCreate(ctx, svc); err != nil {
		return nil, err
	}
	ip := net.ParseIP(svc.Spec.ClusterIP)
	if ip == nil {
		return nil, fmt.Errorf("Service %s/%s has no ClusterIP (%q)", svc.Namespace, svc.Name, svc.Spec.ClusterIP)
	}
	serverSecret := &corev1.Secret{ObjectMeta: objMeta()}
	err := r.APIReader.Get(ctx, client.ObjectKeyFromObject(serverSecret), serverSecret)
	if err == nil && !certFor(serverSecret.Data[vmpodv1.CloneCertKey], ip) {
		// the Service was made anew (another ClusterIP): so are the certificate and the
		// pod that serves it
		for _, o := range []client.Object{&corev1.Pod{ObjectMeta: objMeta()}, serverSecret} {
			if err := r.Client.Delete(ctx, o); client.IgnoreNotFound(err) != nil {
				return nil, fmt.Errorf("delete the stale clone source %T: %w", o, err)
			}
		}
		return nil, fmt.Errorf("the clone source's certificate does not name Service %s/%s's ClusterIP %s: made anew", svc.Namespace, svc.Name, ip)
	}
	if apierrors.IsNotFound(err) {
		cert, key, err := selfsigned.New(ip, svc.Name+"."+svc.Namespace, cloneServeLimit)
		if err != nil {
			return nil, err
		}
		token := make([]byte, 32)
		rand.Read(token)
		serverSecret.Data = map[string][]byte{vmpodv1.CloneCertKey: cert, vmpodv1.CloneKeyKey: key, vmpodv1.CloneTokenKey: []byte(hex.EncodeToString(token))}
		err = r.create(ctx, serverSecret)
	}
	if err != nil {
		return nil, fmt.Errorf("clone source Secret %s/%s: %w", source.Namespace, name, err)
	}
	pod := &corev1.Pod{ObjectMeta: objMeta(), Spec: cloneServerPod(source, name, r.ImporterImage)}
	if err := r.getOrCreate(ctx, pod); err != nil {
		return nil, err
	}
	if claim := podClaim(pod); claim != source.Name {
		// the DataSource names another PVC now
		if err := r.Client.Delete(ctx, pod); client.IgnoreNotFound(err) != nil {
			return nil, fmt.Errorf("delete the clone source pod serving PVC %s: %w", claim, err)
		}
		return nil, fmt.Errorf("the clone source pod served PVC %s, not %s: made anew", claim, source.Name)
	}
	if !podReady(pod) {
		msg := fmt.Sprintf("waiting for pod %s/%s to serve PVC %s (%s%s)", pod.Namespace, pod.Name, source.Name, pod.Status.Phase, podTrouble(pod))
		s.Phase, s.Progress = vmpodv1.PhaseCloneScheduled, "N/A"
		setCondition(s, orig, vmpodv1.DVRunning, false, "CloneSourceStarting", msg)
		setCondition(s, orig, vmpodv1.DVReady, false, "CloneSourceStarting", msg)
		return nil, nil
	}

	// the target side: the importer trusts this server's certificate only and sends the
	// token; kept in step with the server's Secret, which a withdrawn grant renews
	data := map[string][]byte{
		cloneCAKey:     serverSecret.Data[vmpodv1.CloneCertKey],
		cloneHeaderKey: []byte("Authorization: Bearer " + string(serverSecret.Data[vmpodv1.CloneTokenKey])),
	}
	targetSecret := &corev1.Secret{ObjectMeta: workerMeta(orig)}
	err = r.APIReader.Get(ctx, client.ObjectKeyFromObject(targetSecret), targetSecret)
	switch {
	case apierrors.IsNotFound(err):
		targetSecret.Data = data
		err = r.create(ctx, targetSecret)
	case err == nil && !metav1.IsControlledBy(targetSecret, orig):
		err = fmt.Errorf("it exists and does not belong to this DataVolume")
	case err == nil && !equality.Semantic.DeepEqual(targetSecret.Data, data):
		targetSecret.Data = data
		err = r.Client.Update(ctx, targetSecret)
	}
	if err != nil {
		return nil, fmt.Errorf("clone credentials Secret %s: %w", targetSecret.Name, err)
	}
	url := "https://" + net.JoinHostPort(ip.String(), strconv.Itoa(vmpodv1.ClonePort)) + vmpodv1.ClonePath
	return &RemoteClone{URL: url, Secret: targetSecret.Name}, nil
}

// holdForCloneSource puts the finalizer and the source namespace on dv before anything is
// made in that namespace.
func (r *Reconciler) holdForCloneSource(ctx context.Context, dv *vmpodv1.DataVolume, ns string) error {
	old := dv.Annotations[cloneNamespaceAnnotation]
	if controllerutil.ContainsFinalizer(dv, cloneFinalizer) && old == ns {
		return nil
	}
	if old != "" && old != ns {
		// the DataSource moved to another namespace before the clone started
		if err := r.deleteCloneSource(ctx, dv, old); err != nil {
			return err
		}
	}
	patch := client.MergeFromWithOptions(dv.DeepCopy(), client.MergeFromWithOptimisticLock{})
	controllerutil.AddFinalizer(dv, cloneFinalizer)
	metav1.SetMetaDataAnnotation(&dv.ObjectMeta, cloneNamespaceAnnotation, ns)
	if err := r.Client.Patch(ctx, dv, patch); err != nil {
		return fmt.Errorf("add the clone finalizer: %w", err)
	}
	return nil
}

// releaseCloneSource deletes the source side of dv's clone from another namespace, then the
// finalizer that held dv for it. The annotation can only point the deletion at objects named
// for dv's UID, which exist nowhere else.
func (r *Reconciler) releaseCloneSource(ctx context.Context, dv *vmpodv1.DataVolume) error {
	if !controllerutil.ContainsFinalizer(dv, cloneFinalizer) {
		return nil
	}
	if ns := dv.Annotations[cloneNamespaceAnnotation]; ns != "" {
		if err := r.deleteCloneSource(ctx, dv, ns); err != nil {
			return err
		}
	}
	patch := client.MergeFromWithOptions(dv.DeepCopy(), client.MergeFromWithOptimisticLock{})
	controllerutil.RemoveFinalizer(dv, cloneFinalizer)
	if err := r.Client.Patch(ctx, dv, patch); err != nil {
		return fmt.Errorf("remove the clone finalizer: %w", err)
	}
	return nil
}

// deleteCloneSource deletes the Pod, Service and Secret that serve dv's clone in ns.
func (r *Reconciler) deleteCloneSource(ctx context.Context, dv *vmpodv1.DataVolume, ns string) error {
	return deleteCloneObjects(ctx, r.Client, ns, CloneSourceName(dv))
}

func deleteCloneObjects(ctx context.Context, c client.Writer, ns, name string) error {
	for _, o := range []client.Object{&corev1.Pod{}, &corev1.Service{}, &corev1.Secret{}} {
		o.SetNamespace(ns)
		o.SetName(name)
		if err := c.Delete(ctx, o); client.IgnoreNotFound(err) != nil {
			return fmt.Errorf("delete the clone source's %T %s/%s: %w", o, ns, name, err)
		}
	}
	log.FromContext(ctx).Info("deleted the clone source", "namespace", ns, "name", name)
	return nil
}

// getOrCreate reads o (by its namespace and name) from the API server, creating it from o
// if it does not exist.
func (r *Reconciler) getOrCreate(ctx context.Context, o client.Object) error {
	err := r.APIReader.Get(ctx, client.ObjectKeyFromObject(o), o)
	if apierrors.IsNotFound(err) {
		err = r.create(ctx, o)
	}
	if err != nil {
		return fmt.Errorf("clone source %T %s/%s: %w", o, o.GetNamespace(), o.GetName(), err)
	}
	return nil
}

func (r *Reconciler) create(ctx context.Context, o client.Object) error {
	if err := r.Client.Create(ctx, o); err != nil {
		return err
	}
	log.FromContext(ctx).Info("created", "kind", fmt.Sprintf("%T", o), "namespace", o.GetNamespace(), "name", o.GetName())
	return nil
}

// cloneServerPod runs `vmpod-importer serve` on source, read-only, with the Secret name.
// It needs no API access; the PV's node affinity places it.
func cloneServerPod(source *corev1.PersistentVolumeClaim, secret, image string) corev1.PodSpec {
	const tlsMount = "/vmpod/tls"
	c := corev1.Container{
		Name:         "server",
		Image:        image,
		Args:         []string{"serve", "--listen=:" + strconv.Itoa(vmpodv1.ClonePort), "--tls-dir=" + tlsMount},
		Ports:        []corev1.ContainerPort{{Name: "https", ContainerPort: vmpodv1.ClonePort}},
		VolumeMounts: []corev1.VolumeMount{{Name: "tls", MountPath: tlsMount, ReadOnly: true}},
		ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(vmpodv1.ClonePort)}},
			PeriodSeconds: 2},
		Resources: corev1.ResourceRequirements{Requests: corev1.ResourceList{
			corev1.ResourceCPU: resource.MustParse("50m"), corev1.ResourceMemory: resource.MustParse("32Mi")}},
		SecurityContext: &corev1.SecurityContext{
			AllowPrivilegeEscalation: ptr.To(false),
			ReadOnlyRootFilesystem:   ptr.To(true),
			SeccompProfile:           &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
		},
		TerminationMessagePolicy: corev1.TerminationMessageFallbackToLogsOnError,
	}
	if source.Spec.VolumeMode != nil && *source.Spec.VolumeMode == corev1.PersistentVolumeBlock {
		c.Args = append(c.Args, "--source-path="+sourceDevice)
		c.VolumeDevices = []corev1.VolumeDevice{{Name: "source", DevicePath: sourceDevice}}
	} else {
		c.Args = append(c.Args, "--source-path="+sourceMount)
		c.VolumeMounts = append(c.VolumeMounts, corev1.VolumeMount{Name: "source", MountPath: sourceMount, ReadOnly: true})
	}
	return corev1.PodSpec{
		ActiveDeadlineSeconds:         ptr.To(int64(cloneServeLimit / time.Second)),
		Containers:                    []corev1.Container{c},
		AutomountServiceAccountToken:  ptr.To(false),
		TerminationGracePeriodSeconds: ptr.To[int64](5),
		Volumes: []corev1.Volume{
			{Name: "source", VolumeSource: corev1.VolumeSource{PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: source.Name, ReadOnly: true}}},
			{Name: "tls", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: secret}}},
		},
	}
}

// podClaim is the PVC the clone source pod serves.
func podClaim(p *corev1.Pod) string {
	for _, v := range p.Spec.Volumes {
		if v.Name == "source" && v.PersistentVolumeClaim != nil {
			return v.PersistentVolumeClaim.ClaimName
		}
	}
	return ""
}

// podTrouble is why the pod's container is not running, if it says: a crash loop (no
// disk.img), an image that does not pull.
func podTrouble(p *corev1.Pod) string {
	for _, c := range p.Status.ContainerStatuses {
		if w := c.State.Waiting; w != nil && w.Reason != "" {
			trouble := ": " + w.Reason
			if t := c.LastTerminationState.Terminated; t != nil && t.Message != "" {
				trouble += ": " + t.Message
			}
			return trouble
		}
	}
	return ""
}

// certFor says whether the PEM certificate names ip.
func certFor(certPEM []byte, ip net.IP) bool {
	block, _ := pem.Decode(certPEM)
	if block == nil {
		return false
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	return err == nil && cert.VerifyHostname(ip.String()) == nil
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// SweepCloneSources deletes the source side of every clone whose DataVolume no longer wants
// it: gone, finished, being deleted, or without the finalizer and annotation that name this
// namespace. The finalizer and the annotation live on an object the DataVolume's author can
// edit, so they cannot be the only way a source side ends.
func (r *Reconciler) SweepCloneSources(ctx context.Context) error {
	pods := &corev1.PodList{}
	if err := r.APIReader.List(ctx, pods, client.HasLabels{CloneForLabel}); err != nil {
		return fmt.Errorf("list clone source pods: %w", err)
	}
	var errs []error
	for i := range pods.Items {
		p := &pods.Items[i]
		wanted, err := r.cloneSourceWanted(ctx, p)
		if err == nil && !wanted {
			log.FromContext(ctx).Info("sweeping a clone source no DataVolume wants", "namespace", p.Namespace, "name", p.Name, "for", p.Annotations[CloneForAnnotation])
			err = deleteCloneObjects(ctx, r.Client, p.Namespace, p.Name)
		}
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func (r *Reconciler) cloneSourceWanted(ctx context.Context, p *corev1.Pod) (bool, error) {
	ns, name, ok := strings.Cut(p.Annotations[CloneForAnnotation], "/")
	if !ok {
		return false, nil
	}
	dv := &vmpodv1.DataVolume{}
	err := r.APIReader.Get(ctx, client.ObjectKey{Namespace: ns, Name: name}, dv)
	switch {
	case apierrors.IsNotFound(err):
		return false, nil
	case err != nil:
		return true, fmt.Errorf("get DataVolume %s/%s: %w", ns, name, err)
	}
	return string(dv.UID) == p.Labels[CloneForLabel] && p.Name == CloneSourceName(dv) &&
		dv.DeletionTimestamp == nil && dv.Status.Phase != vmpodv1.PhaseSucceeded && dv.Status.Phase != vmpodv1.PhaseFailed &&
		controllerutil.ContainsFinalizer(dv, cloneFinalizer) && dv.Annotations[cloneNamespaceAnnotation] == p.Namespace, nil
}
