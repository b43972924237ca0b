// Package manager assembles vmpod-controller: a controller-runtime manager running the
// VirtualMachine, VirtualMachineMigration and DataVolume reconcilers.
package manager

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"strconv"
	"time"

	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/selection"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
	"github.com/vmpod/vmpod/controller/internal/datavolume"
	"github.com/vmpod/vmpod/controller/internal/migration"
	"github.com/vmpod/vmpod/controller/internal/podexec"
	"github.com/vmpod/vmpod/controller/internal/render"
	"github.com/vmpod/vmpod/controller/internal/vm"
)

// Name is the controller's name in events and leader election.
const Name = "vmpod-controller"

// Options configure the manager; AddFlags binds them to command-line flags.
type Options struct {
	MetricsAddr             string
	ProbeAddr               string
	LeaderElect             bool
	LeaderElectionNamespace string
	Render                  render.Config
	ImporterImage           string
	Backoff                 vm.Backoff
	// CloneSweepInterval: how often clone source sides no DataVolume wants are deleted.
	CloneSweepInterval time.Duration
	// Namespace, if set, is the only namespace watched.
	Namespace string
	// SkipNameValidation lets tests run several managers in one process.
	SkipNameValidation bool
	// PodExec runs pause/unpause in VM pods; nil: through the API server's pods/exec.
	// Tests without a kubelet set a recorder.
	PodExec vm.PodExec
	// MigrationExec runs the migration execs, with stdin; nil: through pods/exec.
	MigrationExec migration.Exec
	// MigrationTargetWait bounds a target pod's start (0: migration.DefaultTargetWait).
	MigrationTargetWait time.Duration
	// MigrationLimits bound the migrations running at once.
	MigrationLimits migration.Limits
	// MigrationPolicy is what migrations that do not say take.
	MigrationPolicy migration.Policy
}

// DefaultOptions are the defaults of the flags.
func DefaultOptions() Options {
	return Options{
		MetricsAddr: ":8080",
		ProbeAddr:   ":8081",
		Render: render.Config{
			RuntimeClassName:   "vmpod",
			ComputeImage:       "registry.k8s.io/pause:3.10",
			CPUAllocationRatio: 10,
		},
		ImporterImage: "ghcr.io/vmpod/vmpod-importer:latest",
		Backoff:       vm.DefaultBackoff,
		MigrationLimits: migration.Limits{PerCluster: migration.DefaultParallelPerCluster,
			OutboundPerNode: migration.DefaultParallelOutboundPerNode},
		MigrationPolicy: migration.DefaultPolicy,

		CloneSweepInterval: datavolume.DefaultCloneSweepInterval,
	}
}

