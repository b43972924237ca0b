// Package pod is one Kubernetes pod as one VM, behind one interface the shim calls: a
// container pod (the vmpod guest runs the pod's containers under its agent) or a VM pod
// (the pod is a guest OS booted from its disks, driven through the QEMU guest agent). It
// knows nothing of containerd's task API; the shim maps that onto it. Both kinds sit on
// the machine layer (runtime/vmm) with a guest layer on top (runtime/vmpodagent,
// runtime/qga); the shim never reaches either layer itself.
package pod

import (
	"context"
	"fmt"
	"syscall"
	"time"

	cgroupsv2 "github.com/containerd/cgroups/v3/cgroup2/stats"
	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/vmpod/vmpod/api/annotations"
	"github.com/vmpod/vmpod/internal/idmap"
	"github.com/vmpod/vmpod/runtime"
	"github.com/vmpod/vmpod/runtime/cri"
	"github.com/vmpod/vmpod/runtime/nodeconfig"
)

// Pod is a running pod. Container ids are containerd's; a pod's first container (the
// sandbox, under CRI) started it.
type Pod interface {
	// ID of the pod: CRI's sandbox id, or the first container's id outside CRI.
	ID() string
	// CreateContainer creates a container from its host spec and its rootfs; its init does
	// not run until StartContainer.
	CreateContainer(ctx context.Context, id string, root Rootfs, spec *specs.Spec, stdio runtime.Stdio) (Process, error)
	StartContainer(ctx context.Context, id string) error
	// Exec starts another process in a running container.
	Exec(ctx context.Context, containerID, execID string, proc *specs.Process, stdio runtime.Stdio) (Process, error)
	PauseContainer(ctx context.Context, id string) error
	ResumeContainer(ctx context.Context, id string) error
	// UpdateContainer gives a container new resource limits.
	UpdateContainer(ctx context.Context, id string, r *specs.LinuxResources) error
	ContainerStats(ctx context.Context, id string) (*cgroupsv2.Metrics, error)
	// ContainerPids lists the host pids that stand for a container's processes.
	ContainerPids(ctx context.Context, id string) ([]uint32, error)
	// WaitOOMEvent blocks until an OOM kill numbered above afterSeq.
	WaitOOMEvent(ctx context.Context, afterSeq uint64) (OOMEvent, error)
	// RemoveContainer removes a container (force: kill it first) and what it held.
	RemoveContainer(ctx context.Context, id string, force bool) error
	// Stop ends the pod and releases everything it holds on the host; later calls
	// return the first result.
	Stop(ctx context.Context) error
	// Done is closed when the pod can run nothing more: its VM is gone for good.
	Done() <-chan struct{}
	// WriteRecord notes in a container's bundle what `shim delete` must clean up if the
	// shim dies.
	WriteRecord(bundle string) error
	// RootfsMap is the ID mapping a container's rootfs is to be mounted through before
	// CreateContainer, nil to mount it as it is (docs/design/025).
	RootfsMap() *idmap.Map
}

// Process is a container's init or an exec'd process.
type Process interface {
	// Pid is the process id reported to containerd.
	Pid() uint32
	// Wait blocks until the process exited. Its output may still be on its way (a
	// background child can hold it open).
	Wait(ctx context.Context) (runtime.Exit, error)
	// OutputDone is closed once the process's output has all reached the host, or was cut
	// off: by Remove, by the pod's end, or for an init a bounded drain after its exit.
	OutputDone() <-chan struct{}
	// Signal delivers sig (all: to every process of the container; init only).
	Signal(ctx context.Context, sig syscall.Signal, all bool) error
	// Resize sets the process's terminal size.
	Resize(ctx context.Context, width, height uint32) error
	// CloseStdin ends the process's stdin.
	CloseStdin(ctx context.Context) error
	// Remove forgets an exited process and stops its stdio.
	Remove(ctx context.Context) error
}

// Rootfs is a container's root filesystem on the host.
type Rootfs struct {
	// Dir is where it is, or is to be, mounted: what the guest is given.
	Dir string
	// Mount mounts it at Dir (containerd's snapshot, as every shim mounts it); nil when
	// Dir is the rootfs as it is. The pod mounts it when it creates the container, but
	// for a migration's target: it writes what the source's container wrote into Upper
	// first, and mounts it only then (docs/design/212).
	Mount func() error
	// Upper is the overlay's upper directory: what the container wrote. "" for a rootfs
	// that is no overlay (its container cannot migrate).
	Upper string
}

// mount mounts the rootfs unless it needs no mount.
func (r Rootfs) mount() error {
	if r.Mount == nil {
		return nil
	}
	return r.Mount()
}

// OOMEvent is one OOM kill in a pod.
type OOMEvent struct {
	Seq         uint64
	ContainerID string
	At          time.Time
}

// ID is the pod a container with this spec belongs to.
func ID(containerID string, spec *specs.Spec) string {
	if id := spec.Annotations[cri.AnnotationSandboxID]; id != "" {
		return id
	}
	return containerID
}

// Host is what a pod may ask of the node beyond its own spec.
type Host struct {
	// Pods finds another pod on the node, for a VM pod's disk attached from an attachment
	// pod's volume (vmspec.HotplugDisk.AttachmentPod); nil: none can be.
	Pods cri.PodLookup
	// ShimSocket is the socket the shim serves the pod on, removed by a sweep if the shim
	// dies without stopping the pod (vmm.Config.OwnerSockets); "" for none.
	ShimSocket string
}

// ownerSockets is the host's sockets for vmm.Config.OwnerSockets.
func (h Host) ownerSockets() []string {
	if h.ShimSocket == "" {
		return nil
	}
	return []string{h.ShimSocket}
}

// Start starts the pod whose first container has spec: a VM pod if its annotations ask
// for one, else a container pod. It validates the vmpod.dev/* annotations against the
// node's config before anything starts.
func Start(ctx context.Context, cfg nodeconfig.Config, podID string, spec *specs.Spec, host Host) (Pod, error) {
	choice, err := annotations.Parse(spec.Annotations, cfg.Annotations.Allowed)
	if err != nil {
		return nil, fmt.Errorf("pod %s: %w: %w", podID, err, errdefs.ErrInvalidArgument)
	}
	go sweepOrphans(context.WithoutCancel(ctx), cfg.StateDir)
	if choice.VM != "" {
		return startVMPod(ctx, cfg, podID, spec, choice.VM, host)
	}
	return startContainerPod(ctx, cfg, podID, spec, choice, host)
}

// cgroupsPath is the cgroup the container's spec asks for: the pod's (the kubelet's pod
// cgroup is its parent), where the VM's host processes go.
func cgroupsPath(spec *specs.Spec) string {
	if spec.Linux == nil {
		return ""
	}
	return spec.Linux.CgroupsPath
}

// networkNamespace is the pod's network namespace as CRI made it (with CNI's veth in it),
// or "" when there is none to join (a plain ctr run, or a host-network pod).
func networkNamespace(spec *specs.Spec) string {
	if spec.Linux == nil {
		return ""
	}
	for _, ns := range spec.Linux.Namespaces {
		if ns.Type == specs.NetworkNamespace {
			return ns.Path
		}
	}
	return ""
}
