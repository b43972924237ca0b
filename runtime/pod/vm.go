package pod

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	cgroupsv2 "github.com/containerd/cgroups/v3/cgroup2/stats"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/api/vmspec"
	"github.com/vmpod/vmpod/internal/cleanup"
	"github.com/vmpod/vmpod/internal/idmap"
	"github.com/vmpod/vmpod/runtime"
	"github.com/vmpod/vmpod/runtime/cri"
	"github.com/vmpod/vmpod/runtime/network"
	"github.com/vmpod/vmpod/runtime/nodeconfig"
)

// VNCPort is the port a VM pod serves its display on, on the pod's localhost: what
// `kubectl port-forward <pod> 5900` (and `kubectl vmpod vnc`) reach.
const VNCPort = 5900

// vmPod is a pod that is a VM booted from its own disks (docs/design/110-vm-pods.md). Its
// sandbox container is a stand-in process of the shim; its one app container, compute,
// is the VM: created = QEMU started with its vCPUs stopped, started = running, exited =
// powered off. A new compute container (the kubelet's or the controller's restart) boots
// the VM again, in the same pod, with the same network.
type vmPod struct {
	id       string
	cfg      nodeconfig.Config
	host     Host
	vm       *vmspec.VM
	hostname string
	stateDir string
	network  *network.Plumbing         // nil without a pod network namespace
	keptNICs map[string]int            // pod interfaces the VM's spec leaves out, by name: ifindex
	loopback *network.LoopbackRedirect // VNC on the pod's localhost; nil without a netns
	// masquerade: the first interface's guest is behind NAT, reachable from the netns, so
	// port-forwards to its ports work
	masquerade bool
	// netns is the pod's network namespace ("" without one), address its IPv4 address
	// there: where a migration target listens, and whence a source dials
	netns   string
	address netip.Addr

	// bootMu serialises booting the VM and stopping the pod, which may take a while; mu
	// only guards the fields below, so lookups do not wait for a boot.
	bootMu    sync.Mutex
	mu        sync.Mutex
	sandbox   *standIn // the sandbox container, once created
	sandboxID string
	compute   *computeVM // the VM, while a compute container exists
	computeID string
	// removed are containers already released (a compute whose VM exited and was
	// replaced): deleting them again succeeds
	removed map[string]bool
	// migratedTo is set once the guest moved to another pod (vmmigrate.go): this pod never
	// boots it again, whatever restarts its container, since the guest runs on elsewhere
	// from the same disks
	migratedTo string

	done     chan struct{}
	stopOnce sync.Once
	stopErr  error
}

