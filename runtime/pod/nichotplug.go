package pod

import (
	"context"
	"fmt"
	"maps"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/runtime/network"
	"github.com/vmpod/vmpod/runtime/vmm"
)

// An interface added to or removed from a running pod's netns (multus' dynamic networks
// controller runs CNI ADD and DEL on a live pod) reaches its q35 VM as a NIC plugged or
// unplugged; the guest gets its configuration from the agent (container pods) or by
// DHCP (VM pods): docs/design/205.

// nicSettle is how long the netns must be quiet before it is read again: CNI makes a
// link, names it, addresses it and sets it up in several steps.
const nicSettle = time.Second

// nicUnplugWait bounds the unplug that undoes a failed plug: the guest must let go.
const nicUnplugWait = 30 * time.Second

// nicFollower follows a pod's netns for one running VM and plugs and unplugs its NICs.
type nicFollower struct {
	pod     string
	network *network.Plumbing
	machine *vmm.Machine
	// configure gives the guest a plugged NIC's configuration, or readies the host for the
	// guest to ask (DHCP, before the plug); the returned func undoes it. iface's MAC is
	// the guest NIC's.
	configure func(ctx context.Context, plan *network.Plan, iface network.Interface) (undo func() error, err error)
	// configureFirst: configure before the plug (a DHCP server must answer the guest's
	// first request), else after (the agent finds the NIC by its MAC)
	configureFirst bool
	// busy is held while the follower plugs or unplugs, as the VM's other device changes
	// hold it (the VM's hotMu): a migration sends the NICs it found, and a target plugs
	// the source's (adopt) before the follower reads its netns again.
	busy *sync.Mutex
	// waiting says the VM is a migration target whose guest has not arrived: a NIC plugged
	// now would be a device the stream does not carry, so links wait for wake
	waiting func() bool
	wake    chan struct{} // a sync is due (the guest arrived)

	// guarded by busy:
	// kept are pod interfaces that stay out of the guest (ifindex by name): a VM pod's
	// spec names the pod interfaces its VM boots with, and the others in the netns when
	// the pod was plumbed are not the VM's
	kept   map[string]int
	next   int
	warned map[string]bool // links already logged as not reaching the guest

	// mu guards ids and stopped, which release reads without busy: a stopping VM must not
	// wait for a device change (a migration holds busy for minutes)
	mu      sync.Mutex
	ids     map[string]*hotNIC // by link name; written with busy held too
	stopped bool               // released: nothing is plugged any more

	done chan struct{}
}

// hotNIC is a NIC the follower plugged.
type hotNIC struct {
	id     string
	mac    string       // the guest NIC's
	undoFn func() error // its configuration's undo, or nil
}

// follow starts following until ctx ends; f.done closes when it has stopped and removed
// what it plumbed.
func (f *nicFollower) follow(ctx context.Context) {
	f.ids, f.warned, f.done, f.wake = map[string]*hotNIC{}, map[string]bool{}, make(chan struct{}), make(chan struct{}, 1)
	go func() {
		defer close(f.done)
		f.run(ctx)
		f.release(log.G(ctx).WithField("pod", f.pod))
	}()
}

func (f *nicFollower) run(ctx context.Context) {
	lg := log.G(ctx).WithField("pod", f.pod)
	for ctx.Err() == nil {
		changes, err := f.network.Watch(ctx)
		if err != nil {
			lg.WithError(err).Warn("pod network: interfaces added later will not reach the guest")
			return
		}
		// an interface may have come between the plumbing (or a lost watch) and this one
		f.sync(ctx)
		f.follow1(ctx, changes)
		if ctx.Err() == nil {
			// the subscription broke (netlink drops it on a receive error such as ENOBUFS)
			lg.Warn("pod network: the netns watch ended; watching again")
			select {
			case <-ctx.Done():
			case <-time.After(nicSettle):
			}
		}
	}
}

