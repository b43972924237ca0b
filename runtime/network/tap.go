package network

import (
	"errors"
	"fmt"
	"os"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// tapFlags: a layer-2 tap, frames without the 4-byte packet-info prefix, with the
// virtio-net header QEMU's userspace virtio-net (vhost=off) uses to pass checksum and
// segmentation offloads through; IFF_TUN_EXCL makes TUNSETIFF fail instead of attaching
// to an existing tap of the same name.
const tapFlags = unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR | unix.IFF_TUN_EXCL

// createTap creates the tap name in ns and returns its file, the tap's only descriptor.
//
// The tap is not persistent (no TUNSETPERSIST): the kernel deletes it, with its qdiscs and
// filters, when the last descriptor closes — ours and QEMU's copy. A shim and QEMU that
// both die leave no tap behind.
//
// The netns a tap is created in is the one of the thread that opened /dev/net/tun: the
// open file's socket is allocated in current->nsproxy->net_ns and TUNSETIFF creates the
// device in sock_net() of that socket (drivers/net/tun.c). So only the open needs the
// thread to be in the pod's netns; netlink.LinkAdd of a Tuntap would open it in the
// caller's netns even through a handle made with NewHandleAt.
func createTap(ns netns.NsHandle, name string) (*os.File, error) {
	var fd int
	err := inNetns(ns, func() (err error) {
		fd, err = unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("open /dev/net/tun in the netns: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("name: %w", err)
	}
	ifr.SetUint16(tapFlags)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		_ = unix.Close(fd)
		if errors.Is(err, unix.EBUSY) {
			return nil, fmt.Errorf("TUNSETIFF: a link named %s already exists in the netns: %w", name, err)
		}
		return nil, fmt.Errorf("TUNSETIFF: %w", err)
	}
	// Blocking: QEMU sets O_NONBLOCK on its copy itself; Go must not put the descriptor
	// in its poller (it never reads it).
	return os.NewFile(uintptr(fd), "/dev/net/tun:"+name), nil
}
