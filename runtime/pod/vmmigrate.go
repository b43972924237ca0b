package pod

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/vmpod/vmpod/api/vmspec"
	"github.com/vmpod/vmpod/qmp"
	"github.com/vmpod/vmpod/runtime"
	"github.com/vmpod/vmpod/runtime/network"
	"github.com/vmpod/vmpod/runtime/vmm"
)

// Live migration between VM pods (issue 12, docs/design/209). The target is a VM pod
// rendered from the source's spec with migration.role target: its QEMU starts waiting for
// the guest. vmspec.MigrateAcceptCommand makes its shim listen on the pod's
// vmspec.MigrationPort; vmspec.MigrateCommand makes the source's shim connect twice, over
// TLS with each end's certificate pinned by the other:
//
//   - the stream connection carries QEMU's migration stream, source to target, each shim
//     copying between the TLS connection and a socket pair whose other end its QEMU holds;
//   - the control connection first carries the guest's shape (a resize's vCPUs and memory),
//     which the target matches before its QEMU reads the stream, answering ready; then the
//     switchover: once the target's QEMU has the whole guest (paused) its shim says
//     loaded; the source's shim, whose QEMU stopped the guest at completion, answers
//     commit and quits its QEMU; only then does the target's shim start the guest's
//     vCPUs. Without a loaded the source resumes its guest; without a commit the target
//     keeps its guest paused. No outcome runs the guest twice.

const (
	// migrationDialWait bounds the source's connections to the target.
	migrationDialWait = 30 * time.Second
	// migrationHandshakeWait bounds one TLS handshake and the role byte after it.
	migrationHandshakeWait = 10 * time.Second
	// switchoverWait bounds each side's wait for the other's word at the switchover.
	switchoverWait = 2 * time.Minute
	// progressEvery spaces the progress lines a migration prints.
	progressEvery = time.Second
	// outcomeWait bounds how long a migration that ended waits for its client to read the
	// outcome before the VM takes other requests (a cancel, the next migration).
	outcomeWait = 10 * time.Second
)

// The first byte a source sends on each of its connections, after the TLS handshake.
const (
	roleControl = 'C'
	roleStream  = 'S'
	// a container pod's: a share's writes as a rootfssync stream, the share's name first
	// (docs/design/212)
	roleMirror = 'M'
)

// switchover is a control connection's message, one JSON line each. The two sides take
// turns: shape, ready (or error), then loaded (or error), then commit.
type switchover struct {
	Shape  *guestShape `json:"shape,omitempty"`  // source, first: what the guest has now
	Pod    *podShape   `json:"pod,omitempty"`    // a container pod's source, first, instead
	Ready  bool        `json:"ready,omitempty"`  // target: this VM matches the shape
	Final  bool        `json:"final,omitempty"`  // container pod's source: its writes are all sent
	Shared bool        `json:"shared,omitempty"` // container pod's target: mounted and shared
	Loaded bool        `json:"loaded,omitempty"` // target: the guest is here, paused
	Commit bool        `json:"commit,omitempty"` // source: the guest is yours, start it
	// a container pod's source, with the commit: where its processes' output goes on
	Handover *handover `json:"handover,omitempty"`
	// container pod's target, last: it runs the guest, its containers' processes taken
	// over (or Error: the guest it had is lost)
	Taken bool   `json:"taken,omitempty"`
	Error string `json:"error,omitempty"` // target: it could not take the guest
}

// guestShape is what the running guest has that its spec does not say: the size a resize
// gave it (docs/design/208), and what the target needs to follow later resizes as the
// source would. A migration carries the state of the machine's devices, not the devices:
// the target plugs the same vCPUs before its QEMU reads the stream (docs/design/209).
// virtio-mem's plugged memory travels in its device's state.
type guestShape struct {
	VCPUs     int `json:"vcpus"`
	MemoryMiB int `json:"memoryMiB"`
	// the compute container's limits the source booted with: the target's limits must
	// ask for this size from them, as the source's ask for it now
	BootCPUMilli int64 `json:"bootCPUMilli,omitempty"`
	BootMemBytes int64 `json:"bootMemBytes,omitempty"`
	// the guest's memory blocks before its first growth (none before one): hot-plugged
	// memory is onlined again after a guest reboot on the target too
	BootBlocks []uint64 `json:"bootBlocks,omitempty"`
	// the disks attachDisk plugged in, by name: the target plugs the same images on the
	// same root ports, where the guest's device state expects them
	Disks []shapedDisk `json:"disks,omitempty"`
	// the NICs the pod's netns gained while the VM ran (docs/design/205): the target plugs
	// a NIC for its own pod interface of the same name, with the guest's MAC, on the
	// same root port
	NICs []shapedNIC `json:"nics,omitempty"`
}

// shapedDisk is a hot-plugged disk of a guestShape: as its attach asked for it, and the
// root port it sits on.
type shapedDisk struct {
	vmspec.HotplugDisk
	Port string `json:"port"`
}

// shapedNIC is a hot-plugged NIC of a guestShape: the pod interface it mirrors, the MAC
// the guest knows it by and the root port it sits on.
type shapedNIC struct {
	Interface string `json:"interface"`
	MAC       string `json:"mac"`
	Port      string `json:"port"`
}

// checkShapedNICs checks the source's hot-plugged NICs (a peer's input) before anything is
// plugged for them.
func checkShapedNICs(shaped []shapedNIC) error {
	names, macs, ports := map[string]int{}, map[string]int{}, map[string]int{}
	for i, n := range shaped {
		if n.Interface == "" {
			return fmt.Errorf("shape.nics[%d].interface: missing", i)
		}
		mac, err := net.ParseMAC(n.MAC)
		if err != nil || len(mac) != 6 || mac[0]&1 != 0 || bytes.Equal(mac, make(net.HardwareAddr, 6)) {
			return fmt.Errorf("shape.nics[%d].mac: %q is no unicast Ethernet address", i, n.MAC)
		}
		if n.Port == "" {
			return fmt.Errorf("shape.nics[%d].port: the source names no root port for pod interface %s", i, n.Interface)
		}
		for _, u := range []struct {
			seen  map[string]int
			key   string
			field string
		}{{names, n.Interface, "interface"}, {macs, mac.String(), "mac"}, {ports, n.Port, "port"}} {
			if j, dup := u.seen[u.key]; dup {
				return fmt.Errorf("shape.nics[%d].%s: %q is shape.nics[%d]'s too", i, u.field, u.key, j)
			}
			u.seen[u.key] = i
		}
	}
	return nil
}