// lock takes busy, unless ctx ends first (the VM stops while a migration, an attach or a
// resize holds it). sync.Mutex has no wait that a context ends, hence the polling; a
// device change is rare, and a wait is as long as one.
func (f *nicFollower) lock(ctx context.Context) bool {
	for !f.busy.TryLock() {
		select {
		case <-ctx.Done():
			return false
		case <-time.After(50 * time.Millisecond):
		}
	}
	if ctx.Err() != nil {
		f.busy.Unlock()
		return false
	}
	return true
}

// wakeUp has the follower read the netns again: a migration target's guest arrived.
func (f *nicFollower) wakeUp() {
	if f == nil { // a VM without a network
		return
	}
	select {
	case f.wake <- struct{}{}:
	default: // one is due already
	}
}

// follow1 syncs after each quiet spell of changes, and when woken, until changes closes.
func (f *nicFollower) follow1(ctx context.Context, changes <-chan struct{}) {
	for {
		select {
		case _, ok := <-changes:
			if !ok {
				return
			}
		case <-f.wake:
			f.sync(ctx)
			continue
		}
		quiet := time.NewTimer(nicSettle)
	settle:
		for {
			select {
			case _, ok := <-changes:
				if !ok {
					quiet.Stop()
					return
				}
				quiet.Reset(nicSettle)
			case <-quiet.C:
				break settle
			}
		}
		f.sync(ctx)
	}
}

// sync plugs a NIC for each interface the netns gained and unplugs those of the
// interfaces it lost.
func (f *nicFollower) sync(ctx context.Context) {
	if !f.lock(ctx) {
		return // the VM stopped while another device change held busy
	}
	defer f.busy.Unlock()
	lg := log.G(ctx).WithField("pod", f.pod)
	if f.waiting != nil && f.waiting() {
		lg.Info("pod network: the VM waits for its migrating guest: interfaces added meanwhile get their NICs once it has arrived")
		return
	}
	added, removed, err := f.network.Rescan()
	if err != nil {
		lg.WithError(err).Warn("pod network: read the netns again")
		return
	}
	for _, name := range removed {
		nic, ok := f.lookup(name)
		if !ok {
			if !f.warned[name] {
				f.warned[name] = true
				lg.Warnf("pod network: %s left the netns; the guest keeps the NIC it booted with until the VM ends", name)
			}
			continue
		}
		uctx, cancel := context.WithTimeout(ctx, nicUnplugWait) // busy is held: the guest must answer in time
		err := f.machine.UnplugNIC(uctx, nic.id)
		cancel()
		if err != nil {
			lg.WithError(err).Warnf("pod network: %s left the netns", name)
			continue
		}
		f.forget(name)
		if nic.undoFn != nil {
			if err := nic.undoFn(); err != nil {
				lg.WithError(err).Warnf("pod network: %s", name)
			}
		}
		if err := f.network.Remove(name); err != nil {
			lg.WithError(err).Warnf("pod network: %s", name)
		}
		lg.Infof("pod network: %s left the netns: its NIC is unplugged", name)
	}
	for _, iface := range added.Interfaces {
		if idx, ok := f.kept[iface.Name]; ok && idx == iface.Index {
			continue
		}
		if t := f.machine.Config().Type; t != machine.Q35 {
			if !f.warned[iface.Name] {
				f.warned[iface.Name] = true
				lg.Warnf("pod network: %s joined the netns, but machine %s has no hotplug: the guest gets it when the pod is recreated (on q35 it is plugged in)", iface.Name, t)
			}
			continue
		}
		id, err := f.plug(ctx, added, iface, nil, "")
		if err != nil {
			lg.WithError(err).Warnf("pod network: %s joined the netns", iface.Name)
			continue
		}
		lg.Infof("pod network: %s joined the netns: plugged in as %s (%s)", iface.Name, id, iface.MAC)
	}
}

