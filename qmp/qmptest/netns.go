package qmptest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"
)

var netnsSeq atomic.Int32

// Netns is a throwaway named network namespace for taps.
type Netns struct {
	Name string
}

// NewNetns creates a network namespace ("ip netns add"). When the test ends it
// checks that no tap is left in it, deletes it and checks that it is gone.
func NewNetns(t testing.TB) *Netns {
	t.Helper()
	n := &Netns{Name: fmt.Sprintf("vmpod-test-%d-%d", os.Getpid(), netnsSeq.Add(1))}
	if out, err := exec.Command("ip", "netns", "add", n.Name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", n.Name, err, out)
	}
	t.Cleanup(func() {
		// Registered first, so this runs after QEMU is dead and the taps' fds
		// are closed: non-persistent taps must have vanished with them.
		if out, err := exec.Command("ip", "-n", n.Name, "-o", "link", "show").CombinedOutput(); err != nil {
			t.Errorf("listing links in %s: %v: %s", n.Name, err, out)
		} else if links := strings.TrimSpace(string(out)); strings.Count(links, "\n") > 0 || !strings.Contains(links, ": lo:") {
			t.Errorf("links left in %s:\n%s", n.Name, links)
		}
		if out, err := exec.Command("ip", "netns", "del", n.Name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", n.Name, err, out)
		}
		if _, err := os.Stat(filepath.Join("/run/netns", n.Name)); !os.IsNotExist(err) {
			t.Errorf("network namespace %s still exists (stat: %v)", n.Name, err)
		}
	})
	return n
}

// OpenTap creates a tap named ifname in the namespace, the way vmpod's shim does
// (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR), and returns its queue fd, closed when the test
// ends. The tap is not persistent: it disappears with the last fd.
func (n *Netns) OpenTap(t testing.TB, ifname string) *os.File {
	t.Helper()
	type result struct {
		f   *os.File
		err error
	}
	ch := make(chan result, 1)
	// setns affects one OS thread: do it on a locked thread, and let the thread
	// die rather than return to the pool if it cannot be switched back.
	go func() {
		runtime.LockOSThread()
		f, restored, err := n.openTapLocked(ifname)
		if restored {
			runtime.UnlockOSThread()
		}
		ch <- result{f, err}
	}()
	r := <-ch
	if r.err != nil {
		t.Fatalf("creating tap %s in %s: %v", ifname, n.Name, r.err)
	}
	t.Cleanup(func() { r.f.Close() })
	return r.f
}

func (n *Netns) openTapLocked(ifname string) (f *os.File, restored bool, err error) {
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		return nil, true, err
	}
	defer orig.Close()
	target, err := os.Open(filepath.Join("/run/netns", n.Name))
	if err != nil {
		return nil, true, err
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		return nil, true, fmt.Errorf("setns: %w", err)
	}
	f, err = openTap(ifname)
	if rerr := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); rerr != nil {
		if f != nil {
			f.Close()
		}
		return nil, false, fmt.Errorf("setns back: %w", rerr)
	}
	return f, true, err
}

func openTap(ifname string) (*os.File, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	ifr, err := unix.NewIfreq(ifname)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("TUNSETIFF: %w", err)
	}
	return os.NewFile(uintptr(fd), "/dev/net/tun:"+ifname), nil
}
