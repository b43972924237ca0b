package pod

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	cgroupsv2 "github.com/containerd/cgroups/v3/cgroup2/stats"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"k8s.io/utils/cpuset"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
	"github.com/vmpod/vmpod/api/annotations"
	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/devices"
	"github.com/vmpod/vmpod/internal/cleanup"
	"github.com/vmpod/vmpod/internal/idmap"
	"github.com/vmpod/vmpod/internal/phases"
	"github.com/vmpod/vmpod/runtime"
	"github.com/vmpod/vmpod/runtime/cri"
	"github.com/vmpod/vmpod/runtime/network"
	"github.com/vmpod/vmpod/runtime/nodeconfig"
	"github.com/vmpod/vmpod/runtime/pidproxy"
	"github.com/vmpod/vmpod/runtime/vmm"
	"github.com/vmpod/vmpod/runtime/vmpodagent"
	"github.com/vmpod/vmpod/runtime/vmtemplate"
)

// containerPod is a pod whose containers run in the vmpod guest under its agent.
type containerPod struct {
	id       string
	guest    *vmpodagent.Guest
	machine  machine.Type
	sizing   nodeconfig.Sizing
	boot     Size // what the VM booted with
	maxSize  Size // how far it can grow (headroom)
	stateDir string
	network  *network.Plumbing         // nil without a pod network namespace
	loopback *network.LoopbackRedirect // port-forwards into the guest; nil without a netns

	resizeMu sync.Mutex // one resize at a time
	// arrivalMu: a migration's target mounting and sharing its placeholders' files, or
	// a placeholder being removed; not both at once
	arrivalMu sync.Mutex
	// hostDevices are the PCI functions plugged for containers' VFIO devices; vfioBind is
	// the node's devices.vfio_bind
	hostDevMu   sync.Mutex
	hostDevices []devices.PCIAddress
	vfioBind    []string
	// nics follows the netns for interfaces added later; stopNetwork ends that
	nics        *nicFollower
	stopNetwork context.CancelFunc

	pinMu  sync.Mutex    // one vCPU pinning at a time
	pinned cpuset.CPUSet // the host CPUs the vCPUs run on; empty: anywhere

	vm machineShape // the machine as QEMU was started, which a migration's target matches
	// setup is the pod's interfaces and routes as the guest was (or, on a migration's
	// target, is to be) told them; guestMACs the guest's MAC by pod interface, which a
	// migrated guest keeps
	setup     *agentv1.SetupSandboxRequest
	guestMACs map[string]string

	mu         sync.Mutex
	size       Size // what the VM has now
	containers map[string]*container
	// a migration (containermigrate.go). awaiting: a target whose guest has not arrived
	// (arrived is closed once it runs here); accepting: it listens for the source.
	// migrating: a migration away in flight; movedTo: the guest runs in that pod now
	awaiting  bool
	accepting bool
	arrived   chan struct{}
	// stopReceive ends the target's receive, which closes received when it returns
	stopReceive context.CancelFunc
	received    chan struct{}
	migrating   *outgoing
	movedTo     string
	// vmDone is closed once the pod can run nothing more: its VM ended, but for a guest
	// that moved away (this pod's containers stay until it is stopped), or it was stopped
	vmDone     chan struct{}
	vmDoneOnce sync.Once

	stopOnce sync.Once
	stopErr  error
	stopping atomic.Bool   // Stop was called: the VM's end is not news
	killedAs string        // why vmpod killed the VM itself (a wedged guest), if it did
	ended    chan struct{} // closed once the VM's end was reported (reportEnd)
}

type container struct {
	name string // its CRI name, "" for a pod's sandbox
	// guestID is the guest's id for it: containerd's, but for a container that came with
	// a migrated guest, which keeps the source pod's (docs/design/212)
	guestID string
	shares  []string
	pid     uint32          // guest pid of its init, once created
	proxy   *pidproxy.Proxy // stands for it on the host (its host pid), once created
	claim   claim           // its limits, which the VM's size must hold
	cpus    cpuset.CPUSet   // the host CPUs it was given (linux.resources.cpu.cpus)
	// termLog is the host file the kubelet reads its termination message from, if mounted
	termLog string
	root    Rootfs
	spec    *specs.Spec
	stdio   runtime.Stdio
	init    *vmpodagent.Process // its init, once created here or adopted

	// a migration's target: placeholder stands for it until the guest arrives; mirrors
	// counts the shares whose writes it receives; arriving is the source's container it
	// becomes, and mirrorDirs where the writes of each of its shares go, once matched
	placeholder *placeholder
	mirrors     int
	arriving    *shapedContainer
	mirrorDirs  map[string]string
	sharedHere  []string // the shares the target made for it (shareArrivals)
	// a migration's source: left stands for it once the guest moved away
	left *standIn
}

