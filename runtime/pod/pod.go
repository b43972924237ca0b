// Package pod is one Kubernetes pod as one VM: it boots the VM sized and configured from
// the pod's first (sandbox) OCI spec and the node's config, and runs the pod's containers
// in it, translating their specs from host terms into guest terms. It knows nothing of
// containerd's task API; the shim maps that onto it.
package pod

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
	"github.com/vmpod/vmpod/api/annotations"
	"github.com/vmpod/vmpod/internal/cleanup"
	"github.com/vmpod/vmpod/runtime"
	"github.com/vmpod/vmpod/runtime/network"
	"github.com/vmpod/vmpod/runtime/nodeconfig"
)

// Pod is a running pod VM.
type Pod struct {
	id       string
	vm       *runtime.VM
	machine  runtime.Machine
	sizing   nodeconfig.Sizing
	boot     Size // what the VM booted with
	maxSize  Size // how far hotplug can grow it (boot on microvm)
	stateDir string
	network  *network.Plumbing         // nil without a pod network namespace
	loopback *network.LoopbackRedirect // port-forwards into the guest; nil without a netns

	resizeMu sync.Mutex // one resize at a time

	mu         sync.Mutex
	size       Size // what the VM has now
	containers map[string]*container

	stopOnce sync.Once
	stopErr  error
}

type container struct {
	shares []string
	pid    uint32 // guest pid of its init, once created
	claim  claim  // its limits, which the VM's size must hold
}

// ID of the pod: CRI's sandbox id, or the container id outside CRI.
func (p *Pod) ID() string { return p.id }

// VM is the pod's VM.
func (p *Pod) VM() *runtime.VM { return p.vm }

// Size is what the VM has: its boot size, grown by UpdateContainer.
func (p *Pod) Size() Size {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.size
}

// Done is closed when the VM is gone.
func (p *Pod) Done() <-chan struct{} { return p.vm.Done() }

// ID is the pod a container with this spec belongs to.
func ID(containerID string, spec *specs.Spec) string {
	if id := spec.Annotations[AnnotationSandboxID]; id != "" {
		return id
	}
	return containerID
}

// Start boots the VM for the pod whose first container has spec: it validates the
// vmpod.dev/* annotations against the node's config before anything starts.
func Start(ctx context.Context, cfg nodeconfig.Config, podID string, spec *specs.Spec) (*Pod, error) {
	choice, err := annotations.Parse(spec.Annotations, cfg.Annotations.Allowed)
	if err != nil {
		return nil, fmt.Errorf("pod %s: %w: %w", podID, err, errdefs.ErrInvalidArgument)
	}
	if choice.VM != "" {
		return nil, fmt.Errorf("pod %s: annotation %s: VM pods are not supported by this shim yet: %w", podID, annotations.VM, errdefs.ErrNotImplemented)
	}
	size, err := sizeFor(spec, cfg.Sizing)
	if err != nil {
		return nil, fmt.Errorf("pod %s: %w: %w", podID, err, errdefs.ErrInvalidArgument)
	}
	h := cfg.Hypervisor
	vmCfg := runtime.Config{
		Name:          podID,
		StateDir:      filepath.Join(cfg.StateDir, podID),
		QEMUPath:      h.QEMU,
		VirtiofsdPath: h.Virtiofsd,
		Kernel:        h.Kernel,
		Initrd:        h.Initrd,
		KernelParams:  h.KernelParams,
		Machine:       h.Machine,
		Accel:         h.Accel,
		SharedFS:      h.SharedFS,
		VCPUs:         size.VCPUs,
		MemoryMiB:     size.MemoryMiB,
		BootTimeout:   cfg.Timeouts.Boot.Duration,
		CallTimeout:   cfg.Timeouts.Call.Duration,
		StopTimeout:   cfg.Timeouts.Stop.Duration,
		Debug:         cfg.Debug,
	}
	if choice.Machine != "" {
		vmCfg.Machine = runtime.Machine(choice.Machine)
	}
	if choice.SharedFS != "" {
		vmCfg.SharedFS = runtime.SharedFS(choice.SharedFS)
	}
	maxSize := headroom(vmCfg.Machine, size, cfg.Sizing)
	vmCfg.MaxVCPUs = maxSize.VCPUs
	if maxSize.MemoryMiB > size.MemoryMiB {
		vmCfg.MaxMemoryMiB = maxSize.MemoryMiB
	}
	log.G(ctx).WithField("pod", podID).Infof("booting VM: %d vCPU, %d MiB, %s (can grow to %d vCPU, %d MiB)",
		size.VCPUs, size.MemoryMiB, vmCfg.Machine, maxSize.VCPUs, maxSize.MemoryMiB)

	var undo cleanup.Stack
	defer func() { _ = undo.Run() }()
	setup := &agentv1.SetupSandboxRequest{
		Hostname:          spec.Hostname,
		HostTimeUnixNanos: time.Now().UnixNano(),
	}
	var plumbing *network.Plumbing
	if netns := networkNamespace(spec); netns != "" {
		plan, err := network.Inspect(netns)
		if err != nil {
			return nil, fmt.Errorf("pod %s: %w", podID, err)
		}
		for _, s := range plan.Skipped {
			log.G(ctx).WithField("pod", podID).Infof("pod network: skipped %s", s)
		}
		if plumbing, err = network.Plumb(plan); err != nil {
			return nil, fmt.Errorf("pod %s: %w", podID, err)
		}
		undo.Add("tear down pod network", plumbing.Teardown)
		vmCfg.NICs = plumbing.NICs()
		setup.Interfaces, setup.Routes = plan.GuestInterfaces(), plan.GuestRoutes()
	}
	vm, err := runtime.Start(ctx, vmCfg)
	if err != nil {
		return nil, fmt.Errorf("pod %s: %w", podID, err)
	}
	undo.Add("stop VM", vm.Kill)
	if err := vm.Agent().SetupSandbox(ctx, setup); err != nil {
		return nil, fmt.Errorf("pod %s: %w", podID, err)
	}
	p := &Pod{id: podID, vm: vm, machine: vmCfg.Machine, sizing: cfg.Sizing, boot: size, maxSize: maxSize, size: size, stateDir: vmCfg.StateDir, network: plumbing, containers: map[string]*container{}}
	if plumbing != nil {
		if p.loopback, err = network.RedirectLoopback(plumbing.Plan().Netns); err != nil {
			return nil, fmt.Errorf("pod %s: %w", podID, err)
		}
		go p.servePortForwards(log.WithLogger(context.WithoutCancel(ctx), log.G(ctx).WithField("pod", podID)))
	}
	undo.Release()
	return p, nil
}

