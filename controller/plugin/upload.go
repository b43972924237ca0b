package plugin

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
	"github.com/vmpod/vmpod/controller/internal/counting"
	"github.com/vmpod/vmpod/controller/internal/datavolume"
)

// UploadOptions are image-upload's flags, named as virtctl's.
type UploadOptions struct {
	ImagePath string
	// ArchivePath is a tar archive (gzip or xz too) to unpack into a Filesystem volume: the
	// DataVolume's contentType is archive
	ArchivePath string
	// for a new DataVolume
	Size         string
	VolumeMode   string // block or filesystem
	StorageClass string
	AccessMode   string
	NoCreate     bool
	// PVC is virtctl's image-upload pvc NAME: the user wants PVC NAME. vmpod fills PVCs
	// through DataVolumes, so it is the same upload, into the DataVolume NAME that owns the
	// PVC NAME; a PVC of that name that no DataVolume fills is refused up front.
	PVC bool
	// Wait bounds each wait: for the importer to be ready, and for the import to complete
	Wait time.Duration
}

// ImageUpload uploads a disk image into a DataVolume whose source is upload, creating the
// DataVolume unless NoCreate (virtctl image-upload dv NAME --size=... --image-path=...). The
// image goes through the API server's port-forward to the DataVolume's importer pod, which
// checks and converts it as it would a download; a refused image leaves the DataVolume
// waiting for another upload.
func ImageUpload(ctx context.Context, rc *rest.Config, c client.Client, key types.NamespacedName, o UploadOptions, stdio IO) error {
	path, flag := o.ImagePath, "--image-path"
	switch {
	case o.ImagePath != "" && o.ArchivePath != "":
		return errors.New("image-upload takes --image-path or --archive-path, not both")
	case o.ArchivePath != "":
		path, flag = o.ArchivePath, "--archive-path"
		if strings.EqualFold(o.VolumeMode, "block") {
			return errors.New("--archive-path unpacks files: it needs --volume-mode filesystem")
		}
	case o.ImagePath == "":
		return errors.New("image-upload needs --image-path (or --archive-path)")
	}
	if o.Wait <= 0 {
		o.Wait = 5 * time.Minute
	}
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("%s %s is not a regular file", flag, path)
	}
	if o.PVC {
		if err := checkUploadPVC(ctx, c, key, stdio); err != nil {
			return err
		}
	}
	if err := ensureUploadDataVolume(ctx, c, key, o, stdio); err != nil {
		return err
	}

	dv, err := waitDataVolume(ctx, c, key, o.Wait, stdio, func(dv *vmpodv1.DataVolume) bool {
		return dv.Status.Phase == vmpodv1.PhaseUploadReady
	})
	if err != nil {
		return err
	}
	pod, err := uploadPod(ctx, c, dv)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdio.Err, "uploading %s (%d bytes) to DataVolume %s through pod %s\n", path, st.Size(), key.Name, pod)
	fwCtx, stopForward := context.WithCancel(ctx)
	defer stopForward()
	fw, errc, err := forward(fwCtx, rc, key.Namespace, pod, []string{"0:" + strconv.Itoa(vmpodv1.UploadPort)}, io.Discard, stdio.Err)
	if err != nil {
		return fmt.Errorf("image-upload: %w", err)
	}
	ports, err := fw.GetPorts()
	if err != nil || len(ports) == 0 {
		return fmt.Errorf("image-upload: no local port: %v", err)
	}
	if err := put(ctx, fmt.Sprintf("http://127.0.0.1:%d%s", ports[0].Local, vmpodv1.UploadPath), f, st.Size(), stdio); err != nil {
		return err
	}
	stopForward()
	<-errc

	fmt.Fprintf(stdio.Err, "uploaded; waiting for DataVolume %s to complete\n", key.Name)
	if _, err := waitDataVolume(ctx, c, key, o.Wait, stdio, func(dv *vmpodv1.DataVolume) bool {
		return dv.Status.Phase == vmpodv1.PhaseSucceeded
	}); err != nil {
		return err
	}
	fmt.Fprintf(stdio.Out, "DataVolume %s: Succeeded, PVC %s holds the image\n", key.Name, key.Name)
	return nil
}

