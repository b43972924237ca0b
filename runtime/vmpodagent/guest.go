// Package vmpodagent is the guest layer of container pods: the vmpod agent (PID 1 of the
// vmpod guest kernel's initramfs) driven over a virtio-serial port of the machine. It
// boots the machine with the vmpod guest, waits for the agent, and runs containers,
// processes, stdio, port-forwards and resource onlining through it.
package vmpodagent

import (
	"context"
	"fmt"
	"net"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
	"github.com/vmpod/vmpod/agent/channel"
	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/internal/cleanup"
	"github.com/vmpod/vmpod/internal/phases"
	"github.com/vmpod/vmpod/runtime"
	"github.com/vmpod/vmpod/runtime/vmm"
)

// Defaults for Config's zero values.
const (
	DefaultBootTimeout = 30 * time.Second
	DefaultCallTimeout = 30 * time.Second
)

// Config is a machine that boots the vmpod guest: Boot.Kernel and Boot.Initrd are the
// guest's, Boot.KernelParams the node admin's additions; the rest of the machine is as
// for any vmm.Machine (SharedFS defaults to virtio-fs here).
type Config struct {
	vmm.Config
	BootTimeout time.Duration // until the agent answers; default DefaultBootTimeout
	CallTimeout time.Duration // per agent call (long polls excepted); default DefaultCallTimeout
	// Debug turns on the agent's debug log (on the guest console).
	Debug bool
}

// Guest is a booted vmpod guest: its machine and its agent.
type Guest struct {
	m     *vmm.Machine
	agent *Client
	cfg   Config
	// bootMemory is the memory the kernel managed when the agent first answered: on a
	// machine that grows offline (microvm) memory targets count from it.
	bootMemory uint64
}

// check refuses what no vmpod guest can run on.
func (c Config) check() error {
	if c.Boot.Kernel == "" {
		return fmt.Errorf("vm %s: invalid config: kernel: not set (the vmpod guest boots its own kernel)", c.Name)
	}
	return nil
}

// withDefaults is c with its zero timeouts set.
func (c Config) withDefaults() Config {
	if c.BootTimeout == 0 {
		c.BootTimeout = DefaultBootTimeout
	}
	if c.CallTimeout == 0 {
		c.CallTimeout = DefaultCallTimeout
	}
	return c
}

// machineConfig is the machine that runs the vmpod guest: the agent's port, the console
// in the log, the kernel command line the agent reads.
func (c Config) machineConfig() vmm.Config {
	mc := c.Config
	if mc.SharedFS == "" {
		mc.SharedFS = machine.VirtioFS
	}
	if mc.UpTimeout == 0 {
		mc.UpTimeout = c.BootTimeout
	}
	mc.Ports = append([]string{agentv1.PortName}, mc.Ports...)
	mc.Console = vmm.ConsoleLog
	// auto-movable: memory added later goes to ZONE_MOVABLE while the kernel keeps enough
	// of its own, so the virtio-mem blocks a shrink asks back can be emptied (docs/design/008)
	params := []string{"console=ttyS0", "quiet", "panic=-1", "memory_hotplug.online_policy=auto-movable"}
	switch {
	case mc.Template: // plugged after a restore, mounted by restored()
	case mc.SharedFS == machine.VirtioFS:
		params = append(params, agentv1.KernelParamShare+"=virtiofs:"+vmm.ShareTag)
	case mc.SharedFS == machine.NineP:
		params = append(params, agentv1.KernelParamShare+"=9p:"+vmm.ShareTag)
	}
	if c.Debug {
		params = append(params, agentv1.KernelParamDebug)
	}
	mc.Boot.KernelParams = append(params, mc.Boot.KernelParams...)
	return mc
}