// shape is this guest's shape. Called with hotMu held.
func (c *computeVM) shape() (guestShape, error) {
	s := guestShape{VCPUs: c.size.VCPUs, MemoryMiB: c.size.MemoryMiB, BootCPUMilli: c.bootLimits.cpuMilli, BootMemBytes: c.bootLimits.memBytes}
	s.BootBlocks = slices.Sorted(maps.Keys(c.bootBlocks))
	for _, name := range slices.Sorted(maps.Keys(c.hot)) {
		port, ok := c.machine.DevicePort(hotDiskID(name))
		if !ok {
			return s, fmt.Errorf("hot-plugged disk %s has no root port", name) // a bug
		}
		s.Disks = append(s.Disks, shapedDisk{HotplugDisk: c.hot[name].HotplugDisk, Port: port})
	}
	if c.nics != nil {
		nics, err := c.nics.shaped()
		if err != nil {
			return s, err
		}
		s.NICs = nics
	}
	return s, nil
}

// takeShape reads the source's guestShape and makes this VM match it before QEMU reads
// the stream: this pod's limits must ask for the guest's size (a target made from the
// source pod before its resize was applied would hold the guest in a cgroup too small,
// and the kubelet would never resize it again), and the vCPUs and disks the source
// plugged are plugged here, in the same slots; attachments name the pods on this node
// that lend this pod the disks the source took from its attachment pods. A refusal is
// told to the source, which then never starts the stream.
func (c *computeVM) takeShape(ctx context.Context, control net.Conn, attachments map[string]string) error {
	msg, err := readSwitchover(control, switchoverWait)
	switch {
	case err != nil:
		return fmt.Errorf("the guest's shape from the source: %w", err)
	case msg.Shape == nil:
		return errors.New("the source did not say the guest's shape")
	}
	s := *msg.Shape
	c.hotMu.Lock() // no resize meanwhile
	defer c.hotMu.Unlock()
	if err := c.matchShape(ctx, s, attachments); err != nil {
		_ = writeSwitchover(control, switchover{Error: err.Error()})
		return err
	}
	log.G(ctx).WithField("pod", c.pod.id).Infof("migration target: the guest has %d vCPUs, %d MiB, %d hot-plugged disks and %d hot-plugged NICs", c.size.VCPUs, c.size.MemoryMiB, len(s.Disks), len(s.NICs))
	return writeSwitchover(control, switchover{Ready: true})
}

// matchShape checks s against this pod and plugs the vCPUs, disks and NICs it lacks.
// Called with hotMu held.
func (c *computeVM) matchShape(ctx context.Context, s guestShape, attachments map[string]string) error {
	hot, err := c.shapedDisks(s.Disks, attachments)
	if err != nil {
		return err
	}
	if err := checkShapedNICs(s.NICs); err != nil {
		return err
	}
	if len(s.NICs) > 0 && c.nics == nil {
		return fmt.Errorf("shape.nics: the guest has %d hot-plugged NICs, and this pod has no network to plug them into: %w", len(s.NICs), errdefs.ErrFailedPrecondition)
	}
	boot := claim{cpuMilli: s.BootCPUMilli, memBytes: s.BootMemBytes}
	want, err := vmTarget(c.pod.vm, boot, c.limits)
	if err != nil {
		return fmt.Errorf("this pod's limits, from the source's at its boot: %w", err)
	}
	if s.VCPUs < c.size.VCPUs { // resizes wait for the guest (resize), so this is a bug
		return fmt.Errorf("the guest has %d vCPUs, this VM already %d", s.VCPUs, c.size.VCPUs)
	}
	if got := (Size{VCPUs: s.VCPUs, MemoryMiB: s.MemoryMiB}); got != want {
		return fmt.Errorf("the guest has %d vCPUs and %d MiB; this pod's limits (CPU %dm, memory %d MiB) give it %d and %d (a target pod asks for what is applied to the source's compute container): %w",
			got.VCPUs, got.MemoryMiB, c.limits.cpuMilli, c.limits.memBytes>>20, want.VCPUs, want.MemoryMiB, errdefs.ErrFailedPrecondition)
	}
	if s.VCPUs > c.size.VCPUs {
		n, err := c.machine.PlugVCPUs(ctx, s.VCPUs)
		if err != nil {
			return fmt.Errorf("plug the guest's %d vCPUs: %w", s.VCPUs, err)
		}
		c.size.VCPUs = n
	}
	for i, d := range hot {
		if _, err := c.plugHotDisk(ctx, d, s.Disks[i].Port); err != nil {
			return fmt.Errorf("plug the guest's hot-plugged disk on %s: %w", s.Disks[i].Port, err)
		}
	}
	if c.nics != nil {
		if err := c.nics.adopt(ctx, s.NICs); err != nil {
			return err
		}
	}
	c.size.MemoryMiB = s.MemoryMiB
	c.bootLimits = boot
	if len(s.BootBlocks) > 0 {
		c.bootBlocks = map[uint64]bool{}
		for _, b := range s.BootBlocks {
			c.bootBlocks[b] = true
		}
	}
	return nil
}