// label names the container in messages: its CRI name, or its id.
func (c *container) label() string {
	switch {
	case c.name != "":
		return c.name
	case c.spec != nil && containerName(c.spec) == "" && c.spec.Annotations[cri.AnnotationContainerType] != "":
		return labelOf("")
	}
	return c.guestID
}

// podIDs are the host sides of a pod's own ID mappings (hostUsers: false), none for a pod
// in the host's user namespace. containerd gives such a pod's files the pod's host ids
// already, so its virtiofsd maps those onto themselves instead of mounting anything
// ID-mapped: a second mapping cannot be stacked on an ID-mapped mount (docs/design/025).
func podIDs(spec *specs.Spec) (uids, gids []vmm.IDRange) {
	if spec.Linux == nil {
		return nil, nil
	}
	for _, m := range spec.Linux.UIDMappings {
		uids = append(uids, vmm.IDRange{First: m.HostID, Count: m.Size})
	}
	for _, m := range spec.Linux.GIDMappings {
		gids = append(gids, vmm.IDRange{First: m.HostID, Count: m.Size})
	}
	return uids, gids
}

// startContainerPod boots the VM for a container pod, sized from spec (the pod's first
// container) within the node's bounds.
func startContainerPod(ctx context.Context, cfg nodeconfig.Config, podID string, spec *specs.Spec, choice annotations.Pod, host Host) (*containerPod, error) {
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
			Users:         cfg.Isolation.QEMUUsers(),
			FileOwners:    cfg.Isolation.FileOwners(),
			VirtiofsdPath: h.Virtiofsd,
			Boot:          vmm.Boot{Kernel: h.Kernel, Initrd: h.Initrd, KernelParams: h.KernelParams},
			Type:          h.Machine,
			Accel:         h.Accel,
			SharedFS:      h.SharedFS,
			VCPUs:         size.VCPUs,
			MemoryMiB:     size.MemoryMiB,
			StopTimeout:   cfg.Timeouts.Stop.Duration,
			Cgroup:        cgroupsPath(spec),
			OwnerSockets:  host.ownerSockets(),

			FreePageReporting: cfg.Sizing.FreePageReporting,
		},
		BootTimeout: cfg.Timeouts.Boot.Duration,
		CallTimeout: cfg.Timeouts.Call.Duration,
		Debug:       cfg.Debug,
	}
	if choice.Machine != "" {
		gc.Type = choice.Machine
	}
	if cri.PrivilegedSandbox(spec) {
		// Host mounts propagated into its volumes after the share (HostToContainer,
		// Bidirectional: a privileged pod's) are not ID-mapped, and would be nobody's to
		// a virtiofsd in a user namespace (docs/design/025).
		gc.FileOwners = nil
	}
	if gc.FileOwners != nil {
		gc.PodUIDs, gc.PodGIDs = podIDs(spec)
	}
	if choice.SharedFS != "" {
		if choice.SharedFS == machine.NineP && gc.Users != nil {
			return nil, fmt.Errorf("pod %s: annotation vmpod.dev/shared-fs: %w, and QEMU runs as a user of its own on this node (isolation.qemu_user): use virtio-fs: %w", podID, vmm.ErrNinePNeedsRoot, errdefs.ErrInvalidArgument)
		}
		gc.SharedFS = choice.SharedFS
	}
	templates := h.Templates && gc.Type == machine.Q35
	if templates {
		size = templateSize(size, cfg.Sizing)
		gc.MemoryMiB = size.MemoryMiB
	}
	maxSize := headroom(gc.Type, size, cfg.Sizing)
	gc.MaxVCPUs = maxSize.VCPUs
	// a restore plugs memory: the room is part of a template's key, even when the pod
	// has all the node allows
	if maxSize.MemoryMiB > size.MemoryMiB || templates {
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
		phases.Mark(ctx, "network")
		gc.NICs = plumbing.NICs()
		setup.Interfaces, setup.Routes = plan.GuestInterfaces(), plan.GuestRoutes()
	}
	var guest *vmpodagent.Guest
	target := choice.MigrationTarget != ""
	switch {
	case target:
		// the machine the source has, which the shape checks: a pod of this spec on this
		// node restores from a template where there is one
		if templates {
			if restored, ok := templateStore(cfg).Restored(gc); ok {
				gc = restored
			}
		}
		log.G(ctx).WithField("pod", podID).Infof("migration target: the VM waits for the guest of pod %s", choice.MigrationTarget)
		guest, err = vmpodagent.Await(ctx, gc)
	case templates:
		guest, err = templateStore(cfg).Boot(ctx, gc)
	default:
		guest, err = vmpodagent.Boot(ctx, gc)
	}
	if err != nil {
		return nil, fmt.Errorf("pod %s: %w", podID, err)
	}
	undo.Add("stop VM", guest.Kill)
	if !target {
		if err := guest.Agent().SetupSandbox(ctx, setup); err != nil {
			return nil, fmt.Errorf("pod %s: %w", podID, err)
		}
		phases.Mark(ctx, "setup")
	}
	p := &containerPod{id: podID, guest: guest, machine: gc.Type, vm: machineShapeOf(guest.Machine().Config()), sizing: cfg.Sizing, boot: size, maxSize: maxSize, size: size,
		stateDir: gc.StateDir, network: plumbing, containers: map[string]*container{}, vfioBind: cfg.Devices.VFIOBind,
		ended: make(chan struct{}), vmDone: make(chan struct{}), setup: setup, guestMACs: map[string]string{},
		awaiting: target, arrived: make(chan struct{})}
	for _, i := range setup.Interfaces {
		p.guestMACs[i.Name] = i.Mac
	}
	if plumbing != nil {
		if p.loopback, err = network.RedirectLoopback(plumbing.Plan().Netns); err != nil {
			return nil, fmt.Errorf("pod %s: %w", podID, err)
		}
	}
	undo.Release()
	go p.watchVM()
	if !target {
		close(p.arrived)
		p.servePod(log.WithLogger(context.WithoutCancel(ctx), log.G(ctx).WithField("pod", podID)))
	}
	return p, nil
}

