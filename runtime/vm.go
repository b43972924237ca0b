package runtime

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/vmpod/vmpod/agent/channel"
	"github.com/vmpod/vmpod/devices"
	"github.com/vmpod/vmpod/internal/cleanup"
	"github.com/vmpod/vmpod/qmp"
)

// helperExitWait bounds the wait for virtiofsd to leave by itself after QEMU is gone.
const helperExitWait = 2 * time.Second

// VM is one running guest. Every host resource Start created (processes, sockets, mounts,
// the state directory) is on its teardown stack, which Stop and Kill run exactly once.
type VM struct {
	cfg   Config
	plan  bootPlan
	hw    *devices.VM // the device model: argv rendered at boot, hotplugs placed later
	qemu  *exec.Cmd
	mon   *qmp.Monitor
	agent *Agent
	share *sharedDir // nil with SharedFSNone

	exited  chan struct{} // closed when QEMU exits
	exitErr error

	teardown cleanup.Stack
	stopOnce sync.Once
	stopErr  error
}

// Start boots a VM and returns once its agent has answered. On any failure everything it
// started is stopped and removed again, and the error names the VM and the step.
func Start(ctx context.Context, cfg Config) (_ *VM, retErr error) {
	cfg = cfg.withDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("vm %s: invalid config: %w", cfg.Name, err)
	}
	logger := log.G(ctx).WithField("vm", cfg.Name)
	started := time.Now()

	host := readHostCPU()
	accel, err := resolveAccel(cfg.Accel, host)
	if err != nil {
		return nil, fmt.Errorf("vm %s: %w", cfg.Name, err)
	}
	if accel.accel == AccelTCG && cfg.Accel == AccelAuto {
		logger.Warnf("accel: %s", accel.reason)
	}
	plan := bootPlan{cfg: cfg, accel: accel, paths: newPaths(cfg.StateDir)}
	if accel.accel == AccelTCG && cfg.Machine == MachineMicroVM {
		if plan.tscKHz, err = host.tscKHz(); err != nil {
			return nil, fmt.Errorf("vm %s: %w", cfg.Name, err)
		}
	}

	hw, err := plan.hardware()
	if err != nil {
		return nil, fmt.Errorf("vm %s: %w", cfg.Name, err)
	}
	vm := &VM{cfg: cfg, plan: plan, hw: hw, exited: make(chan struct{}), agent: newAgent(cfg.Name, cfg.CallTimeout)}
	defer func() {
		if retErr != nil {
			if err := vm.teardown.Run(); err != nil {
				logger.WithError(err).Error("cleanup after failed start left something behind")
			}
		}
	}()

	if err := os.MkdirAll(filepath.Dir(cfg.StateDir), 0o711); err != nil {
		return nil, fmt.Errorf("vm %s: state dir: %w", cfg.Name, err)
	}
	if err := os.Mkdir(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("vm %s: state dir: %w", cfg.Name, err)
	}
	vm.teardown.Add("remove state dir", func() error { return removeStateDir(cfg.StateDir) })

	logFile, err := os.OpenFile(cfg.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("vm %s: log: %w", cfg.Name, err)
	}
	defer logFile.Close() // children hold their own copies

	if cfg.SharedFS != SharedFSNone {
		if vm.share, err = newSharedDir(plan.paths.shared); err != nil {
			return nil, fmt.Errorf("vm %s: shared dir: %w", cfg.Name, err)
		}
		vm.teardown.Add("unmount shared dir", vm.share.close)
	}
	if cfg.SharedFS == SharedFSVirtioFS {
		if err := vm.startVirtiofsd(ctx, logFile); err != nil {
			return nil, fmt.Errorf("vm %s: virtiofsd: %w", cfg.Name, err)
		}
	}

	logger.WithField("accel", accel.accel).WithField("machine", cfg.Machine).Debug("starting QEMU")
	if err := vm.startQEMU(logFile); err != nil {
		return nil, fmt.Errorf("vm %s: start QEMU: %w", cfg.Name, err)
	}
	vm.teardown.Add("close agent connection", vm.agent.close)

	bootCtx, cancel := context.WithTimeout(ctx, cfg.BootTimeout)
	defer cancel()
	if err := vm.connectQMP(bootCtx); err != nil {
		return nil, fmt.Errorf("vm %s: QMP: %w%s", cfg.Name, err, vm.consoleHint())
	}
	if err := vm.connectAgent(bootCtx); err != nil {
		return nil, fmt.Errorf("vm %s: boot: %w%s", cfg.Name, err, vm.consoleHint())
	}
	logger.WithField("accel", accel.accel).Infof("booted in %v", time.Since(started).Round(time.Millisecond))
	return vm, nil
}

