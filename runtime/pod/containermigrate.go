package pod

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/pkg/identifiers"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
	"github.com/vmpod/vmpod/api/annotations"
	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/api/vmspec"
	"github.com/vmpod/vmpod/qmp"
	"github.com/vmpod/vmpod/runtime"
	"github.com/vmpod/vmpod/runtime/cri"
	"github.com/vmpod/vmpod/runtime/network"
	"github.com/vmpod/vmpod/runtime/rootfssync"
	"github.com/vmpod/vmpod/runtime/vmm"
	"github.com/vmpod/vmpod/runtime/vmpodagent"
)

// Live migration between container pods (issue 12, docs/design/212). The target is a
// container pod annotated annotations.MigrationTarget: its QEMU starts waiting for the
// guest instead of booting one, and the containers the kubelet creates and starts in it
// are placeholders — a host pid, a rootfs not mounted yet — until the guest, which already
// runs them all, arrives. The control path is the VM pods' (vmmigrate.go): execs the shims
// answer (vmspec.MigrateAcceptCommand at the target, vmspec.MigrateCommand at the source)
// and TLS connections between the pods, with each end's certificate pinned by the other.
// Beside the control and the stream connections, the source opens one per share whose
// writes must travel (a container's rootfs: its overlay's upper directory; an emptyDir),
// each a rootfssync stream into the target's copy:
//
//   - control: the source's podShape (the machine, the containers by CRI name with their
//     guest ids and shares), which the target matches against its placeholders; passes of
//     the writes while the guest runs; at the pause before the switchover the last passes,
//     then final, on which the target mounts the rootfs and shares everything under the
//     source's share names (virtiofsd reopens the guest's open files by path), answering
//     shared; then loaded and commit as for a VM pod, the commit with each container's
//     output offsets;
//   - the target takes the guest over: its agent, each container's init as the
//     placeholder's process (its output from where the source's copy stopped), the target
//     pod's addresses (Guest.TakeAddresses); container ids differ between the two pods, so
//     the pod keeps the guest's id for each container (container.guestID).
//
// The source pod's containers do not exit: a kubelet would restart them into a pod with
// no VM. They stay running, as stand-ins, until the pod is deleted.

// podShape is what a container pod's guest is, for the target to check before the stream.
type podShape struct {
	Machine machineShape `json:"machine"`
	// BootMemory is the memory the guest's kernel managed at its boot (resizes count from it)
	BootMemory uint64 `json:"bootMemory"`
	// NICs are the guest's MACs by pod interface: the guest keeps them on the target
	NICs       map[string]string `json:"nics,omitempty"`
	Containers []shapedContainer `json:"containers"`
}

// machineShape is the machine a container pod's guest runs on, as QEMU was started: the
// target's must be the same (the stream carries the devices' state, not the devices).
type machineShape struct {
	Type         machine.Type `json:"type"`
	VCPUs        int          `json:"vcpus"`
	MemoryMiB    int          `json:"memoryMiB"`
	MaxVCPUs     int          `json:"maxVCPUs"`
	MaxMemoryMiB int          `json:"maxMemoryMiB"`
	// Template: restored from a template, whose devices were plugged after the restore
	// (vmm.Config.Template)
	Template bool `json:"template"`
}

func machineShapeOf(c vmm.Config) machineShape {
	return machineShape{Type: c.Type, VCPUs: c.VCPUs, MemoryMiB: c.MemoryMiB, MaxVCPUs: c.MaxVCPUs, MaxMemoryMiB: c.MaxMemoryMiB, Template: c.Template}
}

// shapedContainer is one container of a podShape.
type shapedContainer struct {
	// Name is the container's CRI name, "" for the pod's sandbox: what a target's
	// placeholder is matched by
	Name string `json:"name"`
	// ID is the guest's id of the container, Pid its init's guest pid
	ID  string `json:"id"`
	Pid uint32 `json:"pid"`
	// Shares are its bind mounts' share names, in the order guestSpec made them
	Shares []string `json:"shares,omitempty"`
	// Mirrored are the shares whose writes travel on connections of their own: its rootfs
	// (RootfsShare) and its emptyDirs
	Mirrored []string `json:"mirrored"`
	// Places are where each of its shares, its rootfs's too, sits in the shared directory
	// (vmm.Machine.SharePlace): the guest knows them by those paths
	Places map[string]uint64 `json:"places"`
}

// handover is what the source says with its commit: how far each init's output reached
// its side, by the guest's container id.
type handover struct {
	Output map[string]vmpodagent.OutputOffsets `json:"output"`
}

// migrationReady bounds the target's wait for the source's last passes: they come once
// QEMU has sent the guest's memory, which takes as long as the guest dirties it.
const migrationReady = 30 * time.Minute

// emptyDirPath marks the kubelet's emptyDir volumes among a container's bind sources:
// the only host directories whose writes move with the pod (a hostPath's stay).
const emptyDirPath = "/volumes/kubernetes.io~empty-dir/"

// containerName is a container's CRI name, "" for a pod's sandbox.
func containerName(spec *specs.Spec) string {
	if spec.Annotations[cri.AnnotationContainerType] == cri.ContainerTypeSandbox {
		return ""
	}
	return spec.Annotations[cri.AnnotationContainerName]
}

// mirroredShares are the shares of a container whose writes move with the pod: its
// rootfs's upper directory, and each bind of a writable emptyDir directory, by share
// name. A writable bind of another host directory cannot move: an error names it.
func mirroredShares(guestID string, c *container) (map[string]string, error) {
	if c.root.Upper == "" {
		return nil, fmt.Errorf("container %s: its rootfs is no overlay: what it wrote cannot be told apart", c.name)
	}
	out := map[string]string{vmpodagent.RootfsShare(guestID): c.root.Upper}
	for i, m := range c.spec.Mounts {
		if !isBind(m) || m.Destination == "/dev/shm" || filepath.Dir(m.Source) == "/dev" {
			continue
		}
		if slices.Contains(m.Options, "ro") || slices.Contains(m.Options, "rro") {
			continue // the target's kubelet gives it the same (a ConfigMap, a Secret, ...)
		}
		fi, err := os.Stat(m.Source)
		if err != nil || !fi.IsDir() {
			continue // a file the kubelet writes for each pod (/etc/hosts, the termination log)
		}
		if !strings.Contains(m.Source, emptyDirPath) {
			return nil, fmt.Errorf("container %s: mounts[%d] (%s): a writable host directory that is no emptyDir stays on this node", c.name, i, m.Destination)
		}
		out[fmt.Sprintf("%s/mounts/%d", guestID, i)] = m.Source
	}
	return out, nil
}