// plug makes iface (of plan, a Rescan's) a guest NIC: its tap, the device, its
// configuration. mac, if given, is the guest NIC's instead of the link's, and port the
// root port to plug it on ("": the lowest free one). It returns the device's id. On
// failure nothing is left. Called with busy held.
func (f *nicFollower) plug(ctx context.Context, plan *network.Plan, iface network.Interface, mac net.HardwareAddr, port string) (id string, retErr error) {
	nic, err := f.network.Add(iface)
	if err != nil {
		return "", err
	}
	if mac != nil {
		iface.MAC, nic.MAC = mac, mac.String()
	}
	var undo []func() error
	defer func() {
		if retErr != nil {
			for i := len(undo) - 1; i >= 0; i-- {
				if err := undo[i](); err != nil {
					retErr = fmt.Errorf("%w (undoing: %v)", retErr, err)
				}
			}
		}
	}()
	undo = append(undo, func() error {
		if _, held := f.lookup(iface.Name); held {
			return nil // its NIC is still plugged: see the unplug's undo
		}
		return f.network.Remove(iface.Name)
	})
	f.next++
	hot := &hotNIC{id: fmt.Sprintf("hotnic%d", f.next), mac: nic.MAC}
	if f.configureFirst {
		if hot.undoFn, err = f.configure(ctx, plan, iface); err != nil {
			return "", err
		}
		if hot.undoFn != nil {
			undo = append(undo, hot.undoFn)
		}
	}
	if err := f.machine.PlugNICAt(ctx, port, hot.id, nic); err != nil {
		return "", err
	}
	undo = append(undo, func() error {
		// on a context of its own: the plug may be undone because ctx ended (the VM stops)
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), nicUnplugWait)
		defer cancel()
		if err := f.machine.UnplugNIC(uctx, hot.id); err != nil {
			// the guest holds the NIC: its tap stays, and the follower keeps it to unplug
			// when the link goes (release removes the tap once the VM is gone; if that was
			// already, the first undo does)
			f.record(iface.Name, hot)
			return err
		}
		return nil
	})
	if !f.configureFirst {
		if hot.undoFn, err = f.configure(ctx, plan, iface); err != nil {
			return "", fmt.Errorf("configure NIC %s in the guest: %w", hot.id, err)
		}
	}
	if !f.record(iface.Name, hot) {
		return "", fmt.Errorf("NIC %s: the VM is stopping: %w", hot.id, errdefs.ErrFailedPrecondition)
	}
	return hot.id, nil
}

// lookup is the NIC plugged for the link named name.
func (f *nicFollower) lookup(name string) (*hotNIC, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	nic, ok := f.ids[name]
	return nic, ok
}

// record keeps nic as the link's, unless the follower has released what it had: then the
// caller undoes it.
func (f *nicFollower) record(name string, nic *hotNIC) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.stopped {
		return false
	}
	f.ids[name] = nic
	return true
}

// forget drops the link's NIC, unplugged.
func (f *nicFollower) forget(name string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.ids, name)
}

// shaped lists the NICs the follower plugged, for a migration's shape. Called with busy
// held.
func (f *nicFollower) shaped() ([]shapedNIC, error) {
	f.mu.Lock()
	ids := maps.Clone(f.ids)
	f.mu.Unlock()
	var out []shapedNIC
	for _, name := range slices.Sorted(maps.Keys(ids)) {
		nic := ids[name]
		port, ok := f.machine.DevicePort(nic.id)
		if !ok {
			return nil, fmt.Errorf("hot-plugged NIC %s (pod interface %s) has no root port", nic.id, name) // a bug
		}
		out = append(out, shapedNIC{Interface: name, MAC: nic.mac, Port: port})
	}
	return out, nil
}

