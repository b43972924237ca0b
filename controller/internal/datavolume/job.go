package datavolume

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strconv"

	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
)

// DataVolumeLabel marks the objects made for a DataVolume with its name.
const DataVolumeLabel = "vmpod.dev/datavolume"

// The worker pod's layout. The importer gets every path as a flag, so these are the only
// place they are chosen.
const (
	ImporterContainer = "importer"
	dataMount         = "/vmpod/data"
	dataDevice        = "/dev/vmpod-data"
	sourceMount       = "/vmpod/source"
	sourceDevice      = "/dev/vmpod-source"
	scratchMount      = "/vmpod/scratch"
	caMount           = "/vmpod/ca"
	authMount         = "/vmpod/auth"
	headersMount      = "/vmpod/headers"

	// FilesystemOverhead is the share of a Filesystem PVC kept free for the filesystem's
	// own metadata, as CDI does (its default is 5.5%): the disk image gets the rest.
	FilesystemOverhead = "0.055"

	// exitPermanent is the importer's exit code for failures a retry cannot fix (a 404, a
	// checksum mismatch, a corrupt image); the Job's podFailurePolicy fails at once on it.
	exitPermanent = 2
)

// WorkerName names the Job, ServiceAccount, Role and RoleBinding that fill a DataVolume:
// vmpod-import-<name>, shortened with a hash to fit the 63 characters of a label value
// (the Job controller labels pods with the Job's name).
func WorkerName(dv *vmpodv1.DataVolume) string {
	name := "vmpod-import-" + dv.Name
	if len(name) <= 63 {
		return name
	}
	sum := sha256.Sum256([]byte(dv.Name))
	return name[:54] + "-" + hex.EncodeToString(sum[:4])
}

// workerMeta is the metadata of the objects in dv's namespace that fill it: named like the
// worker, labelled, owned by dv.
func workerMeta(dv *vmpodv1.DataVolume) metav1.ObjectMeta {
	return metav1.ObjectMeta{Name: WorkerName(dv), Namespace: dv.Namespace, Labels: map[string]string{DataVolumeLabel: dv.Name},
		OwnerReferences: []metav1.OwnerReference{*metav1.NewControllerRef(dv, vmpodv1.GroupVersion.WithKind("DataVolume"))}}
}