// startVMPod checks a VM pod's spec against the node and makes its network ready; the VM
// itself boots with the compute container.
func startVMPod(ctx context.Context, cfg nodeconfig.Config, podID string, spec *specs.Spec, annotation string, host Host) (_ *vmPod, retErr error) {
	vm, err := vmspec.Parse([]byte(annotation))
	if err != nil {
		return nil, fmt.Errorf("pod %s: annotation %s: %w: %w", podID, vmspec.Annotation, err, errdefs.ErrInvalidArgument)
	}
	if err := checkVMAgainstNode(vm, cfg); err != nil {
		return nil, fmt.Errorf("pod %s: annotation %s: %w: %w", podID, vmspec.Annotation, err, errdefs.ErrInvalidArgument)
	}
	p := &vmPod{id: podID, cfg: cfg, host: host, vm: vm, hostname: spec.Hostname, stateDir: filepath.Join(cfg.StateDir, podID),
		done: make(chan struct{}), removed: map[string]bool{}}
	var undo cleanup.Stack
	defer func() {
		if retErr != nil {
			_ = undo.Run()
		}
	}()
	if netns := networkNamespace(spec); netns != "" {
		plan, err := network.Inspect(netns)
		if err != nil {
			return nil, fmt.Errorf("pod %s: %w", podID, err)
		}
		p.netns, p.address = netns, podAddress(plan)
		for _, s := range plan.Skipped {
			log.G(ctx).WithField("pod", podID).Infof("pod network: skipped %s", s)
		}
		for i, iface := range vm.Interfaces {
			if !hasInterface(plan, iface.PodInterface) {
				return nil, fmt.Errorf("pod %s: annotation %s: interfaces[%d].podInterface: the pod has no interface %s: %w", podID, vmspec.Annotation, i, iface.PodInterface, errdefs.ErrInvalidArgument)
			}
		}
		// only the interfaces the VM has get a tap: the others stay as CNI made them
		p.keptNICs = map[string]int{} // never plugged in later either (docs/design/205)
		plan.Interfaces = slices.DeleteFunc(plan.Interfaces, func(i network.Interface) bool {
			if slices.ContainsFunc(vm.Interfaces, func(v vmspec.Interface) bool { return v.PodInterface == i.Name }) {
				return false
			}
			p.keptNICs[i.Name] = i.Index
			return true
		})
		for _, iface := range vm.Interfaces {
			if iface.Binding == vmspec.BindingMasquerade {
				plan.Masquerade = masqueradeOf(iface)
				// the pod's own port, where it receives a migrating guest
				plan.Masquerade.Kept = []network.Port{{Protocol: "tcp", Port: vmspec.MigrationPort}}
				p.masquerade = true
			}
		}
		if len(plan.Interfaces) > 0 { // a VM without NICs has nothing to plumb
			if p.network, err = network.Plumb(plan); err != nil {
				return nil, fmt.Errorf("pod %s: %w", podID, err)
			}
			undo.Add("tear down pod network", p.network.Teardown)
		}
		if p.loopback, err = network.RedirectLoopback(netns); err != nil {
			return nil, fmt.Errorf("pod %s: %w", podID, err)
		}
		undo.Add("remove the loopback redirect", p.loopback.Close)
		go p.serveLoopback(log.WithLogger(context.WithoutCancel(ctx), log.G(ctx).WithField("pod", podID)))
	} else if len(vm.Interfaces) > 0 {
		log.G(ctx).WithField("pod", podID).Warn("VM pod without a network namespace (host network?): its interfaces get no NIC")
	}
	if vm.Migration != nil && !p.address.IsValid() {
		return nil, fmt.Errorf("pod %s: annotation %s: migration.role target: the pod has no network namespace with an IPv4 address to receive the guest on: %w", podID, vmspec.Annotation, errdefs.ErrInvalidArgument)
	}
	log.G(ctx).WithField("pod", podID).Infof("VM pod: %d vCPU, %d MiB, %s, firmware %s, %d disks", vm.CPU.VCPUs(), vm.MemoryMiB, vm.Machine, vm.Firmware.Type, len(vm.Disks))
	return p, nil
}

// checkVMAgainstNode applies the node admin's bounds (nodeconfig sizing) to a VM spec.
func checkVMAgainstNode(vm *vmspec.VM, cfg nodeconfig.Config) error {
	var errs []error
	if n := vm.CPU.VCPUs(); n > cfg.Sizing.MaxVCPUs {
		errs = append(errs, fmt.Errorf("cpu: %d vCPUs, the node allows %d (sizing.max_vcpus)", n, cfg.Sizing.MaxVCPUs))
	} else if n := vm.CPU.MaxVCPUs(); n > cfg.Sizing.MaxVCPUs {
		errs = append(errs, fmt.Errorf("cpu.maxSockets: room for %d vCPUs, the node allows %d (sizing.max_vcpus)", n, cfg.Sizing.MaxVCPUs))
	}
	if vm.MemoryMiB > int64(cfg.Sizing.MaxMemoryMiB) {
		errs = append(errs, fmt.Errorf("memoryMiB: %d, the node allows %d (sizing.max_memory_mib)", vm.MemoryMiB, cfg.Sizing.MaxMemoryMiB))
	} else if vm.MaxMemoryMiB > int64(cfg.Sizing.MaxMemoryMiB) {
		errs = append(errs, fmt.Errorf("maxMemoryMiB: %d, the node allows %d (sizing.max_memory_mib)", vm.MaxMemoryMiB, cfg.Sizing.MaxMemoryMiB))
	}
	switch m := vm.CPU.Model; {
	case m == "" || m == machine.CPUHostModel:
	case m == machine.CPUHostPassthrough:
		if cfg.Hypervisor.Accel == machine.TCG { // with accel auto, the machine layer finds out
			errs = append(errs, errors.New("cpu.model: host-passthrough needs KVM; this node emulates (hypervisor.accel tcg)"))
		}
	case !slices.Contains(cfg.Hypervisor.CPUModels, m):
		errs = append(errs, fmt.Errorf("cpu.model: %s is not one of the CPU models this node allows (hypervisor.cpu_models: %s)", m, strings.Join(cfg.Hypervisor.CPUModels, ", ")))
	}
	if (len(vm.GPUs) > 0 || len(vm.HostDevices) > 0) && vm.Machine != machine.Q35 {
		errs = append(errs, fmt.Errorf("gpus/hostDevices: passthrough needs machine q35 (PCIe), not %s", vm.Machine))
	}
	return errors.Join(errs...)
}