// AddFlags binds o to flags.
func (o *Options) AddFlags(fs *flag.FlagSet) {
	fs.StringVar(&o.MetricsAddr, "metrics-bind-address", o.MetricsAddr, "metrics endpoint address (0 disables it)")
	fs.StringVar(&o.ProbeAddr, "health-probe-bind-address", o.ProbeAddr, "health probe endpoint address")
	fs.BoolVar(&o.LeaderElect, "leader-elect", o.LeaderElect, "elect a leader, for more than one replica")
	fs.StringVar(&o.LeaderElectionNamespace, "leader-election-namespace", o.LeaderElectionNamespace, "namespace of the leader election Lease")
	fs.StringVar(&o.Render.RuntimeClassName, "runtime-class", o.Render.RuntimeClassName, "RuntimeClass of VM pods")
	fs.StringVar(&o.Render.ComputeImage, "compute-image", o.Render.ComputeImage, "image of VM pods' compute container (never run: the shim runs the VM)")
	fs.Int64Var(&o.Render.CPUAllocationRatio, "cpu-allocation-ratio", o.Render.CPUAllocationRatio, "a vCPU requests 1/ratio CPU unless the VM sets resources.requests.cpu")
	fs.StringVar(&o.ImporterImage, "importer-image", o.ImporterImage, "image with vmpod-importer and qemu-img for DataVolume Jobs")
	fs.DurationVar(&o.Backoff.Base, "restart-backoff", o.Backoff.Base, "wait after a VM pod's first failure; doubles per consecutive failure")
	fs.DurationVar(&o.Backoff.Max, "restart-backoff-max", o.Backoff.Max, "longest wait between failed VM pods")
	fs.StringVar(&o.Namespace, "namespace", o.Namespace, "watch only this namespace (default: all)")
	fs.IntVar(&o.MigrationLimits.PerCluster, "parallel-migrations-per-cluster", o.MigrationLimits.PerCluster, "most live migrations running at once in the cluster")
	fs.IntVar(&o.MigrationLimits.OutboundPerNode, "parallel-outbound-migrations-per-node", o.MigrationLimits.OutboundPerNode, "most live migrations leaving one node at once")
	p := &o.MigrationPolicy
	fs.Func("migration-bandwidth-mib", fmt.Sprintf("MiB/s a live migration's stream may take unless it says (default %d)", p.BandwidthMiB), int32Flag(&p.BandwidthMiB, 1, 1<<20))
	fs.Func("migration-completion-timeout-per-gib", fmt.Sprintf("seconds per GiB of guest memory a live migration may take unless it says (default %d)", p.CompletionTimeoutPerGiB), int32Flag(&p.CompletionTimeoutPerGiB, 1, 86400))
	fs.Func("migration-progress-timeout", fmt.Sprintf("seconds a live migration may go without progress unless it says (default %d)", p.ProgressTimeoutSeconds), int32Flag(&p.ProgressTimeoutSeconds, 1, 86400))
	fs.BoolVar(&p.AutoConverge, "migration-auto-converge", p.AutoConverge, "throttle a guest that dirties memory faster than its migration sends it, unless the migration says")
	fs.BoolVar(&p.AllowPostCopy, "migration-allow-post-copy", p.AllowPostCopy, "switch a live migration that does not converge to post-copy unless it says (target nodes need vm.unprivileged_userfaultfd = 1)")
	fs.DurationVar(&o.CloneSweepInterval, "clone-sweep-interval", o.CloneSweepInterval, "how often clone servers in source namespaces that no DataVolume wants are deleted")
}

// Scheme is the types the manager works with.
func Scheme() (*runtime.Scheme, error) {
	s := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(s); err != nil {
		return nil, fmt.Errorf("add client-go types: %w", err)
	}
	if err := vmpodv1.AddToScheme(s); err != nil {
		return nil, fmt.Errorf("add vmpod.dev types: %w", err)
	}
	return s, nil
}