// servePortForwards carries each connection containerd makes to localhost in the pod's
// netns (a CRI port-forward) to the same port on the guest's loopback.
func (p *Pod) servePortForwards(ctx context.Context) {
	for {
		conn, port, err := p.loopback.Accept()
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			log.G(ctx).WithError(err).Warn("port-forward")
			continue
		}
		go func() {
			if err := p.vm.ForwardPort(ctx, conn, port); err != nil {
				log.G(ctx).WithError(err).Debugf("port-forward to %d ended", port)
			}
		}()
	}
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

// pids are the guest pids of the pod's container inits: the processes whose namespaces
// other containers may join.
func (p *Pod) pids() []uint32 {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []uint32
	for _, c := range p.containers {
		if c.pid != 0 {
			out = append(out, c.pid)
		}
	}
	return out
}

// CreateContainer creates a container from its host spec and a host rootfs directory.
func (p *Pod) CreateContainer(ctx context.Context, id, rootfs string, spec *specs.Spec, stdio runtime.Stdio) (*runtime.Process, error) {
	p.mu.Lock()
	if _, exists := p.containers[id]; exists {
		p.mu.Unlock()
		return nil, fmt.Errorf("pod %s: container %s: %w", p.id, id, errdefs.ErrAlreadyExists)
	}
	c := &container{}
	if spec.Linux != nil {
		c.claim = claimOf(spec.Linux.Resources, claim{})
	}
	p.containers[id] = c
	p.mu.Unlock()

	var undo cleanup.Stack
	defer func() { _ = undo.Run() }()
	undo.Add("forget container", func() error {
		p.mu.Lock()
		defer p.mu.Unlock()
		delete(p.containers, id)
		return nil
	})
	guest, shares, err := guestSpec(id, spec, p.pids(), p.vm.Share, runtime.MountPointsBelow)
	for _, name := range shares {
		undo.Add("unshare "+name, func() error { return p.vm.Unshare(name) })
	}
	if err != nil {
		return nil, fmt.Errorf("pod %s: container %s: %w: %w", p.id, id, err, errdefs.ErrInvalidArgument)
	}
	proc, err := p.vm.CreateContainer(ctx, id, rootfs, guest, stdio)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	c.shares, c.pid = shares, proc.Pid()
	p.mu.Unlock()
	undo.Release()
	return proc, nil
}

// RemoveContainer removes the container in the guest and takes back its shares.
func (p *Pod) RemoveContainer(ctx context.Context, id string, force bool) error {
	p.mu.Lock()
	c, ok := p.containers[id]
	p.mu.Unlock()
	if !ok {
		return fmt.Errorf("pod %s: container %s: %w", p.id, id, errdefs.ErrNotFound)
	}
	if err := p.vm.RemoveContainer(ctx, id, force); err != nil {
		return err
	}
	var errs []error
	for _, name := range c.shares {
		if err := p.vm.Unshare(name); err != nil {
			errs = append(errs, err)
		}
	}
	p.mu.Lock()
	delete(p.containers, id)
	p.mu.Unlock()
	if len(errs) > 0 {
		return fmt.Errorf("pod %s: container %s: %v", p.id, id, errs)
	}
	return nil
}

// Exec starts a process in a running container.
func (p *Pod) Exec(ctx context.Context, containerID, execID string, proc *specs.Process, stdio runtime.Stdio) (*runtime.Process, error) {
	return p.vm.Exec(ctx, containerID, execID, proc, stdio)
}

// Stop shuts the VM down and releases everything the pod holds on the host: the
// port-forward redirect, the VM (it holds the taps), then the network plumbing. Later
// calls return the first result.
func (p *Pod) Stop(ctx context.Context) error {
	p.stopOnce.Do(func() {
		var err error
		if p.loopback != nil {
			err = p.loopback.Close()
		}
		err = errors.Join(err, p.vm.Stop(ctx))
		if p.network != nil {
			err = errors.Join(err, p.network.Teardown())
		}
		p.stopErr = err
	})
	return p.stopErr
}
