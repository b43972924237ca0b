package agent

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// portAppearWait bounds the wait for the virtio-serial port at boot; the driver is built
// into the kernel, so it is normally there before /init runs.
const portAppearWait = 10 * time.Second

// devicePort is the guest end of a virtio-serial port, opened blocking: reads return EOF
// (0 bytes) while the host side is not connected, which agent/channel expects.
type devicePort struct {
	fd   int
	path string
}

// openPort finds the port named name through sysfs (there is no udev) and opens it.
func openPort(name string) (*devicePort, error) {
	deadline := time.Now().Add(portAppearWait)
	for {
		names, _ := filepath.Glob("/sys/class/virtio-ports/*/name")
		for _, f := range names {
			if readTrim(f) != name {
				continue
			}
			dev := "/dev/" + filepath.Base(filepath.Dir(f))
			fd, err := unix.Open(dev, unix.O_RDWR|unix.O_CLOEXEC, 0)
			if err == nil {
				return &devicePort{fd: fd, path: dev}, nil
			}
			if !os.IsNotExist(err) {
				return nil, fmt.Errorf("open %s: %w", dev, err)
			}
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("virtio-serial port %q: not found in /sys/class/virtio-ports after %v", name, portAppearWait)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (p *devicePort) Read(b []byte) (int, error) {
	for {
		n, err := unix.Read(p.fd, b)
		switch {
		case err == unix.EINTR || err == unix.EAGAIN:
			continue
		case err != nil:
			return 0, fmt.Errorf("%s: %w", p.path, err)
		case n == 0:
			return 0, io.EOF
		}
		return n, nil
	}
}

func (p *devicePort) Write(b []byte) (int, error) {
	total := 0
	for total < len(b) {
		n, err := unix.Write(p.fd, b[total:])
		if err == unix.EINTR || err == unix.EAGAIN {
			continue
		}
		if err != nil {
			return total, fmt.Errorf("%s: %w", p.path, err)
		}
		total += n
	}
	return total, nil
}

func (p *devicePort) String() string { return strings.TrimPrefix(p.path, "/dev/") }