// templateStore is the node's store of VM templates (docs/design/022).
func templateStore(cfg nodeconfig.Config) *vmtemplate.Store {
	return &vmtemplate.Store{Dir: cfg.TemplateDir(), BaseMemoryMiB: cfg.Sizing.DefaultMemoryMiB, Cgroup: cfg.TemplateCgroup()}
}

// servePod starts what serves a pod whose guest runs: port-forwards into it, interfaces
// added to the pod's netns plugged in, the report of the VM's end.
func (p *containerPod) servePod(ctx context.Context) {
	if p.network != nil {
		go p.servePortForwards(ctx)
		nics := &nicFollower{pod: p.id, network: p.network, machine: p.guest.Machine(), configure: p.configureNIC, busy: new(sync.Mutex)}
		netCtx, stop := context.WithCancel(ctx)
		p.mu.Lock()
		p.nics, p.stopNetwork = nics, stop
		p.mu.Unlock()
		nics.follow(netCtx)
	}
	go p.reportEnd(ctx)
}

// watchVM closes vmDone once the VM has ended, unless its guest moved away.
func (p *containerPod) watchVM() {
	<-p.guest.Done()
	p.mu.Lock()
	moved := p.movedTo != ""
	p.mu.Unlock()
	if !moved {
		p.vmDoneOnce.Do(func() { close(p.vmDone) })
	}
}

func (p *containerPod) ID() string { return p.id }

// Size is what the VM has: its boot size, grown by UpdateContainer.
func (p *containerPod) Size() Size {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.size
}

func (p *containerPod) Done() <-chan struct{} { return p.vmDone }

func (p *containerPod) WriteRecord(bundle string) error { return writeRecord(bundle, p.id, p.stateDir) }

func (p *containerPod) RootfsMap() *idmap.Map { return p.guest.Machine().RootfsMap() }

// servePortForwards carries each connection containerd makes to localhost in the pod's
// netns (a CRI port-forward) to the same port on the guest's loopback.
func (p *containerPod) servePortForwards(ctx context.Context) {
	p.loopback.Serve(func(conn net.Conn, port uint32) {
		if err := p.guest.ForwardPort(ctx, conn, port); err != nil {
			log.G(ctx).WithError(err).Debugf("port-forward to %d ended", port)
		}
	}, func(err error) { log.G(ctx).WithError(err).Warn("port-forward") })
}

// nsOwners maps the host pids of the pod's containers (their proxies, which containerd
// builds namespace paths from) to their inits' guest pids.
func (p *containerPod) nsOwners() map[uint32]uint32 {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := map[uint32]uint32{}
	for _, c := range p.containers {
		// An exited container's proxy pid is free for another process to take.
		if c.pid != 0 && c.proxy != nil && !c.proxy.Exited() {
			out[uint32(c.proxy.Pid())] = c.pid
		}
	}
	return out
}

