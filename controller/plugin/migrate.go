package plugin

import (
	"context"
	"fmt"
	"strings"

	"github.com/spf13/pflag"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
)

// Migrate creates a VirtualMachineMigration of the VM (virtctl migrate): the controller
// moves the running guest to a pod on another node. knobs holds the spec's policy fields
// the command line set (VMName is the VM's); what it leaves unset is the cluster's policy.
func Migrate(ctx context.Context, c client.Client, vm types.NamespacedName, knobs vmpodv1.VirtualMachineMigrationSpec) (string, error) {
	v := &vmpodv1.VirtualMachine{}
	if err := c.Get(ctx, vm, v); err != nil {
		return "", fmt.Errorf("VM %s: %w", vm.Name, err)
	}
	knobs.VMName = vm.Name
	m := &vmpodv1.VirtualMachineMigration{
		ObjectMeta: metav1.ObjectMeta{GenerateName: vm.Name + "-migration-", Namespace: vm.Namespace},
		Spec:       knobs,
	}
	if err := c.Create(ctx, m); err != nil {
		return "", fmt.Errorf("create a migration of VM %s: %w", vm.Name, err)
	}
	return fmt.Sprintf("VM %s: migration %s created (kubectl get vmim %s -w follows it)", vm.Name, m.Name, m.Name), nil
}

// MigratePod creates a VirtualMachineMigration of a container pod (kubectl vmpod migrate
// --pod): the controller moves the pod's guest, its containers running, into a new pod on
// another node, which takes the pod's place (docs/design/212).
func MigratePod(ctx context.Context, c client.Client, pod types.NamespacedName, knobs vmpodv1.VirtualMachineMigrationSpec) (string, error) {
	p := &corev1.Pod{}
	if err := c.Get(ctx, pod, p); err != nil {
		return "", fmt.Errorf("pod %s: %w", pod.Name, err)
	}
	knobs.PodName = pod.Name
	m := &vmpodv1.VirtualMachineMigration{
		ObjectMeta: metav1.ObjectMeta{GenerateName: generateName(pod.Name + "-migration-"), Namespace: pod.Namespace},
		Spec:       knobs,
	}
	if err := c.Create(ctx, m); err != nil {
		return "", fmt.Errorf("create a migration of pod %s: %w", pod.Name, err)
	}
	return fmt.Sprintf("pod %s: migration %s created (kubectl get vmim %s -w follows it)", pod.Name, m.Name, m.Name), nil
}

// generateName keeps a GenerateName prefix within what the API server takes (it appends
// five characters to at most 58).
func generateName(prefix string) string {
	if len(prefix) > 58 {
		return prefix[:58]
	}
	return prefix
}

// MigrateCancel deletes the VM's unfinished migrations (virtctl migrate-cancel), or the
// pod's when pod is set: the guest runs on where it is.
func MigrateCancel(ctx context.Context, c client.Client, key types.NamespacedName, pod bool) (string, error) {
	subject := "VM " + key.Name
	if pod {
		subject = "pod " + key.Name
	}
	list := &vmpodv1.VirtualMachineMigrationList{}
	if err := c.List(ctx, list, client.InNamespace(key.Namespace)); err != nil {
		return "", fmt.Errorf("list migrations: %w", err)
	}
	var cancelled []string
	for i := range list.Items {
		m := &list.Items[i]
		if m.Subject() != subject || m.Finished() || m.DeletionTimestamp != nil {
			continue
		}
		if err := c.Delete(ctx, m); client.IgnoreNotFound(err) != nil {
			return "", fmt.Errorf("cancel migration %s: %w", m.Name, err)
		}
		cancelled = append(cancelled, m.Name)
	}
	if len(cancelled) == 0 {
		return fmt.Sprintf("%s: no migration in flight", subject), nil
	}
	return fmt.Sprintf("%s: cancelled migration %s", subject, strings.Join(cancelled, ", ")), nil
}

// migrationFlags are kubectl vmpod migrate's flags for a migration's policy knobs (the
// VirtualMachineMigration spec's fields), which virtctl does not have: a user would
// otherwise write the manifest.
type migrationFlags struct {
	fs                                   *pflag.FlagSet
	bandwidthMiB, perGiB, progress, down *int32
	autoConverge, postCopy               *bool
}

func addMigrationFlags(fs *pflag.FlagSet) migrationFlags {
	return migrationFlags{fs: fs,
		bandwidthMiB: fs.Int32("bandwidth-mib", 0, "migrate: cap the stream at this many MiB/s (default: the cluster's policy)"),
		perGiB:       fs.Int32("completion-timeout-per-gib", 0, "migrate: give up (or switch to post-copy) after this many seconds per GiB of guest memory"),
		progress:     fs.Int32("progress-timeout", 0, "migrate: give up (or switch to post-copy) after this many seconds without progress"),
		down:         fs.Int32("downtime-limit-ms", 0, "migrate: the longest the guest may stay stopped for the last copy"),
		autoConverge: fs.Bool("auto-converge", false, "migrate: throttle a guest that dirties memory faster than it is sent"),
		postCopy:     fs.Bool("allow-post-copy", false, "migrate: switch to post-copy instead of giving up (needs vm.unprivileged_userfaultfd = 1 on the target node)"),
	}
}

// spec is the knobs the command line set; the API server checks their ranges.
func (f migrationFlags) spec() vmpodv1.VirtualMachineMigrationSpec {
	var s vmpodv1.VirtualMachineMigrationSpec
	set := func(name string) bool { return f.fs.Changed(name) }
	if set("bandwidth-mib") {
		s.BandwidthMiB = *f.bandwidthMiB
	}
	if set("completion-timeout-per-gib") {
		s.CompletionTimeoutPerGiB = *f.perGiB
	}
	if set("progress-timeout") {
		s.ProgressTimeoutSeconds = *f.progress
	}
	if set("downtime-limit-ms") {
		s.DowntimeLimitMs = *f.down
	}
	if set("auto-converge") {
		s.AutoConverge = f.autoConverge
	}
	if set("allow-post-copy") {
		s.AllowPostCopy = f.postCopy
	}
	return s
}