// checkUploadPVC refuses image-upload pvc NAME when PVC NAME exists and no DataVolume fills
// it (vmpod's importer writes only into a DataVolume's own PVC), and says how the PVC is made.
func checkUploadPVC(ctx context.Context, c client.Client, key types.NamespacedName, stdio IO) error {
	pvc := &corev1.PersistentVolumeClaim{}
	err := c.Get(ctx, key, pvc)
	switch {
	case apierrors.IsNotFound(err):
	case err != nil:
		return fmt.Errorf("get PVC %s: %w", key, err)
	default:
		if owner := metav1.GetControllerOf(pvc); owner == nil || owner.Kind != "DataVolume" || owner.Name != key.Name {
			return fmt.Errorf("PVC %s exists and no DataVolume fills it: vmpod uploads into a DataVolume's PVC (delete the PVC, or upload under another name)", key.Name)
		}
	}
	fmt.Fprintf(stdio.Err, "PVC %s is filled through DataVolume %s, which owns it (vmpod imports into DataVolumes)\n", key.Name, key.Name)
	return nil
}

// ensureUploadDataVolume checks an existing DataVolume takes uploads, or creates one.
func ensureUploadDataVolume(ctx context.Context, c client.Client, key types.NamespacedName, o UploadOptions, stdio IO) error {
	dv := &vmpodv1.DataVolume{}
	err := c.Get(ctx, key, dv)
	switch {
	case err == nil:
		if dv.Spec.Source.Upload == nil {
			return fmt.Errorf("DataVolume %s does not take uploads (its source is not upload)", key.Name)
		}
		switch takesArchive := dv.Spec.ContentType == vmpodv1.ContentTypeArchive; {
		case takesArchive && o.ArchivePath == "":
			return fmt.Errorf("DataVolume %s takes a tar archive (contentType archive): upload it with --archive-path", key.Name)
		case !takesArchive && o.ArchivePath != "":
			return fmt.Errorf("DataVolume %s takes a disk image: upload it with --image-path", key.Name)
		}
		if dv.Status.Phase == vmpodv1.PhaseSucceeded {
			return fmt.Errorf("DataVolume %s holds its data already (Succeeded); a DataVolume is one import: make a new one", key.Name)
		}
		if o.Size != "" {
			fmt.Fprintf(stdio.Err, "DataVolume %s exists: --size is ignored\n", key.Name)
		}
		return nil
	case !apierrors.IsNotFound(err):
		return fmt.Errorf("get DataVolume %s: %w", key, err)
	case o.NoCreate:
		return fmt.Errorf("DataVolume %s does not exist (--no-create)", key)
	case o.Size == "":
		return fmt.Errorf("DataVolume %s does not exist: give --size to create it", key)
	}
	size, err := resource.ParseQuantity(o.Size)
	if err != nil || size.Sign() <= 0 {
		return fmt.Errorf("--size %q: not a positive quantity (e.g. 10Gi)", o.Size)
	}
	dv = &vmpodv1.DataVolume{
		ObjectMeta: metav1.ObjectMeta{Name: key.Name, Namespace: key.Namespace},
		Spec: vmpodv1.DataVolumeSpec{
			Source: vmpodv1.DataVolumeSource{Upload: &vmpodv1.UploadSource{}},
			Storage: vmpodv1.StorageSpec{Resources: corev1.VolumeResourceRequirements{
				Requests: corev1.ResourceList{corev1.ResourceStorage: size}}},
		},
	}
	if o.ArchivePath != "" {
		dv.Spec.ContentType = vmpodv1.ContentTypeArchive
	}
	switch strings.ToLower(o.VolumeMode) {
	case "":
	case "block":
		dv.Spec.Storage.VolumeMode = ptr.To(corev1.PersistentVolumeBlock)
	case "filesystem":
		dv.Spec.Storage.VolumeMode = ptr.To(corev1.PersistentVolumeFilesystem)
	default:
		return fmt.Errorf("--volume-mode %q: want block or filesystem", o.VolumeMode)
	}
	if o.StorageClass != "" {
		dv.Spec.Storage.StorageClassName = &o.StorageClass
	}
	if o.AccessMode != "" {
		dv.Spec.Storage.AccessModes = []corev1.PersistentVolumeAccessMode{corev1.PersistentVolumeAccessMode(o.AccessMode)}
	}
	if err := c.Create(ctx, dv); err != nil {
		return fmt.Errorf("create DataVolume %s: %w", key, err)
	}
	fmt.Fprintf(stdio.Err, "DataVolume %s created (%s)\n", key.Name, size.String())
	return nil
}

