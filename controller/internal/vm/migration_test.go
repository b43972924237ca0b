package vm_test

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"

	"github.com/vmpod/vmpod/api/annotations"
	"github.com/vmpod/vmpod/api/vmspec"
	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
	"github.com/vmpod/vmpod/controller/internal/migration"
	"github.com/vmpod/vmpod/controller/internal/render"
	"github.com/vmpod/vmpod/controller/internal/testenv"
	"github.com/vmpod/vmpod/controller/internal/vm"
	"github.com/vmpod/vmpod/controller/manager"
)

// fakeShims stands in for the shims' migration execs (no kubelet here; the shims' side is
// integration/vmpod's TestVMPodLiveMigration). It checks what the controller hands each
// end: a target pod accepts, a source pod's migrate must name the address the target
// gave and carry the certificate pair that matches the target's. How a migrate ends is
// the test's: done, failed or held until cancelled.
type fakeShims struct {
	mu      sync.Mutex
	accepts map[string]vmspec.MigrationAccept // by target pod
	calls   []string
	outcome func(source string) error // nil: completed
	hold    chan struct{}             // non-nil: a migrate waits for a cancel
	// late: a cancel finds the switchover done (the guest moved): the migrate completes
	late bool
	// requests are the options the migrate requests carried, in order
	requests []vmspec.MigrationRequestOptions
	// container is where the execs must go ("": a VM pod's compute container)
	container string
}

func (s *fakeShims) options() []vmspec.MigrationRequestOptions {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]vmspec.MigrationRequestOptions(nil), s.requests...)
}

const fakeTargetAddress = "10.99.0.8:49152"

func (s *fakeShims) Stream(ctx context.Context, ns, pod, container string, cmd []string, stdin io.Reader, stdout io.Writer) error {
	var in []byte
	if stdin != nil {
		in, _ = io.ReadAll(stdin)
	}
	s.mu.Lock()
	s.calls = append(s.calls, pod+":"+strings.Join(cmd, " "))
	want := cmp.Or(s.container, vmspec.ComputeContainer)
	s.mu.Unlock()
	if container != want || len(cmd) != 1 {
		return fmt.Errorf("exec %v in container %s", cmd, container)
	}
	switch cmd[0] {
	case vmspec.MigrateAcceptCommand:
		a, err := vmspec.ParseMigrationAccept(in)
		if err != nil {
			return err
		}
		s.mu.Lock()
		if s.accepts == nil {
			s.accepts = map[string]vmspec.MigrationAccept{}
		}
		s.accepts[pod] = a
		s.mu.Unlock()
		b, _ := json.Marshal(vmspec.MigrationListening{Address: fakeTargetAddress})
		_, err = stdout.Write(b)
		return err
	case vmspec.MigrateCommand:
		r, err := vmspec.ParseMigrationRequest(in)
		if err != nil {
			return err
		}
		if r.Target != fakeTargetAddress {
			return fmt.Errorf("migrate to %s, the target said %s", r.Target, fakeTargetAddress)
		}
		s.mu.Lock()
		s.requests = append(s.requests, r.Options)
		paired, readied := false, false
		for _, a := range s.accepts {
			if a.TLS.PeerCert == r.TLS.Cert && r.TLS.PeerCert == a.TLS.Cert {
				paired, readied = true, a.PostCopy == r.Options.AllowPostCopy
			}
		}
		outcome, hold := s.outcome, s.hold
		s.mu.Unlock()
		if !paired {
			return errors.New("the source's credentials do not pair with any target's")
		}
		if !readied {
			return errors.New("the source may switch to post-copy and its target was not readied for it, or the other way round")
		}
		line := func(p vmspec.MigrationProgress) { b, _ := json.Marshal(p); _, _ = stdout.Write(append(b, '\n')) }
		line(vmspec.MigrationProgress{Status: "active", TotalBytes: 512 << 20, TransferredBytes: 100 << 20, RemainingBytes: 400 << 20})
		if hold != nil {
			select {
			case <-hold:
				s.mu.Lock()
				late := s.late
				s.mu.Unlock()
				if !late {
					return errors.New("vmpod.dev/migrate: migration cancelled")
				}
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		if outcome != nil {
			if err := outcome(pod); err != nil {
				return err
			}
		}
		line(vmspec.MigrationProgress{Status: "completed", TotalBytes: 512 << 20, TransferredBytes: 210 << 20, DowntimeMs: 23})
		return nil
	case vmspec.MigrateCancelCommand:
		s.mu.Lock()
		answer := vmspec.MigrationCancelled{WasInFlight: s.hold != nil, GuestMoved: s.late}
		if answer.GuestMoved {
			answer.MovedTo = fakeTargetAddress
		}
		if s.hold != nil {
			close(s.hold)
			s.hold = nil
		}
		s.mu.Unlock()
		b, _ := json.Marshal(answer)
		_, err := stdout.Write(b)
		return err
	case vmspec.UnpauseCommand:
		_, err := io.WriteString(stdout, "running\n")
		return err
	}
	return fmt.Errorf("unexpected exec %v", cmd)
}

func (s *fakeShims) ran() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.calls...)
}

// migrationFixture starts the controllers in a namespace of their own with the shims'
// migration execs faked (they succeed unless told otherwise) and a target that does not
// run failing its migration after targetWait.
func migrationFixture(t *testing.T, targetWait time.Duration) (*fixture, *fakeShims) {
	env := testenv.Get(t)
	ns := env.Namespace(t)
	shims := &fakeShims{}
	env.StartManager(t, ns, func(o *manager.Options) {
		o.Backoff, o.MigrationExec, o.MigrationTargetWait = fast, shims, targetWait
	})
	return &fixture{t: t, env: env, c: env.Client, ns: ns, ctx: context.Background()}, shims
}