// shapedDisks checks the source's hot-plugged disks as an attach to this VM would be
// checked, and gives each the pod on this node that lends its volume in place of the
// source's. Nothing is plugged until all of them pass.
func (c *computeVM) shapedDisks(shaped []shapedDisk, attachments map[string]string) ([]vmspec.HotplugDisk, error) {
	var hot []vmspec.HotplugDisk
	names, ports := map[string]int{}, map[string]int{}
	for i, sd := range shaped {
		d := sd.HotplugDisk
		if j, dup := names[d.Name]; dup {
			return nil, fmt.Errorf("shape.disks[%d].name: disk %q is shape.disks[%d] too", i, d.Name, j)
		}
		if j, dup := ports[sd.Port]; dup && sd.Port != "" {
			return nil, fmt.Errorf("shape.disks[%d].port: root port %q is shape.disks[%d]'s too", i, sd.Port, j)
		}
		names[d.Name], ports[sd.Port] = i, i
		if d.AttachmentPod != "" {
			uid, ok := attachments[d.Name]
			if !ok {
				return nil, fmt.Errorf("the guest's hot-plugged disk %s comes from an attachment pod on the source's node, and none on this node was named for it (accept.attachments): %w", d.Name, errdefs.ErrFailedPrecondition)
			}
			d.AttachmentPod = uid
		}
		data, err := json.Marshal(d)
		if err != nil {
			return nil, fmt.Errorf("shape.disks[%d]: %w", i, err)
		}
		d, err = vmspec.ParseHotplugDisk(data, c.pod.vm)
		if err != nil {
			return nil, fmt.Errorf("shape.disks[%d]: %w", i, err)
		}
		if sd.Port == "" {
			return nil, fmt.Errorf("shape.disks[%d].port: the source names no root port for disk %s", i, d.Name)
		}
		hot = append(hot, d)
	}
	return hot, nil
}

// guestMAC is a masquerade-bound NIC's MAC when the spec names none: locally administered,
// from the VM's UUID and the interface's name, the same in every pod of the VM.
func guestMAC(uuid, iface string) string {
	h := sha256.Sum256([]byte(uuid + "/" + iface))
	h[0] = h[0]&0xfe | 0x02 // unicast, locally administered
	return net.HardwareAddr(h[:6]).String()
}