// migrationCommand is a container pod's exec that the shim answers itself, if args is one.
func migrationCommand(args []string) bool {
	return len(args) > 0 && (args[0] == vmspec.MigrateAcceptCommand || args[0] == vmspec.MigrateCommand || args[0] == vmspec.MigrateCancelCommand)
}

// commandExec is an exec the shim answers itself: a migration's command.
type commandExec struct {
	pid      uint32
	done     chan struct{}
	exit     runtime.Exit
	cancel   context.CancelFunc
	killedBy atomic.Int32
}

// command runs a migration command for an exec in container c.
func (p *containerPod) command(ctx context.Context, c *container, execID string, proc *specs.Process, stdio runtime.Stdio) (Process, error) {
	args := proc.Args
	if len(args) != 1 {
		return nil, fmt.Errorf("exec %s: %s takes no arguments (its request is JSON on stdin: it holds a key), got %d: %w", execID, args[0], len(args)-1, errdefs.ErrInvalidArgument)
	}
	if proc.Terminal {
		return nil, fmt.Errorf("exec %s: %s: no terminal: %w", execID, args[0], errdefs.ErrInvalidArgument)
	}
	runCtx, cancel := context.WithCancel(log.WithLogger(context.WithoutCancel(ctx), log.G(ctx).WithField("pod", p.id)))
	e := &commandExec{pid: uint32(c.proxy.Pid()), done: make(chan struct{}), cancel: cancel}
	go func() {
		defer close(e.done)
		defer cancel()
		e.exit = runtime.Exit{Status: p.runCommand(runCtx, args[0], stdio), ExitedAt: time.Now()}
		if sig := e.killedBy.Load(); sig != 0 && e.exit.Status != 0 {
			e.exit.Status = 128 + int(sig)
		}
	}()
	return e, nil
}

// runCommand answers one migration command and returns its exit status.
func (p *containerPod) runCommand(ctx context.Context, cmd string, stdio runtime.Stdio) int {
	stderr := func(err error) int {
		if stdio.Stderr != nil {
			_, _ = io.WriteString(stdio.Stderr, err.Error()+"\n")
		}
		return 1
	}
	out := stdio.Stdout
	if out == nil {
		out = io.Discard
	}
	if cmd == vmspec.MigrateCancelCommand {
		answer, err := p.cancelMigration(ctx)
		if err != nil {
			return stderr(err)
		}
		_, _ = io.WriteString(out, answer+"\n")
		return 0
	}
	var input []byte
	if stdio.Stdin != nil {
		b, err := readInput(ctx, stdio.Stdin)
		if err != nil {
			return stderr(err)
		}
		input = b
	}
	if len(input) == 0 {
		return stderr(fmt.Errorf("%s: the request goes on stdin (exec -i), as JSON: %w", cmd, errdefs.ErrInvalidArgument))
	}
	if cmd == vmspec.MigrateAcceptCommand {
		answer, err := p.acceptMigration(ctx, input)
		if err != nil {
			return stderr(err)
		}
		_, _ = io.WriteString(out, answer+"\n")
		return 0
	}
	if err := p.migrate(ctx, input, out); err != nil {
		return stderr(err)
	}
	return 0
}

func (e *commandExec) Pid() uint32 { return e.pid }

func (e *commandExec) Wait(ctx context.Context) (runtime.Exit, error) {
	select {
	case <-e.done:
		return e.exit, nil
	case <-ctx.Done():
		return runtime.Exit{}, ctx.Err()
	}
}

func (e *commandExec) OutputDone() <-chan struct{} { return e.done }

// Signal cancels the command on a signal that would end a process: a migration in flight
// is cancelled as its exec ends.
func (e *commandExec) Signal(ctx context.Context, sig syscall.Signal, all bool) error {
	if !endsAProcess(sig) {
		return nil
	}
	e.killedBy.CompareAndSwap(0, int32(sig))
	e.cancel()
	return nil
}

func (e *commandExec) Resize(context.Context, uint32, uint32) error { return nil }
func (e *commandExec) CloseStdin(context.Context) error             { return nil }
func (e *commandExec) Remove(context.Context) error                 { return nil }

// placeholder is a migration target's container until the guest arrives: its host pid is
// the container's proxy, and it becomes the process of the source's container that came
// with the guest (adopt), or exits 1 when the guest does not come. A signal before then
// ends it, as it would end the container.
type placeholder struct {
	c       *container
	stand   *standIn
	once    sync.Once
	ready   chan struct{} // closed once adopted, or failed
	proc    Process       // the adopted init, once ready; nil if the guest did not come
	fail    runtime.Exit  // why not
	started bool          // StartContainer was called (guarded by the pod's mu)
}

func newPlaceholder(c *container) *placeholder {
	return &placeholder{c: c, stand: newStandIn(), ready: make(chan struct{})}
}

// resolve makes the placeholder proc, or, when proc is nil, ends it with fail. Only the
// first call counts.
func (m *placeholder) resolve(proc Process, fail runtime.Exit) {
	m.once.Do(func() {
		m.proc, m.fail = proc, fail
		close(m.ready)
	})
}

// adopted is the placeholder's process once it is ready, nil before or without one.
func (m *placeholder) adopted() Process {
	select {
	case <-m.ready:
		return m.proc
	default:
		return nil
	}
}

func (m *placeholder) Pid() uint32 { return uint32(m.c.proxy.Pid()) }

func (m *placeholder) Wait(ctx context.Context) (runtime.Exit, error) {
	select {
	case <-m.stand.exited:
		m.ended()
		return m.stand.exit, nil
	case <-m.ready:
	case <-ctx.Done():
		return runtime.Exit{}, ctx.Err()
	}
	if m.proc == nil {
		m.ended()
		return m.fail, nil
	}
	return m.proc.Wait(ctx)
}

// ended stops the host pid of a placeholder that ended: as an init's, it names nothing
// from then on.
func (m *placeholder) ended() {
	if m.c.proxy != nil {
		m.c.proxy.Stop()
	}
}

func (m *placeholder) OutputDone() <-chan struct{} {
	if proc := m.adopted(); proc != nil {
		return proc.OutputDone()
	}
	done := make(chan struct{}) // nothing was written: done once it has ended
	go func() {
		select {
		case <-m.stand.exited:
		case <-m.ready:
		}
		close(done)
	}()
	return done
}

func (m *placeholder) Signal(ctx context.Context, sig syscall.Signal, all bool) error {
	if proc := m.adopted(); proc != nil {
		return proc.Signal(ctx, sig, all)
	}
	return m.stand.Signal(ctx, sig, all)
}

