// Package plugin is kubectl-vmpod, the kubectl plugin for vmpod VMs:
//
//	kubectl vmpod start|stop|restart VM    change what runs (see docs/design/102-state-change-requests.md)
//	kubectl vmpod pause|unpause VM         stop and resume the running VM's vCPUs in place
//	kubectl vmpod console VM               attach to the VM's serial console
//	kubectl vmpod vnc VM                   forward a local port to the VM's display
//	kubectl vmpod port-forward VM PORT...  forward local ports to the guest's
//	kubectl vmpod guestosinfo VM           what the guest agent reports of the guest
//	kubectl vmpod convert -f FILE          KubeVirt/CDI manifests -> vmpod's
//	kubectl vmpod image-upload dv NAME ... upload a disk image into a DataVolume
package plugin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/client"

	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
	"github.com/vmpod/vmpod/controller/convert"
)

const usage = `kubectl vmpod: manage vmpod VirtualMachines

Usage:
  kubectl vmpod start VM [flags]      start a stopped VM
  kubectl vmpod stop VM [flags]       stop a VM (the guest gets an ACPI power-off)
  kubectl vmpod restart VM [flags]    replace the VM's pod with a new one
  kubectl vmpod pause VM [flags]      stop the running VM's vCPUs (memory and devices stay)
  kubectl vmpod unpause VM [flags]    resume a paused VM
  kubectl vmpod console VM [flags]    attach to the VM's serial console (Ctrl-] detaches)
  kubectl vmpod vnc VM [flags]        forward a local port (--port, default free) to the VM's
                                      VNC display and print the address for a viewer
  kubectl vmpod port-forward VM [LOCAL:]REMOTE...
                                      forward local ports to the guest's ports (masquerade
                                      binding); --stdio connects stdin/stdout to one port,
                                      for ssh: ssh -o ProxyCommand='kubectl vmpod
                                      port-forward --stdio VM 22' user@VM
  kubectl vmpod addvolume VM --volume-name=NAME
                                      add DataVolume or PVC NAME to the VM as a hotpluggable
                                      virtio disk (serial NAME, at most 20 characters): a
                                      running VM gets it without a restart; it stays in
                                      the VM's spec (--persist is implied)
  kubectl vmpod removevolume VM --volume-name=NAME
                                      take a hotpluggable volume out of the VM (and its guest)
  kubectl vmpod migrate VM [--bandwidth-mib=N] [--auto-converge[=false]] [--allow-post-copy]
        [--completion-timeout-per-gib=S] [--progress-timeout=S] [--downtime-limit-ms=MS]
                                      move the running VM to a pod on another node without
                                      stopping it (a VirtualMachineMigration; unset knobs
                                      take the cluster's policy)
  kubectl vmpod migrate-cancel VM     cancel the VM's migration; the guest runs on where it is
  kubectl vmpod migrate --pod POD [knobs as above]
                                      move a container pod of a vmpod RuntimeClass, its
                                      containers running, into a new pod on another node
                                      that takes its place (its labels and owners; a new
                                      name and IP)
  kubectl vmpod migrate-cancel --pod POD
                                      cancel the pod's migration
  kubectl vmpod guestosinfo VM        print what the guest agent reports: OS, hostname,
                                      interfaces and addresses (JSON)
  kubectl vmpod convert -f FILE       convert KubeVirt VirtualMachine / CDI DataVolume
                                      manifests to vmpod's (- reads stdin)
  kubectl vmpod image-upload dv|pvc NAME --image-path=FILE|--archive-path=TAR [--size=10Gi] [--volume-mode=block]
        [--storage-class=SC] [--access-mode=MODE] [--no-create] [--wait-secs=300]
                                      upload a disk image (raw, qcow2, vmdk, vdi, vhd(x),
                                      gzip or xz) into DataVolume NAME, made with source
                                      upload unless it exists; needs pods/portforward.
                                      pvc NAME: the same, for a VM that names PVC NAME
                                      (the DataVolume NAME fills and owns it)

Flags: the usual kubectl connection flags (--kubeconfig, --context, -n/--namespace, ...).
`

// IO is where a command reads and writes.
type IO struct {
	In       io.Reader
	Out, Err io.Writer
}

// Main runs kubectl-vmpod with args (without the program name) and returns the exit code.
func Main(args []string, stdio IO) int {
	if err := run(context.Background(), args, stdio); err != nil {
		if !errors.Is(err, pflag.ErrHelp) {
			fmt.Fprintln(stdio.Err, "error:", err)
		}
		return 1
	}
	return 0
}

