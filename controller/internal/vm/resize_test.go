package vm_test

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/vmpod/vmpod/api/vmspec"
	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
	"github.com/vmpod/vmpod/controller/internal/render"
	"github.com/vmpod/vmpod/controller/internal/testenv"
)

// A VM with room to grow (cpu.maxSockets, memory.maxGuest) is resized in place when its
// sockets or guest memory change within the room: its pod's compute container gets the
// new limits through pods/resize (the kubelet then has the shim hot-plug them), the pod
// and its hash stay, and no restart is required. A change of the room itself is one.
func TestLiveResize(t *testing.T) {
	f := setup(t)
	vm := f.cirros("grow", vmpodv1.RunStrategyAlways)
	d := &vm.Spec.Template.Spec.Domain
	d.CPU = &vmpodv1.CPU{Sockets: 1, MaxSockets: 4}
	d.Memory = &vmpodv1.Memory{Guest: ptr.To(resource.MustParse("1Gi")), MaxGuest: ptr.To(resource.MustParse("2Gi"))}
	d.Resources.Requests = nil
	f.create(vm)
	pod := f.waitPod("grow", "")
	spec, err := vmspec.Parse([]byte(pod.Annotations[vmspec.Annotation]))
	if err != nil || spec.CPU.MaxSockets != 4 || spec.MaxMemoryMiB != 2048 || spec.CPU.Sockets != 1 || spec.MemoryMiB != 1024 {
		t.Fatalf("the pod's VM spec %+v (%v): want 1 of 4 sockets, 1024 of 2048 MiB", spec, err)
	}
	lim := pod.Spec.Containers[0].Resources.Limits
	if lim.Cpu().String() != "1" || lim.Memory().String() != "1Gi" {
		t.Fatalf("compute limits cpu %s memory %s, want the VM's size: 1, 1Gi", lim.Cpu(), lim.Memory())
	}
	f.bind(pod, f.node())
	f.kubeletRuns(pod)
	f.waitStatus("grow", vmpodv1.StatusRunning)

	f.update("grow", func(v *vmpodv1.VirtualMachine) {
		v.Spec.Template.Spec.Domain.CPU.Sockets = 3
		v.Spec.Template.Spec.Domain.Memory.Guest = ptr.To(resource.MustParse("1536Mi"))
	})
	testenv.Eventually(t, timeout, "event Resizing", func() (bool, string) {
		return slices.Contains(f.events("grow"), "Resizing"), fmt.Sprint(f.eventNotes("grow", "ResizeFailed"))
	})
	testenv.Eventually(t, timeout, "the pod resized to 3 CPUs, 1536Mi", func() (bool, string) {
		p := f.pod("grow")
		l, r := p.Spec.Containers[0].Resources.Limits, p.Spec.Containers[0].Resources.Requests
		return p.UID == pod.UID && l.Cpu().String() == "3" && l.Memory().String() == "1536Mi" && r.Memory().String() == "1536Mi" && r.Cpu().String() == "300m",
			p.Spec.Containers[0].Resources.String()
	})
	if p := f.pod("grow"); render.TemplateHash(p) != render.TemplateHash(pod) {
		t.Errorf("the resized pod's hash changed")
	}
	if c := condition(f.vm("grow"), vmpodv1.VMRestartRequired); c == nil || c.Status != "False" {
		t.Errorf("RestartRequired %+v after a change within the room, want False", c)
	}

	// more room is a new machine: a restart applies it
	f.update("grow", func(v *vmpodv1.VirtualMachine) { v.Spec.Template.Spec.Domain.CPU.MaxSockets = 8 })
	testenv.Eventually(t, timeout, "RestartRequired", func() (bool, string) {
		c := condition(f.vm("grow"), vmpodv1.VMRestartRequired)
		return c != nil && c.Status == "True", f.describe("grow")
	})

	// the CRD refuses sockets beyond the room
	v := f.vm("grow")
	v.Spec.Template.Spec.Domain.CPU.Sockets = 9
	if err := f.c.Update(f.ctx, v); err == nil || !strings.Contains(err.Error(), "maxSockets must be at least sockets") {
		t.Errorf("sockets 9 of maxSockets 8: %v, want the CRD's refusal", err)
	}
	v = f.vm("grow")
	v.Spec.Template.Spec.Domain.Memory.Guest = ptr.To(resource.MustParse("3Gi"))
	if err := f.c.Update(f.ctx, v); err == nil || !strings.Contains(err.Error(), "maxGuest must be at least guest") {
		t.Errorf("guest 3Gi of maxGuest 2Gi: %v, want the CRD's refusal", err)
	}
	if slices.Contains(f.events("grow"), "ResizeFailed") {
		t.Errorf("a resize failed: %v", f.eventNotes("grow", "ResizeFailed"))
	}
}