// migratable is a VM a migration can move: its disk on a PVC, behind masquerade.
func (f *fixture) migratable(name string) *vmpodv1.VirtualMachine {
	return f.vmOnClaim(name, corev1.ReadWriteMany)
}

// vmOnClaim is a VM whose disk is on a PVC of the access mode, behind masquerade.
func (f *fixture) vmOnClaim(name string, mode corev1.PersistentVolumeAccessMode) *vmpodv1.VirtualMachine {
	f.t.Helper()
	pvc := &corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Name: name + "-root", Namespace: f.ns},
		Spec: corev1.PersistentVolumeClaimSpec{AccessModes: []corev1.PersistentVolumeAccessMode{mode},
			Resources: corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{"storage": resource.MustParse("1Gi")}}}}
	f.create(pvc)
	vm := f.cirros(name, vmpodv1.RunStrategyAlways)
	spec := &vm.Spec.Template.Spec
	spec.Domain.Devices.Disks = spec.Domain.Devices.Disks[:1]
	spec.Domain.Devices.Disks[0].Name = "root"
	spec.Volumes = []vmpodv1.Volume{{Name: "root", VolumeSource: vmpodv1.VolumeSource{PersistentVolumeClaim: &vmpodv1.PersistentVolumeClaimVolumeSource{
		PersistentVolumeClaimVolumeSource: corev1.PersistentVolumeClaimVolumeSource{ClaimName: pvc.Name}}}}}
	spec.Domain.Devices.Interfaces = []vmpodv1.Interface{{Name: "default", Masquerade: &vmpodv1.InterfaceMasquerade{}}}
	spec.Networks = []vmpodv1.Network{{Name: "default", Pod: &vmpodv1.PodNetwork{}}}
	return vm
}

func (f *fixture) migration(name, vmName string) *vmpodv1.VirtualMachineMigration {
	f.t.Helper()
	m := &vmpodv1.VirtualMachineMigration{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: f.ns}, Spec: vmpodv1.VirtualMachineMigrationSpec{VMName: vmName}}
	f.create(m)
	return m
}

// startTarget waits for the migration's target pod and has "the kubelet" of node run it;
// the migration then goes on to its execs.
func (f *fixture) startTarget(name, node string) *corev1.Pod {
	f.t.Helper()
	m := f.waitPhase(name, vmpodv1.MigrationScheduling)
	p, err := f.getPod(m.Status.TargetPod)
	if err != nil {
		f.t.Fatalf("the target pod of migration %s: %v", name, err)
	}
	f.bind(p, node)
	f.kubeletRuns(p)
	return p
}

func (f *fixture) getMigration(name string) *vmpodv1.VirtualMachineMigration {
	f.t.Helper()
	m := &vmpodv1.VirtualMachineMigration{}
	if err := f.c.Get(f.ctx, types.NamespacedName{Namespace: f.ns, Name: name}, m); err != nil {
		f.t.Fatalf("get migration %s: %v", name, err)
	}
	return m
}

func (f *fixture) waitPhase(name string, phase vmpodv1.MigrationPhase) *vmpodv1.VirtualMachineMigration {
	f.t.Helper()
	var m *vmpodv1.VirtualMachineMigration
	testenv.Eventually(f.t, timeout, fmt.Sprintf("migration %s %s", name, phase), func() (bool, string) {
		m = f.getMigration(name)
		return m.Status.Phase == phase, fmt.Sprintf("%+v", m.Status)
	})
	return m
}

func (f *fixture) getPod(name string) (*corev1.Pod, error) {
	p := &corev1.Pod{}
	return p, f.c.Get(f.ctx, types.NamespacedName{Namespace: f.ns, Name: name}, p)
}

// gone says whether the pod is deleted or being deleted (no kubelet here to finish it).
func (f *fixture) gone(name string) bool {
	p, err := f.getPod(name)
	return apierrors.IsNotFound(err) || (err == nil && p.DeletionTimestamp != nil)
}