func (p *containerPod) CreateContainer(ctx context.Context, id string, root Rootfs, spec *specs.Spec, stdio runtime.Stdio) (Process, error) {
	p.mu.Lock()
	if _, exists := p.containers[id]; exists {
		p.mu.Unlock()
		return nil, fmt.Errorf("pod %s: container %s: %w", p.id, id, errdefs.ErrAlreadyExists)
	}
	switch {
	case p.movedTo != "":
		p.mu.Unlock()
		return nil, fmt.Errorf("pod %s: container %s: the pod's guest moved to %s: %w", p.id, id, p.movedTo, errdefs.ErrFailedPrecondition)
	case p.migrating != nil:
		// it would not be in the shape the target took, nor its writes in the streams
		p.mu.Unlock()
		return nil, fmt.Errorf("pod %s: container %s: the pod's guest is migrating; create it in the pod it lands in: %w", p.id, id, errdefs.ErrFailedPrecondition)
	case p.awaiting && p.accepting:
		p.mu.Unlock()
		return nil, fmt.Errorf("pod %s: container %s: the pod is receiving its guest, whose containers are set: %w", p.id, id, errdefs.ErrFailedPrecondition)
	}
	c := &container{name: containerName(spec), guestID: id, root: root, spec: spec, stdio: stdio, termLog: mountSource(spec, terminationLog)}
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
	if p.awaiting {
		p.mu.Unlock()
		return p.createPlaceholder(ctx, id, c)
	}
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
	if err := root.mount(); err != nil {
		return nil, fmt.Errorf("pod %s: container %s: %w", p.id, id, err)
	}
	spec, err := p.plugHostDevices(ctx, spec)
	if err != nil {
		return nil, fmt.Errorf("pod %s: container %s: %w", p.id, id, err)
	}
	guest, shares, err := guestSpec(id, spec, p.nsOwners(), p.guest.Share, vmm.MountPointsBelow)
	for _, name := range shares {
		undo.Add("unshare "+name, func() error { return p.guest.Unshare(name) })
	}
	if err != nil {
		return nil, fmt.Errorf("pod %s: container %s: %w: %w", p.id, id, err, errdefs.ErrInvalidArgument)
	}
	if err := p.pinVCPUs(ctx, false); err != nil {
		return nil, fmt.Errorf("pod %s: container %s: linux.resources.cpu.cpus: %w", p.id, id, err)
	}
	proxy, err := p.startProxy(id)
	if err != nil {
		return nil, fmt.Errorf("pod %s: container %s: %w", p.id, id, err)
	}
	undo.Add("stop pid proxy", func() error { proxy.Stop(); return nil })
	proc, err := p.guest.CreateContainer(ctx, id, root.Dir, guest, stdio)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	c.shares, c.pid, c.proxy, c.init = shares, proc.Pid(), proxy, proc
	p.mu.Unlock()
	undo.Release()
	go relaySignals(log.G(ctx).WithField("container", id), proc, proxy)
	return hostProcess{proc, proxy, p, c}, nil
}

// createPlaceholder is CreateContainer on a migration's target before the guest came: the
// container's host pid, and what it needs to receive the source's container (its rootfs
// is mounted only once the source's writes are in, docs/design/212).
func (p *containerPod) createPlaceholder(ctx context.Context, id string, c *container) (Process, error) {
	var undo cleanup.Stack
	defer func() { _ = undo.Run() }()
	undo.Add("forget container", func() error {
		p.mu.Lock()
		defer p.mu.Unlock()
		delete(p.containers, id)
		return nil
	})
	mirrored, err := mirroredShares(id, c)
	if err != nil {
		return nil, fmt.Errorf("pod %s: container %s: a migration's target cannot receive it: %w: %w", p.id, id, err, errdefs.ErrInvalidArgument)
	}
	if _, err := guestShares(id, c.spec); err != nil {
		return nil, fmt.Errorf("pod %s: container %s: %w: %w", p.id, id, err, errdefs.ErrInvalidArgument)
	}
	proxy, err := p.startProxy(id)
	if err != nil {
		return nil, fmt.Errorf("pod %s: container %s: %w", p.id, id, err)
	}
	p.mu.Lock()
	c.proxy, c.mirrors = proxy, len(mirrored)
	c.placeholder = newPlaceholder(c)
	p.mu.Unlock()
	undo.Release()
	log.G(ctx).WithField("pod", p.id).Infof("migration target: container %s (%s) waits for the guest", id, c.label())
	return c.placeholder, nil
}

