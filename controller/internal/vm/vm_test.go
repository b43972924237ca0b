package vm_test

// These tests run the real manager against a real kube-apiserver and etcd (envtest). There
// is no kubelet: where one would act (run a pod, report it failed, finish deleting it), the
// test does what the kubelet does, through the same API.

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/retry"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/vmpod/vmpod/api/vmspec"
	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
	"github.com/vmpod/vmpod/controller/internal/testenv"
	"github.com/vmpod/vmpod/controller/internal/vm"
	"github.com/vmpod/vmpod/controller/manager"
)

func TestMain(m *testing.M) { testenv.Main(m) }

const timeout = 20 * time.Second

// fast is a back-off short enough for tests and long enough to observe (metav1.Time has
// whole seconds).
var fast = vm.Backoff{Base: time.Second, Max: 4 * time.Second, ResetAfter: time.Hour}

type fixture struct {
	t   *testing.T
	env *testenv.Env
	c   client.Client
	ns  string
	ctx context.Context
}

func setup(t *testing.T) *fixture {
	env := testenv.Get(t)
	ns := env.Namespace(t)
	env.StartManager(t, ns, func(o *manager.Options) { o.Backoff = fast })
	return &fixture{t: t, env: env, c: env.Client, ns: ns, ctx: context.Background()}
}

// cirros is a small VM like KubeVirt's vm-cirros example.
func (f *fixture) cirros(name string, strategy vmpodv1.RunStrategy) *vmpodv1.VirtualMachine {
	return &vmpodv1.VirtualMachine{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: f.ns},
		Spec: vmpodv1.VirtualMachineSpec{
			RunStrategy: strategy,
			Template: vmpodv1.VirtualMachineTemplateSpec{Spec: vmpodv1.InstanceSpec{
				Domain: vmpodv1.DomainSpec{
					Resources: vmpodv1.ResourceRequirements{Requests: corev1.ResourceList{"memory": resource.MustParse("128Mi")}},
					Devices: vmpodv1.Devices{Disks: []vmpodv1.Disk{
						{Name: "containerdisk", Disk: &vmpodv1.DiskTarget{Bus: "virtio"}},
						{Name: "cloudinitdisk", Disk: &vmpodv1.DiskTarget{Bus: "virtio"}},
					}},
				},
				Volumes: []vmpodv1.Volume{
					{Name: "containerdisk", VolumeSource: vmpodv1.VolumeSource{ContainerDisk: &vmpodv1.ContainerDiskSource{Image: "quay.io/kubevirt/cirros-container-disk-demo:v1.7.0"}}},
					{Name: "cloudinitdisk", VolumeSource: vmpodv1.VolumeSource{CloudInitNoCloud: &vmpodv1.CloudInitNoCloudSource{UserData: "#!/bin/sh\necho hi\n"}}},
				},
			}},
		},
	}
}

func (f *fixture) create(o client.Object) {
	f.t.Helper()
	if err := f.c.Create(f.ctx, o); err != nil {
		f.t.Fatalf("create %T %s: %v", o, o.GetName(), err)
	}
}

func (f *fixture) vm(name string) *vmpodv1.VirtualMachine {
	f.t.Helper()
	v := &vmpodv1.VirtualMachine{}
	if err := f.c.Get(f.ctx, types.NamespacedName{Namespace: f.ns, Name: name}, v); err != nil {
		f.t.Fatalf("get VM %s: %v", name, err)
	}
	return v
}

// pod returns the VM's pod, or nil.
func (f *fixture) pod(vmName string) *corev1.Pod { return f.env.VMPod(f.t, f.ns, vmName) }

// waitPod waits for a pod of the VM whose UID is not `not`.
func (f *fixture) waitPod(vmName string, not types.UID) *corev1.Pod {
	f.t.Helper()
	return f.env.WaitVMPod(f.t, f.ns, vmName, not, timeout, func() string { return f.describe(vmName) })
}

func (f *fixture) waitNoPod(vmName string) {
	f.t.Helper()
	f.env.WaitNoVMPod(f.t, f.ns, vmName, timeout)
}

func (f *fixture) waitStatus(vmName string, want vmpodv1.PrintableStatus) *vmpodv1.VirtualMachine {
	f.t.Helper()
	var v *vmpodv1.VirtualMachine
	testenv.Eventually(f.t, timeout, fmt.Sprintf("VM %s to be %s", vmName, want), func() (bool, string) {
		v = f.vm(vmName)
		return v.Status.PrintableStatus == want, f.describe(vmName)
	})
	return v
}

func (f *fixture) describe(vmName string) string {
	v := f.vm(vmName)
	var conds []string
	for _, c := range v.Status.Conditions {
		conds = append(conds, fmt.Sprintf("%s=%s(%s: %s)", c.Type, c.Status, c.Reason, c.Message))
	}
	return fmt.Sprintf("%s %s", v.Status.PrintableStatus, strings.Join(conds, " "))
}