// Boot starts the machine and returns once the agent has answered: the moment the guest
// counts as booted. A template machine with a saved state to restore (vmm.Config.
// RestoreFrom) is restored instead, and returns as a booted one would: its shared
// directory mounted, its randomness its own. On any failure everything it started is stopped and removed again.
func Boot(ctx context.Context, cfg Config) (_ *Guest, retErr error) {
	cfg = cfg.withDefaults()
	if err := cfg.check(); err != nil {
		return nil, err
	}
	started := time.Now()
	bootCtx, cancel := context.WithTimeout(ctx, cfg.BootTimeout)
	defer cancel()
	m, err := vmm.Start(bootCtx, cfg.machineConfig())
	if err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			_ = m.Kill()
		}
	}()
	g := &Guest{m: m, agent: newClient(cfg.Name, cfg.CallTimeout, m.Done()), cfg: cfg}
	m.OnTeardown("close agent connection", g.agent.close)
	ping, err := g.connectAgent(bootCtx)
	if err != nil {
		if cfg.RestoreFrom != nil && ctx.Err() == nil {
			// QEMU took the state, but the guest it holds never answered: the template's
			// fault as much as a state QEMU refuses (the pod is booted instead)
			err = fmt.Errorf("%w: the restored guest's agent: %w", vmm.ErrTemplateRefused, err)
		}
		return nil, fmt.Errorf("vm %s: boot: %w%s", cfg.Name, err, m.ConsoleHint())
	}
	g.bootMemory = ping.MemoryBytes
	if cfg.RestoreFrom != nil {
		phases.Mark(ctx, "agent")
		if err := g.restored(bootCtx); err != nil {
			return nil, fmt.Errorf("vm %s: restore: %w%s", cfg.Name, err, m.ConsoleHint())
		}
	}
	phases.Mark(ctx, "boot")
	log.G(ctx).WithField("vm", cfg.Name).WithField("accel", m.Accel()).Infof("booted in %v", time.Since(started).Round(time.Millisecond))
	return g, nil
}

// Receive starts cfg's machine to receive a running guest by live migration from a
// machine of the same config, containers and all (issue 12, docs/design/211). Before the
// guest arrives the caller shares into it what the source shared, under the same names
// (Machine().Share; RootfsShare for a container's rootfs): virtiofsd on this side reopens
// the files the guest has open by their paths. It then accepts the stream
// (vmm.Machine.AcceptMigration) and, once the guest has arrived (AwaitIncoming), takes it
// over with Adopt.
//
// Receive returns once QEMU waits; a successful migration at the source does not yet
// mean this side loaded the guest (AwaitIncoming says so): the source must not end its
// guest before.
func Receive(ctx context.Context, cfg Config) (*vmm.Machine, error) {
	cfg = cfg.withDefaults()
	if err := cfg.check(); err != nil {
		return nil, err
	}
	mc := cfg.machineConfig()
	mc.Incoming = true
	return vmm.Start(ctx, mc)
}

// Adopt is the guest that arrived on m (Receive), once its agent answered a session of
// this side's: its containers and processes are the agent's and came with it.
// bootMemory is the source guest's BootMemory, which later resizes count from. On an
// error m is the caller's to stop, as it was.
func Adopt(ctx context.Context, cfg Config, m *vmm.Machine, bootMemory uint64) (*Guest, error) {
	g := awaiting(cfg, m)
	if err := g.Arrived(ctx, bootMemory); err != nil {
		return nil, err
	}
	return g, nil
}

// Await is Receive with the guest to come: a Guest whose machine waits for the stream
// and whose agent calls fail (FailedPrecondition) until Arrived, so that a pod can hold
// one Guest from its start (docs/design/212). On an error nothing is left running.
func Await(ctx context.Context, cfg Config) (*Guest, error) {
	m, err := Receive(ctx, cfg)
	if err != nil {
		return nil, err
	}
	return awaiting(cfg, m), nil
}

func awaiting(cfg Config, m *vmm.Machine) *Guest {
	cfg = cfg.withDefaults()
	g := &Guest{m: m, agent: newClient(cfg.Name, cfg.CallTimeout, m.Done()), cfg: cfg}
	m.OnTeardown("close agent connection", g.agent.close)
	return g
}