func (m *placeholder) Resize(ctx context.Context, w, h uint32) error {
	if proc := m.adopted(); proc != nil {
		return proc.Resize(ctx, w, h)
	}
	return nil
}

func (m *placeholder) CloseStdin(ctx context.Context) error {
	if proc := m.adopted(); proc != nil {
		return proc.CloseStdin(ctx)
	}
	return nil
}

func (m *placeholder) Remove(ctx context.Context) error {
	if proc := m.adopted(); proc != nil {
		return proc.Remove(ctx)
	}
	return nil
}

// guestHere says why op cannot act on the pod's guest now: it has not arrived from a
// migration's source, or it moved away; nil when it is here.
func (p *containerPod) guestHere(op string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case p.awaiting:
		return fmt.Errorf("pod %s: %s: the guest has not arrived from its migration's source: %w", p.id, op, errdefs.ErrFailedPrecondition)
	case p.movedTo != "":
		return fmt.Errorf("pod %s: %s: the pod's guest moved to %s: %w", p.id, op, p.movedTo, errdefs.ErrFailedPrecondition)
	}
	return nil
}

// acceptMigration answers vmspec.MigrateAcceptCommand on a migration target: it listens
// on its node's address, on a port of its own, and returns where; the guest arrives in the
// background (receive), and the placeholders fail if none does within the request's
// timeout.
func (p *containerPod) acceptMigration(ctx context.Context, input []byte) (string, error) {
	const cmd = vmspec.MigrateAcceptCommand
	req, err := vmspec.ParseMigrationAccept(input)
	if err != nil {
		return "", fmt.Errorf("%s: %w: %w", cmd, err, errdefs.ErrInvalidArgument)
	}
	if req.PostCopy {
		return "", fmt.Errorf("%s: accept.postCopy: a container pod's guest moves by pre-copy only (its writes go at the switchover): %w", cmd, errdefs.ErrInvalidArgument)
	}
	if len(req.Attachments) > 0 {
		return "", fmt.Errorf("%s: accept.attachments: a container pod has no attached disks: %w", cmd, errdefs.ErrInvalidArgument)
	}
	cfg, err := req.TLS.Config()
	if err != nil {
		return "", fmt.Errorf("%s: accept.tls: %w: %w", cmd, err, errdefs.ErrInvalidArgument)
	}
	// The node's network, not the pod's: the pod's address is its guest's, whose network
	// namespace passes everything that arrives on to the guest (docs/design/401). So
	// KubeVirt's migrations go between its node agents too.
	node, err := network.NodeAddress()
	if err != nil {
		return "", fmt.Errorf("%s: %w", cmd, err)
	}
	p.mu.Lock()
	var mirrors int
	var notStarted []string
	for _, c := range p.containers {
		mirrors += c.mirrors
		if c.placeholder != nil && !c.placeholder.started {
			notStarted = append(notStarted, c.label())
		}
	}
	switch {
	case !p.awaiting:
		p.mu.Unlock()
		return "", fmt.Errorf("%s: this pod is no migration target waiting for its guest (annotation %s): %w", cmd, annotations.MigrationTarget, errdefs.ErrFailedPrecondition)
	case p.accepting:
		p.mu.Unlock()
		return "", fmt.Errorf("%s: already listening for the source: %w", cmd, errdefs.ErrAlreadyExists)
	case len(notStarted) > 0:
		p.mu.Unlock()
		return "", fmt.Errorf("%s: containers %s are not started yet: the guest runs them all: %w", cmd, strings.Join(notStarted, ", "), errdefs.ErrFailedPrecondition)
	}
	p.accepting = true
	p.mu.Unlock()
	l, err := net.Listen("tcp", net.JoinHostPort(node.String(), "0")) // a port of its own: other targets may wait on this node
	if err != nil {
		p.mu.Lock()
		p.accepting = false
		p.mu.Unlock()
		return "", fmt.Errorf("%s: %w", cmd, err)
	}
	addr := l.Addr().String()
	log.G(ctx).Infof("migration target: listening on %s for %v (%d writes' streams)", addr, req.AcceptTimeout(), mirrors)
	// the exec's end does not end the receive; the pod's Stop does (and waits for it)
	rctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	received := make(chan struct{})
	p.mu.Lock()
	p.stopReceive, p.received = cancel, received
	p.mu.Unlock()
	go func() {
		defer close(received)
		defer cancel()
		p.receive(rctx, l, cfg, req, mirrors)
	}()
	out, err := json.Marshal(vmspec.MigrationListening{Address: addr})
	return string(out), err
}