// WorkerJobSpec is the Job that runs vmpod-importer for dv into pvc. A clone has source,
// the PVC to mount (in dv's namespace), or served, the source pod to pull from (another
// namespace's PVC).
func WorkerJobSpec(dv *vmpodv1.DataVolume, pvc, source *corev1.PersistentVolumeClaim, served *RemoteClone, name, image string) batchv1.JobSpec {
	block := pvc.Spec.VolumeMode != nil && *pvc.Spec.VolumeMode == corev1.PersistentVolumeBlock
	size := pvc.Spec.Resources.Requests[corev1.ResourceStorage]
	c := corev1.Container{
		Name:  ImporterContainer,
		Image: image,
		Args:  []string{"--content-type=" + string(contentType(dv)), "--size=" + strconv.FormatInt(size.Value(), 10), "--scratch=" + scratchMount},
		Env: []corev1.EnvVar{
			{Name: "VMPOD_PVC_NAME", Value: pvc.Name},
			{Name: "VMPOD_NAMESPACE", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.namespace"}}},
		},
		VolumeMounts: []corev1.VolumeMount{{Name: "scratch", MountPath: scratchMount}},
		Resources: corev1.ResourceRequirements{Requests: corev1.ResourceList{
			corev1.ResourceCPU: resource.MustParse("100m"), corev1.ResourceMemory: resource.MustParse("128Mi")}},
		SecurityContext: &corev1.SecurityContext{
			AllowPrivilegeEscalation: ptr.To(false),
			SeccompProfile:           &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
		},
		TerminationMessagePolicy: corev1.TerminationMessageFallbackToLogsOnError,
	}
	volumes := []corev1.Volume{
		{Name: "data", VolumeSource: corev1.VolumeSource{PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: pvc.Name}}},
		// scratch holds the download until it is verified and converted; never more than
		// the PVC's size
		{Name: "scratch", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{SizeLimit: &size}}},
	}
	if block {
		c.Args = append(c.Args, "--dest="+dataDevice, "--dest-mode=block")
		c.VolumeDevices = append(c.VolumeDevices, corev1.VolumeDevice{Name: "data", DevicePath: dataDevice})
	} else {
		c.Args = append(c.Args, "--dest="+dataMount, "--dest-mode=filesystem", "--filesystem-overhead="+FilesystemOverhead)
		c.VolumeMounts = append(c.VolumeMounts, corev1.VolumeMount{Name: "data", MountPath: dataMount})
	}

	src := dv.Spec.Source
	mount := func(name, path string, vs corev1.VolumeSource) {
		volumes = append(volumes, corev1.Volume{Name: name, VolumeSource: vs})
		c.VolumeMounts = append(c.VolumeMounts, corev1.VolumeMount{Name: name, MountPath: path, ReadOnly: true})
	}
	addCredentials := func(secret, certConfigMap string) {
		if secret != "" {
			mount("auth", authMount, corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: secret}})
			c.Args = append(c.Args, "--auth-dir="+authMount)
		}
		if certConfigMap != "" {
			mount("ca", caMount, corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
				LocalObjectReference: corev1.LocalObjectReference{Name: certConfigMap}}})
			c.Args = append(c.Args, "--ca-dir="+caMount)
		}
	}
	switch {
	case src.HTTP != nil:
		c.Args = append(c.Args, "--source=http", "--url="+src.HTTP.URL)
		if src.HTTP.Checksum != "" {
			c.Args = append(c.Args, "--checksum="+src.HTTP.Checksum)
		}
		for _, h := range src.HTTP.ExtraHeaders {
			c.Args = append(c.Args, "--header="+h)
		}
		for i, s := range src.HTTP.SecretExtraHeaders {
			dir := fmt.Sprintf("%s/%d", headersMount, i)
			mount(fmt.Sprintf("headers-%d", i), dir, corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: s}})
			c.Args = append(c.Args, "--header-dir="+dir)
		}
		addCredentials(src.HTTP.SecretRef, src.HTTP.CertConfigMap)
	case src.S3 != nil:
		c.Args = append(c.Args, "--source=s3", "--url="+src.S3.URL)
		if src.S3.Region != "" {
			c.Args = append(c.Args, "--s3-region="+src.S3.Region)
		}
		if src.S3.Checksum != "" {
			c.Args = append(c.Args, "--checksum="+src.S3.Checksum)
		}
		addCredentials(src.S3.SecretRef, src.S3.CertConfigMap)
	case src.Registry != nil:
		c.Args = append(c.Args, "--source=registry", "--url="+src.Registry.URL)
		addCredentials(src.Registry.SecretRef, src.Registry.CertConfigMap)
	case src.PVC != nil && source != nil:
		c.Args = append(c.Args, "--source=pvc")
		volumes = append(volumes, corev1.Volume{Name: "source", VolumeSource: corev1.VolumeSource{
			PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: source.Name, ReadOnly: true}}})
		if source.Spec.VolumeMode != nil && *source.Spec.VolumeMode == corev1.PersistentVolumeBlock {
			c.Args = append(c.Args, "--source-path="+sourceDevice)
			c.VolumeDevices = append(c.VolumeDevices, corev1.VolumeDevice{Name: "source", DevicePath: sourceDevice})
		} else {
			c.Args = append(c.Args, "--source-path="+sourceMount)
			c.VolumeMounts = append(c.VolumeMounts, corev1.VolumeMount{Name: "source", MountPath: sourceMount, ReadOnly: true})
		}
	case src.PVC != nil && served != nil:
		// a guest-written disk: raw, never probed (see the importer's --source-format)
		c.Args = append(c.Args, "--source=http", "--url="+served.URL, "--source-format=raw", "--header-dir="+headersMount, "--ca-dir="+caMount)
		only := func(key string) corev1.VolumeSource {
			return corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: served.Secret, Items: []corev1.KeyToPath{{Key: key, Path: key}}}}
		}
		mount("clone-header", headersMount, only(cloneHeaderKey))
		mount("clone-ca", caMount, only(cloneCAKey))
	case src.Upload != nil:
		c.Args = append(c.Args, "--source=upload", "--listen=127.0.0.1:"+strconv.Itoa(vmpodv1.UploadPort))
	case src.Blank != nil:
		c.Args = append(c.Args, "--source=blank")
	}

	return batchv1.JobSpec{
		// transient failures (network) retry; permanent ones fail the Job at once
		BackoffLimit: ptr.To[int32](3),
		PodFailurePolicy: &batchv1.PodFailurePolicy{Rules: []batchv1.PodFailurePolicyRule{{
			Action: batchv1.PodFailurePolicyActionFailJob,
			OnExitCodes: &batchv1.PodFailurePolicyOnExitCodesRequirement{
				ContainerName: ptr.To(ImporterContainer), Operator: batchv1.PodFailurePolicyOnExitCodesOpIn, Values: []int32{exitPermanent}},
		}}},
		Template: corev1.PodTemplateSpec{
			Spec: corev1.PodSpec{
				RestartPolicy:      corev1.RestartPolicyNever,
				ServiceAccountName: name,
				Containers:         []corev1.Container{c},
				Volumes:            volumes,
			},
		},
	}
}

func contentType(dv *vmpodv1.DataVolume) vmpodv1.ContentType {
	if dv.Spec.ContentType == "" {
		return vmpodv1.ContentTypeKubeVirt
	}
	return dv.Spec.ContentType
}