// startProxy starts the host process whose pid stands for container id (pidproxy), in
// the pod's cgroup, named by the pod's state directory (leak checks and `shim delete`
// find it there).
func (p *containerPod) startProxy(id string) (*pidproxy.Proxy, error) {
	exe, err := pidproxy.Path()
	if err != nil {
		return nil, err
	}
	m := p.guest.Machine()
	proxy, err := pidproxy.Start(exe, filepath.Join(p.stateDir, "containers", id), m.PlaceInCgroup)
	if err != nil {
		return nil, err
	}
	if err := m.AdoptIntoCgroup(proxy.Pid()); err != nil {
		proxy.Stop()
		return nil, fmt.Errorf("pid proxy: %w", err)
	}
	return proxy, nil
}

// relaySignals passes the signals sent to a container's host pid on to its init, and
// SIGKILLs the init when that pid is killed — what they do to a runc container.
func relaySignals(lg *log.Entry, proc *vmpodagent.Process, proxy *pidproxy.Proxy) {
	ctx := context.Background()
	for sig := range proxy.Signals() {
		lg.Infof("signal %d to the container's host pid %d: relaying it to its init", sig, proxy.Pid())
		if err := proc.Signal(ctx, sig, false); err != nil {
			lg.WithError(err).Debugf("relay signal %d", sig)
		}
	}
	if proxy.Killed() {
		lg.Warnf("the container's host pid %d was killed: killing its init", proxy.Pid())
		if err := proc.Signal(ctx, syscall.SIGKILL, false); err != nil {
			lg.WithError(err).Debug("kill the init")
		}
	}
}

// hostProcess is a container's process as containerd sees it: with the host pid of the
// container's proxy. An init's proxy ends with the init: from then on its pid names
// nothing, as a runc container's pid after its exit.
type hostProcess struct {
	*vmpodagent.Process
	proxy *pidproxy.Proxy
	pod   *containerPod
	c     *container
}

func (h hostProcess) Pid() uint32 { return uint32(h.proxy.Pid()) }

// Wait returns the process's exit. When the VM ended under it, it returns only once the
// pod has reported why (the containers' termination messages are written before
// containerd hears of their exits and the kubelet reads them). When the guest moved to
// another pod, an init waits for its stand-in (Signal ends it), and an exec ends as
// killed: it runs on in the other pod, out of this one's reach.
func (h hostProcess) Wait(ctx context.Context) (runtime.Exit, error) {
	exit, err := h.Process.Wait(ctx)
	if err != nil {
		if left := h.pod.leftBehind(h.c); left != nil {
			if h.ExecID() != "" {
				return runtime.Exit{Status: exitKilled, ExitedAt: time.Now()}, nil
			}
			exit, err = left.Wait(ctx)
		}
	}
	if err == nil && h.ExecID() == "" {
		h.proxy.Stop()
	}
	if err != nil {
		h.pod.awaitEndReport()
	}
	return exit, err
}

// leftBehind is the stand-in of container c once the pod's guest moved away, nil before.
func (p *containerPod) leftBehind(c *container) *standIn {
	p.mu.Lock()
	defer p.mu.Unlock()
	return c.left
}

// Remove forgets the process; once the guest moved away there is nothing to forget.
func (h hostProcess) Remove(ctx context.Context) error {
	if h.pod.leftBehind(h.c) != nil {
		return nil
	}
	return h.Process.Remove(ctx)
}

// endNoticeWait bounds how long a failed Wait looks for the VM's end (QEMU is reaped a
// moment after its connections break), endReportWait how long it then waits for the
// report: a termination log that blocks must not hold back the exits.
const (
	endNoticeWait = time.Second
	endReportWait = 5 * time.Second
)

func (p *containerPod) awaitEndReport() {
	select {
	case <-p.guest.Done():
	case <-time.After(endNoticeWait):
		return // a broken connection the VM outlives: the caller retries
	}
	select {
	case <-p.ended:
	case <-time.After(endReportWait):
	}
}

// unresponsiveAfter bounds how long a signal may take to reach a container's process. A
// guest that has not taken it by then is wedged (its vCPUs stopped, its agent stuck) or
// badly overloaded: a signal stays queued, as kill(2) queues one for a stopped process;
// a SIGKILL to a container's init ends the VM if the guest does not answer a ping
// either, the one way left to keep SIGKILL's promise.
var unresponsiveAfter = 10 * time.Second

// wedgedPingWait is how long the agent has to answer the ping that tells a wedged guest
// from an overloaded one.
var wedgedPingWait = 5 * time.Second