// kubeletRuns marks the pod running and ready, as a kubelet would.
func (f *fixture) kubeletRuns(p *corev1.Pod) {
	f.t.Helper()
	// a pod the controller changed since the caller read it (labels, annotations) is read
	// again, as the kubelet's status manager does on a conflict
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		if err := f.c.Get(f.ctx, types.NamespacedName{Namespace: p.Namespace, Name: p.Name}, p); err != nil {
			return err
		}
		f.markRunning(p)
		return f.c.Status().Update(f.ctx, p)
	})
	if err != nil {
		f.t.Fatalf("mark pod running: %v", err)
	}
}

func (f *fixture) markRunning(p *corev1.Pod) {
	now := metav1.Now()
	p.Status.Phase = corev1.PodRunning
	p.Status.StartTime = &now
	p.Status.PodIP, p.Status.PodIPs = "10.99.0.7", []corev1.PodIP{{IP: "10.99.0.7"}}
	p.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue, LastTransitionTime: now}}
	p.Status.ContainerStatuses = []corev1.ContainerStatus{{Name: vmspec.ComputeContainer, Image: p.Spec.Containers[0].Image, ImageID: "sha256:x",
		Ready: true, Started: ptr.To(true), State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}},
		// a kubelet that resizes in place (1.35+) reports them; the API server refuses a
		// resize of a running pod without
		Resources: p.Spec.Containers[0].Resources.DeepCopy()}}
}

// kubeletEnds marks the pod's VM ended: the guest powered off (code 0) or QEMU failed.
func (f *fixture) kubeletEnds(p *corev1.Pod, exitCode int32) {
	f.t.Helper()
	now := metav1.Now()
	phase := corev1.PodSucceeded
	if exitCode != 0 {
		phase = corev1.PodFailed
	}
	p.Status.Phase = phase
	if p.Status.StartTime == nil {
		p.Status.StartTime = &now
	}
	p.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionFalse, LastTransitionTime: now}}
	p.Status.ContainerStatuses = []corev1.ContainerStatus{{Name: vmspec.ComputeContainer, Image: p.Spec.Containers[0].Image, ImageID: "sha256:x",
		State: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: exitCode, StartedAt: *p.Status.StartTime, FinishedAt: now}}}}
	if err := f.c.Status().Update(f.ctx, p); err != nil {
		f.t.Fatalf("mark pod %s: %v", phase, err)
	}
}

func (f *fixture) request(vmName string, req vmpodv1.StateChangeRequest) {
	f.t.Helper()
	b, _ := json.Marshal(req)
	patch := fmt.Sprintf(`{"metadata":{"annotations":{%q:%q}}}`, vmpodv1.StateChangeRequestAnnotation, b)
	v := &vmpodv1.VirtualMachine{ObjectMeta: metav1.ObjectMeta{Namespace: f.ns, Name: vmName}}
	if err := f.c.Patch(f.ctx, v, client.RawPatch(types.MergePatchType, []byte(patch))); err != nil {
		f.t.Fatalf("request %s: %v", req.Action, err)
	}
}

func (f *fixture) waitRequestDone(vmName string) {
	f.t.Helper()
	testenv.Eventually(f.t, timeout, "the request annotation to be removed", func() (bool, string) {
		_, ok := f.vm(vmName).Annotations[vmpodv1.StateChangeRequestAnnotation]
		return !ok, f.describe(vmName)
	})
}

func (f *fixture) setStrategy(vmName string, s vmpodv1.RunStrategy) {
	f.t.Helper()
	v := &vmpodv1.VirtualMachine{ObjectMeta: metav1.ObjectMeta{Namespace: f.ns, Name: vmName}}
	patch := fmt.Sprintf(`{"spec":{"runStrategy":%q}}`, s)
	if err := f.c.Patch(f.ctx, v, client.RawPatch(types.MergePatchType, []byte(patch))); err != nil {
		f.t.Fatalf("set runStrategy %s: %v", s, err)
	}
}

// vmEvents are the events regarding the VM.
func (f *fixture) vmEvents(vmName string) []eventsv1.Event {
	f.t.Helper()
	list := &eventsv1.EventList{}
	if err := f.c.List(f.ctx, list, client.InNamespace(f.ns)); err != nil {
		f.t.Fatalf("list events: %v", err)
	}
	var out []eventsv1.Event
	for _, e := range list.Items {
		if e.Regarding.Name == vmName && e.Regarding.Kind == "VirtualMachine" {
			out = append(out, e)
		}
	}
	return out
}

// events are the reasons of the events regarding the VM.
func (f *fixture) events(vmName string) []string {
	var reasons []string
	for _, e := range f.vmEvents(vmName) {
		reasons = append(reasons, e.Reason)
	}
	return reasons
}

// eventNotes are the notes of the VM's events of reason.
func (f *fixture) eventNotes(vmName, reason string) []string {
	var notes []string
	for _, e := range f.vmEvents(vmName) {
		if e.Reason == reason {
			notes = append(notes, e.Note)
		}
	}
	return notes
}

func (f *fixture) waitEvent(vmName, reason string) {
	f.t.Helper()
	testenv.Eventually(f.t, timeout, "event "+reason, func() (bool, string) {
		got := f.events(vmName)
		for _, r := range got {
			if r == reason {
				return true, ""
			}
		}
		return false, fmt.Sprint(got)
	})
}

func condition(v *vmpodv1.VirtualMachine, t string) *metav1.Condition {
	return meta.FindStatusCondition(v.Status.Conditions, t)
}
