package importer

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
)

// Exit codes. The DataVolume controller's Job fails at once on ExitPermanent (its
// podFailurePolicy) and retries ExitTransient.
const (
	ExitOK        = 0
	ExitTransient = 1
	ExitPermanent = 2
)

// Main is cmd/vmpod-importer; `vmpod-importer serve` is the source side of a clone from
// another namespace (see Serve). The PVC to report on comes from $VMPOD_PVC_NAME and
// $VMPOD_NAMESPACE (set by the Job); without them the importer only logs.
func Main(args []string) int {
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, nil)))
	if len(args) > 0 && args[0] == "serve" {
		ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer cancel()
		return serveMain(ctx, args[1:])
	}
	o, kubeconfig, err := parseFlags(args)
	if errors.Is(err, flag.ErrHelp) {
		return ExitOK
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "vmpod-importer:", err)
		return ExitPermanent
	}
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()

	var rep Reporter = LogReporter{}
	if pvc, ns := os.Getenv("VMPOD_PVC_NAME"), os.Getenv("VMPOD_NAMESPACE"); pvc != "" && ns != "" {
		cs, err := clientset(kubeconfig)
		if err != nil {
			slog.Error("no API client", "err", err)
			return ExitTransient
		}
		rep = &PVCReporter{Client: cs, Namespace: ns, Name: pvc, Interval: o.ProgressInterval}
		slog.Info("reporting on PVC", "namespace", ns, "pvc", pvc)
	}
	err = Run(ctx, o, rep)
	var ie *Error
	switch {
	case err == nil:
		return ExitOK
	case errors.As(err, &ie) && ie.Permanent:
		writeTerminationMessage(err)
		return ExitPermanent
	default:
		writeTerminationMessage(err)
		return ExitTransient
	}
}

func parseFlags(args []string) (Options, string, error) {
	var o Options
	var headers, headerDirs stringList
	var kubeconfig string
	fs := flag.NewFlagSet("vmpod-importer", flag.ContinueOnError)
	fs.StringVar(&o.Source, "source", "", "http, s3, registry, upload, pvc or blank")
	fs.StringVar(&o.URL, "url", "", "http(s)://..., http(s)://<endpoint>/<bucket>/<key> (s3) or docker://...")
	fs.StringVar(&o.Checksum, "checksum", "", "sha256:<hex> or sha512:<hex> of the downloaded bytes")
	fs.Var(&headers, "header", `an extra HTTP header "Name: value" (repeatable)`)
	fs.Var(&headerDirs, "header-dir", "a directory of files each holding a header (repeatable)")
	fs.StringVar(&o.AuthDir, "auth-dir", "", "a directory with files accessKeyId and secretKey")
	fs.StringVar(&o.Listen, "listen", "", "upload: the address to take the upload on (PUT or POST "+vmpodv1.UploadPath+")")
	fs.StringVar(&o.S3Region, "s3-region", "", "s3: the signing region (default: from an AWS endpoint's name, else us-east-1)")
	fs.StringVar(&o.CADir, "ca-dir", "", "a directory of PEM CA certificates to trust")
	fs.StringVar(&o.SourcePath, "source-path", "", "pvc source: the source PVC's mount or block device")
	fs.StringVar(&o.SourceFormat, "source-format", "", "raw: take the download as a raw disk, neither probed nor decompressed (a clone of a guest-written disk)")
	fs.StringVar(&o.ContentType, "content-type", "kubevirt", "kubevirt (a disk image) or archive (tar)")
	fs.StringVar(&o.Dest, "dest", "", "the PVC's mount directory or block device")
	fs.StringVar(&o.DestMode, "dest-mode", "filesystem", "filesystem or block")
	fs.Int64Var(&o.Size, "size", 0, "the PVC's size in bytes (0: the free space)")
	fs.Float64Var(&o.FilesystemOverhead, "filesystem-overhead", 0.055, "share of a filesystem PVC left for the filesystem")
	fs.StringVar(&o.Scratch, "scratch", "", "a directory for the download")
	fs.DurationVar(&o.ProgressInterval, "progress-interval", 2*time.Second, "how often to report progress")
	fs.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig (default: in-cluster)")
	if err := fs.Parse(args); err != nil {
		return o, "", err
	}
	if fs.NArg() > 0 {
		return o, "", fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	o.Headers, o.HeaderDirs = headers, headerDirs
	return o, kubeconfig, nil
}

func clientset(kubeconfig string) (*kubernetes.Clientset, error) {
	var cfg *rest.Config
	var err error
	if kubeconfig != "" {
		cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
	} else {
		cfg, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, fmt.Errorf("API client config: %w", err)
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("API client: %w", err)
	}
	return cs, nil
}

// writeTerminationMessage leaves the error where kubectl describe shows it.
func writeTerminationMessage(err error) {
	_ = os.WriteFile("/dev/termination-log", []byte(err.Error()), 0o644)
}

type stringList []string

func (s *stringList) String() string     { return fmt.Sprint([]string(*s)) }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }
