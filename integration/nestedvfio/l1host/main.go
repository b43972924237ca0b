// Command l1host is vmpod's device path run inside the L1 guest of the nested VFIO proof
// (integration/nestedvfio): there the emulated intel-iommu gives real IOMMU groups and
// vfio-pci drives real (emulated by L0) PCI functions. It does what the shim does for a
// pod given VFIO devices, with vmpod's own code:
//
//   - cold plug: a device plugin bound the function to vfio-pci and handed over its group
//     node (-coldplug /dev/vfio/N); devices.Sysfs.CheckVFIO resolves and checks it, the 64-bit
//     window is sized from its BARs, and vmm starts the L2 VM (q35) with it on a root port;
//   - hot plug: when the L2 guest prints "L2-READY-FOR-HOTPLUG", a function still on its
//     host driver (-hotplug 0000:00:03.0, e1000e) is bound to vfio-pci (the device plugin's
//     part, done with vmpod's Sysfs.BindVFIO), checked from its new group node like any
//     other (with the node's allow-list, -allow), and plugged into the running L2 with
//     vmm.Machine.PlugVFIO.
//
// The L2 guest's serial console is copied to stdout, each line prefixed "L2| "; the
// command's own lines start "L1host:". It exits 0 when L2 printed "L2-DONE" and powered off.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/devices"
	"github.com/vmpod/vmpod/runtime/vmm"
	"github.com/vmpod/vmpod/runtime/vmuser"
)

func main() {
	var (
		kernel   = flag.String("kernel", "", "L2 kernel")
		initrd   = flag.String("initrd", "", "L2 initramfs")
		coldplug = flag.String("coldplug", "", "VFIO group node of the function to cold-plug")
		hotplug  = flag.String("hotplug", "", "PCI address of the function to bind and hot-plug")
		allow    = flag.String("allow", "", "the node's devices.vfio_bind allow-list, comma-separated")
		stateDir = flag.String("state", "/run/vmpod-l2", "L2 VM state directory")
		timeout  = flag.Duration("timeout", 20*time.Minute, "give up after (less than the test's 30)")
	)
	flag.Parse()
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	if err := run(ctx, *kernel, *initrd, *coldplug, *hotplug, strings.Split(*allow, ","), *stateDir); err != nil {
		fmt.Printf("L1host: FAIL: %v\n", err)
		os.Exit(1)
	}
	fmt.Println("L1host: PASS")
}

func logf(format string, args ...any) {
	fmt.Printf("L1host: "+format+"\n", args...)
}

// groupNode is a VFIO node as an OCI spec would list it.
func groupNode(path string) (devices.CharDevice, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return devices.CharDevice{}, fmt.Errorf("stat %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFCHR {
		return devices.CharDevice{}, fmt.Errorf("%s is not a character device", path)
	}
	return devices.CharDevice{Path: path, Major: unix.Major(uint64(st.Rdev)), Minor: unix.Minor(uint64(st.Rdev))}, nil
}