// adopt plugs, in a migration target's VM, the NICs the source's follower plugged
// (checkShapedNICs passed): each mirrors the pod interface of the same name in this
// pod's netns — multus attached the source pod's networks to the target pod when it was
// made — with the MAC the guest knows, on the source's root port, before QEMU reads the
// stream. The follower then treats them as its own: the interface leaving unplugs the
// NIC. Called with busy held; on failure the NICs plugged so far stay for the VM's
// teardown (a target that refuses the guest ends).
func (f *nicFollower) adopt(ctx context.Context, shaped []shapedNIC) error {
	if len(shaped) == 0 {
		return nil
	}
	added, _, err := f.network.Rescan()
	if err != nil {
		return fmt.Errorf("read this pod's netns for the guest's hot-plugged NICs: %w", err)
	}
	for i, n := range shaped {
		if _, ok := f.lookup(n.Interface); ok {
			return fmt.Errorf("shape.nics[%d].interface: pod interface %s already has a NIC of this VM's, not on the guest's port %s: %w", i, n.Interface, n.Port, errdefs.ErrFailedPrecondition)
		}
		j := slices.IndexFunc(added.Interfaces, func(iface network.Interface) bool { return iface.Name == n.Interface })
		if j < 0 {
			return fmt.Errorf("shape.nics[%d].interface: the guest has a NIC for pod interface %s, which this pod's netns lacks or cannot mirror (the target pod needs the source pod's networks): %w", i, n.Interface, errdefs.ErrFailedPrecondition)
		}
		mac, _ := net.ParseMAC(n.MAC) // checked by checkShapedNICs
		if _, err := f.plug(ctx, added, added.Interfaces[j], mac, n.Port); err != nil {
			return fmt.Errorf("shape.nics[%d]: plug the guest's NIC for %s on %s: %w", i, n.Interface, n.Port, err)
		}
		delete(f.kept, n.Interface) // the pod's next VM plugs it too, as the source's would
	}
	return nil
}

// release removes what the follower plumbed once it stops: the VM that had the NICs is
// going (a pod's next VM follows the netns afresh and plugs them again). A plug that ends
// after it (a migration target's adopt, on the receiving goroutine) undoes itself.
func (f *nicFollower) release(lg *log.Entry) {
	f.mu.Lock()
	f.stopped = true
	ids := f.ids
	f.ids = map[string]*hotNIC{}
	f.mu.Unlock()
	for name, nic := range ids {
		if nic.undoFn != nil {
			if err := nic.undoFn(); err != nil {
				lg.WithError(err).Warnf("pod network: %s", name)
			}
		}
		if err := f.network.Remove(name); err != nil {
			lg.WithError(err).Warnf("pod network: %s", name)
		}
	}
}

// routesOut is plan's routes out of the interface named name.
func routesOut(plan *network.Plan, name string) []network.Route {
	var out []network.Route
	for _, r := range plan.Routes {
		if r.Device == name {
			out = append(out, r)
		}
	}
	return out
}

// nicConfigWait bounds the wait for a container pod's guest to have a plugged NIC.
const nicConfigWait = 10 * time.Second

// configureNIC has a container pod's agent configure a plugged NIC (found by its MAC):
// its addresses and MTU, and the routes out of it; again until the guest has it. The
// guest drops all of it with the NIC.
func (p *containerPod) configureNIC(ctx context.Context, plan *network.Plan, iface network.Interface) (func() error, error) {
	one := &network.Plan{Interfaces: []network.Interface{iface}, Routes: routesOut(plan, iface.Name)}
	req := &agentv1.SetupSandboxRequest{Interfaces: one.GuestInterfaces(), Routes: one.GuestRoutes()}
	ctx, cancel := context.WithTimeout(ctx, nicConfigWait)
	defer cancel()
	for {
		err := p.guest.Agent().SetupSandbox(ctx, req)
		if err == nil {
			return nil, nil
		}
		select {
		case <-ctx.Done():
			return nil, err
		case <-time.After(100 * time.Millisecond):
		}
	}
}
