package vm_test

import (
	"errors"
	"fmt"
	"maps"
	"math"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/retry"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/vmpod/vmpod/api/annotations"
	"github.com/vmpod/vmpod/api/vmspec"
	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
	"github.com/vmpod/vmpod/controller/internal/migration"
	"github.com/vmpod/vmpod/controller/internal/testenv"
)

// containerPod is a running container pod of the vmpod RuntimeClass on node, owned by a
// ReplicaSet (no controller acts on it here: the ownership is what the migration hands
// over), with two containers, a liveness and a readiness probe, an emptyDir and a
// configMap.
func (f *fixture) containerPod(name, node string, change func(*corev1.Pod)) *corev1.Pod {
	f.t.Helper()
	rs := &appsv1.ReplicaSet{ObjectMeta: metav1.ObjectMeta{Name: name + "-rs", Namespace: f.ns},
		Spec: appsv1.ReplicaSetSpec{Replicas: ptr.To[int32](1), Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": name}},
			Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{"app": name}},
				Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "busybox"}}}}}}
	f.create(rs)
	probe := func(delay int32) *corev1.Probe {
		return &corev1.Probe{InitialDelaySeconds: delay, ProbeHandler: corev1.ProbeHandler{Exec: &corev1.ExecAction{Command: []string{"true"}}}}
	}
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: f.ns, Labels: map[string]string{"app": name, "tier": "web"},
			Annotations:     map[string]string{"example.com/note": "kept"},
			OwnerReferences: []metav1.OwnerReference{*metav1.NewControllerRef(rs, appsv1.SchemeGroupVersion.WithKind("ReplicaSet"))}},
		Spec: corev1.PodSpec{
			RuntimeClassName: ptr.To("vmpod"),
			Containers: []corev1.Container{
				{Name: "app", Image: "busybox", LivenessProbe: probe(5), ReadinessProbe: probe(1),
					Resources: corev1.ResourceRequirements{Limits: corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("1536Mi")}}},
				{Name: "side", Image: "busybox"},
			},
			Volumes: []corev1.Volume{
				{Name: "scratch", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}},
				{Name: "conf", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: "conf"}}}},
			},
		},
	}
	if change != nil {
		change(p)
	}
	f.create(p)
	f.bind(p, node)
	f.containersRun(p)
	return p
}

// containersRun has "the kubelet" report every container of the pod running.
func (f *fixture) containersRun(p *corev1.Pod) {
	f.t.Helper()
	f.setContainers(p, func(c corev1.Container, now metav1.Time) corev1.ContainerState {
		return corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}}
	})
}

// setContainers reports the pod running with its containers in the states state gives.
func (f *fixture) setContainers(p *corev1.Pod, state func(corev1.Container, metav1.Time) corev1.ContainerState) {
	f.t.Helper()
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		if err := f.c.Get(f.ctx, types.NamespacedName{Namespace: p.Namespace, Name: p.Name}, p); err != nil {
			return err
		}
		now := metav1.Now()
		p.Status.Phase, p.Status.StartTime = corev1.PodRunning, &now
		p.Status.ContainerStatuses = nil
		for _, c := range p.Spec.Containers {
			p.Status.ContainerStatuses = append(p.Status.ContainerStatuses, corev1.ContainerStatus{Name: c.Name, Image: c.Image, ImageID: "sha256:x",
				State: state(c, now), Started: ptr.To(true), Resources: c.Resources.DeepCopy()})
		}
		return f.c.Status().Update(f.ctx, p)
	})
	if err != nil {
		f.t.Fatalf("report pod %s's containers: %v", p.Name, err)
	}
}

func (f *fixture) podMigration(name, pod string) {
	f.t.Helper()
	f.create(&vmpodv1.VirtualMachineMigration{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: f.ns}, Spec: vmpodv1.VirtualMachineMigrationSpec{PodName: pod}})
}

