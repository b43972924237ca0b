package datavolume_test

import (
	"context"
	"fmt"
	"maps"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/retry"
	"sigs.k8s.io/controller-runtime/pkg/client"

	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
	"github.com/vmpod/vmpod/controller/internal/datavolume"
	"github.com/vmpod/vmpod/controller/internal/testenv"
	"github.com/vmpod/vmpod/controller/manager"
)

// TestCloneAcrossNamespaces: a DataVolume cloning another namespace's golden image through
// a DataSource there, with the manager running under vmpod-controller's own ClusterRole.
// Until the source namespace grants the clone (a RoleBinding of vmpod-datavolume-cloner to
// the DataVolume's namespace's default ServiceAccount) it waits, saying how to grant it, and
// makes nothing; then the source namespace gets the server (Service, Secret, Pod), and once
// that pod is ready the clone's Job pulls from it over TLS with the token, as a raw disk.
// When the clone completes, or a DataVolume is deleted mid-clone, the source side goes.
// (The transfer itself is the importer's TestCloneServer and the cluster e2e's.)
func TestCloneAcrossNamespaces(t *testing.T) {
	env := testenv.Get(t)
	ctx := context.Background()
	golden, ns := env.Namespace(t), env.Namespace(t)
	for _, file := range []string{"role.yaml", "datavolume_cloner_role.yaml"} {
		if err := env.ApplyFile(ctx, filepath.Join(env.Root, "config", "rbac", file)); err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatal(err)
		}
	}
	create := func(o client.Object) {
		t.Helper()
		if err := env.Client.Create(ctx, o); err != nil {
			t.Fatalf("create %T %s: %v", o, o.GetName(), err)
		}
	}
	create(&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "controller"}})
	binding := &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "vmpod-controller-" + ns},
		RoleRef:  rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: "vmpod-controller"},
		Subjects: []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Namespace: ns, Name: "controller"}}}
	create(binding)
	t.Cleanup(func() { env.Client.Delete(ctx, binding) })
	env.StartManagerAs(t, env.ServiceAccountConfig(t, ns, "controller"), ns, func(o *manager.Options) { o.CloneSweepInterval = time.Second })
	f := &fixture{t: t, env: env, c: env.Client, ns: ns, ctx: ctx}

	size := corev1.ResourceList{"storage": resource.MustParse("64Mi")}
	create(&corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Namespace: golden, Name: "fedora-golden"},
		Spec: corev1.PersistentVolumeClaimSpec{AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			Resources: corev1.VolumeResourceRequirements{Requests: size}}})
	create(&vmpodv1.DataSource{ObjectMeta: metav1.ObjectMeta{Namespace: golden, Name: "fedora"},
		Spec: vmpodv1.DataSourceSpec{Source: vmpodv1.DataSourceSource{PVC: vmpodv1.DataSourcePVC{Name: "fedora-golden"}}}})
	clone := func(name string) *vmpodv1.DataVolume {
		dv := &vmpodv1.DataVolume{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
			Spec: vmpodv1.DataVolumeSpec{SourceRef: &vmpodv1.DataVolumeSourceRef{Kind: vmpodv1.DataSourceKind, Name: "fedora", Namespace: golden},
				Storage: vmpodv1.StorageSpec{Resources: corev1.VolumeResourceRequirements{Requests: size}}}}
		create(dv)
		return dv
	}
	waitReason := func(name, reason, msg string) {
		t.Helper()
		testenv.Eventually(t, timeout, fmt.Sprintf("DataVolume %s: %s", name, reason), func() (bool, string) {
			d := f.dv(name)
			c := meta.FindStatusCondition(d.Status.Conditions, vmpodv1.DVRunning)
			return c != nil && c.Reason == reason && strings.Contains(c.Message, msg), describe(d)
		})
	}
	// sourceSide reads dv's Service, Secret and Pod in the golden namespace, and how many exist
	sourceSide := func(dv *vmpodv1.DataVolume) (svc *corev1.Service, secret *corev1.Secret, pod *corev1.Pod, found int) {
		key := types.NamespacedName{Namespace: golden, Name: datavolume.CloneSourceName(dv)}
		svc, secret, pod = &corev1.Service{}, &corev1.Secret{}, &corev1.Pod{}
		for _, o := range []client.Object{svc, secret, pod} {
			err := env.Client.Get(ctx, key, o)
			switch {
			case err == nil:
				found++
			case !apierrors.IsNotFound(err):
				t.Fatalf("get %T %s: %v", o, key, err)
			}
		}
		return
	}
	waitSourceSide := func(dv *vmpodv1.DataVolume, want int, what string) {
		t.Helper()
		testenv.Eventually(t, timeout, what, func() (bool, string) {
			_, _, _, found := sourceSide(dv)
			return found == want, fmt.Sprintf("%d of 3 source objects", found)
		})
	}
	markReady := func(pod *corev1.Pod) {
		t.Helper()
		pod.Status.Phase = corev1.PodRunning
		pod.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}
		if err := env.Client.Status().Update(ctx, pod); err != nil {
			t.Fatal(err)
		}
	}
	annotatePVC := func(name, phase string) {
		t.Helper()
		pvc := &corev1.PersistentVolumeClaim{}
		if err := f.get(name, pvc); err != nil {
			t.Fatal(err)
		}
		metav1.SetMetaDataAnnotation(&pvc.ObjectMeta, vmpodv1.ImportPhaseAnnotation, phase)
		if err := env.Client.Update(ctx, pvc); err != nil {
			t.Fatal(err)
		}
	}

	// not granted: waits, says how to grant it, makes nothing
	dv := clone("rootdisk")
	waitReason("rootdisk", "CloneNotAuthorized", "kubectl create rolebinding clone-to-"+ns+" -n "+golden+" --clusterrole=vmpod-datavolume-cloner --serviceaccount="+ns+":default")
	if err := f.get(dv.Name, &corev1.PersistentVolumeClaim{}); !apierrors.IsNotFound(err) {
		t.Errorf("an unauthorized clone made its PVC (%v)", err)
	}
	if _, _, _, found := sourceSide(dv); found != 0 {
		t.Errorf("an unauthorized clone made %d source objects", found)
	}
	// the same through a DataSource of the DataVolume's own namespace that names the golden
	// PVC: it is the PVC's namespace that must grant it
	create(&vmpodv1.DataSource{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "mine"},
		Spec: vmpodv1.DataSourceSpec{Source: vmpodv1.DataSourceSource{PVC: vmpodv1.DataSourcePVC{Name: "fedora-golden", Namespace: golden}}}})
	sneaky := &vmpodv1.DataVolume{ObjectMeta: metav1.ObjectMeta{Name: "sneaky", Namespace: ns},
		Spec: vmpodv1.DataVolumeSpec{SourceRef: &vmpodv1.DataVolumeSourceRef{Kind: vmpodv1.DataSourceKind, Name: "mine"},
			Storage: vmpodv1.StorageSpec{Resources: corev1.VolumeResourceRequirements{Requests: size}}}}
	create(sneaky)
	waitReason("sneaky", "CloneNotAuthorized", "may not clone from namespace "+golden)
	if _, _, _, found := sourceSide(sneaky); found != 0 {
		t.Errorf("a clone through the DataVolume's own DataSource made %d source objects", found)
	}
	if err := env.Client.Delete(ctx, sneaky); err != nil {
		t.Fatal(err)
	}

	// granted the way the message says: the source side appears, held by the finalizer
	create(&rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Namespace: golden, Name: "clone-to-" + ns},
		RoleRef:  rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: datavolume.ClonerClusterRole},
		Subjects: []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Namespace: ns, Name: "default"}}})
	waitReason("rootdisk", "CloneSourceStarting", "to serve PVC fedora-golden")
	dv = f.dv(dv.Name)
	svc, secret, pod, found := sourceSide(dv)
	if found != 3 {
		t.Fatalf("the source side: %d of 3 objects", found)
	}
	if !slices.Contains(f.dv(dv.Name).Finalizers, "vmpod.dev/clone-source") {
		t.Errorf("finalizers %v lack vmpod.dev/clone-source", f.dv(dv.Name).Finalizers)
	}
	spec := pod.Spec
	if c := spec.Containers[0]; c.Args[0] != "serve" || !slices.Contains(c.Args, "--source-path=/vmpod/source") || c.Image != "vmpod-importer:test" {
		t.Errorf("source pod container %s %v", c.Image, c.Args)
	}
	if !hasReadOnlyClaim(spec.Volumes, "fedora-golden") || spec.AutomountServiceAccountToken == nil || *spec.AutomountServiceAccountToken {
		t.Errorf("source pod: volumes %+v, automount %v: want the golden PVC read-only and no API token", spec.Volumes, spec.AutomountServiceAccountToken)
	}
	if len(secret.Data[vmpodv1.CloneTokenKey]) < 32 || len(secret.Data[vmpodv1.CloneCertKey]) == 0 || len(secret.Data[vmpodv1.CloneKeyKey]) == 0 {
		t.Errorf("source Secret keys: %v", slices.Collect(maps.Keys(secret.Data)))
	}
	if err := f.get(datavolume.WorkerName(dv), &batchv1.Job{}); !apierrors.IsNotFound(err) {
		t.Errorf("the Job exists before the source pod is ready (%v)", err)
	}

	// the kubelet's part: the pod is ready
	markReady(pod)
	job := f.job(dv)
	c := job.Spec.Template.Spec.Containers[0]
	wantURL := fmt.Sprintf("--url=https://%s:%d%s", svc.Spec.ClusterIP, vmpodv1.ClonePort, vmpodv1.ClonePath)
	for _, want := range []string{"--source=http", wantURL, "--source-format=raw", "--ca-dir=/vmpod/ca", "--header-dir=/vmpod/headers"} {
		if !slices.Contains(c.Args, want) {
			t.Errorf("clone Job args %v lack %s", c.Args, want)
		}
	}
	for _, v := range job.Spec.Template.Spec.Volumes {
		if v.PersistentVolumeClaim != nil && v.PersistentVolumeClaim.ClaimName == "fedora-golden" {
			t.Errorf("the clone Job mounts the other namespace's PVC: %+v", v)
		}
	}
	target := &corev1.Secret{}
	if err := f.get(datavolume.WorkerName(dv), target); err != nil {
		t.Fatalf("the clone's credentials Secret: %v", err)
	}
	if string(target.Data["ca.crt"]) != string(secret.Data[vmpodv1.CloneCertKey]) ||
		string(target.Data["authorization"]) != "Authorization: Bearer "+string(secret.Data[vmpodv1.CloneTokenKey]) {
		t.Errorf("the clone's credentials do not match the server's")
	}

	// the importer's report completes it; the source side goes, and the finalizer
	annotatePVC(dv.Name, string(vmpodv1.PhaseSucceeded))
	f.waitPhase(dv.Name, vmpodv1.PhaseSucceeded)
	waitSourceSide(dv, 0, "the completed clone's source side deleted")
	if fin := f.dv(dv.Name).Finalizers; len(fin) != 0 {
		t.Errorf("the completed clone keeps finalizers %v", fin)
	}

	// a clone by a direct pvc source whose import fails: the source side goes too
	direct := func(name string) *vmpodv1.DataVolume {
		d := &vmpodv1.DataVolume{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
			Spec: vmpodv1.DataVolumeSpec{Source: vmpodv1.DataVolumeSource{PVC: &vmpodv1.PVCSource{Namespace: golden, Name: "fedora-golden"}},
				Storage: vmpodv1.StorageSpec{Resources: corev1.VolumeResourceRequirements{Requests: size}}}}
		create(d)
		waitSourceSide(d, 3, "the source side of "+name)
		return d
	}
	broken := direct("broken")
	_, _, pod, _ = sourceSide(broken)
	markReady(pod)
	f.job(broken)
	annotatePVC(broken.Name, string(vmpodv1.PhaseFailed))
	f.waitPhase(broken.Name, vmpodv1.PhaseFailed)
	waitSourceSide(broken, 0, "the failed clone's source side deleted")

	// its author strips the finalizer and deletes it: the sweep takes the source side down
	stripped := direct("stripped")
	testenv.Eventually(t, timeout, "the finalizer on "+stripped.Name, func() (bool, string) {
		d := f.dv(stripped.Name)
		return len(d.Finalizers) == 1, fmt.Sprint(d.Finalizers)
	})
	// (the controller writes it too: its status, as the clone goes on)
	var d *vmpodv1.DataVolume
	if err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		d = f.dv(stripped.Name)
		d.Finalizers = nil
		return env.Client.Update(ctx, d)
	}); err != nil {
		t.Fatal(err)
	}
	if err := env.Client.Delete(ctx, d); err != nil {
		t.Fatal(err)
	}
	waitSourceSide(stripped, 0, "the stripped clone's source side swept")

	// deleted mid-clone: the source side goes with it
	gone := direct("abandoned")
	if err := env.Client.Delete(ctx, f.dv(gone.Name)); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, timeout, "the deleted clone gone", func() (bool, string) {
		err := f.get(gone.Name, &vmpodv1.DataVolume{})
		return apierrors.IsNotFound(err), fmt.Sprint(err)
	})
	waitSourceSide(gone, 0, "the deleted clone's source side deleted")

	// the grant withdrawn before the Job is made: the clone waits again, its source side gone
	revoked := direct("revoked")
	if err := env.Client.Delete(ctx, &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Namespace: golden, Name: "clone-to-" + ns}}); err != nil {
		t.Fatal(err)
	}
	waitReason(revoked.Name, "CloneNotAuthorized", "may not clone from namespace "+golden)
	waitSourceSide(revoked, 0, "the revoked clone's source side deleted")
}
