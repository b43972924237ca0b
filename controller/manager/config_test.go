package manager_test

// The deployment manifests (config/) and the RBAC generated from the reconcilers' markers,
// checked the only way that counts: apply them to a real API server, then run the manager
// with the ServiceAccount's token and let it do its whole job.

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
	"github.com/vmpod/vmpod/controller/internal/datavolume"
	"github.com/vmpod/vmpod/controller/internal/render"
	"github.com/vmpod/vmpod/controller/internal/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

const timeout = 30 * time.Second

func TestConfigAppliesAndItsRBACIsEnough(t *testing.T) {
	env := testenv.Get(t)
	ctx := context.Background()
	kubectl := filepath.Join(os.Getenv("KUBEBUILDER_ASSETS"), "kubectl")
	out, err := exec.Command(kubectl, "--kubeconfig", env.KubeconfigFile(t), "apply", "-k", filepath.Join(env.Root, "config", "default")).CombinedOutput()
	if err != nil {
		t.Fatalf("kubectl apply -k config/default: %v\n%s", err, out)
	}
	t.Logf("kubectl apply -k config/default:\n%s", out)
	for _, want := range []string{"namespace/vmpod-system", "serviceaccount/vmpod-controller", "clusterrole.rbac.authorization.k8s.io/vmpod-controller",
		"clusterrolebinding.rbac.authorization.k8s.io/vmpod-controller", "deployment.apps/vmpod-controller"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("kubectl apply did not mention %s", want)
		}
	}

	// the manager as the Deployment runs it: with the vmpod-controller ServiceAccount
	ns := env.Namespace(t)
	env.StartManagerAs(t, env.ServiceAccountConfig(t, "vmpod-system", "vmpod-controller"), ns, nil)

	vm := &vmpodv1.VirtualMachine{
		ObjectMeta: metav1.ObjectMeta{Name: "rbac", Namespace: ns},
		Spec: vmpodv1.VirtualMachineSpec{
			RunStrategy: vmpodv1.RunStrategyAlways,
			DataVolumeTemplates: []vmpodv1.DataVolumeTemplateSpec{{
				Metadata: vmpodv1.DataVolumeTemplateMeta{Name: "rbac-root"},
				Spec: vmpodv1.DataVolumeSpec{
					Source: vmpodv1.DataVolumeSource{HTTP: &vmpodv1.HTTPSource{URL: "http://127.0.0.1:1/disk.qcow2"}},
					Storage: vmpodv1.StorageSpec{Resources: corev1.VolumeResourceRequirements{
						Requests: corev1.ResourceList{"storage": resource.MustParse("1Gi")}}},
				},
			}},
			Template: vmpodv1.VirtualMachineTemplateSpec{Spec: vmpodv1.InstanceSpec{
				Domain: vmpodv1.DomainSpec{
					Resources: vmpodv1.ResourceRequirements{Requests: corev1.ResourceList{"memory": resource.MustParse("64Mi")}},
					Devices:   vmpodv1.Devices{Disks: []vmpodv1.Disk{{Name: "root"}}},
				},
				Volumes: []vmpodv1.Volume{{Name: "root", VolumeSource: vmpodv1.VolumeSource{DataVolume: &vmpodv1.DataVolumeVolumeSource{Name: "rbac-root"}}}},
			}},
		},
	}
	if err := env.Client.Create(ctx, vm); err != nil {
		t.Fatal(err)
	}
	key := func(name string) types.NamespacedName { return types.NamespacedName{Namespace: ns, Name: name} }
	get := func(name string, o client.Object) error { return env.Client.Get(ctx, key(name), o) }

	// VM controller: creates the DataVolume; DataVolume controller: the PVC, and the
	// importer's ServiceAccount, Role (which needs the controller to hold what it grants)
	// and Job
	dv := &vmpodv1.DataVolume{ObjectMeta: metav1.ObjectMeta{Name: "rbac-root", Namespace: ns}}
	worker := datavolume.WorkerName(dv)
	for _, o := range []struct {
		name string
		obj  client.Object
	}{{"rbac-root", &vmpodv1.DataVolume{}}, {"rbac-root", &corev1.PersistentVolumeClaim{}},
		{worker, &corev1.ServiceAccount{}}, {worker, &batchv1.Job{}}} {
		testenv.Eventually(t, timeout, fmt.Sprintf("%T %s", o.obj, o.name), func() (bool, string) {
			err := get(o.name, o.obj)
			return err == nil, fmt.Sprint(err)
		})
	}
	// the import completes (the importer's report): the VM controller creates the pod
	pvc := &corev1.PersistentVolumeClaim{}
	if err := get("rbac-root", pvc); err != nil {
		t.Fatal(err)
	}
	pvc.Annotations = map[string]string{vmpodv1.ImportPhaseAnnotation: "Succeeded"}
	if err := env.Client.Update(ctx, pvc); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, timeout, "the VM's pod", func() (bool, string) {
		err := get(render.PodName("rbac"), &corev1.Pod{})
		return err == nil, fmt.Sprint(err)
	})
	testenv.Eventually(t, timeout, "VM status written", func() (bool, string) {
		v := &vmpodv1.VirtualMachine{}
		_ = get("rbac", v)
		return v.Status.PodName == render.PodName("rbac"), string(v.Status.PrintableStatus)
	})
	testenv.Eventually(t, timeout, "events recorded", func() (bool, string) {
		list := &eventsv1.EventList{}
		if err := env.Client.List(ctx, list, client.InNamespace(ns)); err != nil {
			return false, err.Error()
		}
		for _, e := range list.Items {
			if e.Reason == "SuccessfulCreate" && e.Regarding.Kind == "VirtualMachine" && e.ReportingController == "vmpod-controller" {
				return true, ""
			}
		}
		return false, fmt.Sprintf("%d events", len(list.Items))
	})
}
