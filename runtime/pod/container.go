package pod

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"sync"
	"time"

	cgroupsv2 "github.com/containerd/cgroups/v3/cgroup2/stats"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"k8s.io/utils/cpuset"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
	"github.com/vmpod/vmpod/api/annotations"
	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/internal/cleanup"
	"github.com/vmpod/vmpod/runtime"
	"github.com/vmpod/vmpod/runtime/network"
	"github.com/vmpod/vmpod/runtime/nodeconfig"
	"github.com/vmpod/vmpod/runtime/vmm"
	"github.com/vmpod/vmpod/runtime/vmpodagent"
)

// containerPod is a pod whose containers run in the vmpod guest under its agent.
type containerPod struct {
	id       string
	guest    *vmpodagent.Guest
	machine  machine.Type
	sizing   nodeconfig.Sizing
	boot     Size // what the VM booted with
	maxSize  Size // how far hotplug can grow it (boot on microvm)
	stateDir string
	network  *network.Plumbing         // nil without a pod network namespace
	loopback *network.LoopbackRedirect // port-forwards into the guest; nil without a netns

	resizeMu sync.Mutex // one resize at a time

	pinMu  sync.Mutex    // one vCPU pinning at a time
	pinned cpuset.CPUSet // the host CPUs the vCPUs run on; empty: anywhere

	mu         sync.Mutex
	size       Size // what the VM has now
	containers map[string]*container

	stopOnce sync.Once
	stopErr  error
}

type container struct {
	shares []string
	pid    uint32        // guest pid of its init, once created
	claim  claim         // its limits, which the VM's size must hold
	cpus   cpuset.CPUSet // the host CPUs it was given (linux.resources.cpu.cpus)
}

// startContainerPod boots the VM for a container pod, sized from spec (the pod's first
// container) within the node's bounds.
func startContainerPod(ctx context.Context, cfg nodeconfig.Config, podID string, spec *specs.Spec, choice annotations.Pod) (*containerPod, error) {
	size, err := sizeFor(spec, cfg.Sizing)
	if err != nil {
		return nil, fmt.Errorf("pod %s: %w: %w", podID, err, errdefs.ErrInvalidArgument)
	}
	h := cfg.Hypervisor
	gc := vmpodagent.Config{
		Config: vmm.Config{
			Name:          podID,
			StateDir:      filepath.Join(cfg.StateDir, podID),
			QEMUPath:      h.QEMU,
			VirtiofsdPath: h.Virtiofsd,
			Boot:          vmm.Boot{Kernel: h.Kernel, Initrd: h.Initrd, KernelParams: h.KernelParams},
			Type:          h.Machine,
			Accel:         h.Accel,
			SharedFS:      h.SharedFS,
			VCPUs:         size.VCPUs,
			MemoryMiB:     size.MemoryMiB,
			StopTimeout:   cfg.Timeouts.Stop.Duration,
			Cgroup:        cgroupsPath(spec),
		},
		BootTimeout: cfg.Timeouts.Boot.Duration,
		CallTimeout: cfg.Timeouts.Call.Duration,
		Debug:       cfg.Debug,
	}
	if choice.Machine != "" {
		gc.Type = choice.Machine
	}
	if choice.SharedFS != "" {
		gc.SharedFS = choice.SharedFS
	}
	maxSize := headroom(gc.Type, size, cfg.Sizing)
	gc.MaxVCPUs = maxSize.VCPUs
	if maxSize.MemoryMiB > size.MemoryMiB {
		gc.MaxMemoryMiB = maxSize.MemoryMiB
	}
	log.G(ctx).WithField("pod", podID).Infof("booting VM: %d vCPU, %d MiB, %s (can grow to %d vCPU, %d MiB)",
		size.VCPUs, size.MemoryMiB, gc.Type, maxSize.VCPUs, maxSize.MemoryMiB)

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
		gc.NICs = plumbing.NICs()
		setup.Interfaces, setup.Routes = plan.GuestInterfaces(), plan.GuestRoutes()
	}
	guest, err := vmpodagent.Boot(ctx, gc)
	if err != nil {
		return nil, fmt.Errorf("pod %s: %w", podID, err)
	}
	undo.Add("stop VM", guest.Kill)
	if err := guest.Agent().SetupSandbox(ctx, setup); err != nil {
		return nil, fmt.Errorf("pod %s: %w", podID, err)
	}
	p := &containerPod{id: podID, guest: guest, machine: gc.Type, sizing: cfg.Sizing, boot: size, maxSize: maxSize, size: size,
		stateDir: gc.StateDir, network: plumbing, containers: map[string]*container{}}
	if plumbing != nil {
		if p.loopback, err = network.RedirectLoopback(plumbing.Plan().Netns); err != nil {
			return nil, fmt.Errorf("pod %s: %w", podID, err)
		}
		go p.servePortForwards(log.WithLogger(context.WithoutCancel(ctx), log.G(ctx).WithField("pod", podID)))
	}
	undo.Release()
	return p, nil
}

func (p *containerPod) ID() string { return p.id }

// Size is what the VM has: its boot size, grown by UpdateContainer.
func (p *containerPod) Size() Size {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.size
}

func (p *containerPod) Done() <-chan struct{} { return p.guest.Done() }

func (p *containerPod) WriteRecord(bundle string) error { return writeRecord(bundle, p.id, p.stateDir) }

