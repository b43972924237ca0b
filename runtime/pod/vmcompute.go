package pod

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	cgroupsv2 "github.com/containerd/cgroups/v3/cgroup2/stats"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/vmpod/vmpod/api/vmspec"
	"github.com/vmpod/vmpod/devices"
	"github.com/vmpod/vmpod/internal/cleanup"
	"github.com/vmpod/vmpod/qmp"
	"github.com/vmpod/vmpod/runtime"
	"github.com/vmpod/vmpod/runtime/cloudinit"
	"github.com/vmpod/vmpod/runtime/cri"
	"github.com/vmpod/vmpod/runtime/disks"
	"github.com/vmpod/vmpod/runtime/network"
	"github.com/vmpod/vmpod/runtime/nodeconfig"
	"github.com/vmpod/vmpod/runtime/qga"
	"github.com/vmpod/vmpod/runtime/vmm"
)

const (
	// consoleDrainWait bounds how long an exit waits for the rest of the console output.
	consoleDrainWait = 2 * time.Second
	// agentCheckWait bounds the guest-agent check that precedes an exec.
	agentCheckWait = 5 * time.Second
	// maxExecInput bounds the stdin of an exec: the guest agent takes it in one message.
	maxExecInput = 1 << 20
	// terminationLog is where the kubelet reads a container's termination message (the
	// default terminationMessagePath): the compute container's exit reason goes there.
	terminationLog = "/dev/termination-log"
)

// computeVM is the compute container of a VM pod: one boot of the VM.
type computeVM struct {
	pod     *vmPod
	id      string
	machine *vmm.Machine
	disks   *disks.Set
	agent   *qga.Client
	dhcp    []*network.DHCPServer
	events  *qmp.Subscription
	console net.Conn
	termLog string      // host path of the compute container's termination log, if mounted
	spec    *specs.Spec // the compute container's, whose volumes disks are opened in

	// nics follows the pod's netns for interfaces added while the VM runs; stopNICs ends it
	nics     *nicFollower
	stopNICs context.CancelFunc

	hotMu sync.Mutex
	hot   map[string]hotDisk // hot-plugged disks, by name
	// agentKeys reads the access credentials the guest agent keeps in the guest while the
	// VM runs; nil without any
	agentKeys func() ([]userKeys, error)

	stdinOnce     sync.Once
	powerdownOnce sync.Once
	stdinStop     chan struct{}
	consoleDone   chan struct{} // closed when the console output has reached the host

	// bootLimits are the compute container's limits at boot, limits its limits now; size
	// is the VM's (docs/design/208). Guarded by hotMu.
	bootLimits, limits claim
	size               Size
	bootBlocks         map[uint64]bool // the guest's memory blocks before its first growth
	// settledBlocks are the blocks past boot the onliner is done with: onlined once (one
	// offline since is the guest's choice), or refused for good by the guest
	settledBlocks map[uint64]bool

	mu       sync.Mutex
	killedBy syscall.Signal // SIGKILL asked for: the exit is a kill, whatever QEMU says
	panicked bool
	running  bool // started: the vCPUs ran (a pause stops them again)
	paused   bool // vCPUs stopped by a pause (not the created-but-not-started stop)
	// awaiting: a migration target's guest has not arrived and been handed over yet, so
	// its vCPUs wait for the source's commit, not for the container's start (vmmigrate.go)
	awaiting  bool
	accepting bool          // a migration target listening for its source
	loaded    bool          // a migration target told its source it has the guest
	migrating *outgoing     // a migration away from here in flight
	decided   *runtime.Exit // the exit the shim chose (migrated away, never arrived)

	exited chan struct{}
	exit   runtime.Exit

	shutOnce sync.Once
	shutErr  error
}