// A container pod moves (docs/design/212): its target is the source's spec without its
// labels and owners, kept off its node, annotated for the target's shim, liveness probes
// held off; the accept waits for every target container; the execs go to the pods' first
// container; then the target takes the source's labels and owner, the source is ranked
// first for deletion and deleted. A failing migration takes the target away and leaves
// the source as it was; pods that cannot move are refused up front, by name.
func TestContainerPodMigration(t *testing.T) {
	f, shims := migrationFixture(t, 5*time.Second)
	shims.container = "app"
	source := f.containerPod("web", "node-a", nil)

	f.podMigration("move", "web")
	m := f.waitPhase("move", vmpodv1.MigrationScheduling)
	if m.Status.SourcePod != "web" || m.Status.SourceNode != "node-a" || m.Status.TargetPod != migration.TargetPodName("web", m.UID) {
		t.Fatalf("status %+v", m.Status)
	}
	target, err := f.getPod(m.Status.TargetPod)
	if err != nil {
		t.Fatal(err)
	}
	if want := map[string]string{migration.Label: "move"}; !maps.Equal(target.Labels, want) || len(target.OwnerReferences) != 0 {
		t.Errorf("the waiting target's labels %v and owners %v: want only %v, no owner (no Service or ReplicaSet may count it yet)", target.Labels, target.OwnerReferences, want)
	}
	if target.Annotations[annotations.MigrationTarget] != string(source.UID) || target.Annotations["example.com/note"] != "kept" {
		t.Errorf("the target's annotations %v: want %s = the source's UID %s and the source's own", target.Annotations, annotations.MigrationTarget, source.UID)
	}
	if _, err := annotations.Parse(target.Annotations, annotations.Known()); err != nil {
		t.Errorf("the target pod's annotations would be refused by the shim: %v", err)
	}
	terms := target.Spec.Affinity.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution.NodeSelectorTerms
	if !strings.Contains(fmt.Sprint(terms), "node-a") || !strings.Contains(fmt.Sprint(terms), "NotIn") {
		t.Errorf("the target pod's node affinity %+v: want it kept off node-a", terms)
	}
	// 5 s of target wait + 800 s per GiB of 1.5 GiB (2, rounded up)
	app := target.Spec.Containers[0]
	if hold := int32(5 + 2*vmspec.DefaultMigrationCompletionPerGiB); app.LivenessProbe.InitialDelaySeconds != hold || app.ReadinessProbe.InitialDelaySeconds != 1 {
		t.Errorf("the target's liveness probe waits %d s, readiness %d s: want %d (past the migration) and 1 (as the source's)",
			app.LivenessProbe.InitialDelaySeconds, app.ReadinessProbe.InitialDelaySeconds, hold)
	}
	spec := source.Spec.DeepCopy()
	spec.NodeName, spec.Affinity, spec.Containers[0].LivenessProbe = "", target.Spec.Affinity, target.Spec.Containers[0].LivenessProbe
	if !equality.Semantic.DeepEqual(spec.Containers, target.Spec.Containers) || !equality.Semantic.DeepEqual(spec.Volumes, target.Spec.Volumes) {
		t.Errorf("the target's containers or volumes differ from the source's beyond the probe")
	}

	// the target's first container runs, its second does not yet: no accept
	f.bind(target, "node-b")
	f.setContainers(target, func(c corev1.Container, now metav1.Time) corev1.ContainerState {
		if c.Name == "app" {
			return corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}}
		}
		return corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "ContainerCreating"}}
	})
	time.Sleep(3 * time.Second)
	if got := shims.ran(); len(got) != 0 || f.getMigration("move").Status.Phase != vmpodv1.MigrationScheduling {
		t.Fatalf("with one target container waiting: execs %v, phase %s; want none, Scheduling", got, f.getMigration("move").Status.Phase)
	}
	// the guest moves while the source is still ready and the target not yet: a
	// ReplicaSet would delete the not-ready pod first, whatever its cost, so the hand-over
	// waits for the target to be ready
	f.setReady(source, true)
	f.containersRun(target)
	testenv.Eventually(t, timeout, "the guest to have moved", func() (bool, string) {
		got := shims.ran()
		return len(got) == 2, fmt.Sprint(got)
	})
	time.Sleep(4 * time.Second)
	if p, _ := f.getPod(target.Name); p.Labels[migration.Label] != "move" || f.gone("web") || f.getMigration("move").Status.Phase != vmpodv1.MigrationRunning {
		t.Errorf("with the target not ready and the source ready: target labels %v, source gone %v, phase %s; want the hand-over to wait",
			p.Labels, f.gone("web"), f.getMigration("move").Status.Phase)
	}
	f.setReady(target, true)
	m = f.waitPhase("move", vmpodv1.MigrationSucceeded)
	if m.Status.TargetNode != "node-b" || m.Status.DowntimeMs != 23 {
		t.Errorf("status of the migration that succeeded: %+v", m.Status)
	}
	if got := shims.ran(); len(got) != 2 || got[0] != target.Name+":"+vmspec.MigrateAcceptCommand || got[1] != "web:"+vmspec.MigrateCommand {
		t.Errorf("execs %v: want accept in the target, migrate in the source", got)
	}
	if o := shims.options(); len(o) != 1 || o[0].AllowPostCopy {
		t.Errorf("migrate options %+v: want one, without post-copy", o)
	}
	target, _ = f.getPod(target.Name)
	if !maps.Equal(target.Labels, source.Labels) || !equality.Semantic.DeepEqual(target.OwnerReferences, source.OwnerReferences) {
		t.Errorf("after the migration the target's labels %v, owners %v: want the source's %v, %v", target.Labels, target.OwnerReferences, source.Labels, source.OwnerReferences)
	}
	if a, ok := target.Annotations[annotations.MigrationTarget]; ok {
		t.Errorf("the pod the guest moved into keeps %s=%s: a sandbox made again for it would wait for a guest", annotations.MigrationTarget, a)
	}
	// (no kubelet here: the deleted source stays, terminating)
	if s, err := f.getPod("web"); err != nil || s.DeletionTimestamp == nil || s.Annotations[migration.DeletionCostAnnotation] != strconv.Itoa(math.MinInt32) {
		t.Errorf("the source after the migration: %v, annotations %v: want it deleted, ranked first for deletion", err, s.Annotations)
	}
	f.waitEventOn(target.Name, "Migrated")

	// the moved pod moves on, back to node-a: the rule that kept it off node-a goes
	f.podMigration("back", target.Name)
	m = f.waitPhase("back", vmpodv1.MigrationScheduling)
	back, _ := f.getPod(m.Status.TargetPod)
	if terms := fmt.Sprint(back.Spec.Affinity.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution.NodeSelectorTerms); strings.Contains(terms, "node-a") || !strings.Contains(terms, "node-b") {
		t.Errorf("the second hop's node affinity %s: want it kept off node-b only", terms)
	}
	if strings.Count(back.Name, "-mig-") != 1 || back.Labels[migration.Label] != "back" || len(back.Labels) != 1 {
		t.Errorf("the second hop's target %s, labels %v", back.Name, back.Labels)
	}

	// the source's shim fails it: the target goes, the source stays as it was
	shims.mu.Lock()
	shims.outcome = func(string) error {
		return errors.New("vmpod.dev/migrate: the target refused the shape: container side: missing")
	}
	shims.mu.Unlock()
	f.bind(back, "node-a")
	f.containersRun(back)
	failed := f.waitPhase("back", vmpodv1.MigrationFailed)
	if !strings.Contains(failed.Status.FailureReason, "refused the shape") {
		t.Errorf("failure reason %q", failed.Status.FailureReason)
	}
	testenv.Eventually(t, timeout, "the failed migration's target to go", func() (bool, string) { return f.gone(back.Name), "" })
	if p, _ := f.getPod(target.Name); p.DeletionTimestamp != nil || p.Annotations[migration.DeletionCostAnnotation] != "" || !maps.Equal(p.Labels, source.Labels) {
		t.Errorf("the source of the failed migration: deleted %v, annotations %v, labels %v: want it untouched", p.DeletionTimestamp, p.Annotations, p.Labels)
	}
	shims.mu.Lock()
	shims.outcome = nil
	shims.mu.Unlock()

	// a target whose container ended before the accept (a placeholder refusing): Failed
	f.podMigration("ended", target.Name)
	m = f.waitPhase("ended", vmpodv1.MigrationScheduling)
	ended, _ := f.getPod(m.Status.TargetPod)
	f.bind(ended, "node-c")
	f.setContainers(ended, func(c corev1.Container, now metav1.Time) corev1.ContainerState {
		return corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: 1, Reason: "Error", Message: "MigrationFailed: the guest did not come"}}
	})
	if r := f.waitPhase("ended", vmpodv1.MigrationFailed).Status.FailureReason; !strings.Contains(r, "container app terminated") || !strings.Contains(r, "MigrationFailed: the guest did not come") {
		t.Errorf("a target whose container ended: failure reason %q", r)
	}

	// refused up front, by name
	vmPod := func(p *corev1.Pod) { p.Labels["vmpod.dev/vm-name"] = "some-vm" }
	f.containerPod("with-init", "node-a", func(p *corev1.Pod) { p.Spec.InitContainers = []corev1.Container{{Name: "init", Image: "busybox"}} })
	f.containerPod("with-claim", "node-a", func(p *corev1.Pod) {
		p.Spec.Volumes = append(p.Spec.Volumes, corev1.Volume{Name: "data", VolumeSource: corev1.VolumeSource{
			PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: "data"}}})
	})
	f.containerPod("with-stdin", "node-a", func(p *corev1.Pod) { p.Spec.Containers[1].Stdin = true })
	f.containerPod("of-a-vm", "node-a", vmPod)
	f.containerPod("no-class", "node-a", func(p *corev1.Pod) { p.Spec.RuntimeClassName = nil })
	f.containerPod("stateful", "node-a", func(p *corev1.Pod) { p.OwnerReferences[0].Kind = "StatefulSet" })
	// (before its migration gives up on it, 5 s on)
	f.podMigration("waiting", target.Name)
	waiting := f.waitPhase("waiting", vmpodv1.MigrationScheduling).Status.TargetPod
	f.podMigration("r-target", waiting)
	if r := f.waitPhase("r-target", vmpodv1.MigrationFailed).Status.FailureReason; !strings.Contains(r, "is the target of migration waiting") {
		t.Errorf("migration of the waiting target %s: failure reason %q", waiting, r)
	}
	for name, c := range map[string]struct{ pod, want string }{
		"r-absent":   {"absent", "spec.podName: pod absent not found"},
		"r-init":     {"with-init", "spec.initContainers"},
		"r-claim":    {"with-claim", "volume data: only emptyDir"},
		"r-stdin":    {"with-stdin", "container side: stdin"},
		"r-vm":       {"of-a-vm", "migrate the VM (spec.vmName)"},
		"r-class":    {"no-class", "no runtimeClassName"},
		"r-stateful": {"stateful", "StatefulSet"},
	} {
		f.podMigration(name, c.pod)
		if r := f.waitPhase(name, vmpodv1.MigrationFailed).Status.FailureReason; !strings.Contains(r, c.want) {
			t.Errorf("migration of pod %s: failure reason %q, want %q in it", c.pod, r, c.want)
		}
	}
}