// A VirtualMachine's guest moves to a target pod on another node: the target is the source
// pod again with the target role, kept off the source's node; the shims are asked in
// order with credentials that pair; the target becomes the VM's pod, the source goes, and
// the VM controller does not start another. A failing migration and a cancelled one leave
// the VM where it was and take their target pods away; migrations that cannot be are
// refused up front with the reason.
func TestVirtualMachineMigration(t *testing.T) {
	f, shims := migrationFixture(t, 5*time.Second)
	ns := f.ns
	f.create(f.migratable("mv"))
	source := f.waitPod("mv", "")
	f.bind(source, "node-a")
	f.kubeletRuns(source)
	f.waitStatus("mv", vmpodv1.StatusRunning)

	f.migration("first", "mv")
	m := f.waitPhase("first", vmpodv1.MigrationScheduling)
	if m.Status.SourcePod != source.Name || m.Status.SourceNode != "node-a" || m.Status.TargetPod == "" {
		t.Fatalf("status %+v", m.Status)
	}
	if m.Status.TargetPod != migration.TargetPodName(source.Name, m.UID) {
		t.Errorf("target pod %s, want %s", m.Status.TargetPod, migration.TargetPodName(source.Name, m.UID))
	}
	target, err := f.getPod(m.Status.TargetPod)
	if err != nil {
		t.Fatal(err)
	}
	spec, err := vmspec.Parse([]byte(target.Annotations[vmspec.Annotation]))
	if err != nil || spec.Migration == nil || spec.Migration.Role != vmspec.RoleTarget {
		t.Errorf("the target pod's VM spec: %+v, %v; want the target role", spec, err)
	}
	if src, _ := vmspec.Parse([]byte(source.Annotations[vmspec.Annotation])); src != nil && spec != nil {
		spec.Migration = nil
		a, _ := spec.Encode()
		b, _ := src.Encode()
		if !bytes.Equal(a, b) {
			t.Errorf("the target's VM spec differs from the source's beyond the role:\n%s\n%s", a, b)
		}
	}
	terms := target.Spec.Affinity.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution.NodeSelectorTerms
	if len(terms) == 0 || !strings.Contains(fmt.Sprint(terms), "node-a") || !strings.Contains(fmt.Sprint(terms), "NotIn") {
		t.Errorf("the target pod's node affinity %+v: want it kept off node-a", terms)
	}
	// the node takes the pod: every vmpod.dev/ annotation is one it knows (it refuses others)
	if _, err := annotations.Parse(target.Annotations, annotations.Known()); err != nil {
		t.Errorf("the target pod's annotations would be refused by the shim: %v", err)
	}
	if !metav1.IsControlledBy(target, f.vm("mv")) || target.Labels[migration.Label] != "first" {
		t.Errorf("the target pod's owner %v, labels %v", target.OwnerReferences, target.Labels)
	}
	f.bind(target, "node-b")
	f.kubeletRuns(target)
	m = f.waitPhase("first", vmpodv1.MigrationSucceeded)
	if m.Status.TargetNode != "node-b" || m.Status.DowntimeMs != 23 || m.Status.TransferredBytes != 210<<20 || m.Status.EndTimestamp == nil {
		t.Errorf("status of the migration that succeeded: %+v", m.Status)
	}
	if got := shims.ran(); len(got) != 3 || got[0] != target.Name+":"+vmspec.MigrateAcceptCommand || got[1] != source.Name+":"+vmspec.MigrateCommand ||
		got[2] != target.Name+":"+vmspec.UnpauseCommand {
		t.Errorf("execs %v: want accept in the target, migrate in the source, unpause in the target (a lost commit's guest)", got)
	}
	testenv.Eventually(t, timeout, "the target to be the VM's pod and the source gone", func() (bool, string) {
		v := f.vm("mv")
		return v.Status.PodName == target.Name && v.Status.NodeName == "node-b" && f.gone(source.Name), fmt.Sprintf("%+v", v.Status)
	})
	f.waitEvent("mv", "Migrated")
	if len(f.getMigration("first").Finalizers) != 0 {
		t.Error("a finished migration keeps its finalizer")
	}
	// the VM stays with its new pod: no other pod is started for it
	time.Sleep(2 * time.Second)
	if v := f.vm("mv"); v.Status.PodName != target.Name || v.Status.PrintableStatus != vmpodv1.StatusRunning {
		t.Errorf("after the migration the VM's pod is %s (%s), want %s running", v.Status.PodName, v.Status.PrintableStatus, target.Name)
	}
	if _, err := f.getPod(render.PodName("mv")); err == nil && !f.gone(render.PodName("mv")) {
		t.Error("the VM controller started a pod of the VM's own name beside the migrated one")
	}

	// the source's shim fails the migration: the guest stays, the target pod goes
	shims.mu.Lock()
	shims.outcome = func(string) error {
		return errors.New("vmpod.dev/migrate: migrate: failed: Unable to write to socket: Broken pipe")
	}
	shims.mu.Unlock()
	f.migration("second", "mv")
	t2 := f.startTarget("second", "node-c")
	m = f.waitPhase("second", vmpodv1.MigrationFailed)
	if !strings.Contains(m.Status.FailureReason, "Broken pipe") {
		t.Errorf("failure reason %q", m.Status.FailureReason)
	}
	testenv.Eventually(t, timeout, "the failed migration's target pod to go", func() (bool, string) { return f.gone(t2.Name), "" })
	if v := f.vm("mv"); v.Status.PodName != target.Name {
		t.Errorf("after a failed migration the VM's pod is %s, want %s", v.Status.PodName, target.Name)
	}

	// deleted while it runs: the source's shim is told to cancel, the target goes
	shims.mu.Lock()
	shims.outcome, shims.hold = nil, make(chan struct{})
	shims.mu.Unlock()
	f.migration("third", "mv")
	t3 := f.startTarget("third", "node-c")
	// the VM's pod arrived from node-a: its own target may go back there, not stay on node-b
	if terms := t3.Spec.Affinity.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution.NodeSelectorTerms; len(terms) != 1 ||
		fmt.Sprint(terms[0].MatchExpressions) != fmt.Sprint([]corev1.NodeSelectorRequirement{{Key: corev1.LabelHostname, Operator: corev1.NodeSelectorOpNotIn, Values: []string{"node-b"}}}) {
		t.Errorf("the second hop's target affinity %+v: want only NotIn node-b", terms)
	}
	f.waitPhase("third", vmpodv1.MigrationRunning)
	// a second migration of the VM meanwhile is refused
	f.migration("fourth", "mv")
	if m := f.waitPhase("fourth", vmpodv1.MigrationFailed); !strings.Contains(m.Status.FailureReason, "migration third of this VM runs") {
		t.Errorf("a concurrent migration: %q", m.Status.FailureReason)
	}
	// a finalizer of the test's own keeps the deleted migration readable after the
	// controller's cancel, to see its last word
	const hold = "test.vmpod.dev/hold"
	third := f.getMigration("third")
	controllerutil.AddFinalizer(third, hold)
	if err := f.c.Update(f.ctx, third); err != nil {
		t.Fatal(err)
	}
	if err := f.c.Delete(f.ctx, third); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, timeout, "the cancelled migration to say Cancelled and its target pod to go", func() (bool, string) {
		m := f.getMigration("third")
		return m.Status.Phase == vmpodv1.MigrationCancelled && m.Status.EndTimestamp != nil &&
			!controllerutil.ContainsFinalizer(m, migration.Finalizer) && f.gone(t3.Name), fmt.Sprintf("%+v", m.Status)
	})
	third = f.getMigration("third")
	controllerutil.RemoveFinalizer(third, hold)
	if err := f.c.Update(f.ctx, third); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, timeout, "the cancelled migration to go", func() (bool, string) {
		err := f.c.Get(f.ctx, types.NamespacedName{Namespace: ns, Name: "third"}, &vmpodv1.VirtualMachineMigration{})
		return apierrors.IsNotFound(err), fmt.Sprint(err)
	})
	testenv.Eventually(t, timeout, "a MigrationCancelled event on the VM, which outlives the migration", func() (bool, string) {
		evs := &eventsv1.EventList{}
		if err := f.c.List(f.ctx, evs, client.InNamespace(ns)); err != nil {
			return false, err.Error()
		}
		for _, e := range evs.Items {
			if e.Regarding.Kind == "VirtualMachine" && e.Regarding.Name == "mv" && e.Reason == "MigrationCancelled" &&
				strings.Contains(e.Note, "migration third cancelled: the guest runs on in "+target.Name) {
				return true, ""
			}
		}
		return false, fmt.Sprint(len(evs.Items), " events")
	})
	if got := shims.ran(); !strings.Contains(strings.Join(got, " "), target.Name+":"+vmspec.MigrateCancelCommand) {
		t.Errorf("execs %v: want a cancel in the VM's pod", got)
	}
	if v := f.vm("mv"); v.Status.PodName != target.Name {
		t.Errorf("after a cancel the VM's pod is %s, want %s", v.Status.PodName, target.Name)
	}

	// deleted too late: the source's shim says the guest moved before the cancel took
	// effect; the target, which holds the guest, becomes the VM's pod instead of going
	vmPod := f.vm("mv").Status.PodName
	shims.mu.Lock()
	shims.hold, shims.late = make(chan struct{}), true
	shims.mu.Unlock()
	f.migration("late", "mv")
	t5 := f.startTarget("late", "node-d")
	f.waitPhase("late", vmpodv1.MigrationRunning)
	if err := f.c.Delete(f.ctx, f.getMigration("late")); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, timeout, "the late-cancelled migration's target to be the VM's pod", func() (bool, string) {
		v := f.vm("mv")
		return v.Status.PodName == t5.Name && !f.gone(t5.Name) && f.gone(vmPod), fmt.Sprintf("%+v", v.Status)
	})
	shims.mu.Lock()
	shims.late = false
	shims.mu.Unlock()

	// refused before anything starts
	f.create(f.cirros("cd", vmpodv1.RunStrategyAlways)) // a containerDisk, bridge-bound
	cd := f.waitPod("cd", "")
	f.bind(cd, "node-a")
	f.kubeletRuns(cd)
	f.create(f.cirros("off", vmpodv1.RunStrategyHalted))
	f.create(f.vmOnClaim("local", corev1.ReadWriteOnce))
	local := f.waitPod("local", "")
	f.bind(local, "node-a")
	f.kubeletRuns(local)
	for name, c := range map[string]struct{ vm, want string }{
		"to-nowhere": {"absent", "spec.vmName: VirtualMachine absent not found"},
		"halted":     {"off", "the VM is not running"},
		"containerd": {"cd", "disks[0] (containerdisk): a containerDisk's writable overlay"},
		"unshared":   {"local", "volume root: PersistentVolumeClaim local-root is ReadWriteOnce, not ReadWriteMany"},
	} {
		f.migration(name, c.vm)
		m := f.waitPhase(name, vmpodv1.MigrationFailed)
		if !strings.Contains(m.Status.FailureReason, c.want) || m.Status.TargetPod != "" {
			t.Errorf("%s: %q (target pod %q); want a refusal saying %q", name, m.Status.FailureReason, m.Status.TargetPod, c.want)
		}
	}
	if m := f.getMigration("containerd"); !strings.Contains(m.Status.FailureReason, "interfaces[0] (default): the bridge binding") {
		t.Errorf("a bridge-bound VM: %q", m.Status.FailureReason)
	}

	// a target pod no node takes: the migration fails after the target wait
	shims.mu.Lock()
	shims.hold = nil
	shims.mu.Unlock()
	f.migration("stuck", "mv")
	m = f.waitPhase("stuck", vmpodv1.MigrationFailed)
	if !strings.Contains(m.Status.FailureReason, "did not start within 5s") {
		t.Errorf("a target that never starts: %q", m.Status.FailureReason)
	}
}