// bootVM starts QEMU for the compute container, its vCPUs stopped until StartContainer:
// the disks opened inside their volumes, the cloud-init disk, the NICs and their DHCP
// answers, the console on the container's stdio. On error nothing is left.
func (p *vmPod) bootVM(ctx context.Context, id, rootfs string, spec *specs.Spec, stdio runtime.Stdio) (_ *computeVM, retErr error) {
	lg := log.G(ctx).WithField("pod", p.id)
	started := time.Now()
	c := &computeVM{pod: p, id: id, spec: spec, exited: make(chan struct{}), stdinStop: make(chan struct{}), consoleDone: make(chan struct{}),
		size: Size{VCPUs: p.vm.CPU.VCPUs(), MemoryMiB: int(p.vm.MemoryMiB)}, awaiting: p.vm.Migration != nil}
	if spec.Linux != nil {
		c.bootLimits = claimOf(spec.Linux.Resources, claim{})
		c.limits = c.bootLimits
	}
	var undo cleanup.Stack
	defer func() {
		if retErr != nil {
			if err := undo.Run(); err != nil {
				lg.WithError(err).Warn("cleanup after a failed VM boot")
			}
		}
	}()
	h := p.cfg.Hypervisor
	set, err := disks.Open(ctx, p.vm, spec, disks.Options{ScratchDir: rootfs, QEMUImg: h.QEMUImg, FirstFDSet: 1})
	if err != nil && ctx.Err() != nil {
		return nil, fmt.Errorf("pod %s: %w", p.id, err) // given up, not a bad disk
	}
	if err != nil {
		return nil, fmt.Errorf("pod %s: annotation %s: %w: %w", p.id, vmspec.Annotation, err, errdefs.ErrInvalidArgument)
	}
	c.disks = set
	undo.Add("close disks", set.Close)
	noCloudKeys, agentKeys, err := accessCredentials(p.vm.AccessCredentials, spec, false)
	if err != nil {
		return nil, fmt.Errorf("pod %s: annotation %s: %w: %w", p.id, vmspec.Annotation, err, errdefs.ErrInvalidArgument)
	}
	if len(agentKeys) > 0 {
		// only the guest agent's credentials: a noCloud Secret that stops parsing must not
		// hold up their keys
		agentCreds := slices.DeleteFunc(slices.Clone(p.vm.AccessCredentials), func(c vmspec.AccessCredential) bool {
			return c.Propagation != vmspec.PropagateGuestAgent
		})
		c.agentKeys = func() ([]userKeys, error) {
			_, keys, err := accessCredentials(agentCreds, spec, true)
			return keys, err
		}
	}
	if ci := p.vm.CloudInit; ci != nil {
		if err := p.attachCloudInit(ci, spec, rootfs, set, noCloudKeys); err != nil {
			return nil, fmt.Errorf("pod %s: %w", p.id, err)
		}
	}
	devs, files, err := set.Machine()
	if err != nil {
		return nil, fmt.Errorf("pod %s: annotation %s: %w: %w", p.id, vmspec.Annotation, err, errdefs.ErrInvalidArgument)
	}
	devs = append(devs, &devices.PVPanic{DeviceID: "pvpanic0"})
	hostDevs, hole64, err := hostDevicesFor(spec, p.vm, devices.Sysfs{}, p.cfg.Devices.VFIOBind)
	if err != nil {
		return nil, fmt.Errorf("pod %s: annotation %s: %w", p.id, vmspec.Annotation, err)
	}
	if len(hostDevs) > 0 {
		lg.Infof("passing through %d PCI functions (%v)", len(hostDevs), hostDevs)
	}
	cfg := vmm.Config{
		Name:         p.id,
		StateDir:     p.stateDir,
		OwnerSockets: p.host.ownerSockets(),
		QEMUPath:     h.QEMU,
		Users:        p.cfg.Isolation.QEMUUsers(),
		Type:         p.vm.Machine,
		Accel:        h.Accel,
		VCPUs:        p.vm.CPU.VCPUs(),
		MaxVCPUs:     p.vm.CPU.MaxVCPUs(),
		Cores:        p.vm.CPU.Cores,
		Threads:      p.vm.CPU.Threads,
		MemoryMiB:    int(p.vm.MemoryMiB),
		// growth room: a virtio-mem device of the difference (none without)
		MaxMemoryMiB: int(p.vm.MaxMemoryMiB),
		CPUModel:     p.vm.CPU.Model,
		HyperV:       p.vm.Features.HyperV,
		KVMHidden:    p.vm.Features.KVMHidden,
		NoACPI:       !*p.vm.Features.ACPI,
		NoSMM:        !*p.vm.Features.SMM,
		Boot:         vmm.Boot{Firmware: firmware(p.vm.Firmware, h)},
		Ports:        []string{qga.PortName},
		Console:      vmm.ConsoleSocket,
		Devices:      devs,
		HostDevices:  hostDevs,
		PCIHole64:    hole64,
		Files:        files,
		Reboot:       true,
		Paused:       true,
		ExitOnPanic:  true,
		// a migration target waits for its guest (vmmigrate.go)
		Incoming: p.vm.Migration != nil,

		FreePageReporting: p.cfg.Sizing.FreePageReporting,
		VNC:               true,
		UUID:              p.vm.UUID,
		UpTimeout:         p.cfg.Timeouts.Boot.Duration,
		Cgroup:            cgroupsPath(spec), // QEMU is the compute container
	}
	if p.network != nil {
		plan := p.network.Plan()
		nics := p.network.NICs()
		dns, search := resolvConf(spec)
		for _, iface := range p.vm.Interfaces {
			i := interfaceIndex(plan, iface.PodInterface)
			nic := nics[i]
			switch {
			case iface.MACAddress != "":
				nic.MAC = iface.MACAddress
			case iface.Binding == vmspec.BindingMasquerade && p.vm.UUID != "":
				// behind NAT the guest's MAC need not be the pod's: one of the VM's own keeps
				// it from pod to pod, across a migration too (the DHCP server answers by MAC)
				nic.MAC = guestMAC(p.vm.UUID, iface.Name)
			}
			if iface.Model != vmspec.ModelVirtio {
				nic.Model = string(iface.Model)
			}
			cfg.NICs = append(cfg.NICs, nic)
			mac, _ := net.ParseMAC(nic.MAC)
			lease, err := plan.LeaseFor(iface.PodInterface, dns, search, p.hostname)
			if iface.Binding == vmspec.BindingMasquerade {
				lease, err = plan.MasqueradeLease(mac, dns, search, p.hostname)
			}
			if err != nil {
				lg.WithError(err).Infof("interface %s: no DHCP (the guest configures itself)", iface.Name)
				continue
			}
			lease.MAC = mac
			srv, err := p.network.ServeDHCP(iface.PodInterface, lease)
			if err != nil {
				return nil, fmt.Errorf("pod %s: interface %s: %w", p.id, iface.Name, err)
			}
			c.dhcp = append(c.dhcp, srv)
			undo.Add("stop DHCP", srv.Close)
		}
	}
	m, err := vmm.Start(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("pod %s: %w", p.id, err)
	}
	c.machine = m
	undo.Add("stop QEMU", m.Kill)
	c.events = m.Monitor().Subscribe(qmp.EventNamed(eventGuestPanicked))
	if c.console, err = m.DialConsole(ctx); err != nil {
		return nil, fmt.Errorf("pod %s: serial console: %w", p.id, err)
	}
	c.agent = qga.New(func(ctx context.Context) (net.Conn, error) { return m.DialPort(ctx, qga.PortName) })
	c.termLog = mountSource(spec, terminationLog)
	undo.Release()

	go c.pumpConsole(stdio)
	go c.watch(log.WithLogger(context.WithoutCancel(ctx), lg))
	if p.vm.MemoryResizable() {
		go c.followReboots(log.WithLogger(context.WithoutCancel(ctx), lg))
	}
	if p.network != nil {
		dns, search := resolvConf(spec)
		c.nics = &nicFollower{pod: p.id, network: p.network, machine: m, configureFirst: true, kept: p.keptNICs, busy: &c.hotMu, waiting: c.isAwaiting,
			configure: func(_ context.Context, plan *network.Plan, iface network.Interface) (func() error, error) {
				return c.serveDHCP(plan, iface, dns, search)
			}}
		var nicCtx context.Context
		nicCtx, c.stopNICs = context.WithCancel(log.WithLogger(context.WithoutCancel(ctx), lg))
		c.nics.follow(nicCtx)
	}
	if c.awaiting {
		lg.Infof("migration target created in %v (QEMU pid %d, waiting for the guest: %s)", time.Since(started).Round(time.Millisecond), m.Pid(), vmspec.MigrateAcceptCommand)
	} else {
		lg.Infof("VM created in %v (QEMU pid %d, paused until the container starts)", time.Since(started).Round(time.Millisecond), m.Pid())
	}
	return c, nil
}

