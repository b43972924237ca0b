// demo boots a vmpod guest and runs a busybox container in it, printing the guest's kernel
// next to the host's and how long each step took. `make demo` runs it.
package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmpod/vmpod/integration/testenv"
	"github.com/vmpod/vmpod/runtime"
)

func main() {
	guest := flag.String("guest", "_output/guest", "directory with vmlinux and initrd.img")
	rootfs := flag.String("rootfs", "", "busybox rootfs directory (hack/busybox-rootfs.sh)")
	flag.Parse()
	if err := demo(*guest, *rootfs); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func demo(guest, rootfs string) error {
	guest, _ = filepath.Abs(guest)
	ctx := context.Background()
	state, err := os.MkdirTemp("/run", "vmpod-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(state)

	t0 := time.Now()
	vm, err := runtime.Start(ctx, runtime.Config{
		Name:     "demo",
		StateDir: filepath.Join(state, "vm"),
		LogPath:  filepath.Join(state, "vm.log"),
		Kernel:   filepath.Join(guest, "vmlinux"),
		Initrd:   filepath.Join(guest, "initrd.img"),
	})
	if err != nil {
		return err
	}
	defer vm.Stop(ctx)
	booted := time.Since(t0)

	// A writable overlay over the cached rootfs, as containerd's snapshotter would give.
	layer := filepath.Join(state, "layer")
	for _, d := range []string{"upper", "work", "merged"} {
		if err := os.MkdirAll(filepath.Join(layer, d), 0o755); err != nil {
			return err
		}
	}
	merged := filepath.Join(layer, "merged")
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s/upper,workdir=%s/work", rootfs, layer, layer)
	if err := unix.Mount("overlay", merged, "overlay", 0, opts); err != nil {
		return fmt.Errorf("rootfs overlay: %w", err)
	}
	defer unix.Unmount(merged, unix.MNT_DETACH)

	t1 := time.Now()
	var out bytes.Buffer
	p, err := vm.CreateContainer(ctx, "demo", merged, testenv.Spec("sh", "-c", "uname -r; cat /proc/cpuinfo | grep -m1 'model name'"), runtime.Stdio{Stdout: &out, Stderr: os.Stderr})
	if err != nil {
		return err
	}
	if err := vm.Agent().StartContainer(ctx, "demo"); err != nil {
		return err
	}
	exit, err := p.Wait(ctx)
	if err != nil {
		return err
	}
	ran := time.Since(t1)
	if err := vm.RemoveContainer(ctx, "demo", true); err != nil {
		return err
	}

	var uts unix.Utsname
	_ = unix.Uname(&uts)
	lines := strings.SplitN(strings.TrimSpace(out.String()), "\n", 2)
	fmt.Printf("host kernel:   %s\n", unix.ByteSliceToString(uts.Release[:]))
	fmt.Printf("guest kernel:  %s   (container exit status %d)\n", lines[0], exit.Status)
	if len(lines) > 1 {
		fmt.Printf("guest cpu:     %s\n", strings.TrimSpace(strings.TrimPrefix(lines[1], "model name\t:")))
	}
	fmt.Printf("accelerator:   %s\n", vm.Accel())
	fmt.Printf("VM boot to agent: %v; container create+start+exit: %v\n", booted.Round(time.Millisecond), ran.Round(time.Millisecond))
	return nil
}