// A VM sized by an instance type with room (maxSockets, maxGuest) switched to a larger one
// within the room is resized in place, as KubeVirt does with an instance type change.
func TestLiveResizeByInstancetype(t *testing.T) {
	f := setup(t)
	sizes := map[string]vmpodv1.InstancetypeSpec{
		"small": {CPU: vmpodv1.InstancetypeCPU{Guest: 1, MaxSockets: 4}, Memory: vmpodv1.InstancetypeMemory{Guest: resource.MustParse("1Gi"), MaxGuest: ptr.To(resource.MustParse("2Gi"))}},
		"large": {CPU: vmpodv1.InstancetypeCPU{Guest: 2, MaxSockets: 4}, Memory: vmpodv1.InstancetypeMemory{Guest: resource.MustParse("1536Mi"), MaxGuest: ptr.To(resource.MustParse("2Gi"))}},
	}
	for name, spec := range sizes {
		f.create(&vmpodv1.VirtualMachineInstancetype{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: f.ns}, Spec: spec})
	}
	vm := f.cirros("sized", vmpodv1.RunStrategyAlways)
	vm.Spec.Instancetype = &vmpodv1.InstancetypeMatcher{Name: "small", Kind: vmpodv1.KindInstancetype}
	vm.Spec.Template.Spec.Domain.Resources.Requests = nil
	f.create(vm)
	pod := f.waitPod("sized", "")
	spec, err := vmspec.Parse([]byte(pod.Annotations[vmspec.Annotation]))
	if err != nil || spec.CPU.MaxSockets != 4 || spec.MaxMemoryMiB != 2048 {
		t.Fatalf("the pod's VM spec %+v (%v): want the instance type's room", spec, err)
	}
	f.bind(pod, f.node())
	f.kubeletRuns(pod)
	f.waitStatus("sized", vmpodv1.StatusRunning)

	f.update("sized", func(v *vmpodv1.VirtualMachine) { v.Spec.Instancetype.Name = "large" })
	testenv.Eventually(t, timeout, "the pod resized to the large instance type", func() (bool, string) {
		p := f.pod("sized")
		l := p.Spec.Containers[0].Resources.Limits
		return p.UID == pod.UID && l.Cpu().String() == "2" && l.Memory().String() == "1536Mi", p.Spec.Containers[0].Resources.String()
	})
	if c := condition(f.vm("sized"), vmpodv1.VMRestartRequired); c == nil || c.Status != "False" {
		t.Errorf("RestartRequired %+v after a switch within the room, want False", c)
	}
}

// node creates a Node with room for the test's pods, gone with the test, and returns its
// name: the API server admits a resize against the pod's node.
func (f *fixture) node() string { return f.nodeNamed("resize-" + f.ns) }

// nodeNamed creates a node of that name with room (8 CPUs, 16 GiB) for the test's life.
func (f *fixture) nodeNamed(name string) string {
	f.t.Helper()
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}
	f.create(node)
	f.t.Cleanup(func() { _ = f.c.Delete(f.ctx, node) })
	node.Status.Capacity = corev1.ResourceList{"cpu": resource.MustParse("8"), "memory": resource.MustParse("16Gi"), "pods": resource.MustParse("110")}
	node.Status.Allocatable = node.Status.Capacity
	if err := f.c.Status().Update(f.ctx, node); err != nil {
		f.t.Fatal(err)
	}
	return node.Name
}