// setReady has "the kubelet" report the pod's Ready condition.
func (f *fixture) setReady(p *corev1.Pod, ready bool) {
	f.t.Helper()
	status := corev1.ConditionFalse
	if ready {
		status = corev1.ConditionTrue
	}
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		if err := f.c.Get(f.ctx, types.NamespacedName{Namespace: p.Namespace, Name: p.Name}, p); err != nil {
			return err
		}
		p.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: status, LastTransitionTime: metav1.Now()}}
		return f.c.Status().Update(f.ctx, p)
	})
	if err != nil {
		f.t.Fatalf("report pod %s ready %v: %v", p.Name, ready, err)
	}
}

// waitEventOn waits for an event of the reason about the pod.
func (f *fixture) waitEventOn(pod, reason string) {
	f.t.Helper()
	testenv.Eventually(f.t, timeout, "event "+reason+" on pod "+pod, func() (bool, string) {
		list := &eventsv1.EventList{}
		if err := f.c.List(f.ctx, list, client.InNamespace(f.ns)); err != nil {
			return false, err.Error()
		}
		var seen []string
		for _, e := range list.Items {
			if e.Regarding.Name == pod && e.Regarding.Kind == "Pod" {
				seen = append(seen, e.Reason)
				if e.Reason == reason {
					return true, ""
				}
			}
		}
		return false, fmt.Sprint(seen)
	})
}