// receive takes the source's connections on l, matches its shape, receives its writes
// and the guest, and takes the guest over once the source commits.
func (p *containerPod) receive(ctx context.Context, l net.Listener, cfg *tls.Config, req vmspec.MigrationAccept, mirrors int) {
	lg := log.G(ctx)
	m := p.guest.Machine()
	stopListening := context.AfterFunc(ctx, func() { _ = l.Close() })
	control, stream, mirrored, err := acceptLinks(ctx, l, cfg, req.AcceptTimeout(), m.Done(), mirrors)
	stopListening()
	if err != nil {
		p.failTarget(ctx, err)
		return
	}
	conns := append([]net.Conn{control, stream}, mirrored...)
	closeAll := func() {
		for _, c := range conns {
			c.Close()
		}
	}
	defer closeAll()
	defer context.AfterFunc(ctx, closeAll)() // a Stop ends every wait on the source
	shape, err := p.takePodShape(ctx, control)
	if err != nil {
		p.failTarget(ctx, err)
		return
	}
	// the writes, into the placeholders' upper directories and emptyDirs
	received := make(chan error, len(mirrored))
	named := map[string]bool{}
	for _, conn := range mirrored {
		name, err := readMirrorName(conn)
		var dst string
		switch {
		case err != nil:
		case named[name]:
			err = fmt.Errorf("the source's writes for share %q: a second connection for it", name)
		default:
			if dst = p.mirrorDst(name); dst == "" {
				err = fmt.Errorf("the source's writes for share %q: no such share here", name)
			}
		}
		named[name] = true
		if err != nil {
			_ = writeSwitchover(control, switchover{Error: err.Error()})
			p.failTarget(ctx, err)
			return
		}
		go func() {
			if err := rootfssync.Receive(ctx, conn, dst); err != nil {
				received <- fmt.Errorf("share %s: %w", name, err)
				return
			}
			received <- nil
		}()
	}
	qemuEnd, shimEnd, err := streamPair()
	if err != nil {
		p.failTarget(ctx, err)
		return
	}
	defer shimEnd.Close()
	err = m.AcceptMigration(ctx, qemuEnd, vmm.MigrationOptions{})
	qemuEnd.Close()
	if err != nil {
		_ = writeSwitchover(control, switchover{Error: err.Error()})
		p.failTarget(ctx, err)
		return
	}
	if err := writeSwitchover(control, switchover{Ready: true}); err != nil {
		p.failTarget(ctx, fmt.Errorf("tell the source this pod is ready: %w", err))
		return
	}
	go func() {
		if _, err := io.Copy(shimEnd, stream); err != nil {
			_ = stream.Close()
		}
		_ = shimEnd.CloseWrite()
	}()
	started := time.Now()
	arrived := make(chan error, 1)
	go func() {
		_, err := m.AwaitIncoming(ctx)
		if err != nil {
			err = fmt.Errorf("%w%s", err, m.ConsoleHint())
			_ = control.Close() // a read of the source's next word ends with it
		}
		arrived <- err
	}()
	// the source's last passes are in and its mirror connections closed: mount and share
	msg, err := readSwitchover(control, migrationReady)
	if err == nil && !msg.Final {
		err = errors.New("the source did not say its writes are all here")
	}
	if err == nil {
		for range mirrored {
			if rerr := <-received; rerr != nil {
				err = errors.Join(err, rerr)
			}
		}
	}
	if err == nil {
		err = p.shareArrivals(ctx, shape)
	}
	if err != nil {
		_ = writeSwitchover(control, switchover{Error: err.Error()})
		select {
		case aerr := <-arrived:
			err = errors.Join(err, aerr)
		default:
		}
		p.failTarget(ctx, err)
		return
	}
	if err := writeSwitchover(control, switchover{Shared: true}); err != nil {
		p.failTarget(ctx, fmt.Errorf("tell the source the shares are ready: %w", err))
		return
	}
	if err := <-arrived; err != nil {
		_ = writeSwitchover(control, switchover{Error: err.Error()})
		p.failTarget(ctx, err)
		return
	}
	lg.Infof("migration target: the guest arrived (%v); telling the source", time.Since(started).Round(time.Millisecond))
	if err := writeSwitchover(control, switchover{Loaded: true}); err != nil {
		p.failTarget(ctx, fmt.Errorf("tell the source the guest arrived: %w", err))
		return
	}
	msg, err = readSwitchover(control, switchoverWait)
	if err == nil && (!msg.Commit || msg.Handover == nil) {
		err = errors.New("the source did not hand the guest over")
	}
	if err != nil {
		// The source may have quit its guest or resumed it: this copy never runs.
		p.failTarget(ctx, fmt.Errorf("the source did not hand the guest over; the guest here is ended: %w", err))
		return
	}
	if err := p.takeOver(ctx, shape, *msg.Handover); err != nil {
		err = fmt.Errorf("the guest arrived, and taking it over failed: %w", err)
		_ = writeSwitchover(control, switchover{Error: err.Error()})
		p.failTarget(ctx, err)
		return
	}
	if err := writeSwitchover(control, switchover{Taken: true}); err != nil {
		lg.WithError(err).Warn("migration target: tell the source the guest runs here")
	}
	lg.Infof("migration target: the guest runs here (%v after its stream began)", time.Since(started).Round(time.Millisecond))
}

// readMirrorName reads the share name a mirror connection starts with: its length in two
// bytes, then the name.
func readMirrorName(conn net.Conn) (string, error) {
	_ = conn.SetReadDeadline(time.Now().Add(migrationHandshakeWait))
	defer conn.SetReadDeadline(time.Time{})
	var n [2]byte
	if _, err := io.ReadFull(conn, n[:]); err != nil {
		return "", fmt.Errorf("a mirror connection's share: %w", err)
	}
	name := make([]byte, binary.BigEndian.Uint16(n[:]))
	if _, err := io.ReadFull(conn, name); err != nil {
		return "", fmt.Errorf("a mirror connection's share: %w", err)
	}
	return string(name), nil
}

func writeMirrorName(conn net.Conn, name string) error {
	b := binary.BigEndian.AppendUint16(nil, uint16(len(name)))
	_, err := conn.Write(append(b, name...))
	return err
}

// takePodShape reads the source's podShape and matches it to this pod: the same machine
// and size, and a placeholder of the same CRI name for every container, with the same
// mounts. A refusal is told to the source.
func (p *containerPod) takePodShape(ctx context.Context, control net.Conn) (podShape, error) {
	msg, err := readSwitchover(control, switchoverWait)
	switch {
	case err != nil:
		return podShape{}, fmt.Errorf("the guest's shape from the source: %w", err)
	case msg.Pod == nil:
		err = errors.New("the source did not say the guest's shape (a VM pod's source?)")
	default:
		err = p.matchPodShape(*msg.Pod)
	}
	if err != nil {
		_ = writeSwitchover(control, switchover{Error: err.Error()})
		return podShape{}, err
	}
	log.G(ctx).Infof("migration target: the guest's %d containers match this pod's", len(msg.Pod.Containers))
	return *msg.Pod, nil
}

// matchPodShape checks s against this pod and gives each placeholder its source
// container's guest id, pid and shares.
func (p *containerPod) matchPodShape(s podShape) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if s.Machine != p.vm {
		why := ""
		if s.Machine.Template != p.vm.Template {
			why = " (one was restored from a template and one not: a source boots without one while its node is still making it)"
		}
		return fmt.Errorf("shape.machine: the guest's machine is %+v, this pod's %+v%s: %w", s.Machine, p.vm, why, errdefs.ErrFailedPrecondition)
	}
	byName := map[string]*container{}
	for _, c := range p.containers {
		if c.placeholder != nil {
			byName[c.name] = c
		}
	}
	ids, places := map[string]bool{}, map[uint64]string{}
	var errs []error
	for i, sc := range s.Containers {
		c, ok := byName[sc.Name]
		if !ok {
			errs = append(errs, fmt.Errorf("shape.containers[%d]: this pod has no container %s", i, labelOf(sc.Name)))
			continue
		}
		delete(byName, sc.Name)
		if err := identifiers.Validate(sc.ID); err != nil || ids[sc.ID] {
			errs = append(errs, fmt.Errorf("shape.containers[%d].id: %q is no container id, or another's", i, sc.ID))
			continue
		}
		ids[sc.ID] = true
		if err := checkPlaces(sc.Places, places); err != nil {
			errs = append(errs, fmt.Errorf("shape.containers[%d].places: %w", i, err))
			continue
		}
		shares, err := guestShares(sc.ID, c.spec)
		if err != nil {
			errs = append(errs, fmt.Errorf("shape.containers[%d] (%s): %w", i, labelOf(sc.Name), err))
			continue
		}
		if !slices.Equal(shares, sc.Shares) {
			errs = append(errs, fmt.Errorf("shape.containers[%d] (%s): its mounts are shared as %v there, and would be %v here: the two pods' containers differ", i, labelOf(sc.Name), sc.Shares, shares))
			continue
		}
		if missing := slices.IndexFunc(append([]string{vmpodagent.RootfsShare(sc.ID)}, shares...), func(name string) bool { return sc.Places[name] == 0 }); missing >= 0 || len(sc.Places) != len(shares)+1 {
			errs = append(errs, fmt.Errorf("shape.containers[%d].places: want a place for each of its %d shares, got %v", i, len(shares)+1, sc.Places))
			continue
		}
		mirrored, err := mirroredShares(sc.ID, c)
		if err != nil {
			errs = append(errs, fmt.Errorf("shape.containers[%d]: %w", i, err))
			continue
		}
		if !slices.Equal(slices.Sorted(mapKeys(mirrored)), slices.Sorted(slices.Values(sc.Mirrored))) {
			errs = append(errs, fmt.Errorf("shape.containers[%d] (%s): its writes come for %v, this pod keeps them in %v", i, labelOf(sc.Name), sc.Mirrored, slices.Sorted(mapKeys(mirrored))))
			continue
		}
		c.arriving = &sc
		c.mirrorDirs = mirrored
	}
	for name := range byName {
		errs = append(errs, fmt.Errorf("shape.containers: this pod's container %s is not the guest's", labelOf(name)))
	}
	if err := errors.Join(errs...); err != nil {
		for _, c := range p.containers {
			c.arriving, c.mirrorDirs = nil, nil
		}
		return err
	}
	return nil
}