// podAddress is the pod's IPv4 address: eth0's, or the first interface's that has one.
func podAddress(plan *network.Plan) netip.Addr {
	var first netip.Addr
	for _, iface := range plan.Interfaces {
		for _, a := range iface.Addresses {
			if !a.Addr().Is4() {
				continue
			}
			if iface.Name == "eth0" {
				return a.Addr()
			}
			if !first.IsValid() {
				first = a.Addr()
			}
		}
	}
	return first
}

func hasInterface(plan *network.Plan, name string) bool {
	for _, i := range plan.Interfaces {
		if i.Name == name {
			return true
		}
	}
	return false
}

func (p *vmPod) ID() string { return p.id }

func (p *vmPod) Done() <-chan struct{} { return p.done }

func (p *vmPod) WriteRecord(bundle string) error { return writeRecord(bundle, p.id, p.stateDir) }

// RootfsMap: a VM pod's containers are its disks' images, never shared.
func (p *vmPod) RootfsMap() *idmap.Map { return nil }

// serveLoopback serves CRI port-forwards to the pod's localhost: the VNC port reaches the
// VM's display; other ports reach the guest behind a masquerade binding. With a bridge
// binding the guest's ports are not reachable this way: the pod's address is the guest's,
// and a connection from the pod's netns to it would never leave the netns.
func (p *vmPod) serveLoopback(ctx context.Context) {
	p.loopback.Serve(func(conn net.Conn, port uint32) {
		switch {
		case port == VNCPort:
			p.proxyVNC(ctx, conn)
		case p.masquerade:
			p.proxyGuest(ctx, conn, port)
		default:
			log.G(ctx).Warnf("port-forward to port %d of a VM pod: only the VNC display (port %d) is served on the pod's localhost; reach the guest on the pod's IP", port, VNCPort)
			_ = conn.Close()
		}
	}, func(err error) { log.G(ctx).WithError(err).Warn("port-forward") })
}

// proxyGuest carries a port-forward to the guest behind NAT.
func (p *vmPod) proxyGuest(ctx context.Context, conn net.Conn, port uint32) {
	defer conn.Close()
	guest, err := network.DialInNetns(p.network.Plan().Netns, net.JoinHostPort(vmspec.MasqueradeGuest, fmt.Sprint(port)))
	if err != nil {
		log.G(ctx).WithError(err).Warnf("port-forward to guest port %d", port)
		return
	}
	splice(conn, guest)
}

// splice copies both ways until one side ends, then closes the other.
func splice(a, b net.Conn) {
	defer b.Close()
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(b, a); done <- struct{}{} }()
	go func() { _, _ = io.Copy(a, b); done <- struct{}{} }()
	<-done
}

// masqueradeOf is the NAT plumbing for a masquerade interface.
func masqueradeOf(iface vmspec.Interface) *network.Masquerade {
	m := &network.Masquerade{Interface: iface.PodInterface, Subnet: netip.MustParsePrefix(vmspec.MasqueradeSubnet),
		Guest: netip.MustParseAddr(vmspec.MasqueradeGuest), Gateway: netip.MustParseAddr(vmspec.MasqueradeGateway)}
	for _, port := range iface.Ports {
		m.Ports = append(m.Ports, network.Port{Protocol: strings.ToLower(string(port.Protocol)), Port: port.Port})
	}
	return m
}

func (p *vmPod) proxyVNC(ctx context.Context, conn net.Conn) {
	defer conn.Close()
	p.mu.Lock()
	c := p.compute
	p.mu.Unlock()
	if c == nil {
		log.G(ctx).Warn("VNC: the VM is not running")
		return
	}
	vnc, err := c.machine.DialVNC(ctx)
	if err != nil {
		log.G(ctx).WithError(err).Warn("VNC")
		return
	}
	splice(conn, vnc)
}