// migratable says why this VM's guest cannot move to another pod, before anything starts.
// Called with hotMu held.
func (c *computeVM) migratable() error {
	p := c.pod
	var errs []error
	if p.netns == "" || !p.address.IsValid() {
		errs = append(errs, errors.New("the pod has no network namespace with an IPv4 address to send the guest from"))
	}
	if err := p.vm.Migratable(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// acceptMigration answers vmspec.MigrateAcceptCommand on a migration target: it listens on
// the pod's migration port and returns where; the guest arrives in the background
// (receive), and the pod fails if none does within the request's timeout.
func (c *computeVM) acceptMigration(ctx context.Context, input []byte) (string, error) {
	const cmd = vmspec.MigrateAcceptCommand
	if len(input) == 0 {
		return "", fmt.Errorf("%s: the request goes on stdin (exec -i), as JSON: %w", cmd, errdefs.ErrInvalidArgument)
	}
	req, err := vmspec.ParseMigrationAccept(input)
	if err != nil {
		return "", fmt.Errorf("%s: %w: %w", cmd, err, errdefs.ErrInvalidArgument)
	}
	cfg, err := req.TLS.Config()
	if err != nil { // checked by the parse
		return "", fmt.Errorf("%s: accept.tls: %w: %w", cmd, err, errdefs.ErrInvalidArgument)
	}
	c.mu.Lock()
	switch {
	case !c.awaiting:
		c.mu.Unlock()
		return "", fmt.Errorf("%s: this VM is no migration target waiting for its guest (annotation %s: migration.role target): %w", cmd, vmspec.Annotation, errdefs.ErrFailedPrecondition)
	case c.accepting:
		c.mu.Unlock()
		return "", fmt.Errorf("%s: already listening for the source: %w", cmd, errdefs.ErrAlreadyExists)
	}
	c.accepting = true
	c.mu.Unlock()
	if req.PostCopy {
		if err := c.machine.CanPostCopy(); err != nil {
			c.mu.Lock()
			c.accepting = false
			c.mu.Unlock()
			return "", fmt.Errorf("%s: accept.postCopy: %w", cmd, err)
		}
	}
	l, err := network.ListenInNetns(c.pod.netns, ":"+strconv.Itoa(vmspec.MigrationPort))
	if err != nil {
		c.mu.Lock()
		c.accepting = false
		c.mu.Unlock()
		return "", fmt.Errorf("%s: %w", cmd, err)
	}
	addr := net.JoinHostPort(c.pod.address.String(), strconv.Itoa(vmspec.MigrationPort))
	lg := log.G(ctx).WithField("pod", c.pod.id)
	lg.Infof("migration target: listening on %s for %v", addr, req.AcceptTimeout())
	go c.receive(log.WithLogger(context.WithoutCancel(ctx), lg), l, cfg, req)
	out, err := json.Marshal(vmspec.MigrationListening{Address: addr})
	return string(out), err
}

// receive takes the source's two connections on l, hands the stream to QEMU and sees the
// switchover through. A target whose guest does not arrive fails (its container exits 1).
func (c *computeVM) receive(ctx context.Context, l net.Listener, cfg *tls.Config, req vmspec.MigrationAccept) {
	lg := log.G(ctx)
	control, stream, err := acceptSource(ctx, l, cfg, req.AcceptTimeout(), c.machine.Done())
	if err != nil {
		c.failTarget(ctx, err)
		return
	}
	defer control.Close()
	defer stream.Close()
	if err := c.takeShape(ctx, control, req.Attachments); err != nil {
		c.failTarget(ctx, err)
		return
	}
	qemuEnd, shimEnd, err := streamPair()
	if err != nil {
		c.failTarget(ctx, err)
		return
	}
	defer shimEnd.Close()
	err = c.machine.AcceptMigration(ctx, qemuEnd, vmm.MigrationOptions{PostCopy: req.PostCopy})
	qemuEnd.Close() // QEMU holds its own copy
	if err != nil {
		c.failTarget(ctx, err)
		return
	}
	// the source's bytes to QEMU. A QEMU that stopped reading (its load failed) ends the
	// stream, which the source's QEMU then hears of. Only post-copy has a return path:
	// QEMU's requests for the pages its guest faults on.
	go func() {
		if _, err := io.Copy(shimEnd, stream); err != nil {
			_ = stream.Close()
		}
		_ = shimEnd.CloseWrite()
	}()
	returnPath := make(chan struct{}) // closed once the return path has all QEMU wrote on it
	if req.PostCopy {
		go func() { copyReturnPath(stream, shimEnd); close(returnPath) }()
	}
	started := time.Now()
	info, err := c.machine.AwaitIncoming(ctx)
	if err != nil {
		_ = writeSwitchover(control, switchover{Error: err.Error()})
		c.failTarget(ctx, err)
		return
	}
	postCopy := info.Status == qmp.MigrationPostcopyActive
	if postCopy {
		lg.Infof("migration target: the guest's devices arrived by post-copy (%v), its memory follows; telling the source", time.Since(started).Round(time.Millisecond))
	} else {
		lg.Infof("migration target: the guest arrived (%v, %d MiB); telling the source", time.Since(started).Round(time.Millisecond), info.Transferred()>>20)
	}
	c.mu.Lock()
	// stopped meanwhile (SIGTERM): the source resumes its guest, unless the migration was
	// switched to post-copy, which then breaks and loses it (docs/design/209)
	if !c.awaiting || c.decided != nil {
		c.mu.Unlock()
		return
	}
	c.loaded = true // from here a stop waits for the source's word (it may commit)
	c.mu.Unlock()
	if err := writeSwitchover(control, switchover{Loaded: true}); err != nil {
		// the source cannot know the guest is here: it resumes its own (or, in post-copy,
		// loses it once this QEMU quits)
		c.failTarget(ctx, fmt.Errorf("tell the source the guest arrived: %w", err))
		return
	}
	msg, err := readSwitchover(control, switchoverWait)
	if err != nil || !msg.Commit {
		// The source may have quit its guest or resumed it: the one safe thing is to keep
		// this one stopped. An unpause starts it once the source is known to have ended.
		lg.WithError(err).Errorf("migration target: the source did not hand the guest over; it stays paused here (%s starts it once the source pod is known to have ended)", vmspec.UnpauseCommand)
		c.mu.Lock()
		c.awaiting, c.paused = false, true
		c.mu.Unlock()
		c.nics.wakeUp() // links that came while the guest was on its way
		if postCopy {
			// a source past the switch never resumes its guest: if the rest of the memory
			// arrives the guest is whole here (paused), and if not it is lost
			if _, err := c.machine.AwaitPostCopy(ctx); err != nil {
				c.loseGuest(ctx, err)
			}
		}
		return
	}
	c.mu.Lock()
	c.awaiting = false
	start := c.running // the container started: the guest runs
	c.mu.Unlock()
	c.nics.wakeUp() // links that came while the guest was on its way
	if start {
		if err := c.machine.Resume(ctx); err != nil {
			lg.WithError(err).Error("migration target: start the guest")
			if postCopy { // the source has committed and will not run it either
				c.loseGuest(ctx, fmt.Errorf("start the guest during post-copy: %w", err))
			}
			return
		}
		if c.agentKeys != nil { // as powerOn does for a guest that boots here
			go c.syncKeysThroughAgent(context.WithoutCancel(ctx), c.agentKeys, keySyncPeriod)
		}
	}
	lg.Infof("migration target: the guest runs here (switchover %v after it arrived)", time.Since(started).Round(time.Millisecond))
	if postCopy {
		if _, err := c.machine.AwaitPostCopy(ctx); err != nil {
			// the guest's memory is split between the pods: neither can run it
			c.loseGuest(ctx, err)
		} else {
			lg.Infof("migration target: post-copy done, the guest's memory is all here (%v after the stream began)", time.Since(started).Round(time.Millisecond))
			// QEMU's last word on the return path (its shutdown message) comes after it
			// reports the migration completed, and the source's QEMU calls its side
			// completed only once it has that word: closing the stream first (the returns
			// below) left a source in postcopy-active for good (measured, a cluster run).
			select {
			case <-returnPath:
			case <-time.After(returnPathDrain):
				lg.Warnf("migration target: the return path did not end within %v of the post-copy's end", returnPathDrain)
			}
		}
	}
}

// returnPathDrain bounds the wait for a finished post-copy's return path to carry QEMU's
// last message to the source: QEMU sends it and closes its end at once.
const returnPathDrain = 10 * time.Second

// copyReturnPath copies a post-copy migration's return path — the target QEMU's requests
// for pages — from from to to, against the stream's direction; the end of one is the end
// of the other.
func copyReturnPath(to io.Writer, from io.Reader) {
	_, _ = io.Copy(to, from)
	if cw, ok := to.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
}

// loseGuest ends a pod whose post-copy migration broke after the switch: its QEMU has
// only part of the guest's memory and the rest is on the other side, so its container
// exits 1 with the reason (the VM's run strategy decides what boots next).
func (c *computeVM) loseGuest(ctx context.Context, why error) {
	log.G(ctx).WithError(why).Error("migration: post-copy broke after the switch: the guest is lost")
	c.mu.Lock()
	c.decided = &runtime.Exit{Status: 1, Reason: vmspec.MigrationFailedReason + ": the guest was lost: " + why.Error()}
	c.mu.Unlock()
	c.machine.Quit(context.WithoutCancel(ctx))
	c.machine.KillProcess()
}

// acceptSource accepts connections on l until it has the source's control and stream
// connections, each past the TLS handshake (a connection that fails it is dropped: a port
// scan does not end the wait), for up to wait or until QEMU exits. Handshakes run side by
// side, so a peer that connects and stalls holds up nobody. It closes l.
func acceptSource(ctx context.Context, l net.Listener, cfg *tls.Config, wait time.Duration, qemuDone <-chan struct{}) (control, stream net.Conn, err error) {
	control, stream, _, err = acceptLinks(ctx, l, cfg, wait, qemuDone, 0)
	return control, stream, err
}

// acceptLinks is acceptSource that also waits for mirrors connections of roleMirror (a
// container pod's writes, docs/design/212).
func acceptLinks(ctx context.Context, l net.Listener, cfg *tls.Config, wait time.Duration, qemuDone <-chan struct{}, mirrors int) (control, stream net.Conn, mirrored []net.Conn, err error) {
	deadline := time.Now().Add(wait)
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		select {
		case <-qemuDone:
			_ = l.Close()
		case <-stop:
		}
	}()
	defer l.Close()
	if tl, ok := l.(*net.TCPListener); ok {
		_ = tl.SetDeadline(deadline)
	}
	type introduced struct {
		conn net.Conn
		role byte
	}
	arrived := make(chan introduced)
	accepted := make(chan error, 1)
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				accepted <- err
				return
			}
			if err := abandonUnanswered(conn); err != nil {
				log.G(ctx).WithError(err).Warnf("migration target: a connection from %s", conn.RemoteAddr())
				conn.Close()
				continue
			}
			go func() {
				tc := tls.Server(conn, cfg)
				role, err := handshake(tc)
				if err != nil {
					log.G(ctx).WithError(err).Warnf("migration target: refused a connection from %s", conn.RemoteAddr())
					tc.Close()
					return
				}
				select {
				case arrived <- introduced{tc, role}:
				case <-stop:
					tc.Close()
				}
			}()
		}
	}()
	for control == nil || stream == nil || len(mirrored) < mirrors {
		select {
		case in := <-arrived:
			switch {
			case in.role == roleControl && control == nil:
				control = in.conn
			case in.role == roleStream && stream == nil:
				stream = in.conn
			case in.role == roleMirror && len(mirrored) < mirrors:
				mirrored = append(mirrored, in.conn)
			default:
				log.G(ctx).Warnf("migration target: refused an extra connection (role %q) from %s", in.role, in.conn.RemoteAddr())
				in.conn.Close()
			}
		case err := <-accepted:
			for _, c := range append([]net.Conn{control, stream}, mirrored...) {
				if c != nil {
					c.Close()
				}
			}
			select {
			case <-qemuDone:
				return nil, nil, nil, errors.New("QEMU exited while waiting for the source")
			default:
			}
			if time.Now().After(deadline) {
				return nil, nil, nil, fmt.Errorf("the source did not connect within %v (its %d connections)", wait, 2+mirrors)
			}
			return nil, nil, nil, fmt.Errorf("accept: %w", err)
		}
	}
	return control, stream, mirrored, nil
}