// maxPlace bounds a share's place: a source's numbering counts its shares.
const maxPlace = 1 << 32

// checkPlaces checks a shaped container's share places: each its own (taken holds those
// of the containers before), none zero or beyond maxPlace.
func checkPlaces(places map[string]uint64, taken map[uint64]string) error {
	for _, name := range slices.Sorted(maps.Keys(places)) {
		place := places[name]
		if place == 0 || place > maxPlace {
			return fmt.Errorf("%s: %d is no place", name, place)
		}
		if other, dup := taken[place]; dup {
			return fmt.Errorf("%s: place %d is %s's too", name, place, other)
		}
		taken[place] = name
	}
	return nil
}

func mapKeys(m map[string]string) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

func labelOf(name string) string {
	if name == "" {
		return "(the sandbox)"
	}
	return name
}

// guestShares are the share names guestSpec gives a container's bind mounts for guest id id.
func guestShares(id string, spec *specs.Spec) ([]string, error) {
	owners := map[uint32]uint32{}
	if spec.Linux != nil {
		for _, ns := range spec.Linux.Namespaces { // any pid is fine: only the names count
			if m := nsPath.FindStringSubmatch(ns.Path); m != nil {
				pid, _ := strconv.ParseUint(m[1], 10, 32)
				owners[uint32(pid)] = 1
			}
		}
	}
	_, shares, err := guestSpec(id, spec, owners, func(_, name string, _ bool) (string, error) { return "/" + name, nil }, vmm.MountPointsBelow)
	return shares, err
}

// mirrorDst is where the writes for the source's share name go here, "" for none.
func (p *containerPod) mirrorDst(name string) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.containers {
		if dst, ok := c.mirrorDirs[name]; ok {
			return dst
		}
	}
	return ""
}

// shareArrivals mounts each placeholder's rootfs, now that the source's writes are in its
// upper directory, and shares it and its mounts under the source's share names.
func (p *containerPod) shareArrivals(ctx context.Context, s podShape) error {
	m := p.guest.Machine()
	// a placeholder removed meanwhile is either gone before (the guest's container would
	// have no host side: refused) or after, and then unshares what this shared
	p.arrivalMu.Lock()
	defer p.arrivalMu.Unlock()
	p.mu.Lock()
	var arriving []*container
	owners := map[uint32]uint32{}
	for _, c := range p.containers {
		if c.arriving == nil {
			continue
		}
		select {
		case <-c.placeholder.stand.exited:
			p.mu.Unlock()
			return fmt.Errorf("container %s was stopped while the guest was on its way", c.label())
		default:
		}
		arriving = append(arriving, c)
		owners[uint32(c.proxy.Pid())] = c.arriving.Pid
	}
	p.mu.Unlock()
	if len(arriving) != len(s.Containers) {
		return fmt.Errorf("%d of the guest's %d containers were removed from this pod while the guest was on its way", len(s.Containers)-len(arriving), len(s.Containers))
	}
	for _, c := range arriving {
		if err := c.root.mount(); err != nil {
			return fmt.Errorf("container %s: %w", c.label(), err)
		}
		places := c.arriving.Places
		share := func(hostPath, name string, readonly, rootfs bool) (string, error) {
			rel, err := m.ShareAt(hostPath, name, places[name], readonly, rootfs)
			if err != nil {
				return "", err
			}
			p.mu.Lock()
			c.sharedHere = append(c.sharedHere, name)
			p.mu.Unlock()
			return agentv1.GuestSharedDir + "/" + rel, nil
		}
		if _, err := share(c.root.Dir, vmpodagent.RootfsShare(c.arriving.ID), false, true); err != nil {
			return fmt.Errorf("container %s: rootfs: %w", c.label(), err)
		}
		_, shares, err := guestSpec(c.arriving.ID, c.spec, owners, func(hostPath, name string, readonly bool) (string, error) {
			return share(hostPath, name, readonly, false)
		}, vmm.MountPointsBelow)
		p.mu.Lock()
		c.shares = shares
		p.mu.Unlock()
		if err != nil {
			return fmt.Errorf("container %s: %w", c.label(), err)
		}
	}
	log.G(ctx).Infof("migration target: %d containers' rootfs mounted and shared", len(arriving))
	return nil
}