// servePortForwards carries each connection containerd makes to localhost in the pod's
// netns (a CRI port-forward) to the same port on the guest's loopback.
func (p *containerPod) servePortForwards(ctx context.Context) {
	p.loopback.Serve(func(conn net.Conn, port uint32) {
		if err := p.guest.ForwardPort(ctx, conn, port); err != nil {
			log.G(ctx).WithError(err).Debugf("port-forward to %d ended", port)
		}
	}, func(err error) { log.G(ctx).WithError(err).Warn("port-forward") })
}

// pids are the guest pids of the pod's container inits: the processes whose namespaces
// other containers may join.
func (p *containerPod) pids() []uint32 {
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

func (p *containerPod) CreateContainer(ctx context.Context, id, rootfs string, spec *specs.Spec, stdio runtime.Stdio) (Process, error) {
	p.mu.Lock()
	if _, exists := p.containers[id]; exists {
		p.mu.Unlock()
		return nil, fmt.Errorf("pod %s: container %s: %w", p.id, id, errdefs.ErrAlreadyExists)
	}
	c := &container{}
	if spec.Linux != nil {
		c.claim = claimOf(spec.Linux.Resources, claim{})
		cpus, err := hostCPUs(spec.Linux.Resources)
		if err != nil {
			p.mu.Unlock()
			return nil, fmt.Errorf("pod %s: container %s: %w: %w", p.id, id, err, errdefs.ErrInvalidArgument)
		}
		c.cpus = cpus
	}
	p.containers[id] = c
	p.mu.Unlock()

	var undo cleanup.Stack
	defer func() { _ = undo.Run() }()
	undo.Add("re-pin vCPUs without it", func() error { return p.pinVCPUs(context.WithoutCancel(ctx), false) })
	undo.Add("forget container", func() error {
		p.mu.Lock()
		defer p.mu.Unlock()
		delete(p.containers, id)
		return nil
	})
	guest, shares, err := guestSpec(id, spec, p.pids(), p.guest.Share, vmm.MountPointsBelow)
	for _, name := range shares {
		undo.Add("unshare "+name, func() error { return p.guest.Unshare(name) })
	}
	if err != nil {
		return nil, fmt.Errorf("pod %s: container %s: %w: %w", p.id, id, err, errdefs.ErrInvalidArgument)
	}
	if guest.Linux != nil {
		guest.Linux.Resources = guestResources(guest.Linux.Resources)
	}
	if err := p.pinVCPUs(ctx, false); err != nil {
		return nil, fmt.Errorf("pod %s: container %s: linux.resources.cpu.cpus: %w", p.id, id, err)
	}
	proc, err := p.guest.CreateContainer(ctx, id, rootfs, guest, stdio)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	c.shares, c.pid = shares, proc.Pid()
	p.mu.Unlock()
	undo.Release()
	return proc, nil
}

func (p *containerPod) StartContainer(ctx context.Context, id string) error {
	return p.guest.Agent().StartContainer(ctx, id)
}

func (p *containerPod) Exec(ctx context.Context, containerID, execID string, proc *specs.Process, stdio runtime.Stdio) (Process, error) {
	pr, err := p.guest.Exec(ctx, containerID, execID, proc, stdio)
	if err != nil {
		return nil, err
	}
	return pr, nil
}

func (p *containerPod) PauseContainer(ctx context.Context, id string) error {
	return p.guest.Agent().PauseContainer(ctx, id)
}

func (p *containerPod) ResumeContainer(ctx context.Context, id string) error {
	return p.guest.Agent().ResumeContainer(ctx, id)
}

func (p *containerPod) ContainerStats(ctx context.Context, id string) (*cgroupsv2.Metrics, error) {
	return p.guest.Agent().ContainerStats(ctx, id)
}

func (p *containerPod) ContainerPids(ctx context.Context, id string) ([]uint32, error) {
	return p.guest.Agent().ListProcesses(ctx, id)
}

func (p *containerPod) WaitOOMEvent(ctx context.Context, afterSeq uint64) (OOMEvent, error) {
	ev, err := p.guest.Agent().WaitOOMEvent(ctx, afterSeq)
	return OOMEvent(ev), err
}

// RemoveContainer removes the container in the guest and takes back its shares.
func (p *containerPod) RemoveContainer(ctx context.Context, id string, force bool) error {
	p.mu.Lock()
	c, ok := p.containers[id]
	p.mu.Unlock()
	if !ok {
		return fmt.Errorf("pod %s: container %s: %w", p.id, id, errdefs.ErrNotFound)
	}
	if err := p.guest.RemoveContainer(ctx, id, force); err != nil {
		return err
	}
	var errs []error
	for _, name := range c.shares {
		if err := p.guest.Unshare(name); err != nil {
			errs = append(errs, err)
		}
	}
	p.mu.Lock()
	delete(p.containers, id)
	p.mu.Unlock()
	if err := p.pinVCPUs(ctx, false); err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		return fmt.Errorf("pod %s: container %s: %v", p.id, id, errs)
	}
	return nil
}

// Stop shuts the VM down and releases everything the pod holds on the host: the
// port-forward redirect, the VM (it holds the taps), then the network plumbing. Later
// calls return the first result.
func (p *containerPod) Stop(ctx context.Context) error {
	p.stopOnce.Do(func() {
		var err error
		if p.loopback != nil {
			err = p.loopback.Close()
		}
		err = errors.Join(err, p.guest.Stop(ctx))
		if p.network != nil {
			err = errors.Join(err, p.network.Teardown())
		}
		p.stopErr = err
	})
	return p.stopErr
}

var _ Pod = (*containerPod)(nil)