// eventGuestPanicked is QEMU's event for a guest that reported a panic (pvpanic).
const eventGuestPanicked = "GUEST_PANICKED"

func interfaceIndex(plan *network.Plan, name string) int {
	for i, iface := range plan.Interfaces {
		if iface.Name == name {
			return i
		}
	}
	return -1 // checked at pod start
}

// attachCloudInit builds the NoCloud disk in the container's scratch space and adds it to
// the disks: a cdrom on sata or scsi, a read-only disk on virtio.
func (p *vmPod) attachCloudInit(ci *vmspec.CloudInit, spec *specs.Spec, scratch string, set *disks.Set, publicKeys []string) error {
	userData, networkData, err := cloudinit.Data(ci, spec)
	if err != nil {
		return fmt.Errorf("annotation %s: %w: %w", vmspec.Annotation, err, errdefs.ErrInvalidArgument)
	}
	instanceID := p.vm.UUID
	if instanceID == "" {
		instanceID = p.id
	}
	path := filepath.Join(scratch, ".vmpod-cidata.iso")
	_ = os.Remove(path) // an earlier boot's, in a reused scratch dir
	nc := cloudinit.NoCloud{InstanceID: instanceID, Hostname: p.hostname, UserData: userData, NetworkData: networkData, PublicKeys: publicKeys}
	if err := nc.WriteISO(path, scratch); err != nil {
		return err
	}
	f, err := os.Open(path)
	_ = os.Remove(path) // the open file is all QEMU needs
	if err != nil {
		return fmt.Errorf("cloud-init ISO: %w", err)
	}
	bus := ci.Bus
	if bus == "" {
		bus = vmspec.BusVirtio
	}
	d := vmspec.Disk{Name: vmspec.CloudInitDiskName, Device: vmspec.DeviceCDROM, Bus: bus}
	if bus == vmspec.BusVirtio {
		d.Device = vmspec.DeviceDisk
	}
	if err := set.Attach(d, f); err != nil {
		_ = f.Close()
		return err
	}
	return nil
}

// mountSource is the host source of the spec's mount at dest, or "".
func mountSource(spec *specs.Spec, dest string) string {
	for _, m := range spec.Mounts {
		if m.Destination == dest {
			return m.Source
		}
	}
	return ""
}

// pumpConsole carries the serial console to the container's stdout (its log, and attach)
// and the container's stdin to the console.
func (c *computeVM) pumpConsole(stdio runtime.Stdio) {
	if stdio.Stdin != nil {
		go func() {
			buf := make([]byte, 4096)
			for {
				n, err := stdio.Stdin.Read(buf)
				select {
				case <-c.stdinStop:
					return
				default:
				}
				if n > 0 {
					if _, werr := c.console.Write(buf[:n]); werr != nil {
						return
					}
				}
				if err != nil {
					return
				}
			}
		}()
	}
	out := stdio.Stdout
	if out == nil {
		out = io.Discard
	}
	_, _ = io.Copy(out, c.console) // ends when QEMU closes the console, at its exit
	close(c.consoleDone)
}

// watch waits for QEMU to exit and records how the container ended.
func (c *computeVM) watch(ctx context.Context) {
	<-c.machine.Done()
	exitErr := c.machine.ExitErr()
	// a panic event QEMU sent before it exited is still queued: read the queue to its end
	// (it ends when the monitor sees QEMU's socket close)
	drainCtx, cancel := context.WithTimeout(ctx, consoleDrainWait)
	defer cancel()
	for {
		ev, err := c.events.Next(drainCtx)
		if err != nil {
			break
		}
		if ev.Name == eventGuestPanicked {
			c.mu.Lock()
			c.panicked = true
			c.mu.Unlock()
		}
	}
	select {
	case <-c.consoleDone:
	case <-time.After(consoleDrainWait):
		_ = c.console.Close()
		select {
		case <-c.consoleDone:
		case <-time.After(consoleDrainWait):
			// the pump is stuck writing to a stdout nobody reads (containerd away): the
			// exit does not wait for it
		}
	}
	c.mu.Lock()
	exit := exitOf(exitErr, c.killedBy, c.panicked, c.decided)
	if c.awaiting && c.decided == nil && c.killedBy == 0 {
		// a migration target's QEMU ends by itself when its incoming stream fails
		exit.Reason = vmspec.MigrationFailedReason + ": the guest did not arrive: " + exit.Reason
	}
	c.mu.Unlock()
	if exit.Status != 0 {
		if tail := strings.TrimSpace(c.machine.ConsoleHint()); tail != "" && !c.isKill(exit) {
			exit.Reason += "\n" + tail
		}
	}
	if c.termLog != "" {
		if err := os.WriteFile(c.termLog, []byte(exit.Reason+"\n"), 0o644); err != nil {
			log.G(ctx).WithError(err).Warn("termination message")
		}
	}
	log.G(ctx).Infof("VM exited: status %d: %s", exit.Status, firstLine(exit.Reason))
	c.exit = exit
	close(c.exited)
}

func (c *computeVM) isKill(e runtime.Exit) bool { return e.Status == exitKilled }

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}