// handshake completes a server-side TLS handshake and reads the role byte after it.
func handshake(tc *tls.Conn) (byte, error) {
	_ = tc.SetDeadline(time.Now().Add(migrationHandshakeWait))
	defer tc.SetDeadline(time.Time{})
	if err := tc.Handshake(); err != nil {
		return 0, err
	}
	var b [1]byte
	if _, err := io.ReadFull(tc, b[:]); err != nil {
		return 0, fmt.Errorf("role: %w", err)
	}
	return b[0], nil
}

// failTarget ends a migration target whose guest did not arrive: its container exits 1
// with the reason.
func (c *computeVM) failTarget(ctx context.Context, why error) {
	log.G(ctx).WithError(why).Error("migration target: the guest did not arrive")
	c.mu.Lock()
	c.decided = &runtime.Exit{Status: 1, Reason: vmspec.MigrationFailedReason + ": " + why.Error()}
	c.mu.Unlock()
	c.machine.Quit(ctx)
	c.machine.KillProcess() // if even quit did not end it
}

// migrate answers vmspec.MigrateCommand: it sends the running guest to the target the
// request names, printing progress as vmspec.MigrationProgress lines to out. On success the
// guest runs in the target pod and this container exits 0 (vmspec.MigratedReason); on
// failure or a cancel (vmspec.MigrateCancelCommand, or the exec ended) the guest runs on
// here as before.
func (c *computeVM) migrate(ctx context.Context, input []byte, out io.Writer) error {
	const cmd = vmspec.MigrateCommand
	if len(input) == 0 {
		return fmt.Errorf("%s: the request goes on stdin (exec -i), as JSON: %w", cmd, errdefs.ErrInvalidArgument)
	}
	req, err := vmspec.ParseMigrationRequest(input)
	if err != nil {
		return fmt.Errorf("%s: %w: %w", cmd, err, errdefs.ErrInvalidArgument)
	}
	cfg, err := req.TLS.Config()
	if err != nil {
		return fmt.Errorf("%s: request.tls: %w: %w", cmd, err, errdefs.ErrInvalidArgument)
	}
	// no attach, detach, resize or pause while the guest moves
	if !c.hotMu.TryLock() {
		return fmt.Errorf("%s: a disk is being attached or detached, or the VM resized: migrate after it: %w", cmd, errdefs.ErrFailedPrecondition)
	}
	defer c.hotMu.Unlock()
	if err := c.migratable(); err != nil {
		return fmt.Errorf("%s: this VM cannot migrate: %w: %w", cmd, err, errdefs.ErrFailedPrecondition)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	c.mu.Lock()
	switch {
	case c.migrating != nil:
		c.mu.Unlock()
		return fmt.Errorf("%s: a migration of this VM is in flight: %w", cmd, errdefs.ErrAlreadyExists)
	case c.awaiting:
		c.mu.Unlock()
		return fmt.Errorf("%s: this VM's own guest has not arrived: %w", cmd, errdefs.ErrFailedPrecondition)
	case !c.running || c.paused:
		c.mu.Unlock()
		return fmt.Errorf("%s: the VM is not running: %w", cmd, errdefs.ErrFailedPrecondition)
	}
	flight := &outgoing{cancel: cancel, done: make(chan struct{})}
	c.migrating = flight
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.migrating = nil
		c.mu.Unlock()
		close(flight.done)
	}()
	lg := log.G(ctx).WithField("pod", c.pod.id)
	rep := newMigrationReport(lg, out)
	defer rep.close()
	report, fail := rep.progress, rep.fail

	dialCtx, cancelDial := context.WithTimeout(ctx, migrationDialWait)
	control, err := dialTarget(dialCtx, c.pod.netns, req.Target, cfg, roleControl)
	if err != nil {
		cancelDial()
		return fail(err)
	}
	defer control.Close()
	stream, err := dialTarget(dialCtx, c.pod.netns, req.Target, cfg, roleStream)
	cancelDial()
	if err != nil {
		return fail(err)
	}
	defer stream.Close()
	shape, err := c.shape() // hotMu is held
	if err != nil {
		return fail(err)
	}
	if err := sayShape(ctx, control, switchover{Shape: &shape}); err != nil {
		return fail(err)
	}
	qemuEnd, shimEnd, err := streamPair()
	if err != nil {
		return fail(err)
	}
	defer shimEnd.Close()
	sent := sendStream(stream, shimEnd)

	o := req.Options
	gib := (c.pod.vm.MemoryMiB + 1023) / 1024
	opts := vmm.MigrationOptions{
		MaxBandwidth:      uint64(o.BandwidthMiB) << 20,
		DowntimeLimit:     time.Duration(o.DowntimeLimitMs) * time.Millisecond,
		AutoConverge:      o.AutoConverge,
		CompletionTimeout: time.Duration(int64(o.CompletionTimeoutPerGiB)*gib) * time.Second,
		ProgressTimeout:   time.Duration(o.ProgressTimeoutSeconds) * time.Second,
		PostCopy:          o.AllowPostCopy,
	}
	var (
		last       time.Time
		switched   = make(chan struct{}) // closed once QEMU runs the migration as post-copy
		switchOnce sync.Once
	)
	opts.Progress = func(info qmp.MigrationInfo) {
		if info.Status == qmp.MigrationPostcopyActive {
			switchOnce.Do(func() { close(switched) })
		}
		if time.Since(last) < progressEvery {
			return
		}
		last = time.Now()
		report(progressOf(info))
	}
	if o.AllowPostCopy {
		go copyReturnPath(shimEnd, stream)
	}
	lg.Infof("migrating to %s (%d MiB/s, auto-converge %v, post-copy allowed %v)", req.Target, o.BandwidthMiB, o.AutoConverge, o.AllowPostCopy)
	done := make(chan migrated, 1)
	go func() {
		info, err := c.machine.Migrate(ctx, qemuEnd, opts)
		qemuEnd.Close()
		done <- migrated{info, err}
	}()
	var r migrated
	select {
	case r = <-done:
		if errors.Is(r.err, vmm.ErrPostCopyUnconfirmed) { // switched, and ended unconfirmed, between two polls
			again := make(chan migrated, 1)
			again <- r
			return c.handOverPostCopy(ctx, control, again, req.Target, report, fail)
		}
	case <-switched:
		return c.handOverPostCopy(ctx, control, done, req.Target, report, fail)
	}
	info, err := r.info, r.err
	if errors.Is(err, vmm.ErrPostCopyBroken) { // switched and broke between two polls
		return c.lostInPostCopy(ctx, err, fail)
	}
	if err != nil {
		// QEMU may have completed (and stopped the guest) after all, e.g. when it stopped
		// answering: no commit went out, so the guest is this pod's to run on
		return fail(c.resumeIfCompleted(ctx, err))
	}
	// QEMU stopped the guest here for good unless told to resume it (postmigrate): wait for
	// the target's word before either side runs it
	if err := awaitLoaded(control, sent); err == nil && ctx.Err() != nil {
		// cancelled at the last moment: the target has the guest but no commit, so it
		// keeps it paused; the guest goes on here
		lg.Warn("migration: cancelled after the target loaded the guest; resuming it here")
		if rerr := c.machine.Resume(context.WithoutCancel(ctx)); rerr != nil {
			return fail(fmt.Errorf("%w (cancelled); and resuming the guest here failed: %w", vmm.ErrMigrationCancelled, rerr))
		}
		return fail(fmt.Errorf("%w; the guest runs on here", vmm.ErrMigrationCancelled))
	} else if err != nil {
		lg.WithError(err).Warn("migration: the target did not take the guest; resuming it here")
		if rerr := c.machine.Resume(context.WithoutCancel(ctx)); rerr != nil {
			return fail(fmt.Errorf("%w; and resuming the guest here failed: %w", err, rerr))
		}
		return fail(fmt.Errorf("%w; the guest runs on here", err))
	}
	// From here the guest is the target's: whatever happens to the commit, this QEMU never
	// runs it again (a target without the commit keeps it paused).
	c.mu.Lock()
	c.decided = &runtime.Exit{Status: 0, Reason: fmt.Sprintf("%s: the guest moved to %s (downtime %v, %d MiB sent)", vmspec.MigratedReason, req.Target, info.Downtime, info.Transferred()>>20)}
	c.mu.Unlock()
	c.pod.mu.Lock()
	c.pod.migratedTo = req.Target
	c.pod.mu.Unlock()
	if err := writeSwitchover(control, switchover{Commit: true}); err != nil {
		lg.WithError(err).Error("migration: the commit did not reach the target: the guest stays paused there")
	}
	c.machine.Quit(context.WithoutCancel(ctx))
	c.machine.KillProcess() // if quit did not end it: this QEMU must never run the guest again
	report(progressOf(info))
	lg.Infof("migrated to %s in %v (downtime %v, %d MiB sent)", req.Target, info.TotalTime, info.Downtime, info.Transferred()>>20)
	return nil
}