// takeOver makes the guest that arrived this pod's: it runs it, connects to its agent,
// gives it this pod's addresses, and turns each placeholder into its container's init.
func (p *containerPod) takeOver(ctx context.Context, s podShape, h handover) error {
	m := p.guest.Machine()
	if err := m.Resume(ctx); err != nil {
		return fmt.Errorf("start the guest: %w", err)
	}
	if err := p.guest.Arrived(ctx, s.BootMemory); err != nil {
		return err
	}
	if p.setup != nil {
		ifaces := make([]*agentv1.Interface, 0, len(p.setup.Interfaces))
		for _, i := range p.setup.Interfaces {
			mac := i.Mac
			if guestMAC, ok := s.NICs[i.Name]; ok {
				mac = guestMAC // the guest knows the NIC by the MAC it came with
			}
			ifaces = append(ifaces, &agentv1.Interface{Name: i.Name, Mac: mac, Addresses: i.Addresses, Mtu: i.Mtu})
		}
		if err := p.guest.TakeAddresses(ctx, ifaces, p.setup.Routes); err != nil {
			return err
		}
		p.guestMACs = s.NICs
	}
	p.mu.Lock()
	if p.stopping.Load() {
		p.mu.Unlock()
		return errors.New("the pod is being stopped")
	}
	var adopt []*container
	orphans := map[string]shapedContainer{}
	for _, sc := range s.Containers {
		orphans[sc.ID] = sc
	}
	for _, c := range p.containers {
		if c.arriving == nil {
			continue
		}
		select {
		case <-c.placeholder.stand.exited: // stopped since the shares were made
		default:
			c.guestID, c.pid = c.arriving.ID, c.arriving.Pid
			adopt = append(adopt, c)
			delete(orphans, c.arriving.ID)
		}
	}
	p.awaiting = false
	p.mu.Unlock()
	for _, sc := range orphans {
		// the container it was stopped or removed here: so it is in the guest
		log.G(ctx).Warnf("migration target: container %s stopped while the guest was on its way: removing it from the guest", labelOf(sc.Name))
		if err := p.guest.RemoveContainer(ctx, sc.ID, true); err != nil {
			log.G(ctx).WithError(err).Warnf("migration target: remove container %s", labelOf(sc.Name))
		}
	}
	for _, c := range adopt {
		stdio := c.stdio
		stdio.Stdin = nil // not carried (Guest.AdoptProcess)
		proc, err := p.guest.AdoptProcess(c.guestID, "", c.pid, stdio, h.Output[c.guestID])
		if err != nil {
			return fmt.Errorf("container %s: %w", c.label(), err)
		}
		p.mu.Lock()
		c.init = proc
		p.mu.Unlock()
		c.placeholder.resolve(hostProcess{Process: proc, proxy: c.proxy, pod: p, c: c}, runtime.Exit{})
		go relaySignals(log.G(ctx).WithField("container", c.label()), proc, c.proxy)
	}
	close(p.arrived)
	p.servePod(context.WithoutCancel(ctx)) // as long as the pod: not the receive's
	if err := p.pinVCPUs(ctx, false); err != nil {
		log.G(ctx).WithError(err).Warn("migration target: pin the vCPUs")
	}
	return nil
}

// failTarget ends a migration target whose guest did not come: its QEMU, and each
// placeholder with exit 1 and the reason in its termination message.
func (p *containerPod) failTarget(ctx context.Context, why error) {
	log.G(ctx).WithError(why).Error("migration target: the guest did not arrive")
	reason := vmspec.MigrationFailedReason + ": " + why.Error()
	p.mu.Lock()
	p.awaiting = false
	var waiting []*placeholder
	var logs []string
	for _, c := range p.containers {
		if c.placeholder != nil && c.placeholder.adopted() == nil {
			waiting = append(waiting, c.placeholder)
			if c.termLog != "" {
				logs = append(logs, c.termLog)
			}
		}
	}
	p.mu.Unlock()
	writeTerminationMessages(ctx, logs, reason)
	for _, w := range waiting {
		w.resolve(nil, runtime.Exit{Status: 1, ExitedAt: time.Now(), Reason: reason})
	}
	m := p.guest.Machine()
	m.Quit(context.WithoutCancel(ctx))
	m.KillProcess()
}