// Arrived takes over the guest that arrived on an awaiting Guest's machine once its agent
// answers a session of this side's; bootMemory is the source guest's BootMemory.
func (g *Guest) Arrived(ctx context.Context, bootMemory uint64) error {
	ctx, cancel := context.WithTimeout(ctx, g.cfg.BootTimeout)
	defer cancel()
	if _, err := g.connectAgent(ctx); err != nil {
		return fmt.Errorf("vm %s: the migrated guest's agent: %w%s", g.cfg.Name, err, g.m.ConsoleHint())
	}
	g.bootMemory = bootMemory
	return nil
}

// connectAgent dials the agent's port, starts a channel session and waits for the agent's
// first Ping reply, which it returns.
func (g *Guest) connectAgent(ctx context.Context) (*agentv1.PingResponse, error) {
	raw, err := g.m.DialPort(ctx, agentv1.PortName)
	if err != nil {
		return nil, err
	}
	// Abort the handshake at once if QEMU dies.
	stopWatch := make(chan struct{})
	go func() {
		select {
		case <-g.m.Done():
			_ = raw.Close()
		case <-stopWatch:
		}
	}()
	defer close(stopWatch)

	conn, err := channel.Client(ctx, raw)
	if err != nil {
		_ = raw.Close()
		return nil, g.m.Explain(fmt.Errorf("agent did not answer the channel handshake: %w", err))
	}
	g.agent.use(ttrpc.NewClient(conn, ttrpc.WithUnaryClientInterceptor(nativeErrors)))
	ping, err := g.agent.Ping(ctx)
	if err != nil {
		return nil, g.m.Explain(err)
	}
	return ping, nil
}

// ReconnectAgent drops the agent connection and starts a new channel session, as a
// restarted shim would. Calls in flight on the old connection fail; later calls through
// the same *Client use the new one.
func (g *Guest) ReconnectAgent(ctx context.Context) error {
	_ = g.agent.close()
	ctx, cancel := context.WithTimeout(ctx, g.cfg.BootTimeout)
	defer cancel()
	if _, err := g.connectAgent(ctx); err != nil {
		return fmt.Errorf("vm %s: reconnect agent: %w", g.cfg.Name, err)
	}
	return nil
}

// BootMemory is the memory the guest's kernel managed when it booted (what a migration's
// target passes to Adopt).
func (g *Guest) BootMemory() uint64 { return g.bootMemory }

// Name is the guest's (its machine's) name.
func (g *Guest) Name() string { return g.cfg.Name }

// Machine is the machine the guest runs on.
func (g *Guest) Machine() *vmm.Machine { return g.m }

// Agent is the guest's agent client.
func (g *Guest) Agent() *Client { return g.agent }

// Done is closed when QEMU has exited, for whatever reason.
func (g *Guest) Done() <-chan struct{} { return g.m.Done() }

// Stop shuts the guest down through its agent, then stops the machine (see vmm.Stop).
func (g *Guest) Stop(ctx context.Context) error { return g.m.Stop(ctx, g.agent.shutdown) }

// Kill stops the machine at once and removes everything Boot created.
func (g *Guest) Kill() error { return g.m.Kill() }

// Share bind-mounts a host directory or file into the guest at
// GuestSharedDir/<share path> and returns its guest path.
func (g *Guest) Share(hostPath, name string, readonly bool) (string, error) {
	rel, err := g.m.Share(hostPath, name, readonly)
	if err != nil {
		return "", err
	}
	return agentv1.GuestSharedDir + "/" + rel, nil
}

// Unshare removes a share made by Share.
func (g *Guest) Unshare(name string) error { return g.m.Unshare(name) }

// RootfsShare is the share name of a container's rootfs (CreateContainer shares it so).
func RootfsShare(containerID string) string { return containerID + "/rootfs" }