func run(ctx context.Context, args []string, stdio IO) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(stdio.Out, usage)
		return nil
	}
	cmd, args := args[0], args[1:]
	fs := pflag.NewFlagSet("kubectl vmpod "+cmd, pflag.ContinueOnError)
	fs.SetOutput(stdio.Err)
	overrides := &clientcmd.ConfigOverrides{}
	clientcmd.BindOverrideFlags(overrides, fs, clientcmd.RecommendedConfigOverrideFlags(""))
	loading := clientcmd.NewDefaultClientConfigLoadingRules()
	fs.StringVar(&loading.ExplicitPath, "kubeconfig", "", "path to the kubeconfig file")
	file := fs.StringP("filename", "f", "", "convert: the manifest file (- for stdin)")
	port := fs.Int("port", 0, "vnc: the local port (0: a free one)")
	stdioForward := fs.Bool("stdio", false, "port-forward: connect stdin and stdout to the one guest port")
	var upload UploadOptions
	fs.StringVar(&upload.ImagePath, "image-path", "", "image-upload: the image file")
	fs.StringVar(&upload.ArchivePath, "archive-path", "", "image-upload: a tar archive to unpack into a Filesystem volume (instead of --image-path)")
	fs.StringVar(&upload.Size, "size", "", "image-upload: the new DataVolume's size (e.g. 10Gi)")
	fs.StringVar(&upload.VolumeMode, "volume-mode", "", "image-upload: the new DataVolume's volume mode (block or filesystem)")
	fs.StringVar(&upload.StorageClass, "storage-class", "", "image-upload: the new DataVolume's storage class")
	fs.StringVar(&upload.AccessMode, "access-mode", "", "image-upload: the new DataVolume's access mode (default ReadWriteOnce)")
	fs.BoolVar(&upload.NoCreate, "no-create", false, "image-upload: upload into an existing DataVolume only")
	volumeName := fs.String("volume-name", "", "addvolume, removevolume: the DataVolume or PVC (and the volume's name)")
	fs.Bool("persist", true, "addvolume: accepted for virtctl's sake; the VM's spec is always changed")
	waitSecs := fs.Int("wait-secs", 300, "image-upload: how long to wait for the importer, and for the import")
	knobs := addMigrationFlags(fs)
	podMigration := fs.Bool("pod", false, "migrate, migrate-cancel: the name is a container pod's, not a VM's")
	if err := fs.Parse(args); err != nil {
		return err
	}
	config := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(loading, overrides)

	if cmd == "convert" {
		return convertCmd(*file, fs.Args(), stdio)
	}
	upload.Wait = time.Duration(*waitSecs) * time.Second
	names := fs.Args()
	if cmd == "image-upload" {
		// virtctl's forms: image-upload dv NAME, image-upload pvc NAME
		if len(names) != 2 || (names[0] != "dv" && names[0] != "pvc") {
			return fmt.Errorf("image-upload takes dv NAME or pvc NAME, got %q", names)
		}
		upload.PVC = names[0] == "pvc"
		names = names[1:]
	}
	if len(names) == 0 || (len(names) != 1 && cmd != "port-forward") {
		return fmt.Errorf("%s needs one VM name, got %d arguments", cmd, len(names))
	}
	ns, _, err := config.Namespace()
	if err != nil {
		return fmt.Errorf("namespace: %w", err)
	}
	rc, err := config.ClientConfig()
	if err != nil {
		return fmt.Errorf("kubeconfig: %w", err)
	}
	c, err := newClient(rc)
	if err != nil {
		return err
	}
	key := types.NamespacedName{Namespace: ns, Name: names[0]}
	switch cmd {
	case "start", "stop", "restart", "pause", "unpause":
		msg, err := StateChange(ctx, c, key, vmpodv1.StateChangeAction(strings.ToUpper(cmd[:1])+cmd[1:]))
		if err != nil {
			return err
		}
		fmt.Fprintln(stdio.Out, msg)
		return nil
	case "console":
		return Console(ctx, rc, c, key, stdio)
	case "vnc":
		return VNC(ctx, rc, c, key, *port, stdio)
	case "port-forward":
		if *stdioForward {
			if fs.NArg() != 2 {
				return fmt.Errorf("port-forward --stdio needs a VM and one guest port, got %q", fs.Args())
			}
			return PortForwardStdio(ctx, rc, c, key, fs.Arg(1), stdio)
		}
		return PortForward(ctx, rc, c, key, fs.Args()[1:], stdio)
	case "guestosinfo":
		return GuestOSInfo(ctx, rc, c, key, stdio)
	case "migrate", "migrate-cancel":
		var msg string
		switch {
		case cmd == "migrate-cancel":
			msg, err = MigrateCancel(ctx, c, key, *podMigration)
		case *podMigration:
			msg, err = MigratePod(ctx, c, key, knobs.spec())
		default:
			msg, err = Migrate(ctx, c, key, knobs.spec())
		}
		if err != nil {
			return err
		}
		fmt.Fprintln(stdio.Out, msg)
		return nil
	case "image-upload":
		return ImageUpload(ctx, rc, c, key, upload, stdio)
	case "addvolume", "removevolume":
		if *volumeName == "" {
			return fmt.Errorf("%s needs --volume-name", cmd)
		}
		change := AddVolume
		if cmd == "removevolume" {
			change = RemoveVolume
		}
		msg, err := change(ctx, c, key, *volumeName)
		if err != nil {
			return err
		}
		fmt.Fprintln(stdio.Out, msg)
		return nil
	}
	return fmt.Errorf("unknown command %q\n\n%s", cmd, usage)
}