// New builds the manager with both reconcilers registered.
func New(ctx context.Context, cfg *rest.Config, o Options) (ctrl.Manager, error) {
	scheme, err := Scheme()
	if err != nil {
		return nil, err
	}
	// Cache only vmpod's own pods and Jobs, not every pod in the cluster.
	has := func(key string) labels.Selector {
		r, err := labels.NewRequirement(key, selection.Exists, nil)
		if err != nil {
			panic(err) // constant keys
		}
		return labels.NewSelector().Add(*r)
	}
	mgrOpts := ctrl.Options{
		Scheme:                  scheme,
		Metrics:                 metricsserver.Options{BindAddress: o.MetricsAddr},
		HealthProbeBindAddress:  o.ProbeAddr,
		LeaderElection:          o.LeaderElect,
		LeaderElectionID:        "vmpod-controller.vmpod.dev",
		LeaderElectionNamespace: o.LeaderElectionNamespace,
		Cache: cache.Options{ByObject: map[client.Object]cache.ByObject{
			&corev1.Pod{}:  {Label: has(render.VMNameLabel)},
			&batchv1.Job{}: {Label: has(datavolume.DataVolumeLabel)},
		}},
	}
	if o.Namespace != "" {
		mgrOpts.Cache.DefaultNamespaces = map[string]cache.Config{o.Namespace: {}}
	}
	if o.SkipNameValidation {
		skip := true
		mgrOpts.Controller.SkipNameValidation = &skip
	}
	mgr, err := ctrl.NewManager(cfg, mgrOpts)
	if err != nil {
		return nil, fmt.Errorf("new manager: %w", err)
	}
	recorder := mgr.GetEventRecorder(Name)
	execClient, err := podexec.New(mgr.GetConfig())
	if err != nil {
		return nil, err
	}
	var podExec vm.PodExec = execClient
	if o.PodExec != nil {
		podExec = o.PodExec
	}
	var migrationExec migration.Exec = execClient
	if o.MigrationExec != nil {
		migrationExec = o.MigrationExec
	}
	vms := &vm.Reconciler{Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(), Recorder: recorder, Render: o.Render, Backoff: o.Backoff, Exec: podExec}
	if err := vms.SetupWithManager(ctx, mgr); err != nil {
		return nil, fmt.Errorf("set up the VirtualMachine controller: %w", err)
	}
	policy := o.MigrationPolicy
	migrations := &migration.Reconciler{Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(), Recorder: recorder, Exec: migrationExec, TargetWait: o.MigrationTargetWait,
		Limits: o.MigrationLimits, Policy: &policy}
	if err := migrations.SetupWithManager(mgr); err != nil {
		return nil, fmt.Errorf("set up the VirtualMachineMigration controller: %w", err)
	}
	dvs := &datavolume.Reconciler{Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(), Recorder: recorder, ImporterImage: o.ImporterImage, RuntimeClassName: o.Render.RuntimeClassName,
		CloneSweepInterval: o.CloneSweepInterval}
	if err := dvs.SetupWithManager(ctx, mgr); err != nil {
		return nil, fmt.Errorf("set up the DataVolume controller: %w", err)
	}
	if err := mgr.AddHealthzCheck("healthz", healthz.Ping); err != nil {
		return nil, fmt.Errorf("add health check: %w", err)
	}
	if err := mgr.AddReadyzCheck("readyz", healthz.Ping); err != nil {
		return nil, fmt.Errorf("add ready check: %w", err)
	}
	return mgr, nil
}

// Main is cmd/vmpod-controller.
func Main(args []string) int {
	o := DefaultOptions()
	fs := flag.NewFlagSet(Name, flag.ContinueOnError)
	o.AddFlags(fs)
	zapOpts := zap.Options{}
	zapOpts.BindFlags(fs)
	kubeconfig := fs.String("kubeconfig", "", "kubeconfig (default: in-cluster, then $KUBECONFIG)")
	if err := fs.Parse(args); errors.Is(err, flag.ErrHelp) {
		return 0
	} else if err != nil {
		return 2
	}
	ctrl.SetLogger(zap.New(zap.UseFlagOptions(&zapOpts)))
	log := ctrl.Log.WithName("setup")

	cfg, err := restConfig(*kubeconfig)
	if err != nil {
		log.Error(err, "no API server config")
		return 1
	}
	ctx := ctrl.SetupSignalHandler()
	mgr, err := New(ctx, cfg, o)
	if err != nil {
		log.Error(err, "set up the manager")
		return 1
	}
	log.Info("starting", "runtimeClass", o.Render.RuntimeClassName, "importerImage", o.ImporterImage)
	if err := mgr.Start(ctx); err != nil {
		log.Error(err, "manager stopped")
		return 1
	}
	return 0
}

func restConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig != "" {
		os.Setenv("KUBECONFIG", kubeconfig)
	}
	return ctrl.GetConfig()
}

// int32Flag parses a flag's whole number within [lo, hi] into dst.
func int32Flag(dst *int32, lo, hi int64) func(string) error {
	return func(v string) error {
		n, err := strconv.ParseInt(v, 10, 32)
		if err != nil || n < lo || n > hi {
			return fmt.Errorf("want a whole number from %d to %d, got %q", lo, hi, v)
		}
		*dst = int32(n)
		return nil
	}
}