// exitOf is the compute container's exit for how QEMU ended: a kill that was asked for, an
// end the shim decided on (a migration), a guest panic, a guest power-off, or QEMU failing.
func exitOf(exitErr error, killedBy syscall.Signal, panicked bool, decided *runtime.Exit) runtime.Exit {
	e := runtime.Exit{ExitedAt: time.Now()}
	switch {
	case killedBy != 0:
		e.Status, e.Reason = 128+int(killedBy), fmt.Sprintf("the VM was stopped without a shutdown (%s)", killedBy)
	case decided != nil:
		e.Status, e.Reason = decided.Status, decided.Reason
	case panicked:
		e.Status, e.Reason = 1, "GuestPanicked: the guest kernel panicked (pvpanic)"
	case exitErr == nil:
		e.Status, e.Reason = 0, "the guest powered off"
	default:
		e.Status, e.Reason = vmm.QEMUExit(exitErr)
	}
	return e
}

// powerOn starts the vCPUs: the firmware runs, the guest boots. Access credentials for the
// guest agent are handed over in the background as soon as it and the accounts exist, and
// kept in line with their Secrets from then on.
func (c *computeVM) powerOn(ctx context.Context) error {
	c.mu.Lock()
	if c.awaiting {
		// a migration target: its vCPUs start when the source hands the guest over
		c.running = true
		c.mu.Unlock()
		return nil
	}
	c.mu.Unlock()
	if err := c.machine.Resume(ctx); err != nil {
		return err
	}
	c.mu.Lock()
	c.running = true
	c.mu.Unlock()
	if c.agentKeys != nil {
		go c.syncKeysThroughAgent(context.WithoutCancel(ctx), c.agentKeys, keySyncPeriod)
	}
	return nil
}

// Pid is QEMU's: the host process that is the VM.
func (c *computeVM) Pid() uint32 { return uint32(c.machine.Pid()) }

func (c *computeVM) Wait(ctx context.Context) (runtime.Exit, error) {
	select {
	case <-c.exited:
		return c.exit, nil
	case <-ctx.Done():
		return runtime.Exit{}, ctx.Err()
	}
}

// OutputDone: the VM's console goes to its log, not to containerd's stdio.
func (c *computeVM) OutputDone() <-chan struct{} { return c.exited }

// Signal: SIGKILL ends QEMU at once; the stop signals press the ACPI power button, and the
// guest shuts down in its own time (the kubelet's grace period, then SIGKILL).
func (c *computeVM) Signal(ctx context.Context, sig syscall.Signal, all bool) error {
	select {
	case <-c.machine.Done():
		return fmt.Errorf("the VM has exited: %w", errdefs.ErrNotFound)
	default:
	}
	switch sig {
	case 0:
		return nil
	case syscall.SIGKILL:
		c.mu.Lock()
		c.killedBy = sig
		c.mu.Unlock()
		c.machine.Quit(ctx)
		select {
		case <-c.machine.Done():
		default:
			c.machine.KillProcess()
		}
		return nil
	case syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGQUIT, syscall.SIGPWR:
		c.mu.Lock()
		empty := c.awaiting && !c.loaded
		c.mu.Unlock()
		if empty {
			// a migration target without a guest has nothing to power off, and once it is
			// stopping it must not take one (after loaded, the source may commit: it waits)
			c.failTarget(ctx, fmt.Errorf("stopped (%s) before the guest arrived", sig))
			return nil
		}
		if err := c.machine.Powerdown(ctx); err != nil {
			return err
		}
		c.powerdownOnce.Do(func() { go c.keepPressing() })
		return nil
	}
	return fmt.Errorf("signal %d to a VM: a VM takes SIGTERM (ACPI power-down) and SIGKILL (stop at once): %w", sig, errdefs.ErrInvalidArgument)
}

// powerButtonRepeat is how often a guest that has not powered off yet has its power button
// pressed again.
const powerButtonRepeat = 10 * time.Second

// keepPressing presses the ACPI power button again until QEMU exits: a guest that is still
// booting (systemd-logind not up yet, as right after a reboot) drops the first press, and
// the kubelet sends its stop signal once. The grace period's SIGKILL ends it anyway.
func (c *computeVM) keepPressing() {
	t := time.NewTicker(powerButtonRepeat)
	defer t.Stop()
	for {
		select {
		case <-c.machine.Done():
			return
		case <-t.C:
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_ = c.machine.Powerdown(ctx)
			cancel()
		}
	}
}

func (c *computeVM) Resize(context.Context, uint32, uint32) error { return nil }

// CloseStdin stops forwarding input to the console; the console itself stays.
func (c *computeVM) CloseStdin(context.Context) error {
	c.stdinOnce.Do(func() { close(c.stdinStop) })
	return nil
}

func (c *computeVM) Remove(context.Context) error { return nil }

// serveDHCP answers the guest's DHCP on a NIC plugged for iface (of plan, a Rescan's):
// the pod interface's address, as the boot NICs get theirs.
func (c *computeVM) serveDHCP(plan *network.Plan, iface network.Interface, dns []netip.Addr, search []string) (func() error, error) {
	lease, err := plan.LeaseFor(iface.Name, dns, search, c.pod.hostname)
	if err != nil {
		return nil, nil // no address to give: the guest configures itself
	}
	lease.MAC = iface.MAC // the guest NIC's: a migrated guest keeps its source's
	srv, err := c.pod.network.ServeDHCP(iface.Name, lease)
	if err != nil {
		return nil, err
	}
	return srv.Close, nil
}