func newClient(rc *rest.Config) (client.Client, error) {
	s := scheme.Scheme
	if err := vmpodv1.AddToScheme(s); err != nil {
		return nil, fmt.Errorf("scheme: %w", err)
	}
	c, err := client.New(rc, client.Options{Scheme: s})
	if err != nil {
		return nil, fmt.Errorf("API client: %w", err)
	}
	return c, nil
}

func convertCmd(file string, args []string, stdio IO) error {
	if len(args) > 0 {
		return fmt.Errorf("convert takes no arguments (use -f FILE), got %q", args)
	}
	var in io.Reader
	switch file {
	case "":
		return errors.New("convert needs -f FILE (- reads stdin)")
	case "-":
		in = stdio.In
	default:
		f, err := os.Open(file)
		if err != nil {
			return err
		}
		defer f.Close()
		in = f
	}
	return convert.Stream(in, stdio.Out, stdio.Err)
}

// StateChange starts, stops, restarts, pauses or unpauses a VM and says what it did. A lasting change (start
// a Halted VM, stop an Always one) edits spec.runStrategy, as virtctl does; a one-off
// (a Manual VM, any restart) is a request annotation the controller carries out.
func StateChange(ctx context.Context, c client.Client, key types.NamespacedName, action vmpodv1.StateChangeAction) (string, error) {
	vm := &vmpodv1.VirtualMachine{}
	if err := c.Get(ctx, key, vm); err != nil {
		return "", fmt.Errorf("get VirtualMachine %s: %w", key, err)
	}
	strategy := vm.Spec.RunStrategy
	setStrategy := func(s vmpodv1.RunStrategy) (string, error) {
		patch := fmt.Sprintf(`{"metadata":{"resourceVersion":%q},"spec":{"runStrategy":%q}}`, vm.ResourceVersion, s)
		if err := c.Patch(ctx, vm, client.RawPatch(types.MergePatchType, []byte(patch))); err != nil {
			return "", fmt.Errorf("set runStrategy %s: %w", s, err)
		}
		return fmt.Sprintf("VirtualMachine %s: runStrategy %s -> %s", key.Name, strategy, s), nil
	}
	request := func(req vmpodv1.StateChangeRequest) (string, error) {
		b, err := json.Marshal(req)
		if err != nil {
			return "", err
		}
		patch, err := json.Marshal(map[string]any{"metadata": map[string]any{
			"resourceVersion": vm.ResourceVersion, "annotations": map[string]string{vmpodv1.StateChangeRequestAnnotation: string(b)}}})
		if err != nil {
			return "", err
		}
		if err := c.Patch(ctx, vm, client.RawPatch(types.MergePatchType, patch)); err != nil {
			return "", fmt.Errorf("request %s: %w", req.Action, err)
		}
		return fmt.Sprintf("VirtualMachine %s: %s requested", key.Name, strings.ToLower(string(req.Action))), nil
	}

	switch action {
	case vmpodv1.StateChangeStart:
		switch strategy {
		case vmpodv1.RunStrategyHalted:
			return setStrategy(vmpodv1.RunStrategyAlways)
		case vmpodv1.RunStrategyAlways:
			return fmt.Sprintf("VirtualMachine %s: runStrategy Always keeps it running already", key.Name), nil
		case vmpodv1.RunStrategyOnce:
			return "", fmt.Errorf("VirtualMachine %s has runStrategy Once: it runs once; change the runStrategy to run it again", key.Name)
		}
		return request(vmpodv1.StateChangeRequest{Action: action})
	case vmpodv1.StateChangeStop:
		switch strategy {
		case vmpodv1.RunStrategyHalted:
			return fmt.Sprintf("VirtualMachine %s: already Halted", key.Name), nil
		case vmpodv1.RunStrategyManual:
			return request(vmpodv1.StateChangeRequest{Action: action})
		}
		return setStrategy(vmpodv1.RunStrategyHalted)
	case vmpodv1.StateChangeRestart:
		if vm.Status.PodUID == "" || !vm.Status.Created {
			return "", fmt.Errorf("VirtualMachine %s has no pod to restart (status %s); use start", key.Name, vm.Status.PrintableStatus)
		}
		return request(vmpodv1.StateChangeRequest{Action: action, PodUID: vm.Status.PodUID})
	case vmpodv1.StateChangePause, vmpodv1.StateChangeUnpause:
		if !vm.Status.Created || vm.Status.PodName == "" {
			return "", fmt.Errorf("VirtualMachine %s is not running (status %s): nothing to %s", key.Name, vm.Status.PrintableStatus, strings.ToLower(string(action)))
		}
		return request(vmpodv1.StateChangeRequest{Action: action})
	}
	return "", fmt.Errorf("unknown action %q", action)
}