// sendStream copies QEMU's migration stream from shimEnd to the target's stream
// connection; the channel gets the copy's end (nil: the stream's last byte left).
func sendStream(stream net.Conn, shimEnd *net.UnixConn) <-chan error {
	sent := make(chan error, 1)
	go func() {
		_, err := io.Copy(stream, shimEnd) // ends when QEMU closes its end, after the last byte
		if err != nil {
			// the target went away: QEMU must hear of it (a full socket pair would hold it
			// until the progress timeout)
			_ = shimEnd.Close()
		} else if cw, ok := stream.(interface{ CloseWrite() error }); ok {
			err = cw.CloseWrite()
		}
		sent <- err
	}()
	return sent
}

// migrated is what Migrate returned.
type migrated struct {
	info qmp.MigrationInfo
	err  error
}

// handOverPostCopy ends a migration QEMU switched to post-copy (done delivers Migrate's
// return). The guest stopped here at the switch and its memory is no longer whole here
// while pages travel, so the target gets the commit as soon as it has the guest's devices,
// and this QEMU serves the pages the target asks for until the last. A target that never
// says it has the guest keeps it paused (no commit): if the migration still completes,
// the guest here is whole and resumes, as after a pre-copy; if it breaks, the guest is
// lost (lostInPostCopy). A migration QEMU never ends although every page went
// (vmm.ErrPostCopyUnconfirmed) is the target's once it said it has the guest, and lost
// otherwise.
func (c *computeVM) handOverPostCopy(ctx context.Context, control net.Conn, done <-chan migrated, target string, report func(vmspec.MigrationProgress), fail func(error) error) error {
	lg := log.G(ctx).WithField("pod", c.pod.id)
	lg.Warn("migration: switched to post-copy: the guest stopped here and runs in the target pod once it has its devices")
	loaded := make(chan error, 1)
	go func() { loaded <- readLoaded(control) }()
	var r *migrated
	select {
	case err := <-loaded:
		if err != nil {
			return c.resumeAfterPostCopy(ctx, <-done, err, fail)
		}
	case m := <-done:
		if m.err != nil && !errors.Is(m.err, vmm.ErrPostCopyUnconfirmed) {
			return c.lostInPostCopy(ctx, m.err, fail)
		}
		r = &m
		if err := <-loaded; err != nil {
			return c.resumeAfterPostCopy(ctx, m, err, fail)
		}
	}
	c.mu.Lock()
	c.decided = &runtime.Exit{Status: 0, Reason: fmt.Sprintf("%s: the guest moved to %s (post-copy)", vmspec.MigratedReason, target)}
	c.mu.Unlock()
	c.pod.mu.Lock()
	c.pod.migratedTo = target
	c.pod.mu.Unlock()
	if err := writeSwitchover(control, switchover{Commit: true}); err != nil {
		lg.WithError(err).Error("migration: the commit did not reach the target: the guest stays paused there")
	}
	if r == nil {
		m := <-done // the target runs the guest; the pages it has not fetched yet are sent
		r = &m
	}
	if r.err != nil && !errors.Is(r.err, vmm.ErrPostCopyUnconfirmed) {
		return c.lostInPostCopy(ctx, r.err, fail)
	}
	if r.err != nil {
		// the target said it has the guest and runs it, and QEMU sent every page: only
		// QEMU's own end never came (design 209)
		lg.WithError(r.err).Warn("migration: QEMU did not confirm the post-copy's end; the target has every page and runs the guest")
	}
	c.machine.Quit(context.WithoutCancel(ctx))
	c.machine.KillProcess()
	report(progressOf(r.info))
	lg.Infof("migrated to %s by post-copy in %v (downtime %v, %d MiB sent)", target, r.info.TotalTime, r.info.Downtime, r.info.Transferred()>>20)
	return nil
}