// shutDown stops QEMU if it still runs and releases everything the boot made.
func (c *computeVM) shutDown() error {
	c.shutOnce.Do(func() {
		select {
		case <-c.machine.Done():
		default:
			c.mu.Lock()
			c.killedBy = syscall.SIGKILL // the exit is a kill, not a crash
			c.mu.Unlock()
		}
		errs := []error{c.machine.Kill()}
		<-c.exited
		if c.stopNICs != nil {
			// after QEMU: a device change under way (a plug, a migration's, holding hotMu)
			// fails without it instead of delaying the end; then the follower removes its
			// taps and DHCP servers before the teardown
			c.stopNICs()
			<-c.nics.done
		}
		_ = c.CloseStdin(context.Background())
		c.events.Close()
		_ = c.agent.Close()
		_ = c.console.Close()
		for _, s := range c.dhcp {
			errs = append(errs, s.Close())
		}
		errs = append(errs, c.disks.Close())
		c.shutErr = errors.Join(errs...)
	})
	return c.shutErr
}

// stats are QEMU's, read on the host: its cgroup's figures (the compute container's
// cgroup), else its CPU time and resident memory from /proc. An exited VM has none (its
// pid may belong to another process by now).
func (c *computeVM) stats() (*cgroupsv2.Metrics, error) {
	select {
	case <-c.machine.Done():
		return &cgroupsv2.Metrics{}, nil
	default:
	}
	if c.machine.CgroupPath() != "" {
		return c.machine.CgroupStats()
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", c.machine.Pid()))
	if err != nil {
		return nil, fmt.Errorf("VM stats: %w", err)
	}
	// fields after the command (which may hold spaces) start after the last ')'
	fields := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
	if len(fields) < 22 {
		return nil, fmt.Errorf("VM stats: short /proc/%d/stat", c.machine.Pid())
	}
	const ticksPerSec = 100 // USER_HZ
	utime, _ := strconv.ParseUint(fields[11], 10, 64)
	stime, _ := strconv.ParseUint(fields[12], 10, 64)
	rssPages, _ := strconv.ParseUint(fields[21], 10, 64)
	toUsec := func(t uint64) uint64 { return t * 1_000_000 / ticksPerSec }
	return &cgroupsv2.Metrics{
		Pids:   &cgroupsv2.PidsStat{Current: 1},
		CPU:    &cgroupsv2.CPUStat{UsageUsec: toUsec(utime + stime), UserUsec: toUsec(utime), SystemUsec: toUsec(stime)},
		Memory: &cgroupsv2.MemoryStat{Usage: rssPages * uint64(os.Getpagesize())},
	}, nil
}

// exec runs a command in the guest through the QEMU guest agent. An exec of exactly
// [vmspec.GuestAgentPingCommand] is KubeVirt's guestAgentPing probe: it answers from
// guest-ping and runs nothing.
func (c *computeVM) exec(ctx context.Context, execID string, proc *specs.Process, stdio runtime.Stdio) (Process, error) {
	if proc.Terminal {
		return nil, fmt.Errorf("exec %s: a terminal in a VM: the QEMU guest agent runs commands without one; use the serial console (kubectl attach, kubectl vmpod console): %w", execID, errdefs.ErrInvalidArgument)
	}
	if len(proc.Args) == 0 {
		return nil, fmt.Errorf("exec %s: process.args: empty: %w", execID, errdefs.ErrInvalidArgument)
	}
	args := proc.Args
	control := len(args) == 1 && (args[0] == vmspec.PauseCommand || args[0] == vmspec.UnpauseCommand)
	ping := len(args) == 1 && args[0] == vmspec.GuestAgentPingCommand
	hotplug := args[0] == vmspec.AttachDiskCommand || args[0] == vmspec.DetachDiskCommand
	if hotplug && len(args) != 2 {
		return nil, fmt.Errorf("exec %s: %s takes one argument (quote the disk's JSON), got %d: %w", execID, args[0], len(args)-1, errdefs.ErrInvalidArgument)
	}
	migration := args[0] == vmspec.MigrateAcceptCommand || args[0] == vmspec.MigrateCommand || args[0] == vmspec.MigrateCancelCommand
	if migration && len(args) != 1 {
		return nil, fmt.Errorf("exec %s: %s takes no arguments (its request is JSON on stdin: it holds a key), got %d: %w", execID, args[0], len(args)-1, errdefs.ErrInvalidArgument)
	}
	// a paused VM's probe fails (exit 1, below): an exec that cannot start is "unknown" to
	// the kubelet's prober, which would keep the pod Ready
	if c.isPaused() && !control && !ping {
		return nil, fmt.Errorf("exec %s: %w: %w", execID, errPaused, errdefs.ErrFailedPrecondition)
	}
	if !ping && !control && !hotplug && !migration {
		// the agent must be there for anything else, or the exec fails now, saying so
		checkCtx, cancel := context.WithTimeout(ctx, agentCheckWait)
		err := c.agent.Ping(checkCtx)
		cancel()
		if errors.Is(err, qga.ErrNoAgent) {
			return nil, fmt.Errorf("exec %s: %w: %w", execID, err, errdefs.ErrFailedPrecondition)
		}
	}
	e := &guestExec{vm: c, done: make(chan struct{}), cancel: make(chan struct{})}
	go e.run(proc.Args, ping, stdio)
	return e, nil
}

// guestExec is an exec'd command in a VM pod's guest.
type guestExec struct {
	vm         *computeVM
	done       chan struct{}
	exit       runtime.Exit
	cancel     chan struct{}
	cancelOnce sync.Once
	killedBy   atomic.Int32 // the signal Signal ended it with
}

func (e *guestExec) run(args []string, ping bool, stdio runtime.Stdio) {
	defer close(e.done)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-e.cancel:
			cancel()
		case <-e.vm.machine.Done():
			cancel()
		case <-ctx.Done():
		}
	}()
	stderr := func(msg string) {
		if stdio.Stderr != nil {
			_, _ = io.WriteString(stdio.Stderr, msg+"\n")
		}
	}
	finish := func(status int) { e.exit = runtime.Exit{Status: status, ExitedAt: time.Now()} }
	if ping {
		if e.vm.isPaused() {
			stderr(errPaused.Error())
			finish(1)
			return
		}
		if err := e.vm.agent.Ping(ctx); err != nil {
			stderr(err.Error())
			finish(1)
			return
		}
		finish(0)
		return
	}
	// answer ends a command the shim answers itself: its output, or its error and status 1
	answer := func(out string, err error) {
		if err != nil {
			stderr(err.Error())
			finish(1)
			return
		}
		if stdio.Stdout != nil {
			_, _ = io.WriteString(stdio.Stdout, out+"\n")
		}
		finish(0)
	}
	switch {
	case len(args) == 1 && (args[0] == vmspec.PauseCommand || args[0] == vmspec.UnpauseCommand):
		answer(e.vm.setPaused(ctx, args[0] == vmspec.PauseCommand))
		return
	case len(args) == 2 && args[0] == vmspec.AttachDiskCommand:
		hpCtx, cancel := context.WithTimeout(ctx, hotplugWait)
		defer cancel()
		answer(e.vm.attachDisk(hpCtx, args[1]))
		return
	case len(args) == 2 && args[0] == vmspec.DetachDiskCommand:
		hpCtx, cancel := context.WithTimeout(ctx, hotplugWait)
		defer cancel()
		answer(e.vm.detachDisk(hpCtx, args[1]))
		return
	case len(args) == 1 && args[0] == vmspec.GuestInfoCommand:
		info, err := guestInfo(ctx, e.vm.agent)
		answer(string(info), err)
		return
	case len(args) == 1 && args[0] == vmspec.MigrateCancelCommand:
		answer(e.vm.cancelMigration(ctx))
		return
	}
	var input []byte
	if stdio.Stdin != nil {
		b, err := readInput(ctx, stdio.Stdin)
		if ctx.Err() != nil {
			finish(128 + int(e.killedBy.Load()))
			return
		}
		if err != nil {
			stderr(err.Error())
			finish(126)
			return
		}
		input = b
	}
	switch {
	case len(args) == 1 && args[0] == vmspec.MigrateAcceptCommand:
		answer(e.vm.acceptMigration(ctx, input))
		return
	case len(args) == 1 && args[0] == vmspec.MigrateCommand:
		out := stdio.Stdout
		if out == nil {
			out = io.Discard
		}
		if err := e.vm.migrate(ctx, input, out); err != nil {
			stderr(err.Error())
			finish(1)
			return
		}
		finish(0)
		return
	}
	st, err := e.vm.agent.Run(ctx, qga.ExecRequest{Path: args[0], Args: args[1:], Input: input})
	if err != nil {
		if sig := e.killedBy.Load(); sig != 0 {
			finish(128 + int(sig))
			return
		}
		stderr(err.Error())
		finish(126) // the command could not be run
		return
	}
	if stdio.Stdout != nil {
		_, _ = stdio.Stdout.Write(st.Stdout)
	}
	if stdio.Stderr != nil {
		_, _ = stdio.Stderr.Write(st.Stderr)
	}
	finish(st.Status)
}