// A VM whose resize the kubelet has not applied (deferred: no room on its node) migrates
// at the size it has: the target pod asks for the CPU and memory the kubelet reports as
// applied to the source, not what the source's spec asks (the target's shim refuses any
// size but the guest's), and once the target is the VM's pod the VM controller resizes it.
func TestMigrationOfADeferredResize(t *testing.T) {
	f, _ := migrationFixture(t, 5*time.Second)
	ns := f.ns
	vm := f.migratable("defer")
	d := &vm.Spec.Template.Spec.Domain
	d.CPU = &vmpodv1.CPU{Sockets: 1, MaxSockets: 2}
	d.Memory = &vmpodv1.Memory{Guest: ptr.To(resource.MustParse("1Gi")), MaxGuest: ptr.To(resource.MustParse("2Gi"))}
	d.Resources.Requests = nil
	f.create(vm)
	nodeA, nodeB := f.nodeNamed("defer-a-"+ns), f.nodeNamed("defer-b-"+ns)
	source := f.waitPod("defer", "")
	f.bind(source, nodeA)
	f.kubeletRuns(source) // applied: 1 CPU, 1Gi
	f.waitStatus("defer", vmpodv1.StatusRunning)
	applied := source.Spec.Containers[0].Resources.DeepCopy()
	limits := func(p *corev1.Pod) string {
		l := p.Spec.Containers[0].Resources.Limits
		return l.Cpu().String() + " " + l.Memory().String()
	}

	// the VM grows; the kubelet (this test) never applies it
	f.update("defer", func(v *vmpodv1.VirtualMachine) {
		v.Spec.Template.Spec.Domain.CPU.Sockets = 2
		v.Spec.Template.Spec.Domain.Memory.Guest = ptr.To(resource.MustParse("1536Mi"))
	})
	testenv.Eventually(t, timeout, "the source pod's spec resized", func() (bool, string) {
		l := limits(f.pod("defer"))
		return l == "2 1536Mi", l
	})

	f.migration("move", "defer")
	m := f.waitPhase("move", vmpodv1.MigrationScheduling)
	target, err := f.getPod(m.Status.TargetPod)
	if err != nil {
		t.Fatal(err)
	}
	if got := target.Spec.Containers[0].Resources; !equality.Semantic.DeepEqual(got.Limits, applied.Limits) || !equality.Semantic.DeepEqual(got.Requests, applied.Requests) {
		t.Errorf("the target's compute resources %s; want those applied to the source, %s", got.String(), applied.String())
	}
	f.bind(target, nodeB)
	f.kubeletRuns(target)
	f.waitPhase("move", vmpodv1.MigrationSucceeded)
	testenv.Eventually(t, timeout, "the target resized to the VM's spec once it is the VM's pod", func() (bool, string) {
		p, err := f.getPod(target.Name)
		if err != nil {
			return false, err.Error()
		}
		l := limits(p)
		return l == "2 1536Mi", l
	})
}