// CreateContainer creates the sandbox stand-in or boots the VM for the compute container.
// A compute container whose VM has exited is released first: the kubelet creates the next
// one before it deletes the dead one.
func (p *vmPod) CreateContainer(ctx context.Context, id string, root Rootfs, spec *specs.Spec, stdio runtime.Stdio) (Process, error) {
	if spec.Annotations[cri.AnnotationContainerType] == cri.ContainerTypeSandbox {
		p.mu.Lock()
		defer p.mu.Unlock()
		if p.sandbox != nil {
			return nil, fmt.Errorf("pod %s: a second sandbox container %s: %w", p.id, id, errdefs.ErrAlreadyExists)
		}
		p.sandbox, p.sandboxID = newStandIn(), id
		return p.sandbox, nil
	}
	if name, cri := spec.Annotations[cri.AnnotationContainerName]; cri && name != vmspec.ComputeContainer {
		return nil, fmt.Errorf("pod %s: container %s (%s): a VM pod runs one container, %q: %w", p.id, id, name, vmspec.ComputeContainer, errdefs.ErrInvalidArgument)
	}
	p.bootMu.Lock()
	defer p.bootMu.Unlock()
	select {
	case <-p.done:
		return nil, fmt.Errorf("pod %s is stopped: %w", p.id, errdefs.ErrFailedPrecondition)
	default:
	}
	p.mu.Lock()
	old, oldID, gone := p.compute, p.computeID, p.migratedTo
	p.mu.Unlock()
	if gone != "" {
		return nil, fmt.Errorf("pod %s: container %s: the guest migrated to %s and runs there from the same disks; this pod does not boot it again: %w", p.id, id, gone, errdefs.ErrFailedPrecondition)
	}
	if old != nil {
		select {
		case <-old.exited:
		default:
			return nil, fmt.Errorf("pod %s: container %s: the VM already runs as container %s: %w", p.id, id, oldID, errdefs.ErrAlreadyExists)
		}
		if err := old.shutDown(); err != nil {
			log.G(ctx).WithError(err).Warnf("pod %s: releasing the exited VM of container %s", p.id, oldID)
		}
		p.mu.Lock()
		p.compute, p.computeID, p.removed[oldID] = nil, "", true
		p.mu.Unlock()
	}
	if err := root.mount(); err != nil {
		return nil, fmt.Errorf("pod %s: container %s: %w", p.id, id, err)
	}
	c, err := p.bootVM(ctx, id, root.Dir, spec, stdio)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	p.compute, p.computeID = c, id
	p.mu.Unlock()
	return c, nil
}

// lookup is the container id's process: the stand-in or the VM.
func (p *vmPod) lookup(id string) (Process, *computeVM, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case p.sandbox != nil && id == p.sandboxID:
		return p.sandbox, nil, nil
	case p.compute != nil && id == p.computeID:
		return p.compute, p.compute, nil
	}
	return nil, nil, fmt.Errorf("pod %s: container %s: %w", p.id, id, errdefs.ErrNotFound)
}

func (p *vmPod) StartContainer(ctx context.Context, id string) error {
	_, c, err := p.lookup(id)
	if err != nil || c == nil {
		return err // the stand-in has nothing to start
	}
	return c.powerOn(ctx)
}

func (p *vmPod) Exec(ctx context.Context, containerID, execID string, proc *specs.Process, stdio runtime.Stdio) (Process, error) {
	_, c, err := p.lookup(containerID)
	if err != nil {
		return nil, err
	}
	if c == nil {
		return nil, fmt.Errorf("pod %s: exec in the sandbox of a VM pod: exec in container %s: %w", p.id, vmspec.ComputeContainer, errdefs.ErrInvalidArgument)
	}
	return c.exec(ctx, execID, proc, stdio)
}

func (p *vmPod) PauseContainer(ctx context.Context, id string) error {
	_, c, err := p.lookup(id)
	if err != nil || c == nil {
		return err
	}
	_, err = c.setPaused(ctx, true)
	return err
}