// hotplugWait bounds an attach or detach: a detach waits for the guest to let the disk go
// (Linux takes ~5 s, pciehp's grace period; more under TCG).
const hotplugWait = 2 * time.Minute

// hotDiskID is a hot-plugged disk's device id, apart from the boot disks' (disk<i>).
func hotDiskID(name string) string { return "hot-" + name }

// hotDisk is a disk attachDisk plugged in.
type hotDisk struct {
	vmspec.HotplugDisk             // as asked for
	image              os.FileInfo // the opened image, to know it again
}

// lockDevices takes hotMu for cmd, a device change, unless the guest is migrating here or
// away, or has left: the change would otherwise wait for the migration to end and then act on a
// QEMU that no longer runs the guest. The controller asks again, of the pod the guest is
// in. Checked before waiting and again after, as a migration may start in between.
func (c *computeVM) lockDevices(cmd string) error {
	if err := c.guestStays(cmd); err != nil {
		return err
	}
	c.hotMu.Lock()
	if err := c.guestStays(cmd); err != nil {
		c.hotMu.Unlock()
		return err
	}
	return nil
}

// guestStays says why cmd cannot act on this VM's guest: it has not arrived, is migrating,
// or is gone.
func (c *computeVM) guestStays(cmd string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.awaiting:
		// a device plugged now would not be in the stream (the source's plugs arrive by
		// the shape)
		return fmt.Errorf("%s: the guest has not arrived from its migration source: %w", cmd, errdefs.ErrFailedPrecondition)
	case c.migrating != nil:
		return fmt.Errorf("%s: the guest is migrating; ask again once it has settled, of the pod it is in: %w", cmd, errdefs.ErrFailedPrecondition)
	case c.decided != nil:
		return fmt.Errorf("%s: the guest has left this pod (%s): %w", cmd, c.decided.Reason, errdefs.ErrFailedPrecondition)
	}
	return nil
}

// attachDisk plugs in the disk an AttachDiskCommand describes (JSON). The same disk
// attached again from the same image is no error: the controller says again what it wants
// when it cannot know whether its last attach got through.
func (c *computeVM) attachDisk(ctx context.Context, arg string) (string, error) {
	d, err := vmspec.ParseHotplugDisk([]byte(arg), c.pod.vm)
	if err != nil {
		return "", fmt.Errorf("%s: %w", vmspec.AttachDiskCommand, err)
	}
	if err := c.lockDevices(vmspec.AttachDiskCommand); err != nil {
		return "", err
	}
	defer c.hotMu.Unlock()
	if c.isPaused() {
		return "", fmt.Errorf("%s: %w", vmspec.AttachDiskCommand, errPaused)
	}
	out, err := c.plugHotDisk(ctx, d, "")
	if err != nil {
		return "", fmt.Errorf("%s: %w", vmspec.AttachDiskCommand, err)
	}
	return out, nil
}