// A VM pod whose guest moved away is not replaced by the VM controller, although it ended
// and the VM should run: the migration controller makes the target the VM's pod.
func TestMigratedPodIsNotReplaced(t *testing.T) {
	env := testenv.Get(t)
	ns := env.Namespace(t)
	env.StartManager(t, ns, func(o *manager.Options) { o.Backoff = fast })
	f := &fixture{t: t, env: env, c: env.Client, ns: ns, ctx: context.Background()}
	f.create(f.cirros("gone", vmpodv1.RunStrategyAlways))
	p := f.waitPod("gone", "")
	f.kubeletRuns(p)
	f.waitStatus("gone", vmpodv1.StatusRunning)
	now := metav1.Now()
	p.Status.Phase = corev1.PodSucceeded
	p.Status.ContainerStatuses = []corev1.ContainerStatus{{Name: vmspec.ComputeContainer, Image: p.Spec.Containers[0].Image, ImageID: "sha256:x",
		State: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: 0, StartedAt: now, FinishedAt: now,
			Message: vmspec.MigratedReason + ": the guest moved to 10.99.0.8:49152 (downtime 23ms, 210 MiB sent)"}}}}
	if err := f.c.Status().Update(f.ctx, p); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * time.Second)
	if cur := f.pod("gone"); cur.UID != p.UID || cur.DeletionTimestamp != nil {
		t.Errorf("the migrated-away pod was replaced or deleted by the VM controller")
	}
	// the control: the same end without the Migrated message is a power-off, replaced
	p = f.pod("gone")
	p.Status.ContainerStatuses[0].State.Terminated.Message = "the guest powered off"
	if err := f.c.Status().Update(f.ctx, p); err != nil {
		t.Fatal(err)
	}
	f.waitPod("gone", p.UID) // a new pod of the same name
}