func (p *vmPod) ResumeContainer(ctx context.Context, id string) error {
	_, c, err := p.lookup(id)
	if err != nil || c == nil {
		return err
	}
	_, err = c.setPaused(ctx, false)
	return err
}

// UpdateContainer resizes the VM as the compute container's limits change (vmresize.go).
func (p *vmPod) UpdateContainer(ctx context.Context, id string, r *specs.LinuxResources) error {
	_, c, err := p.lookup(id)
	if err != nil || c == nil {
		return err // the sandbox's resources are the pod's: nothing runs in the stand-in
	}
	return c.resize(ctx, r)
}

func (p *vmPod) ContainerStats(ctx context.Context, id string) (*cgroupsv2.Metrics, error) {
	_, c, err := p.lookup(id)
	if err != nil {
		return nil, err
	}
	if c == nil {
		return &cgroupsv2.Metrics{}, nil
	}
	return c.stats()
}

func (p *vmPod) ContainerPids(ctx context.Context, id string) ([]uint32, error) {
	proc, _, err := p.lookup(id)
	if err != nil {
		return nil, err
	}
	return []uint32{proc.Pid()}, nil
}

// WaitOOMEvent: the guest's OOM kills are its own business; a host-side OOM kill of QEMU
// shows as the compute container's exit.
func (p *vmPod) WaitOOMEvent(ctx context.Context, afterSeq uint64) (OOMEvent, error) {
	select {
	case <-ctx.Done():
		return OOMEvent{}, ctx.Err()
	case <-p.done:
		return OOMEvent{}, fmt.Errorf("pod %s is stopped: %w", p.id, errdefs.ErrNotFound)
	}
}

func (p *vmPod) RemoveContainer(ctx context.Context, id string, force bool) error {
	p.mu.Lock()
	var c *computeVM
	switch {
	case p.sandbox != nil && id == p.sandboxID:
		p.sandbox.end(exitKilled)
		p.sandbox, p.sandboxID = nil, ""
		p.removed[id] = true
		p.mu.Unlock()
		return nil
	case p.compute != nil && id == p.computeID:
		c = p.compute
		p.compute, p.computeID, p.removed[id] = nil, "", true
	case p.removed[id]:
		p.mu.Unlock()
		return nil
	default:
		p.mu.Unlock()
		return fmt.Errorf("pod %s: container %s: %w", p.id, id, errdefs.ErrNotFound)
	}
	p.mu.Unlock()
	// Forgotten before the teardown: an error is reported once, and a retried delete
	// then succeeds instead of keeping the container (and the pod) forever.
	if err := c.shutDown(); err != nil {
		return fmt.Errorf("pod %s: container %s: %w", p.id, id, err)
	}
	return nil
}

// Stop ends the VM if it still runs and releases the pod's network. Later calls return the
// first result.
func (p *vmPod) Stop(ctx context.Context) error {
	p.stopOnce.Do(func() {
		p.bootMu.Lock() // a boot in progress finishes (or fails) first
		defer p.bootMu.Unlock()
		p.mu.Lock()
		c, sandbox := p.compute, p.sandbox
		p.compute = nil
		close(p.done)
		p.mu.Unlock()
		var errs []error
		if c != nil {
			errs = append(errs, c.shutDown())
		}
		if sandbox != nil {
			sandbox.end(exitKilled)
		}
		if p.loopback != nil {
			errs = append(errs, p.loopback.Close())
		}
		if p.network != nil {
			errs = append(errs, p.network.Teardown())
		}
		p.stopErr = errors.Join(errs...)
	})
	return p.stopErr
}

// resolvConf is the DNS the CRI gave the compute container (its /etc/resolv.conf mount),
// for the guest's DHCP lease.
func resolvConf(spec *specs.Spec) (servers []netip.Addr, search []string) {
	for _, m := range spec.Mounts {
		if m.Destination != "/etc/resolv.conf" {
			continue
		}
		f, err := os.Open(m.Source)
		if err != nil {
			return nil, nil
		}
		defer f.Close()
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) < 2 {
				continue
			}
			switch fields[0] {
			case "nameserver":
				if a, err := netip.ParseAddr(fields[1]); err == nil {
					servers = append(servers, a)
				}
			case "search":
				search = fields[1:]
			}
		}
	}
	return servers, search
}

var _ Pod = (*vmPod)(nil)