func run(ctx context.Context, kernel, initrd, coldplug, hotplug string, allow []string, stateDir string) (retErr error) {
	var sysfs devices.Sysfs

	// Cold plug: the device plugin's group node.
	node, err := groupNode(coldplug)
	if err != nil {
		return err
	}
	claim, err := sysfs.CheckVFIO([]devices.CharDevice{node}, nil)
	if err != nil {
		return fmt.Errorf("cold-plug check: %w", err)
	}
	if err := claim.Bind(); err != nil {
		return err
	}
	var bars uint64
	for _, a := range claim.Functions {
		id, err := sysfs.VendorDevice(a)
		if err != nil {
			return err
		}
		n, err := sysfs.BAR64Bytes(a)
		if err != nil {
			return err
		}
		bars += n
		logf("cold-plug %s: function %s (%s), 64-bit BARs %d bytes", coldplug, a, id, n)
	}

	// Hot plug, step one: the function is still on its host driver.
	hot, err := devices.ParsePCIAddress(hotplug)
	if err != nil {
		return err
	}
	driver, err := sysfs.Driver(hot)
	if err != nil {
		return err
	}
	hotID, err := sysfs.VendorDevice(hot)
	if err != nil {
		return err
	}
	logf("hot-plug candidate %s (%s) is on driver %q", hot, hotID, driver)
	bars64, err := sysfs.BAR64Bytes(hot)
	if err != nil {
		return err
	}
	bars += bars64

	_ = os.RemoveAll(stateDir)
	users := vmuser.Default()
	cfg := vmm.Config{
		Name:        "l2",
		StateDir:    stateDir,
		LogPath:     filepath.Join(filepath.Dir(stateDir), "l2-qemu.log"),
		Type:        machine.Q35,
		VCPUs:       1,
		MemoryMiB:   512,
		Boot:        vmm.Boot{Kernel: kernel, Initrd: initrd, KernelParams: []string{"console=ttyS0", "rdinit=/init", "panic=-1"}},
		Console:     vmm.ConsoleSocket,
		HostDevices: claim.Functions,
		Users:       &users, // an unprivileged QEMU is given the group device (vmm grantVFIO)
		PCIHole64:   devices.PCIHole64For(bars),
		Paused:      true, // the console is connected before the guest prints
	}
	start := time.Now()
	m, err := vmm.Start(ctx, cfg)
	if err != nil {
		return fmt.Errorf("start L2: %w", err)
	}
	defer func() {
		_ = m.Kill()
		// the teardown gives the group device back to its owner
		var st unix.Stat_t
		if err := unix.Stat(coldplug, &st); err == nil && st.Uid != 0 && retErr == nil {
			retErr = fmt.Errorf("%s still belongs to uid %d after the VM", coldplug, st.Uid)
		}
	}()
	// the proof covers an unprivileged QEMU: its own uid, no capabilities, given the
	// group device for its life (docs/design/014)
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", m.Pid()))
	if err != nil {
		return err
	}
	var uid, capEff string
	for _, l := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(l, "Uid:"); ok {
			uid = strings.Fields(v)[0]
		}
		if v, ok := strings.CutPrefix(l, "CapEff:"); ok {
			capEff = strings.TrimSpace(v)
		}
	}
	var st unix.Stat_t
	if err := unix.Stat(coldplug, &st); err != nil {
		return err
	}
	if uid == "0" || capEff != "0000000000000000" || fmt.Sprint(st.Uid) != uid {
		return fmt.Errorf("L2's QEMU runs as uid %s with CapEff %s, and %s belongs to uid %d: want an unprivileged QEMU owning the group", uid, capEff, coldplug, st.Uid)
	}
	logf("L2's QEMU runs as uid %s without capabilities; %s is given to it", uid, coldplug)
	conn, err := m.DialConsole(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	if err := m.Resume(ctx); err != nil {
		return err
	}
	logf("L2 started (QEMU pid %d, accel %s) with %v on root ports", m.Pid(), m.Accel(), claim.Functions)

	lines := make(chan string)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(conn)
		for sc.Scan() {
			lines <- strings.TrimRight(sc.Text(), "\r")
		}
	}()
	done := false
	for !done {
		select {
		case <-ctx.Done():
			return fmt.Errorf("L2 did not finish: %w", ctx.Err())
		case <-m.Done():
			// drain what the console still holds (nil: already drained)
			if lines != nil {
				for l := range lines {
					fmt.Println("L2| " + l)
					done = done || strings.Contains(l, "L2-DONE")
				}
			}
			if !done {
				return fmt.Errorf("L2 exited before L2-DONE: %v", m.ExitErr())
			}
		case l, ok := <-lines:
			if !ok {
				lines = nil
				continue
			}
			fmt.Println("L2| " + l)
			switch {
			case strings.Contains(l, "L2-READY-FOR-HOTPLUG"):
				logf("L2 booted and checked its cold-plugged device %.1f s after start", time.Since(start).Seconds())
				if err := plugHot(ctx, sysfs, m, hot, allow); err != nil {
					return err
				}
			case strings.Contains(l, "L2-DONE"):
				done = true
			case strings.Contains(l, "L2-FAIL"):
				return errors.New("the L2 guest reported a failure: " + l)
			}
		}
	}
	select {
	case <-m.Done():
	case <-time.After(2 * time.Minute):
		return errors.New("L2 printed L2-DONE but did not power off")
	}
	logf("L2 done %.1f s after start", time.Since(start).Seconds())
	return nil
}

// plugHot plays the device plugin that allocates hot after the pod started: it binds the
// function from its host driver to vfio-pci (with vmpod's Sysfs.BindVFIO: driver_override,
// unbind, probe) and hands over the group node that binding made. vmpod's part follows:
// the check a pod's VFIO nodes get, then PlugVFIO into the running L2.
func plugHot(ctx context.Context, sysfs devices.Sysfs, m *vmm.Machine, hot devices.PCIAddress, allow []string) error {
	g, err := sysfs.IOMMUGroupOf(hot)
	if err != nil {
		return err
	}
	node := fmt.Sprintf("/dev/vfio/%d", g.Number)
	if _, err := os.Stat(node); err == nil {
		return fmt.Errorf("%s exists before %s was bound: the proof wants the host driver first", node, hot)
	}
	if err := sysfs.BindVFIO(hot); err != nil {
		return err
	}
	n, err := groupNode(node)
	if err != nil {
		return err
	}
	claim, err := sysfs.CheckVFIO([]devices.CharDevice{n}, allow)
	if err != nil {
		return fmt.Errorf("hot-plug check: %w", err)
	}
	logf("bound %s to vfio-pci; group node %s gives %v", hot, node, claim.Functions)
	for i, a := range claim.Functions {
		start := time.Now()
		if err := m.PlugVFIO(ctx, fmt.Sprintf("hostdev-hot%d", i), a); err != nil {
			return err
		}
		logf("PlugVFIO %s took %d ms", a, time.Since(start).Milliseconds())
	}
	return nil
}