// A VM with evictionStrategy LiveMigrate is guarded by a PodDisruptionBudget that no
// eviction passes, and leaves a cordoned node by migration; one that cannot move stays and
// says why; a VM without the strategy is neither guarded nor moved, and dropping the
// strategy drops the budget.
func TestEvacuation(t *testing.T) {
	f, shims := migrationFixture(t, time.Minute)
	ns := f.ns
	nodeA, nodeB := "evac-a-"+ns, "evac-b-"+ns
	for _, n := range []string{nodeA, nodeB} {
		node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n}}
		f.create(node)
		t.Cleanup(func() { _ = f.c.Delete(f.ctx, node) })
	}
	running := func(name string) *corev1.Pod {
		p := f.waitPod(name, "")
		f.bind(p, nodeA)
		f.kubeletRuns(p)
		f.waitStatus(name, vmpodv1.StatusRunning)
		return p
	}
	mover := f.migratable("mover")
	mover.Spec.Template.Spec.EvictionStrategy = ptr.To(vmpodv1.EvictionStrategyLiveMigrate)
	f.create(mover)
	source := running("mover")
	f.create(f.migratable("stayer"))
	running("stayer")
	stuck := f.cirros("stuck", vmpodv1.RunStrategyAlways) // a containerDisk: it cannot move
	stuck.Spec.Template.Spec.EvictionStrategy = ptr.To(vmpodv1.EvictionStrategyLiveMigrate)
	f.create(stuck)
	running("stuck")

	budget := &policyv1.PodDisruptionBudget{}
	testenv.Eventually(t, timeout, "the LiveMigrate VM's PodDisruptionBudget", func() (bool, string) {
		err := f.c.Get(f.ctx, types.NamespacedName{Namespace: ns, Name: vm.DisruptionBudgetName("mover")}, budget)
		return err == nil, fmt.Sprint(err)
	})
	sel, err := metav1.LabelSelectorAsSelector(budget.Spec.Selector)
	if err != nil || budget.Spec.MinAvailable == nil || budget.Spec.MinAvailable.IntValue() != 2 ||
		!sel.Matches(labels.Set(source.Labels)) || !metav1.IsControlledBy(budget, f.vm("mover")) {
		t.Errorf("budget %+v (%v): want minAvailable 2 over the VM's pods, owned by the VM", budget.Spec, err)
	}
	if sel.Matches(labels.Set{render.VMNameLabel: "mover", render.HotplugVolumeLabel: "data"}) {
		t.Errorf("the budget selects the VM's disk attachment pods too")
	}
	// its disk attachment pods have one of their own, which no eviction passes either: a
	// drain must not pull a hot-plugged disk out of a guest that is about to move with it
	disks := &policyv1.PodDisruptionBudget{}
	testenv.Eventually(t, timeout, "the LiveMigrate VM's attachment pods' PodDisruptionBudget", func() (bool, string) {
		err := f.c.Get(f.ctx, types.NamespacedName{Namespace: ns, Name: vm.AttachmentBudgetName("mover")}, disks)
		return err == nil, fmt.Sprint(err)
	})
	if sel, err := metav1.LabelSelectorAsSelector(disks.Spec.Selector); err != nil || disks.Spec.MaxUnavailable == nil || disks.Spec.MaxUnavailable.IntValue() != 0 ||
		!sel.Matches(labels.Set{render.VMNameLabel: "mover", render.HotplugVolumeLabel: "data"}) || sel.Matches(labels.Set(source.Labels)) {
		t.Errorf("attachment pods' budget %+v (%v): want maxUnavailable 0 over the VM's attachment pods only", disks.Spec, err)
	}
	if err := f.c.Get(f.ctx, types.NamespacedName{Namespace: ns, Name: vm.DisruptionBudgetName("stayer")}, &policyv1.PodDisruptionBudget{}); !apierrors.IsNotFound(err) {
		t.Errorf("a VM without evictionStrategy has a budget (%v)", err)
	}

	// kubectl drain's first step: the node is cordoned
	node := &corev1.Node{}
	if err := f.c.Get(f.ctx, types.NamespacedName{Name: nodeA}, node); err != nil {
		t.Fatal(err)
	}
	node.Spec.Unschedulable = true
	if err := f.c.Update(f.ctx, node); err != nil {
		t.Fatal(err)
	}
	var evac *vmpodv1.VirtualMachineMigration
	testenv.Eventually(t, timeout, "an evacuation migration of the LiveMigrate VM", func() (bool, string) {
		all := &vmpodv1.VirtualMachineMigrationList{}
		if err := f.c.List(f.ctx, all, client.InNamespace(ns)); err != nil {
			return false, err.Error()
		}
		for i := range all.Items {
			if v := all.Items[i].Spec.VMName; v == "stayer" || v == "stuck" {
				t.Errorf("VM %s is migrated (%s): it has no evictionStrategy or cannot move", v, all.Items[i].Name)
			}
			if all.Items[i].Spec.VMName == "mover" {
				evac = &all.Items[i]
			}
		}
		return evac != nil, fmt.Sprint(len(all.Items))
	})
	if evac.Labels[vm.EvacuationLabel] != "true" || evac.Annotations[vm.EvacuationNodeAnnotation] != nodeA || !strings.HasPrefix(evac.Name, "mover-evacuation-") {
		t.Errorf("evacuation %s, labels %v, annotations %v", evac.Name, evac.Labels, evac.Annotations)
	}
	f.waitEvent("stuck", "EvacuationBlocked")
	if notes := f.eventNotes("stuck", "EvacuationBlocked"); len(notes) == 0 || !strings.Contains(notes[0], "containerDisk") {
		t.Errorf("EvacuationBlocked events %q: want the reason the guest cannot move", notes)
	}
	f.startTarget(evac.Name, nodeB)
	f.waitPhase(evac.Name, vmpodv1.MigrationSucceeded)
	testenv.Eventually(t, timeout, "the VM on the other node", func() (bool, string) {
		v := f.vm("mover")
		return v.Status.NodeName == nodeB && f.gone(source.Name), fmt.Sprintf("%+v", v.Status)
	})
	// off the cordoned node: no second evacuation
	time.Sleep(2 * time.Second)
	all := &vmpodv1.VirtualMachineMigrationList{}
	if err := f.c.List(f.ctx, all, client.InNamespace(ns)); err != nil || len(all.Items) != 1 {
		t.Errorf("%d migrations (%v), want the one evacuation", len(all.Items), err)
	}

	// the strategy dropped: the budget goes
	f.update("mover", func(v *vmpodv1.VirtualMachine) { v.Spec.Template.Spec.EvictionStrategy = nil })
	testenv.Eventually(t, timeout, "the budgets to go with the strategy", func() (bool, string) {
		err := f.c.Get(f.ctx, types.NamespacedName{Namespace: ns, Name: vm.DisruptionBudgetName("mover")}, &policyv1.PodDisruptionBudget{})
		derr := f.c.Get(f.ctx, types.NamespacedName{Namespace: ns, Name: vm.AttachmentBudgetName("mover")}, &policyv1.PodDisruptionBudget{})
		return apierrors.IsNotFound(err) && apierrors.IsNotFound(derr), fmt.Sprint(err, derr)
	})
	// an evacuation that fails is not followed by another at once (back-off: a minute)
	shims.mu.Lock()
	shims.outcome = func(string) error {
		return errors.New("vmpod.dev/migrate: failed: Unable to write to socket: Broken pipe")
	}
	shims.mu.Unlock()
	loser := f.migratable("loser")
	loser.Spec.Template.Spec.EvictionStrategy = ptr.To(vmpodv1.EvictionStrategyLiveMigrate)
	f.create(loser)
	running("loser")
	evacuations := func() []vmpodv1.VirtualMachineMigration {
		all := &vmpodv1.VirtualMachineMigrationList{}
		if err := f.c.List(f.ctx, all, client.InNamespace(ns)); err != nil {
			t.Fatal(err)
		}
		return slices.DeleteFunc(all.Items, func(m vmpodv1.VirtualMachineMigration) bool { return m.Spec.VMName != "loser" })
	}
	testenv.Eventually(t, timeout, "an evacuation of the second VM", func() (bool, string) { return len(evacuations()) == 1, "" })
	f.startTarget(evacuations()[0].Name, nodeB)
	f.waitPhase(evacuations()[0].Name, vmpodv1.MigrationFailed)
	time.Sleep(3 * time.Second)
	if got := evacuations(); len(got) != 1 {
		t.Errorf("%d evacuations of the VM after one failed, want 1 until its back-off ends", len(got))
	}
}