// migrate answers vmspec.MigrateCommand on a container pod: it sends the running guest,
// and its containers' writes, to the target the request names, printing progress lines.
// On success the guest runs in the target pod and this pod's containers stay running as
// stand-ins until the pod is deleted; on failure or a cancel before the pause that ends
// the pre-copy the guest runs on here; after that pause, under TCG, a failure ends it
// (vmm.ErrGuestLost, docs/design/211).
func (p *containerPod) migrate(ctx context.Context, input []byte, out io.Writer) error {
	const cmd = vmspec.MigrateCommand
	req, err := vmspec.ParseMigrationRequest(input)
	if err != nil {
		return fmt.Errorf("%s: %w: %w", cmd, err, errdefs.ErrInvalidArgument)
	}
	if req.Options.AllowPostCopy {
		return fmt.Errorf("%s: options.allowPostCopy: a container pod's guest moves by pre-copy only (its writes go at the switchover): %w", cmd, errdefs.ErrInvalidArgument)
	}
	cfg, err := req.TLS.Config()
	if err != nil {
		return fmt.Errorf("%s: request.tls: %w: %w", cmd, err, errdefs.ErrInvalidArgument)
	}
	m := p.guest.Machine()
	if err := m.CanMigrate(); err != nil {
		return fmt.Errorf("%s: %w", cmd, err)
	}
	if !p.resizeMu.TryLock() {
		return fmt.Errorf("%s: the VM is being resized: migrate after it: %w", cmd, errdefs.ErrFailedPrecondition)
	}
	defer p.resizeMu.Unlock()
	p.hostDevMu.Lock()
	passthrough := len(p.hostDevices)
	p.hostDevMu.Unlock()
	if passthrough > 0 {
		return fmt.Errorf("%s: the pod has %d host PCI devices passed through: they stay on this node: %w", cmd, passthrough, errdefs.ErrFailedPrecondition)
	}
	shape, sources, err := p.podShape()
	if err != nil {
		return fmt.Errorf("%s: %w", cmd, err)
	}
	if m.Accel() == machine.TCG {
		// QEMU 10.0 under TCG aborted the source half-way (system/physmem.c
		// tlb_reset_dirty_range_all: "Assertion `block == qemu_get_ram_block(end - 1)'
		// failed") migrating a guest with 64 MiB plugged by virtio-mem; the same guest
		// without plugged memory migrates (docs/design/212)
		plugged, err := m.PluggedMemory(ctx)
		if err != nil {
			return fmt.Errorf("%s: %w", cmd, err)
		}
		if plugged > 0 {
			return fmt.Errorf("%s: the guest has %d MiB of hot-plugged (virtio-mem) memory, whose migration aborts QEMU under TCG: a container pod migrates under TCG only at the node's default guest size (containers' memory limits of at most %d MiB in all): %w",
				cmd, plugged>>20, p.sizing.DefaultMemoryMiB-p.sizing.GuestOverheadMiB, errdefs.ErrNotImplemented)
		}
	}
	room, err := readMemoryRoom("/proc", "/sys/fs/cgroup", m.Pid(), int64(p.boot.MemoryMiB)<<20)
	if err != nil {
		return fmt.Errorf("%s: %w", cmd, err)
	}
	log.G(ctx).Infof("migration: the guest's RAM %d MiB, %d MiB of it resident; room in cgroup %s: %d MiB", room.guest>>20, room.resident>>20, room.cgroup, room.room>>20)
	if err := room.check(); err != nil {
		return fmt.Errorf("%s: %w", cmd, err)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	flight := &outgoing{cancel: cancel, done: make(chan struct{})}
	p.mu.Lock()
	if p.migrating != nil {
		p.mu.Unlock()
		return fmt.Errorf("%s: a migration of this pod is in flight: %w", cmd, errdefs.ErrAlreadyExists)
	}
	p.migrating = flight
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		p.migrating = nil
		p.mu.Unlock()
		close(flight.done)
	}()
	lg := log.G(ctx)
	rep := newMigrationReport(lg, out)
	defer rep.close()
	report, fail := rep.progress, rep.fail

	dialCtx, cancelDial := context.WithTimeout(ctx, migrationDialWait)
	defer cancelDial()
	// from the node's network, as the target listens (acceptMigration)
	dial := func(role byte) (net.Conn, error) { return dialTarget(dialCtx, "", req.Target, cfg, role) }
	control, err := dial(roleControl)
	if err != nil {
		return fail(err)
	}
	defer control.Close()
	stream, err := dial(roleStream)
	if err != nil {
		return fail(err)
	}
	defer stream.Close()
	type mirror struct {
		share string
		conn  net.Conn
		tree  *rootfssync.Mirror
	}
	var mirrors []*mirror
	for _, share := range slices.Sorted(mapKeys(sources)) {
		conn, err := dial(roleMirror)
		if err == nil {
			if err = writeMirrorName(conn, share); err != nil {
				conn.Close()
			}
		}
		if err != nil {
			for _, mr := range mirrors {
				mr.conn.Close()
			}
			return fail(err)
		}
		mirrors = append(mirrors, &mirror{share: share, conn: conn, tree: rootfssync.Over(sources[share], conn)})
	}
	closeMirrors := func() {
		for _, mr := range mirrors {
			mr.conn.Close()
		}
	}
	defer closeMirrors()
	// a cancel ends a pass blocked on the target; from the pause before the switchover on
	// the last passes are bounded instead (a cancel no longer stops a TCG switchover)
	stopMirrors := context.AfterFunc(ctx, closeMirrors)
	defer stopMirrors()
	cancelDial()
	if err := sayShape(ctx, control, switchover{Pod: &shape}); err != nil {
		return fail(err)
	}
	// what the containers wrote, while they run: the last passes, with the guest stopped,
	// then send only what changed since
	passes := func(ctx context.Context, live bool) error {
		var total rootfssync.Changes
		for _, mr := range mirrors {
			c, err := mr.tree.Pass(ctx, live)
			if err != nil {
				return fmt.Errorf("the writes of share %s: %w", mr.share, err)
			}
			total.Copied, total.Removed, total.Bytes = total.Copied+c.Copied, total.Removed+c.Removed, total.Bytes+c.Bytes
		}
		lg.Infof("migration: writes passed (live %v): %d entries copied, %d removed, %d KiB", live, total.Copied, total.Removed, total.Bytes>>10)
		return nil
	}
	if err := passes(ctx, true); err != nil {
		return fail(fmt.Errorf("%w; the guest runs on here", err))
	}

	qemuEnd, shimEnd, err := streamPair()
	if err != nil {
		return fail(err)
	}
	defer shimEnd.Close()
	sent := sendStream(stream, shimEnd)
	o := req.Options
	gib := (p.Size().MemoryMiB + 1023) / 1024
	opts := vmm.MigrationOptions{
		MaxBandwidth:      uint64(o.BandwidthMiB) << 20,
		DowntimeLimit:     time.Duration(o.DowntimeLimitMs) * time.Millisecond,
		AutoConverge:      o.AutoConverge,
		CompletionTimeout: time.Duration(int64(o.CompletionTimeoutPerGiB)*int64(gib)) * time.Second,
		ProgressTimeout:   time.Duration(o.ProgressTimeoutSeconds) * time.Second,
	}
	var last time.Time
	opts.Progress = func(info qmp.MigrationInfo) {
		if time.Since(last) < progressEvery {
			return
		}
		last = time.Now()
		report(progressOf(info))
	}
	opts.BeforeSwitchover = func(ctx context.Context) error {
		stopMirrors()
		for _, mr := range mirrors {
			_ = mr.conn.SetDeadline(time.Now().Add(switchoverWait))
		}
		if err := passes(ctx, false); err != nil {
			return err
		}
		closeMirrors() // the target's receivers end: nothing more is written there
		if err := writeSwitchover(control, switchover{Final: true}); err != nil {
			return fmt.Errorf("tell the target the writes are in: %w", err)
		}
		return readWord(control, "it shares the containers' files", func(m switchover) bool { return m.Shared })
	}
	lg.Infof("migrating to %s (%d MiB/s, auto-converge %v, %d writes' streams)", req.Target, o.BandwidthMiB, o.AutoConverge, len(mirrors))
	info, err := m.Migrate(ctx, qemuEnd, opts)
	qemuEnd.Close()
	if err != nil {
		if errors.Is(err, vmm.ErrGuestLost) {
			return fail(err)
		}
		select {
		case <-m.Done(): // (the pod's containers end with QEMU's end)
			return fail(fmt.Errorf("%w; the guest was lost with its QEMU", err))
		default:
		}
		return fail(fmt.Errorf("%w; the guest runs on here", err))
	}
	if err := p.awaitLoadedOrLose(ctx, control, sent); err != nil {
		return fail(err)
	}
	// From here the guest is the target's: this QEMU never runs it again.
	out2 := handover{Output: map[string]vmpodagent.OutputOffsets{}}
	p.mu.Lock()
	p.movedTo = req.Target
	var inits []*container
	for _, c := range p.containers {
		c.left = newStandIn()
		if c.init != nil {
			inits = append(inits, c)
		}
	}
	p.mu.Unlock()
	m.Quit(context.WithoutCancel(ctx))
	m.KillProcess()
	for _, c := range inits {
		out2.Output[c.guestID] = c.init.HandOverOutput()
	}
	err = writeSwitchover(control, switchover{Commit: true, Handover: &out2})
	if err != nil {
		err = fmt.Errorf("the commit did not reach the target, whose copy of the guest is then ended: %w", err)
	} else {
		// the target runs the guest once it has taken it over: its agent, the processes,
		// the addresses; a failure there loses the guest
		err = readWord(control, "it took the guest over", func(m switchover) bool { return m.Taken })
	}
	if err != nil {
		p.lostAfterMove(ctx, err)
		return fail(fmt.Errorf("%w: %w", err, vmm.ErrGuestLost))
	}
	report(progressOf(info))
	lg.Infof("migrated to %s in %v (downtime %v, %d MiB sent)", req.Target, info.TotalTime, info.Downtime, info.Transferred()>>20)
	return nil
}