// resumeAfterPostCopy ends a post-copy the target never took (why): no commit went out,
// so the target keeps its copy paused. If QEMU completed the migration the guest is whole
// here and runs on (QEMU reactivates its disks on the resume); if not, it is lost.
func (c *computeVM) resumeAfterPostCopy(ctx context.Context, m migrated, why error, fail func(error) error) error {
	if m.err != nil {
		return c.lostInPostCopy(ctx, fmt.Errorf("%w; and then: %w", why, m.err), fail)
	}
	log.G(ctx).WithField("pod", c.pod.id).WithError(why).Warn("migration: the target did not take the guest after post-copy completed; resuming it here")
	if err := c.machine.Resume(context.WithoutCancel(ctx)); err != nil {
		return c.lostInPostCopy(ctx, fmt.Errorf("%w; and resuming the guest here failed: %w", why, err), fail)
	}
	return fail(fmt.Errorf("%w; the guest runs on here", why))
}

// lostInPostCopy ends the source of a post-copy that broke (why): the guest's memory is
// split between the pods, so this one ends too (loseGuest).
func (c *computeVM) lostInPostCopy(ctx context.Context, why error, fail func(error) error) error {
	if !errors.Is(why, vmm.ErrPostCopyBroken) {
		why = fmt.Errorf("post-copy: %w: %w", why, vmm.ErrPostCopyBroken)
	}
	c.loseGuest(ctx, why)
	return fail(why)
}

// awaitLoaded waits for the stream's last byte to leave and the target's word that it has
// the guest.
func awaitLoaded(control net.Conn, sent <-chan error) error {
	select {
	case err := <-sent:
		if err != nil {
			return fmt.Errorf("send the stream's end: %w", err)
		}
	case <-time.After(switchoverWait):
		return fmt.Errorf("the stream's end did not leave within %v", switchoverWait)
	}
	return readLoaded(control)
}

// readLoaded reads the target's word at the switchover: nil if it has the guest.
func readLoaded(control net.Conn) error {
	return readWord(control, "it has the guest", func(m switchover) bool { return m.Loaded })
}

// readWord reads the target's next message: nil if said holds for it; its error, or a
// silence on what (the word expected), otherwise.
func readWord(control net.Conn, what string, said func(switchover) bool) error {
	msg, err := readSwitchover(control, switchoverWait)
	switch {
	case err != nil:
		return fmt.Errorf("the target's word (%s): %w", what, err)
	case msg.Error != "":
		return fmt.Errorf("the target: %s", msg.Error)
	case !said(msg):
		return fmt.Errorf("the target did not say %s", what)
	}
	return nil
}

// outgoing is a migration away from here in flight.
type outgoing struct {
	cancel context.CancelFunc
	done   chan struct{} // closed when migrate has returned
}

// cancelWait bounds how long a cancel waits for the migration in flight to end.
const cancelWait = 2 * time.Minute

// cancelMigration answers vmspec.MigrateCancelCommand: the migration in flight is
// cancelled, and once it has ended the answer says where the guest is (a cancel that came
// after the switchover finds it moved). Without a migration it says where the guest is.
func (c *computeVM) cancelMigration(ctx context.Context) (string, error) {
	c.mu.Lock()
	flight := c.migrating
	c.mu.Unlock()
	return cancelFlight(log.WithLogger(ctx, log.G(ctx).WithField("pod", c.pod.id)), flight, func() string {
		c.pod.mu.Lock()
		defer c.pod.mu.Unlock()
		return c.pod.migratedTo
	})
}