// Migrations out of one node beyond the per-node limit wait Pending, saying so, until one
// ends; then the next starts. The migration's knobs reach the source's shim, the cluster's
// policy (the controller's flags) filling what a migration leaves unset.
func TestMigrationLimits(t *testing.T) {
	env := testenv.Get(t)
	ns := env.Namespace(t)
	shims := &fakeShims{hold: make(chan struct{})}
	env.StartManager(t, ns, func(o *manager.Options) {
		o.Backoff, o.MigrationExec, o.MigrationTargetWait = fast, shims, time.Minute
		o.MigrationLimits = migration.Limits{PerCluster: 5, OutboundPerNode: 1}
		o.MigrationPolicy.BandwidthMiB, o.MigrationPolicy.AllowPostCopy = 32, true
	})
	f := &fixture{t: t, env: env, c: env.Client, ns: ns, ctx: context.Background()}
	for _, name := range []string{"one", "two"} {
		f.create(f.migratable(name))
		p := f.waitPod(name, "")
		f.bind(p, "node-a")
		f.kubeletRuns(p)
		f.waitStatus(name, vmpodv1.StatusRunning)
	}
	first := &vmpodv1.VirtualMachineMigration{ObjectMeta: metav1.ObjectMeta{Name: "first", Namespace: ns},
		Spec: vmpodv1.VirtualMachineMigrationSpec{VMName: "one", DowntimeLimitMs: 120, AllowPostCopy: new(false)}}
	f.create(first)
	f.startTarget("first", "node-b")
	f.waitPhase("first", vmpodv1.MigrationRunning)
	f.migration("second", "two")
	f.waitPhase("second", vmpodv1.MigrationPending)
	time.Sleep(3 * time.Second)
	if m := f.getMigration("second"); m.Status.Phase != vmpodv1.MigrationPending || m.Status.TargetPod != "" {
		t.Errorf("the second migration off node-a: %+v, want it Pending with no target while the first runs", m.Status)
	}
	found := false
	testenv.Eventually(t, timeout, "a MigrationQueued event", func() (bool, string) {
		evs := &eventsv1.EventList{}
		if err := f.c.List(f.ctx, evs, client.InNamespace(ns)); err != nil {
			return false, err.Error()
		}
		for _, e := range evs.Items {
			if e.Regarding.Name == "second" && e.Reason == "MigrationQueued" && strings.Contains(e.Note, "leave node node-a (at most 1 at once)") {
				found = true
			}
		}
		return found, fmt.Sprint(len(evs.Items))
	})
	shims.mu.Lock()
	close(shims.hold) // the first ends (its source's shim says cancelled)
	shims.hold = nil
	shims.mu.Unlock()
	f.waitPhase("first", vmpodv1.MigrationFailed)
	f.startTarget("second", "node-b")
	f.waitPhase("second", vmpodv1.MigrationSucceeded)
	got := shims.options()
	if len(got) != 2 || got[0].DowntimeLimitMs != 120 || got[0].AllowPostCopy || !got[1].AllowPostCopy ||
		got[0].BandwidthMiB != 32 || got[1].BandwidthMiB != 32 || !got[1].AutoConverge || got[1].CompletionTimeoutPerGiB != 800 {
		t.Errorf("the sources were asked for %+v; want the policy's 32 MiB/s, auto-converge and 800 s/GiB in both, "+
			"a 120 ms downtime limit and no post-copy in the first (its spec), post-copy in the second (the policy)", got)
	}
}

