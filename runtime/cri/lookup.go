package cri

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	containersapi "github.com/containerd/containerd/api/services/containers/v1"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// maxListBytes bounds the reply listing the node's containers: specs are ~10-30 KiB, so
// a few thousand containers.
const maxListBytes = 128 << 20

// Pod is a pod on this node as containerd's CRI plugin recorded it.
type Pod struct {
	UID       string
	Namespace string
	// Labels are its sandbox's: the pod's labels.
	Labels map[string]string
	// Containers are the OCI specs of its app containers (not the sandbox's).
	Containers []*specs.Spec
}

// PodLookup finds a pod on this node by its UID.
type PodLookup interface {
	Pod(ctx context.Context, uid string) (*Pod, error)
}

// Containerd looks pods up in containerd's container metadata, through its API socket
// (the one containerd started the shim with). It reads; it changes nothing.
type Containerd struct {
	Address   string // containerd's gRPC socket
	Namespace string // containerd's namespace of the pods (the shim's own: k8s.io)
}

// Pod finds the pod whose UID is uid: its app containers (by the sandbox-uid annotation
// the CRI plugin gives each), then its sandbox (by their sandbox-id), whose labels and
// namespace must agree. An unknown pod is errdefs.ErrNotFound.
func (c Containerd) Pod(ctx context.Context, uid string) (*Pod, error) {
	if c.Address == "" {
		return nil, fmt.Errorf("pod %s: the shim was started without containerd's address: %w", uid, errdefs.ErrFailedPrecondition)
	}
	// every container with its spec in one reply: more than gRPC's default 4 MiB on a
	// busy node
	conn, err := grpc.NewClient("unix://"+c.Address, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxListBytes)))
	if err != nil {
		return nil, fmt.Errorf("containerd at %s: %w", c.Address, err)
	}
	defer conn.Close()
	client := containersapi.NewContainersClient(conn)
	ctx = namespaces.WithNamespace(ctx, c.Namespace)

	list, err := client.List(ctx, &containersapi.ListContainersRequest{Filters: []string{fmt.Sprintf("labels.%q==%s", kindLabel, ContainerTypeContainer)}})
	if err != nil {
		return nil, fmt.Errorf("pod %s: list containerd's containers: %w", uid, errgrpc.ToNative(err))
	}
	pod := &Pod{UID: uid}
	var sandboxID string
	for _, ctr := range list.GetContainers() {
		spec, err := specOf(ctr)
		if err != nil || spec.Annotations[AnnotationSandboxUID] != uid {
			continue // another pod's, or not CRI's
		}
		id := spec.Annotations[AnnotationSandboxID]
		if sandboxID != "" && id != sandboxID {
			// two sandboxes of one UID: a pod whose sandbox was recreated; ask again
			// once the kubelet has removed the old one
			return nil, fmt.Errorf("pod %s: containers of two sandboxes (%s, %s): %w", uid, sandboxID, id, errdefs.ErrFailedPrecondition)
		}
		sandboxID = id
		pod.Containers = append(pod.Containers, spec)
	}
	if sandboxID == "" {
		return nil, fmt.Errorf("pod %s: no container of it on this node: %w", uid, errdefs.ErrNotFound)
	}
	got, err := client.Get(ctx, &containersapi.GetContainerRequest{ID: sandboxID})
	if err != nil {
		return nil, fmt.Errorf("pod %s: sandbox %s: %w", uid, sandboxID, errgrpc.ToNative(err))
	}
	sandbox := got.GetContainer()
	spec, err := specOf(sandbox)
	if err != nil {
		return nil, fmt.Errorf("pod %s: sandbox %s: %w", uid, sandboxID, err)
	}
	if sandbox.GetLabels()[kindLabel] != ContainerTypeSandbox || spec.Annotations[AnnotationSandboxUID] != uid {
		return nil, fmt.Errorf("pod %s: container %s, named its sandbox, is not that pod's sandbox: %w", uid, sandboxID, errdefs.ErrFailedPrecondition)
	}
	pod.Namespace = spec.Annotations[AnnotationSandboxNamespace]
	pod.Labels = sandbox.GetLabels()
	return pod, nil
}

// specOf decodes a container's OCI spec (containerd stores it as JSON).
func specOf(ctr *containersapi.Container) (*specs.Spec, error) {
	a := ctr.GetSpec()
	if a == nil || !strings.HasSuffix(a.GetTypeUrl(), "opencontainers/runtime-spec/1/Spec") {
		return nil, errors.New("no OCI runtime spec")
	}
	var spec specs.Spec
	if err := json.Unmarshal(a.GetValue(), &spec); err != nil {
		return nil, fmt.Errorf("OCI runtime spec: %w", err)
	}
	return &spec, nil
}