// Signal delivers sig, bounded by unresponsiveAfter as above: so a wedged guest cannot
// keep its containers from being stopped (containerd's SIGTERM, its SIGKILL after the
// grace period, the SIGKILL to every container of a pod being stopped).
func (h hostProcess) Signal(ctx context.Context, sig syscall.Signal, all bool) error {
	if left := h.pod.leftBehind(h.c); left != nil {
		if h.ExecID() != "" {
			return fmt.Errorf("pod %s: the pod's guest moved away with the process: %w", h.pod.id, errdefs.ErrNotFound)
		}
		return left.Signal(ctx, sig, all)
	}
	result := make(chan error, 1)
	go func() { result <- h.Process.Signal(context.WithoutCancel(ctx), sig, all) }() // bounded by the agent call timeout
	select {
	case err := <-result:
		return h.pod.goneErr(err)
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(unresponsiveAfter):
	}
	lg := log.G(ctx).WithField("container", h.ContainerID()).WithField("exec", h.ExecID())
	if sig == syscall.SIGKILL && h.ExecID() == "" {
		why := fmt.Sprintf("GuestUnresponsive: the guest did not take a SIGKILL for container %s within %v, nor answer a ping; vmpod killed the VM",
			h.ContainerID(), unresponsiveAfter)
		if h.pod.killIfWedged(ctx, why) {
			return nil
		}
	}
	lg.Warnf("the guest has not taken signal %d within %v: it stays queued", sig, unresponsiveAfter)
	go func() {
		if err := <-result; err != nil {
			lg.WithError(err).Warnf("queued signal %d", sig)
		}
	}()
	return nil
}

// goneErr is err, or NotFound ("process already finished") if the VM ended meanwhile:
// another container's SIGKILL may have ended it (killIfWedged).
func (p *containerPod) goneErr(err error) error {
	if err == nil {
		return nil
	}
	select {
	case <-p.guest.Done():
		return fmt.Errorf("pod %s: the VM is gone: %w", p.id, errdefs.ErrNotFound)
	default:
		return err
	}
}

// killIfWedged ends the VM, saying why, unless its agent still answers a ping (an
// overloaded guest is left alone). It reports whether it killed it.
func (p *containerPod) killIfWedged(ctx context.Context, why string) bool {
	pingCtx, cancel := context.WithTimeout(ctx, wedgedPingWait)
	defer cancel()
	if _, err := p.guest.Agent().Ping(pingCtx); err == nil {
		return false
	}
	p.mu.Lock()
	if p.killedAs == "" {
		p.killedAs = why
	}
	p.mu.Unlock()
	log.G(ctx).Errorf("pod %s: %s", p.id, why)
	p.guest.Machine().KillProcess()
	return true
}

// reportEnd waits for the VM to end. Unless the pod was being stopped, it logs why and
// writes the reason into each container's termination message (where the container left
// none), where the kubelet shows it: a guest kernel panic, the agent's death (the guest's
// init), a wedged guest vmpod killed, QEMU crashing.
func (p *containerPod) reportEnd(ctx context.Context) {
	defer close(p.ended)
	<-p.guest.Done()
	p.mu.Lock()
	moved := p.movedTo != ""
	p.mu.Unlock()
	if p.stopping.Load() || moved {
		return
	}
	p.mu.Lock()
	why := p.killedAs
	var logs []string
	for _, c := range p.containers {
		// one that exited before keeps its own end: the kubelet re-reads its log
		if c.termLog != "" && c.proxy != nil && !c.proxy.Exited() {
			logs = append(logs, c.termLog)
		}
	}
	p.mu.Unlock()
	if why == "" {
		why = p.guest.Machine().Ending()
		if strings.Contains(why, "Attempted to kill init") {
			why += " (the guest's init is vmpod's agent: it died)"
		}
	}
	log.G(ctx).Errorf("the VM ended: %s", why)
	writeTerminationMessages(ctx, logs, why)
}

// writeTerminationMessages writes msg to each of the termination logs at paths that the
// container did not write itself (writeTerminationMessage).
func writeTerminationMessages(ctx context.Context, paths []string, msg string) {
	for _, path := range paths {
		if err := writeTerminationMessage(path, msg); err != nil {
			log.G(ctx).WithError(err).Warn("termination message")
		}
	}
}

// writeTerminationMessage writes msg to the termination log at path unless the container
// wrote one itself. Only a regular file is written, and never through a symlink: the
// source is the user's, and a FIFO or a device would block or take the write.
func writeTerminationMessage(path, msg string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|syscall.O_NONBLOCK|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file (%s)", path, fi.Mode().Type())
	}
	if fi.Size() > 0 {
		return nil
	}
	_, err = f.WriteString(msg + "\n")
	return err
}