// cancelFlight cancels the migration in flight (nil: none), waits for it to end, and
// answers where the guest is then (movedTo: "" while it is here).
func cancelFlight(ctx context.Context, flight *outgoing, movedTo func() string) (string, error) {
	answer := vmspec.MigrationCancelled{}
	if flight != nil {
		answer.WasInFlight = true
		flight.cancel()
		select {
		case <-flight.done:
		case <-time.After(cancelWait):
			return "", fmt.Errorf("%s: the migration did not end within %v of its cancel: %w", vmspec.MigrateCancelCommand, cancelWait, errdefs.ErrUnavailable)
		}
	}
	answer.MovedTo = movedTo()
	answer.GuestMoved = answer.MovedTo != ""
	log.G(ctx).Infof("migration cancel: %+v", answer)
	out, err := json.Marshal(answer)
	return string(out), err
}

// resumeIfCompleted resumes the guest if QEMU completed the migration (postmigrate) though
// Migrate failed: no commit was sent, so no other pod runs it. It returns why as err says.
func (c *computeVM) resumeIfCompleted(ctx context.Context, why error) error {
	st, err := c.machine.Monitor().Status(context.WithoutCancel(ctx))
	if err != nil || st.State != qmp.RunStatePostMigrate {
		return why
	}
	if err := c.machine.Resume(context.WithoutCancel(ctx)); err != nil {
		return fmt.Errorf("%w; QEMU had completed, and resuming the guest here failed: %w", why, err)
	}
	return fmt.Errorf("%w; QEMU had completed, the guest was resumed here", why)
}

// dialTarget connects to the target at addr from network namespace netns and introduces
// the connection by role after the TLS handshake.
func dialTarget(ctx context.Context, netns, addr string, cfg *tls.Config, role byte) (net.Conn, error) {
	conn, err := network.DialInNetnsContext(ctx, netns, addr)
	if err != nil {
		return nil, fmt.Errorf("connect to the target %s: %w", addr, err)
	}
	if err := abandonUnanswered(conn); err != nil {
		conn.Close()
		return nil, fmt.Errorf("target %s: %w", addr, err)
	}
	tc := tls.Client(conn, cfg)
	if dl, ok := ctx.Deadline(); ok {
		_ = tc.SetDeadline(dl)
	}
	if err := tc.HandshakeContext(ctx); err != nil {
		tc.Close()
		return nil, fmt.Errorf("target %s: TLS: %w", addr, err)
	}
	if _, err := tc.Write([]byte{role}); err != nil {
		tc.Close()
		return nil, fmt.Errorf("target %s: %w", addr, err)
	}
	_ = tc.SetDeadline(time.Time{})
	return tc, nil
}

// peerSilence bounds how long bytes sent to the other shim may go unacknowledged before
// the connection is given up (TCP_USER_TIMEOUT). A peer whose pod's network went before
// its shim closed the connection (a target pod deleted mid-stream: the kubelet tears the
// netns down) never resets it: without a bound the source's QEMU waits on a full send
// buffer until the progress timeout (seen once: 150 s), or for ever once switched to
// post-copy. A live peer acknowledges what it receives even while it does not read.
const peerSilence = 60 * time.Second

// abandonUnanswered makes conn, a TCP connection between the migration's shims, fail once
// what it sent has gone unacknowledged for peerSilence.
func abandonUnanswered(conn net.Conn) error {
	tcp, ok := conn.(*net.TCPConn)
	if !ok {
		return nil
	}
	raw, err := tcp.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, int(peerSilence.Milliseconds()))
	}); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("TCP_USER_TIMEOUT: %w", serr)
	}
	return nil
}

// progressOf is the progress line of QEMU's account.
func progressOf(info qmp.MigrationInfo) vmspec.MigrationProgress {
	p := vmspec.MigrationProgress{Status: string(info.Status), ElapsedMs: info.TotalTime.Milliseconds(), DowntimeMs: info.Downtime.Milliseconds(), Error: info.ErrorDesc}
	if info.RAM != nil {
		p.TotalBytes, p.TransferredBytes, p.RemainingBytes, p.DirtyPagesRate = info.RAM.Total, info.Transferred(), info.Remaining(), info.RAM.DirtyPagesRate
	}
	return p
}

// streamPair is a connected socket pair: one end for QEMU, one the shim copies through.
func streamPair() (qemuEnd *os.File, shimEnd *net.UnixConn, err error) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("migration stream: %w", err)
	}
	qemuEnd = os.NewFile(uintptr(fds[0]), "migration-qemu")
	shim := os.NewFile(uintptr(fds[1]), "migration-shim")
	defer shim.Close() // FileConn keeps a copy
	conn, err := net.FileConn(shim)
	if err != nil {
		qemuEnd.Close()
		return nil, nil, fmt.Errorf("migration stream: %w", err)
	}
	return qemuEnd, conn.(*net.UnixConn), nil
}

// maxSwitchover bounds a switchover message, its newline included.
const maxSwitchover = 64 << 10

func writeSwitchover(conn net.Conn, m switchover) error {
	b, _ := json.Marshal(m)
	if len(b) >= maxSwitchover {
		// the peer would read a cut line: say what is too big instead
		return fmt.Errorf("a switchover message of %d bytes, more than the %d one carries (a pod of very many containers or mounts)", len(b), maxSwitchover-1)
	}
	_ = conn.SetWriteDeadline(time.Now().Add(switchoverWait))
	_, err := conn.Write(append(b, '\n'))
	return err
}

// readSwitchover reads one message within wait: each side reads one, so a buffer that reads
// ahead loses nothing.
func readSwitchover(conn net.Conn, wait time.Duration) (switchover, error) {
	_ = conn.SetReadDeadline(time.Now().Add(wait))
	defer conn.SetReadDeadline(time.Time{})
	line, err := bufio.NewReaderSize(io.LimitReader(conn, maxSwitchover), maxSwitchover).ReadBytes('\n')
	if err != nil {
		return switchover{}, err
	}
	// strictly: a peer's field this shim does not know (a newer one's device, say) must
	// refuse the migration here, not be dropped and fail the stream later
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	var m switchover
	if err := dec.Decode(&m); err != nil {
		return switchover{}, fmt.Errorf("a switchover message: %w", err)
	}
	return m, nil
}