// lostAfterMove ends a source whose guest left and did not land (why): its containers'
// stand-ins exit 1 with the reason in their termination messages, and the pod is done,
// as a pod whose VM died: a kubelet restarts what its policy says, elsewhere.
func (p *containerPod) lostAfterMove(ctx context.Context, why error) {
	reason := vmspec.MigrationFailedReason + ": the guest was lost after it left: " + why.Error()
	log.G(ctx).WithError(why).Error("migration: the guest left and the target did not take it over: it is lost")
	p.mu.Lock()
	var left []*standIn
	var logs []string
	for _, c := range p.containers {
		if c.left != nil {
			left = append(left, c.left)
			if c.termLog != "" {
				logs = append(logs, c.termLog)
			}
		}
	}
	p.mu.Unlock()
	writeTerminationMessages(ctx, logs, reason)
	for _, s := range left {
		s.end(1)
	}
	p.vmDoneOnce.Do(func() { close(p.vmDone) })
}

// awaitLoadedOrLose waits for the target's word that it has the guest. Without it the
// guest, stopped here by QEMU at the migration's end, resumes here, but under TCG, where
// a resumed virtio-fs guest runs stale translations (docs/design/211): that one is ended.
func (p *containerPod) awaitLoadedOrLose(ctx context.Context, control net.Conn, sent <-chan error) error {
	err := awaitLoaded(control, sent)
	if err == nil {
		return nil
	}
	m := p.guest.Machine()
	if m.Accel() == machine.TCG {
		log.G(ctx).WithError(err).Error("migration: the target did not take the guest, and under TCG it cannot resume here: it is lost")
		m.Quit(context.WithoutCancel(ctx))
		m.KillProcess()
		return fmt.Errorf("%w: %w", err, vmm.ErrGuestLost)
	}
	log.G(ctx).WithError(err).Warn("migration: the target did not take the guest; resuming it here")
	if rerr := m.Resume(context.WithoutCancel(ctx)); rerr != nil {
		return fmt.Errorf("%w; and resuming the guest here failed: %w", err, rerr)
	}
	return fmt.Errorf("%w; the guest runs on here", err)
}

// sayShape tells the target the guest's shape (msg: a VM pod's or a container pod's) and
// waits for it to match it, or for ctx to end (a cancel).
func sayShape(ctx context.Context, control net.Conn, msg switchover) error {
	stop := context.AfterFunc(ctx, func() { _ = control.SetDeadline(time.Now()) })
	defer stop()
	cancelled := fmt.Errorf("%w before the stream began; the guest runs on here", vmm.ErrMigrationCancelled)
	if err := writeSwitchover(control, msg); err != nil {
		if ctx.Err() != nil {
			return cancelled
		}
		return fmt.Errorf("tell the target the guest's shape: %w", err)
	}
	answer, err := readSwitchover(control, switchoverWait)
	switch {
	case ctx.Err() != nil:
		return cancelled
	case err != nil:
		return fmt.Errorf("the target's answer to the guest's shape: %w", err)
	case answer.Error != "":
		return fmt.Errorf("the target refused the guest: %s", answer.Error)
	case !answer.Ready:
		return errors.New("the target did not say it matches the guest's shape")
	}
	return nil
}

// podShape is this pod's guest as a target must match it, with the host directories of
// the shares whose writes travel, by share name.
func (p *containerPod) podShape() (podShape, map[string]string, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case p.awaiting:
		return podShape{}, nil, fmt.Errorf("this pod's own guest has not arrived: %w", errdefs.ErrFailedPrecondition)
	case p.movedTo != "":
		return podShape{}, nil, fmt.Errorf("the pod's guest moved to %s already: %w", p.movedTo, errdefs.ErrFailedPrecondition)
	case p.size != p.boot:
		return podShape{}, nil, fmt.Errorf("the VM was resized (%d vCPUs, %d MiB; it booted with %d, %d MiB): a resized container pod cannot migrate yet: %w",
			p.size.VCPUs, p.size.MemoryMiB, p.boot.VCPUs, p.boot.MemoryMiB, errdefs.ErrNotImplemented)
	}
	s := podShape{Machine: p.vm, BootMemory: p.guest.BootMemory(), NICs: p.guestMACs}
	sources := map[string]string{}
	var errs []error
	for _, id := range slices.Sorted(func(yield func(string) bool) {
		for id := range p.containers {
			if !yield(id) {
				return
			}
		}
	}) {
		c := p.containers[id]
		switch {
		case c.init == nil || c.proxy == nil:
			errs = append(errs, fmt.Errorf("container %s is being created", c.label()))
			continue
		case c.proxy.Exited():
			errs = append(errs, fmt.Errorf("container %s has exited: a kubelet would start it again, into a pod with no VM", c.label()))
			continue
		case c.stdio.Stdin != nil:
			errs = append(errs, fmt.Errorf("container %s has a stdin (stdin: true), which is not carried", c.label()))
			continue
		}
		mirrored, err := mirroredShares(c.guestID, c)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		sc := shapedContainer{Name: c.name, ID: c.guestID, Pid: c.pid, Shares: c.shares, Places: map[string]uint64{}}
		for _, share := range append([]string{vmpodagent.RootfsShare(c.guestID)}, c.shares...) {
			place, ok := p.guest.Machine().SharePlace(share)
			if !ok {
				errs = append(errs, fmt.Errorf("container %s: share %s is not shared (a bug)", c.label(), share))
				continue
			}
			sc.Places[share] = place
		}
		for share, dir := range mirrored {
			sources[share] = dir
			sc.Mirrored = append(sc.Mirrored, share)
		}
		slices.Sort(sc.Mirrored)
		s.Containers = append(s.Containers, sc)
	}
	if err := errors.Join(errs...); err != nil {
		return podShape{}, nil, fmt.Errorf("%w: %w", err, errdefs.ErrFailedPrecondition)
	}
	return s, sources, nil
}

// cancelMigration answers vmspec.MigrateCancelCommand: as a VM pod's (vmmigrate.go).
func (p *containerPod) cancelMigration(ctx context.Context) (string, error) {
	p.mu.Lock()
	flight := p.migrating
	p.mu.Unlock()
	return cancelFlight(ctx, flight, func() string {
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.movedTo
	})
}