// plugHotDisk opens d's image, from this pod's compute container or from d's attachment
// pod, and plugs it on root port port ("": the lowest free one), unless that image is
// attached as d already. Called with hotMu held.
func (c *computeVM) plugHotDisk(ctx context.Context, d vmspec.HotplugDisk, port string) (string, error) {
	spec := c.spec
	if d.AttachmentPod != "" {
		var err error
		if spec, err = c.attachmentSpec(ctx, d); err != nil {
			return "", fmt.Errorf("disk %s: %w", d.Name, err)
		}
	}
	disk, err := disks.OpenHotplug(ctx, d.Disk, spec, disks.Options{QEMUImg: c.pod.cfg.Hypervisor.QEMUImg})
	if err != nil {
		return "", err
	}
	defer disk.File.Close() // QEMU holds its own copy once plugged
	fi, err := disk.File.Stat()
	if err != nil {
		return "", fmt.Errorf("disk %s: %w", d.Name, err)
	}
	if had, dup := c.hot[d.Name]; dup {
		if sameImage(fi, had.image) {
			return fmt.Sprintf("disk %s attached already", d.Name), nil
		}
		return "", fmt.Errorf("disk %s is attached already, from another image: %w", d.Name, errdefs.ErrAlreadyExists)
	}
	// the same image under another volume's name would have two writers
	if other := c.diskOf(fi); other != "" {
		return "", fmt.Errorf("disk %s: volume %s holds the image of disk %s: %w", d.Name, d.Volume, other, errdefs.ErrAlreadyExists)
	}
	if err := c.machine.PlugDiskAt(ctx, port, disk.VirtioBlk(hotDiskID(d.Name)), disk.File); err != nil {
		return "", fmt.Errorf("disk %s: %w", d.Name, err)
	}
	if c.hot == nil {
		c.hot = map[string]hotDisk{}
	}
	c.hot[d.Name] = hotDisk{HotplugDisk: d, image: fi}
	from := ""
	if d.AttachmentPod != "" {
		from = ", pod " + d.AttachmentPod
	}
	log.G(ctx).WithField("pod", c.pod.id).Infof("attached disk %s (volume %s%s, %d bytes)", d.Name, d.Volume, from, disk.Size)
	return fmt.Sprintf("disk %s attached (virtio, serial %s, %d bytes)", d.Name, disk.VirtioBlk("").Serial, disk.Size), nil
}

// attachmentSpec is the OCI spec of the container of d's attachment pod that mounts d's
// volume, once that pod is known to lend it to this one: it runs on this node, in this
// pod's namespace, and its sandbox is labelled AttachmentForLabel with this pod's UID.
func (c *computeVM) attachmentSpec(ctx context.Context, d vmspec.HotplugDisk) (*specs.Spec, error) {
	self, ns := c.spec.Annotations[cri.AnnotationSandboxUID], c.spec.Annotations[cri.AnnotationSandboxNamespace]
	if self == "" || c.pod.host.Pods == nil {
		return nil, fmt.Errorf("disk.attachmentPod: this pod was not started through CRI, so no other pod can lend it a volume: %w", errdefs.ErrFailedPrecondition)
	}
	p, err := c.pod.host.Pods.Pod(ctx, d.AttachmentPod)
	if err != nil {
		return nil, fmt.Errorf("disk.attachmentPod: %w", err)
	}
	if p.Namespace != ns {
		return nil, fmt.Errorf("disk.attachmentPod: pod %s is in namespace %s, this pod in %s: %w", d.AttachmentPod, p.Namespace, ns, errdefs.ErrPermissionDenied)
	}
	if lent := p.Labels[vmspec.AttachmentForLabel]; lent != self {
		return nil, fmt.Errorf("disk.attachmentPod: pod %s does not lend its volumes to this pod (its label %s is %q, this pod's UID %s): %w", d.AttachmentPod, vmspec.AttachmentForLabel, lent, self, errdefs.ErrPermissionDenied)
	}
	for _, spec := range p.Containers {
		if disks.HasVolume(spec, d.Disk) {
			return spec, nil
		}
	}
	return nil, fmt.Errorf("disk.attachmentPod: no container of pod %s has volume %s (at %s): %w", d.AttachmentPod, d.Volume, disks.VolumePath(d.Disk), errdefs.ErrNotFound)
}

// diskOf names the boot or hot-plugged disk whose image fi is, or "". Called with hotMu.
func (c *computeVM) diskOf(fi os.FileInfo) string {
	for _, d := range c.disks.Disks {
		if bfi, err := d.File.Stat(); err == nil && sameImage(fi, bfi) {
			return d.Spec.Name
		}
	}
	for name, h := range c.hot {
		if sameImage(fi, h.image) {
			return name
		}
	}
	return ""
}

// sameImage says whether two opened disks are one image: one file, or one block device
// through two device nodes.
func sameImage(a, b os.FileInfo) bool {
	if os.SameFile(a, b) {
		return true
	}
	sa, okA := a.Sys().(*syscall.Stat_t)
	sb, okB := b.Sys().(*syscall.Stat_t)
	return okA && okB && a.Mode()&os.ModeDevice != 0 && b.Mode()&os.ModeDevice != 0 && sa.Rdev == sb.Rdev
}

// detachDisk takes out a disk attachDisk plugged in, by name. A disk that is not attached
// is no error (see attachDisk), and the answer says so.
func (c *computeVM) detachDisk(ctx context.Context, name string) (string, error) {
	if err := c.lockDevices(vmspec.DetachDiskCommand); err != nil {
		return "", err
	}
	defer c.hotMu.Unlock()
	if c.isPaused() {
		return "", fmt.Errorf("%s: %w", vmspec.DetachDiskCommand, errPaused)
	}
	if _, ok := c.hot[name]; !ok {
		return "disk " + name + " is not attached", nil
	}
	if err := c.machine.UnplugDisk(ctx, hotDiskID(name)); err != nil && !errdefs.IsNotFound(err) {
		if _, plugged := c.machine.DevicePort(hotDiskID(name)); !plugged {
			delete(c.hot, name) // the guest let it go: what failed is the host's tidying
		}
		return "", fmt.Errorf("%s: disk %s: %w", vmspec.DetachDiskCommand, name, err)
	}
	delete(c.hot, name)
	log.G(ctx).WithField("pod", c.pod.id).Infof("detached disk %s", name)
	return "disk " + name + " detached", nil
}