// A VM with a hot-plugged volume migrates with it: once the target pod runs, it gets an
// attachment pod of its own on its node, lent to it, and only when that runs does the
// target accept the guest, naming that pod for the disk; the target then is the VM's pod
// with the volume attached, and the source's attachment pod goes once the source ended.
// A volume on its way in, or on a claim only one node can open, is refused up front.
func TestMigrationWithHotplugVolume(t *testing.T) {
	env := testenv.Get(t)
	ns := env.Namespace(t)
	exec, shims := &recordingExec{}, &fakeShims{}
	env.StartManager(t, ns, func(o *manager.Options) {
		o.Backoff, o.PodExec, o.MigrationExec, o.MigrationTargetWait = fast, exec, shims, time.Minute
	})
	f := &fixture{t: t, env: env, c: env.Client, ns: ns, ctx: context.Background()}
	shared := pvc(ns, "shared")
	shared.Spec.AccessModes = []corev1.PersistentVolumeAccessMode{corev1.ReadWriteMany}
	f.create(shared)
	vm := f.migratable("hpm")
	addHotplugVolume(vm, "data", "shared")
	f.create(vm)
	source := f.waitPod("hpm", "")
	f.bind(source, "node-a")
	f.kubeletRuns(source)
	f.waitStatus("hpm", vmpodv1.StatusRunning)
	lentToSource := f.waitAttachmentPod("hpm", "data")

	// the volume is still on its way in: not now
	f.migration("early", "hpm")
	if m := f.waitPhase("early", vmpodv1.MigrationFailed); !strings.Contains(m.Status.FailureReason, "hot-plugged volume data is Pending") {
		t.Errorf("a migration while the volume attaches: %q", m.Status.FailureReason)
	}
	f.kubeletRuns(lentToSource)
	f.waitVolume("hpm", "data", vmpodv1.VolumeReady, "")

	f.migration("move", "hpm")
	target := f.startTarget("move", "node-b")
	lentName := render.TargetAttachmentPodName("hpm", "data", target.UID)
	var lent *corev1.Pod
	testenv.Eventually(t, timeout, "the target's attachment pod", func() (bool, string) {
		p, err := f.getPod(lentName)
		lent = p
		return err == nil, fmt.Sprint(err)
	})
	if lent.Labels[vmspec.AttachmentForLabel] != string(target.UID) || !metav1.IsControlledBy(lent, target) ||
		lent.Spec.Volumes[0].PersistentVolumeClaim.ClaimName != "shared" || !slices.Contains(lent.Finalizers, render.AttachmentFinalizer) {
		t.Errorf("the target's attachment pod: labels %v, owners %v, volumes %+v, finalizers %v; want claim shared lent to and owned by %s",
			lent.Labels, lent.OwnerReferences, lent.Spec.Volumes, lent.Finalizers, target.Name)
	}
	if terms := lent.Spec.Affinity.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution.NodeSelectorTerms; terms[0].MatchFields[0].Values[0] != "node-b" {
		t.Errorf("the target's attachment pod goes to %v, want node-b", terms)
	}
	// the source's attachment pod is not taken for a stale one meanwhile
	time.Sleep(2 * time.Second)
	if m := f.getMigration("move"); m.Status.Phase != vmpodv1.MigrationScheduling {
		t.Errorf("the migration is %s before the target's attachment pod runs", m.Status.Phase)
	}
	if f.gone(lent.Name) || f.gone(lentToSource.Name) {
		t.Fatal("an attachment pod was let go while both QEMUs may hold the disk")
	}
	f.kubeletRuns(lent)
	f.waitPhase("move", vmpodv1.MigrationSucceeded)
	shims.mu.Lock()
	accepted := shims.accepts[target.Name].Attachments
	shims.mu.Unlock()
	if accepted["data"] != string(lent.UID) || len(accepted) != 1 {
		t.Errorf("the target's accept named attachment pods %v, want data: %s", accepted, lent.UID)
	}
	// the target is the VM's pod, with the volume attached from its own attachment pod
	// (the migration's phase and the VM's status are written by two reconciles:
	// the volume's status may still name the source for a moment)
	testenv.Eventually(t, timeout, "the volume's status names the target", func() (bool, string) {
		s := volumeStatus(f.vm("hpm"), "data")
		return s != nil && s.Phase == vmpodv1.VolumeReady && s.PodUID == target.UID && s.AttachmentPod == lent.Name,
			fmt.Sprintf("%+v, want Ready in pod %s from attachment pod %s", s, target.UID, lent.Name)
	})
	if attach := lastExec(t, exec, vmspec.AttachDiskCommand); !strings.HasPrefix(attach, target.Name+"/") || !strings.Contains(attach, string(lent.UID)) {
		t.Errorf("the last attach %q: want it in the target, from its attachment pod", attach)
	}
	// the source's attachment pod goes once its QEMU is gone
	if f.gone(lentToSource.Name) {
		t.Error("the source's attachment pod went while the source pod had not ended")
	}
	ended, err := f.getPod(source.Name)
	if err != nil {
		t.Fatal(err)
	}
	f.kubeletEnds(ended, 0)
	testenv.Eventually(t, timeout, "the source's attachment pod let go", func() (bool, string) {
		return f.gone(lentToSource.Name), ""
	})

	// a hot-plugged volume only one node can open: refused up front
	f.create(pvc(ns, "local"))
	f.update("hpm", func(v *vmpodv1.VirtualMachine) { addHotplugVolume(v, "logs", "local") })
	logs := f.waitAttachmentPod("hpm", "logs")
	f.kubeletRuns(logs)
	f.waitVolume("hpm", "logs", vmpodv1.VolumeReady, "")
	f.migration("rwo", "hpm")
	if m := f.waitPhase("rwo", vmpodv1.MigrationFailed); !strings.Contains(m.Status.FailureReason, "hot-plugged volume logs: PersistentVolumeClaim local is ReadWriteOnce") {
		t.Errorf("a migration with a ReadWriteOnce hot-plugged volume: %q", m.Status.FailureReason)
	}
}