// waitDataVolume polls the DataVolume until done says so, saying each phase it passes; a
// Failed DataVolume ends the wait with its reason.
func waitDataVolume(ctx context.Context, c client.Client, key types.NamespacedName, timeout time.Duration, stdio IO,
	done func(*vmpodv1.DataVolume) bool) (*vmpodv1.DataVolume, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last vmpodv1.DataVolumePhase
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		dv := &vmpodv1.DataVolume{}
		if err := c.Get(ctx, key, dv); err != nil {
			return nil, fmt.Errorf("get DataVolume %s: %w", key, err)
		}
		if dv.Status.Phase != last {
			last = dv.Status.Phase
			fmt.Fprintf(stdio.Err, "DataVolume %s: %s\n", key.Name, orPending(last))
		}
		if done(dv) {
			return dv, nil
		}
		if dv.Status.Phase == vmpodv1.PhaseFailed {
			msg := "failed"
			if cond := meta.FindStatusCondition(dv.Status.Conditions, vmpodv1.DVReady); cond != nil {
				msg = cond.Reason + ": " + cond.Message
			}
			return nil, fmt.Errorf("DataVolume %s failed: %s", key.Name, msg)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("DataVolume %s is still %s after %s", key.Name, orPending(last), timeout)
		case <-tick.C:
		}
	}
}

func orPending(p vmpodv1.DataVolumePhase) vmpodv1.DataVolumePhase {
	if p == "" {
		return vmpodv1.PhasePending
	}
	return p
}

// uploadPod is the DataVolume's running importer pod.
func uploadPod(ctx context.Context, c client.Client, dv *vmpodv1.DataVolume) (string, error) {
	pods := &corev1.PodList{}
	if err := c.List(ctx, pods, client.InNamespace(dv.Namespace), client.MatchingLabels{"job-name": datavolume.WorkerName(dv)}); err != nil {
		return "", fmt.Errorf("list the importer's pods: %w", err)
	}
	for _, p := range pods.Items {
		if p.Status.Phase == corev1.PodRunning && p.DeletionTimestamp == nil {
			return p.Name, nil
		}
	}
	return "", fmt.Errorf("DataVolume %s is UploadReady but its importer Job %s has no running pod", dv.Name, datavolume.WorkerName(dv))
}

// put sends the image, saying how far it got every few seconds, and returns the importer's
// verdict: it answers once the image is written, or refuses it with the reason.
func put(ctx context.Context, url string, f *os.File, size int64, stdio IO) error {
	body := &counting.Reader{R: f}
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, url, body)
	if err != nil {
		return err
	}
	req.ContentLength = size
	req.Header.Set("Content-Type", "application/octet-stream")
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		t := time.NewTicker(3 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				n := body.N()
				fmt.Fprintf(stdio.Err, "sent %d of %d MiB (%.0f%%)\n", n>>20, size>>20, 100*float64(n)/float64(max(size, 1)))
			}
		}
	}()
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("upload: %w", err)
	}
	defer resp.Body.Close()
	answer, _ := io.ReadAll(io.LimitReader(resp.Body, 8<<10))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("the importer refused the upload (%s): %s", resp.Status, strings.TrimSpace(string(answer)))
	}
	return nil
}