// CreateContainer shares the host directory rootfs (mounted through the machine's
// RootfsMap, if it has one) into the guest, points spec's root at it and creates the
// container. Bind-mount sources in spec must already be guest paths.
func (g *Guest) CreateContainer(ctx context.Context, id, rootfs string, spec *specs.Spec, stdio runtime.Stdio) (*Process, error) {
	if spec == nil || spec.Root == nil {
		return nil, fmt.Errorf("vm %s: container %s: spec.root: missing", g.cfg.Name, id)
	}
	var undo cleanup.Stack
	defer func() { _ = undo.Run() }()
	rel, err := g.m.ShareRootfs(rootfs, RootfsShare(id))
	guestRoot := agentv1.GuestSharedDir + "/" + rel
	if err != nil {
		return nil, fmt.Errorf("container %s: rootfs: %w", id, err)
	}
	undo.Add("unshare rootfs", func() error { return g.Unshare(RootfsShare(id)) })

	guestSpec := *spec
	root := *spec.Root
	root.Path = guestRoot
	guestSpec.Root = &root
	pid, err := g.agent.createContainer(ctx, id, &guestSpec, stdioRequest(stdio))
	if err != nil {
		return nil, err
	}
	undo.Release()
	return newProcess(g.agent, id, "", pid, stdio, OutputOffsets{}), nil
}

// Exec starts another process in a running container.
func (g *Guest) Exec(ctx context.Context, containerID, execID string, proc *specs.Process, stdio runtime.Stdio) (*Process, error) {
	pid, err := g.agent.execProcess(ctx, containerID, execID, proc, stdioRequest(stdio))
	if err != nil {
		return nil, err
	}
	return newProcess(g.agent, containerID, execID, pid, stdio, OutputOffsets{}), nil
}

// TakeAddresses gives a migrated guest its new pod's addresses and routes: each interface
// is found by its MAC (which moved with the guest) and keeps only the addresses given,
// the routes through the old ones going with them (docs/design/212).
func (g *Guest) TakeAddresses(ctx context.Context, interfaces []*agentv1.Interface, routes []*agentv1.Route) error {
	req := &agentv1.SetupSandboxRequest{Routes: routes}
	for _, i := range interfaces {
		req.Interfaces = append(req.Interfaces, &agentv1.Interface{Mac: i.Mac, Name: i.Name, Addresses: i.Addresses, Mtu: i.Mtu, ReplaceAddresses: true})
	}
	if err := g.agent.SetupSandbox(ctx, req); err != nil {
		return fmt.Errorf("vm %s: the new pod's addresses: %w", g.cfg.Name, err)
	}
	return nil
}

// AdoptProcess is a process that came with a migrated guest (Adopt): its output is copied
// to stdio's writers from where the source's copy stopped (Process.HandOverOutput at the
// source), its exit awaited as any process's. Its stdin is not carried: a new writer
// would start at the guest's offset of the old one, which this side does not know.
func (g *Guest) AdoptProcess(containerID, execID string, pid uint32, stdio runtime.Stdio, from OutputOffsets) (*Process, error) {
	if stdio.Stdin != nil {
		return nil, fmt.Errorf("vm %s: adopt %s: stdio.stdin: a migrated process's stdin is not carried: %w", g.cfg.Name, containerID, errdefs.ErrNotImplemented)
	}
	return newProcess(g.agent, containerID, execID, pid, stdio, from), nil
}

// RemoveContainer removes the container in the guest (force: kill it first) and its
// rootfs share. A container the guest does not know, or a machine that is gone, leaves
// only the host side to clean up, which is done.
func (g *Guest) RemoveContainer(ctx context.Context, id string, force bool) error {
	select {
	case <-g.m.Done():
	default:
		if err := g.agent.removeContainer(ctx, id, force); err != nil && !errdefs.IsNotFound(err) {
			return err
		}
	}
	return g.Unshare(RootfsShare(id))
}

// ForwardPort carries conn to TCP port on the guest's loopback (see Client.forwardPort).
func (g *Guest) ForwardPort(ctx context.Context, conn net.Conn, port uint32) error {
	if err := g.agent.forwardPort(ctx, conn, port); err != nil {
		return fmt.Errorf("vm %s: %w", g.cfg.Name, err)
	}
	return nil
}