// lookup is container id, and the guest's id for it, if the guest is here to act on it
// (op says what for).
func (p *containerPod) lookup(id, op string) (*container, string, error) {
	p.mu.Lock()
	c, ok := p.containers[id]
	p.mu.Unlock()
	if !ok {
		return nil, "", fmt.Errorf("pod %s: container %s: %w", p.id, id, errdefs.ErrNotFound)
	}
	if err := p.guestHere(op + " " + id); err != nil {
		return c, "", err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return c, c.guestID, nil
}

// StartContainer starts the container's init; a migration target's placeholder only
// notes it (the guest's container runs already).
func (p *containerPod) StartContainer(ctx context.Context, id string) error {
	p.mu.Lock()
	c, ok := p.containers[id]
	if ok && c.placeholder != nil && p.awaiting {
		c.placeholder.started = true
		p.mu.Unlock()
		return nil
	}
	p.mu.Unlock()
	_, gid, err := p.lookup(id, "start")
	if err != nil {
		return err
	}
	return p.guest.Agent().StartContainer(ctx, gid)
}

// Exec starts a process in a container; containerd sees the container's host pid for it
// (an exec has no proxy of its own: one per exec would cost a process start each). A
// migration's command is the shim's to answer (containermigrate.go).
func (p *containerPod) Exec(ctx context.Context, containerID, execID string, proc *specs.Process, stdio runtime.Stdio) (Process, error) {
	p.mu.Lock()
	c, ok := p.containers[containerID]
	p.mu.Unlock()
	if !ok || c.proxy == nil {
		return nil, fmt.Errorf("pod %s: container %s: %w", p.id, containerID, errdefs.ErrNotFound)
	}
	if migrationCommand(proc.Args) {
		return p.command(ctx, c, execID, proc, stdio)
	}
	_, gid, err := p.lookup(containerID, "exec in")
	if err != nil {
		return nil, err
	}
	pr, err := p.guest.Exec(ctx, gid, execID, proc, stdio)
	if err != nil {
		return nil, err
	}
	return hostProcess{pr, c.proxy, p, c}, nil
}

func (p *containerPod) PauseContainer(ctx context.Context, id string) error {
	_, gid, err := p.lookup(id, "pause")
	if err != nil {
		return err
	}
	return p.guest.Agent().PauseContainer(ctx, gid)
}

func (p *containerPod) ResumeContainer(ctx context.Context, id string) error {
	_, gid, err := p.lookup(id, "resume")
	if err != nil {
		return err
	}
	return p.guest.Agent().ResumeContainer(ctx, gid)
}

// ContainerStats are the container's cgroup's in the guest; none while the guest is on
// its way here or gone.
func (p *containerPod) ContainerStats(ctx context.Context, id string) (*cgroupsv2.Metrics, error) {
	c, gid, err := p.lookup(id, "stats of")
	if errdefs.IsFailedPrecondition(err) && c != nil {
		return &cgroupsv2.Metrics{}, nil
	}
	if err != nil {
		return nil, err
	}
	return p.guest.Agent().ContainerStats(ctx, gid)
}

// ContainerPids is the container's host pid, its proxy's, while the container runs: its
// processes' guest pids would name unrelated host processes to whoever acts on them
// (docs/design/012). `ctr task ps` thus shows one pid per container, as with Kata.
func (p *containerPod) ContainerPids(ctx context.Context, id string) ([]uint32, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	c, ok := p.containers[id]
	if !ok {
		return nil, fmt.Errorf("pod %s: container %s: %w", p.id, id, errdefs.ErrNotFound)
	}
	if c.proxy == nil || c.proxy.Exited() {
		return nil, nil
	}
	return []uint32{uint32(c.proxy.Pid())}, nil
}

// WaitOOMEvent waits for the guest's next OOM kill (on a migration's target, for the
// guest to arrive first), naming the container by this pod's id.
func (p *containerPod) WaitOOMEvent(ctx context.Context, afterSeq uint64) (OOMEvent, error) {
	select {
	case <-p.arrived:
	case <-p.vmDone:
		return OOMEvent{}, fmt.Errorf("pod %s is stopped: %w", p.id, errdefs.ErrNotFound)
	case <-ctx.Done():
		return OOMEvent{}, ctx.Err()
	}
	ev, err := p.guest.Agent().WaitOOMEvent(ctx, afterSeq)
	if err != nil {
		return OOMEvent{}, err
	}
	p.mu.Lock()
	for id, c := range p.containers {
		if c.guestID == ev.ContainerID {
			ev.ContainerID = id
		}
	}
	p.mu.Unlock()
	return OOMEvent(ev), nil
}

// RemoveContainer removes the container in the guest and takes back its shares. A
// placeholder, or a container whose guest moved away, has only its host side.
func (p *containerPod) RemoveContainer(ctx context.Context, id string, force bool) error {
	p.mu.Lock()
	c, ok := p.containers[id]
	var hostOnly bool
	if ok {
		hostOnly = c.left != nil || (c.placeholder != nil && c.placeholder.adopted() == nil)
	}
	p.mu.Unlock()
	if !ok {
		return fmt.Errorf("pod %s: container %s: %w", p.id, id, errdefs.ErrNotFound)
	}
	if hostOnly {
		return p.forgetContainer(ctx, id, c)
	}
	if err := p.guest.RemoveContainer(ctx, c.guestID, force); err != nil {
		return err
	}
	var errs []error
	for _, name := range c.shares {
		if err := p.guest.Unshare(name); err != nil {
			errs = append(errs, err)
		}
	}
	if c.proxy != nil {
		c.proxy.Stop()
	}
	p.mu.Lock()
	delete(p.containers, id)
	p.mu.Unlock()
	if err := p.pinVCPUs(ctx, false); err != nil {
		// The container is gone either way; its CPUs stay in the pinning until the next change.
		log.G(ctx).WithError(err).Warnf("pod %s: re-pin vCPUs without container %s", p.id, id)
	}
	if len(errs) > 0 {
		return fmt.Errorf("pod %s: container %s: %v", p.id, id, errs)
	}
	return nil
}

// forgetContainer removes what a container has only on the host: a placeholder whose
// guest never came (or has not yet: the source's container then has no place here), or a
// container whose guest moved away.
func (p *containerPod) forgetContainer(ctx context.Context, id string, c *container) error {
	if c.placeholder != nil {
		// first: a guest that arrives now leaves it out (takeOver)
		c.placeholder.stand.end(exitKilled)
	}
	p.arrivalMu.Lock() // not while its files are being shared for the guest
	defer p.arrivalMu.Unlock()
	p.mu.Lock()
	if c.left != nil {
		c.left.end(exitKilled)
	}
	shared := c.sharedHere
	delete(p.containers, id)
	p.mu.Unlock()
	var errs []error
	for _, name := range shared { // a target whose guest did not come after all
		if err := p.guest.Unshare(name); err != nil {
			errs = append(errs, err)
		}
	}
	if c.proxy != nil {
		c.proxy.Stop()
	}
	log.G(ctx).WithField("pod", p.id).Infof("container %s removed (its host side only)", id)
	return errors.Join(errs...)
}

// receiveStopWait bounds how long a Stop waits for a migration target's receive to end.
const receiveStopWait = 30 * time.Second

// Stop shuts the VM down and releases everything the pod holds on the host: the
// port-forward redirect, the VM (it holds the taps), then the network plumbing. Later
// calls return the first result.
func (p *containerPod) Stop(ctx context.Context) error {
	p.stopping.Store(true)
	p.stopOnce.Do(func() {
		var err error
		p.mu.Lock()
		stopReceive, received := p.stopReceive, p.received
		p.mu.Unlock()
		if stopReceive != nil { // a guest on its way: its receive ends first
			stopReceive()
			select {
			case <-received:
			case <-time.After(receiveStopWait):
				log.G(ctx).Warnf("pod %s: the migration's receive did not end within %v of the stop", p.id, receiveStopWait)
			}
		}
		p.mu.Lock()
		stopNetwork, nics, noGuest := p.stopNetwork, p.nics, p.awaiting
		p.mu.Unlock()
		if stopNetwork != nil {
			// a sync under way must not plumb a tap after the teardown below
			stopNetwork()
			<-nics.done
		}
		if p.loopback != nil {
			err = p.loopback.Close()
		}
		// The proxies first: they are in the pod's cgroup, which the VM's teardown removes.
		p.mu.Lock()
		var proxies []*pidproxy.Proxy
		for _, c := range p.containers {
			if c.proxy != nil {
				proxies = append(proxies, c.proxy)
			}
			if c.left != nil {
				c.left.end(exitKilled)
			}
			if c.placeholder != nil {
				c.placeholder.stand.end(exitKilled)
			}
		}
		p.mu.Unlock()
		for _, proxy := range proxies {
			proxy.Stop()
		}
		if noGuest {
			// a migration's target still waiting: no agent to ask for a shutdown
			p.guest.Machine().Quit(ctx)
		}
		err = errors.Join(err, p.guest.Stop(ctx))
		if p.network != nil {
			err = errors.Join(err, p.network.Teardown())
		}
		p.vmDoneOnce.Do(func() { close(p.vmDone) })
		p.stopErr = err
	})
	return p.stopErr
}

var _ Pod = (*containerPod)(nil)