func (vm *VM) startVirtiofsd(ctx context.Context, logFile *os.File) error {
	sock := vm.plan.paths.virtiofsdSock
	cmd := exec.Command(vm.cfg.VirtiofsdPath,
		"--socket-path="+sock,
		"-o", "source="+vm.plan.paths.shared,
		"-o", "cache=auto",
		"-o", "xattr")
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// A dying shim must not leave virtiofsd behind.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	vm.teardown.Add("stop virtiofsd", func() error { return stopHelper(cmd, done) })
	// QEMU connects to the socket at start-up, so it must exist first.
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			return nil
		}
		select {
		case <-done:
			return fmt.Errorf("exited before creating %s: %s", sock, cmd.ProcessState)
		case <-ctx.Done():
			return ctx.Err()
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no socket at %s after 5s", sock)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// stopHelper waits briefly for a helper that should exit on its own, then kills it.
func stopHelper(cmd *exec.Cmd, done <-chan struct{}) error {
	select {
	case <-done:
		return nil
	case <-time.After(helperExitWait):
	}
	_ = cmd.Process.Kill()
	<-done
	return nil
}

func (vm *VM) startQEMU(logFile *os.File) error {
	args, files := vm.hw.Render()
	cmd := exec.Command(vm.cfg.QEMUPath, args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.ExtraFiles = files
	// Pdeathsig: `kill -9` of the shim must not leave a QEMU running.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		return err
	}
	vm.qemu = cmd
	go func() {
		vm.exitErr = cmd.Wait()
		close(vm.exited)
	}()
	vm.teardown.Add("stop QEMU", func() error {
		select {
		case <-vm.exited:
		default:
			_ = cmd.Process.Kill()
			<-vm.exited
		}
		return nil
	})
	return nil
}

// connectQMP connects the VM's QMP monitor; QEMU creates its socket at start-up.
func (vm *VM) connectQMP(ctx context.Context) error {
	dialCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-vm.exited:
			cancel()
		case <-dialCtx.Done():
		}
	}()
	mon, err := qmp.Dial(dialCtx, vm.plan.paths.qmpSock)
	if err != nil {
		return vm.qemuDiedOr(err)
	}
	vm.mon = mon
	vm.teardown.Add("close QMP", func() error { _ = mon.Close(); return nil })
	return nil
}

// connectAgent dials QEMU's socket for the agent port, starts a channel session and waits
// for the agent's first Ping reply: the moment the VM counts as booted.
func (vm *VM) connectAgent(ctx context.Context) error {
	raw, err := vm.dialAgentSocket(ctx)
	if err != nil {
		return err
	}
	// Abort the handshake at once if QEMU dies.
	stopWatch := make(chan struct{})
	go func() {
		select {
		case <-vm.exited:
			_ = raw.Close()
		case <-stopWatch:
		}
	}()
	defer close(stopWatch)

	conn, err := channel.Client(ctx, raw)
	if err != nil {
		_ = raw.Close()
		return vm.qemuDiedOr(fmt.Errorf("agent did not answer the channel handshake: %w", err))
	}
	vm.agent.use(ttrpc.NewClient(conn, ttrpc.WithUnaryClientInterceptor(nativeErrors)))
	if _, err := vm.agent.Ping(ctx); err != nil {
		return vm.qemuDiedOr(err)
	}
	return nil
}

// ReconnectAgent drops the agent connection and starts a new channel session, as a
// restarted shim would. Calls in flight on the old connection fail; later calls through
// the same *Agent use the new one.
func (vm *VM) ReconnectAgent(ctx context.Context) error {
	_ = vm.agent.close()
	ctx, cancel := context.WithTimeout(ctx, vm.cfg.BootTimeout)
	defer cancel()
	if err := vm.connectAgent(ctx); err != nil {
		return fmt.Errorf("vm %s: reconnect agent: %w", vm.cfg.Name, err)
	}
	return nil
}

