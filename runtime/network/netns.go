package network

import (
	"errors"
	"fmt"
	"runtime"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// podNetns is an open pod network namespace: its file (which keeps it alive) and a netlink
// handle whose sockets live in it. Every netlink call of this package goes through the
// handle; no thread of the process has to enter the netns for them.
type podNetns struct {
	path   string
	ns     netns.NsHandle
	handle *netlink.Handle
}

// openNetns opens the network namespace bind-mounted (or linked, /proc/<pid>/ns/net) at
// path. It refuses anything that is not a network namespace, and the shim's own one:
// redirecting the host's interfaces into a VM would cut the node off.
func openNetns(path string) (_ *podNetns, retErr error) {
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return nil, fmt.Errorf("open: %w", err)
	}
	defer func() {
		if retErr != nil {
			_ = ns.Close()
		}
	}()
	if err := checkIsNetns(int(ns)); err != nil {
		return nil, err
	}
	// The calling thread's netns is the process's: threads only leave it locked, as
	// inNetns does.
	own, err := netns.Get()
	if err != nil {
		return nil, fmt.Errorf("open the shim's own netns to compare: %w", err)
	}
	defer own.Close()
	if ns.Equal(own) {
		return nil, errors.New("is the shim's own network namespace, not a pod's: refusing to redirect the host's interfaces")
	}
	handle, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, fmt.Errorf("netlink socket in the netns: %w", err)
	}
	return &podNetns{path: path, ns: ns, handle: handle}, nil
}

// checkIsNetns tells a network namespace from other files with a message that says what
// the file is instead.
func checkIsNetns(fd int) error {
	var fs unix.Statfs_t
	if err := unix.Fstatfs(fd, &fs); err != nil {
		return fmt.Errorf("statfs: %w", err)
	}
	if fs.Type != unix.NSFS_MAGIC {
		return errors.New("not a namespace file (want a bind mount of /proc/<pid>/ns/net, as CNI and containerd make)")
	}
	nstype, err := unix.IoctlRetInt(fd, unix.NS_GET_NSTYPE)
	if err != nil {
		return fmt.Errorf("ioctl NS_GET_NSTYPE: %w", err)
	}
	if nstype != unix.CLONE_NEWNET {
		return fmt.Errorf("is a %s namespace, not a network namespace", nsTypeName(nstype))
	}
	return nil
}

func nsTypeName(t int) string {
	switch t {
	case unix.CLONE_NEWNS:
		return "mount"
	case unix.CLONE_NEWUTS:
		return "uts"
	case unix.CLONE_NEWIPC:
		return "ipc"
	case unix.CLONE_NEWUSER:
		return "user"
	case unix.CLONE_NEWPID:
		return "pid"
	case unix.CLONE_NEWCGROUP:
		return "cgroup"
	case unix.CLONE_NEWTIME:
		return "time"
	}
	return fmt.Sprintf("type %#x", t)
}

func (p *podNetns) close() error {
	p.handle.Close()
	return p.ns.Close()
}

// inNetns runs fn on an OS thread that has entered ns, then moves the thread back.
//
// setns(2) changes the calling thread only, and Go moves goroutines between threads, so fn
// runs in a goroutine of its own, locked to its thread from before setns until after the
// thread is back. If it cannot get back, the goroutine exits still locked and Go ends the
// thread instead of lending a thread in the pod's netns to other goroutines. Threads Go
// starts meanwhile are not cloned from a locked thread (Go 1.10+), so they do not inherit
// the pod's netns.
func inNetns(ns netns.NsHandle, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("get the thread's netns: %w", err)
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			runtime.UnlockOSThread() // setns failed: the thread is where it was
			errc <- fmt.Errorf("enter netns: %w", err)
			return
		}
		fnErr := fn()
		if err := netns.Set(orig); err != nil {
			errc <- errors.Join(fnErr, fmt.Errorf("return to the original netns: %w", err))
			return // still locked: the thread dies with this goroutine
		}
		runtime.UnlockOSThread()
		errc <- fnErr
	}()
	return <-errc
}