// Pid is QEMU's: the guest process has no host pid.
func (e *guestExec) Pid() uint32 { return e.vm.Pid() }

func (e *guestExec) Wait(ctx context.Context) (runtime.Exit, error) {
	select {
	case <-e.done:
		return e.exit, nil
	case <-ctx.Done():
		return runtime.Exit{}, ctx.Err()
	}
}

// OutputDone: the guest agent returns a command's output with its exit, and run writes
// it before finishing.
func (e *guestExec) OutputDone() <-chan struct{} { return e.done }

// Signal ends the exec for containerd (an ExecSync timeout kills it). The guest agent
// cannot signal a process, so the command itself may run on in the guest.
func (e *guestExec) Signal(ctx context.Context, sig syscall.Signal, all bool) error {
	if sig == 0 {
		return nil
	}
	e.cancelOnce.Do(func() {
		e.killedBy.Store(int32(sig))
		close(e.cancel)
	})
	return nil
}

func (e *guestExec) Resize(context.Context, uint32, uint32) error { return nil }
func (e *guestExec) CloseStdin(context.Context) error             { return nil }
func (e *guestExec) Remove(context.Context) error {
	return e.Signal(context.Background(), syscall.SIGKILL, false)
}

// errPaused is why an exec into a paused VM fails: nothing in the guest can answer.
var errPaused = errors.New("the VM is paused (kubectl vmpod unpause resumes it)")

func (c *computeVM) isRunning() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.running
}

func (c *computeVM) isPaused() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.paused
}

// isAwaiting says whether this VM is a migration target whose guest has not arrived.
func (c *computeVM) isAwaiting() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.awaiting
}

// setPaused stops or resumes the VM's vCPUs and returns the state it is in after: "paused"
// or "running". Both are idempotent, as QMP stop and cont are.
func (c *computeVM) setPaused(ctx context.Context, pause bool) (string, error) {
	if pause {
		// a detach waits for the guest, which a pause would stop from answering
		if !c.hotMu.TryLock() {
			return "", fmt.Errorf("VM %s: a disk is being attached or detached, or the VM resized: pause after it: %w", c.id, errdefs.ErrFailedPrecondition)
		}
		defer c.hotMu.Unlock()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.awaiting:
		// a migration target's vCPUs belong to the switchover until the guest is here
		return "", fmt.Errorf("VM %s: the guest has not arrived from its migration source: %w", c.id, errdefs.ErrFailedPrecondition)
	case c.migrating != nil || c.decided != nil:
		// a source's: a cont while QEMU waits for the target's word would run the guest
		// in two places
		return "", fmt.Errorf("VM %s: the guest is migrating or has moved away: %w", c.id, errdefs.ErrFailedPrecondition)
	}
	op, state := c.machine.Resume, "running"
	if pause {
		op, state = c.machine.Pause, "paused"
	}
	if err := op(ctx); err != nil {
		return "", fmt.Errorf("VM %s: %s: %w", c.id, state, err)
	}
	c.paused = pause
	return state, nil
}

// guestInfo is GuestInfoCommand's output. Only the agent's version is required: a guest
// agent may lack (or an admin may have disabled) the other commands.
func guestInfo(ctx context.Context, agent *qga.Client) ([]byte, error) {
	ai, err := agent.Info(ctx)
	if err != nil {
		return nil, err
	}
	info := vmspec.GuestInfo{AgentVersion: ai.Version}
	if ai.Supports("guest-get-osinfo") {
		if os, err := agent.OSInfo(ctx); err == nil {
			g := vmspec.GuestOS(os)
			info.OS = &g
		}
	}
	if ai.Supports("guest-get-host-name") {
		info.Hostname, _ = agent.HostName(ctx)
	}
	if ai.Supports("guest-network-get-interfaces") {
		ifs, err := agent.Interfaces(ctx)
		if err != nil {
			return nil, err
		}
		for _, i := range ifs {
			gi := vmspec.GuestInterface{Name: i.Name}
			if i.MAC != nil {
				gi.MAC = i.MAC.String()
			}
			for _, ip := range i.IPs {
				gi.IPs = append(gi.IPs, ip.String())
			}
			info.Interfaces = append(info.Interfaces, gi)
		}
	}
	return json.Marshal(info)
}

// readInput reads an exec's stdin to its end (the guest agent takes it in one message),
// giving up when ctx ends (the exec killed, the VM gone) rather than holding the exec, and
// with it the container's exit, for a stdin that never closes.
func readInput(ctx context.Context, r io.Reader) ([]byte, error) {
	type result struct {
		b   []byte
		err error
	}
	done := make(chan result, 1)
	go func() {
		b, err := io.ReadAll(io.LimitReader(r, maxExecInput+1))
		done <- result{b, err}
	}()
	select {
	case res := <-done:
		if res.err != nil {
			return nil, fmt.Errorf("stdin: %w", res.err)
		}
		if len(res.b) > maxExecInput {
			return nil, fmt.Errorf("stdin: more than %d bytes: the guest agent takes stdin in one message", maxExecInput)
		}
		return res.b, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// firmware is the machine's firmware for the VM spec's, from the node's OVMF builds.
func firmware(f vmspec.Firmware, h nodeconfig.Hypervisor) vmm.Firmware {
	fw := vmm.Firmware{Type: vmm.FirmwareType(f.Type), Code: h.UEFICode, VarsTemplate: h.UEFIVars}
	if f.SecureBoot {
		fw.SecureBoot, fw.Code, fw.VarsTemplate = true, h.UEFISecureCode, h.UEFISecureVars
	}
	return fw
}