func (vm *VM) dialAgentSocket(ctx context.Context) (net.Conn, error) {
	var d net.Dialer
	for {
		conn, err := d.DialContext(ctx, "unix", vm.plan.paths.agentSock)
		if err == nil {
			return conn, nil
		}
		select {
		case <-vm.exited:
			return nil, vm.qemuDiedOr(err)
		case <-ctx.Done():
			return nil, fmt.Errorf("QEMU never opened %s: %w", vm.plan.paths.agentSock, ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// qemuDiedOr explains a failure by QEMU's death if QEMU is dead or dying: a closed
// socket is often the first sign, the exit status comes a moment later.
func (vm *VM) qemuDiedOr(err error) error {
	select {
	case <-vm.exited:
		return fmt.Errorf("QEMU exited (%v)", vm.exitErr)
	case <-time.After(200 * time.Millisecond):
		return err
	}
}

// consoleHint is the end of the VM log, for boot errors.
func (vm *VM) consoleHint() string {
	tail := logTail(vm.cfg.LogPath, 15)
	if tail == "" {
		return ""
	}
	return "\n--- last lines of " + vm.cfg.LogPath + ":\n" + tail
}

func logTail(path string, lines int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	all := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return strings.Join(all, "\n")
}

// Name is the VM's name.
func (vm *VM) Name() string { return vm.cfg.Name }

// Accel is the accelerator the VM runs on.
func (vm *VM) Accel() Accel { return vm.plan.accel.accel }

// Agent is the VM's agent client.
func (vm *VM) Agent() *Agent { return vm.agent }

// Done is closed when QEMU has exited, for whatever reason.
func (vm *VM) Done() <-chan struct{} { return vm.exited }

// QEMUPid is the QEMU process id.
func (vm *VM) QEMUPid() int { return vm.qemu.Process.Pid }

// Stop shuts the guest down through its agent, waits up to StopTimeout for QEMU to exit,
// kills it if it does not, and removes everything Start created. Safe to call again and
// after QEMU died; later calls return the first result.
func (vm *VM) Stop(ctx context.Context) error {
	vm.stopOnce.Do(func() {
		select {
		case <-vm.exited:
		default:
			shutdownCtx, cancel := context.WithTimeout(ctx, vm.cfg.StopTimeout)
			if err := vm.agent.shutdown(shutdownCtx); err != nil {
				log.G(ctx).WithError(err).Warnf("vm %s: graceful shutdown failed, killing QEMU", vm.cfg.Name)
			}
			select {
			case <-vm.exited:
			case <-shutdownCtx.Done():
				log.G(ctx).Warnf("vm %s: still running %v after shutdown, asking QEMU to quit", vm.cfg.Name, vm.cfg.StopTimeout)
				vm.quit(ctx)
			}
			cancel()
		}
		vm.stopErr = vm.teardown.Run()
		if vm.stopErr != nil {
			vm.stopErr = fmt.Errorf("vm %s: teardown: %w", vm.cfg.Name, vm.stopErr)
		}
	})
	return vm.stopErr
}

// quit asks QEMU itself to exit (QMP quit), for a guest that did not power off; the
// teardown kills QEMU if even that does not work.
func (vm *VM) quit(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, helperExitWait)
	defer cancel()
	if err := vm.mon.Quit(ctx); err != nil {
		log.G(ctx).WithError(err).Warnf("vm %s: QMP quit", vm.cfg.Name)
	}
	select {
	case <-vm.exited:
	case <-ctx.Done():
	}
}

// Kill stops the VM at once (SIGKILL to QEMU) and removes everything Start created.
func (vm *VM) Kill() error {
	vm.stopOnce.Do(func() {
		vm.stopErr = vm.teardown.Run()
		if vm.stopErr != nil {
			vm.stopErr = fmt.Errorf("vm %s: teardown: %w", vm.cfg.Name, vm.stopErr)
		}
	})
	return vm.stopErr
}

// Share bind-mounts a host directory or file into the guest at
// GuestSharedDir/name and returns its guest path.
func (vm *VM) Share(hostPath, name string, readonly bool) (string, error) {
	if vm.share == nil {
		return "", fmt.Errorf("vm %s: share %s: the VM has no shared filesystem", vm.cfg.Name, hostPath)
	}
	guest, err := vm.share.share(hostPath, name, readonly)
	if err != nil {
		return "", fmt.Errorf("vm %s: %w", vm.cfg.Name, err)
	}
	return guest, nil
}

// Unshare removes a share made by Share.
func (vm *VM) Unshare(name string) error {
	if vm.share == nil {
		return nil
	}
	return vm.share.unshare(name)
}

// rootfsShare is the share name of a container's rootfs.
func rootfsShare(containerID string) string { return containerID + "/rootfs" }

// CreateContainer shares the host directory rootfs into the guest, points spec's root at
// it and creates the container. Bind-mount sources in spec must already be guest paths.
func (vm *VM) CreateContainer(ctx context.Context, id, rootfs string, spec *specs.Spec, stdio Stdio) (*Process, error) {
	if spec == nil || spec.Root == nil {
		return nil, fmt.Errorf("vm %s: container %s: spec.root: missing", vm.cfg.Name, id)
	}
	var undo cleanup.Stack
	defer func() { _ = undo.Run() }()
	guestRoot, err := vm.Share(rootfs, rootfsShare(id), false)
	if err != nil {
		return nil, fmt.Errorf("container %s: rootfs: %w", id, err)
	}
	undo.Add("unshare rootfs", func() error { return vm.Unshare(rootfsShare(id)) })

	guestSpec := *spec
	root := *spec.Root
	root.Path = guestRoot
	guestSpec.Root = &root
	pid, err := vm.agent.createContainer(ctx, id, &guestSpec, stdio.request())
	if err != nil {
		return nil, err
	}
	undo.Release()
	return newProcess(vm.agent, id, "", pid, stdio), nil
}

// Exec starts another process in a running container.
func (vm *VM) Exec(ctx context.Context, containerID, execID string, proc *specs.Process, stdio Stdio) (*Process, error) {
	pid, err := vm.agent.execProcess(ctx, containerID, execID, proc, stdio.request())
	if err != nil {
		return nil, err
	}
	return newProcess(vm.agent, containerID, execID, pid, stdio), nil
}

// RemoveContainer removes the container in the guest (force: kill it first) and its
// rootfs share. A container the guest does not know, or a VM that is gone, leaves only
// the host side to clean up, which is done.
func (vm *VM) RemoveContainer(ctx context.Context, id string, force bool) error {
	select {
	case <-vm.exited:
	default:
		if err := vm.agent.removeContainer(ctx, id, force); err != nil && !errdefs.IsNotFound(err) {
			return err
		}
	}
	return vm.Unshare(rootfsShare(id))
}
