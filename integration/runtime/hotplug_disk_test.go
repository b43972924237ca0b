package runtime_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/devices"
	"github.com/vmpod/vmpod/integration/testenv"
	"github.com/vmpod/vmpod/runtime/vmpodagent"
)

// TestHotplugDisk: a disk image the host opened is plugged into a running q35 VM and
// unplugged again, each observed from a container in the guest (the disk's serial and size
// in sysfs); a second plug of the same id, an unplug of an unknown one and a plug into a
// microvm or a q35 without ACPI (whose guest never sees the disk, measured) are refused,
// and a failed plug (an image opened read-only for a writable disk) leaves nothing behind:
// the same id plugs afterwards.
func TestHotplugDisk(t *testing.T) {
	testenv.Require(t)
	cfg := testenv.VMConfig(t, "hotdisk")
	cfg.Type = machine.Q35
	vm := testenv.StartVM(t, cfg)
	ctx := testenv.Context(t, 3*time.Minute)

	image := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(image, make([]byte, 32<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	disk := devices.VirtioBlk{DeviceID: "hot0", Serial: "vmpod-hot0"}
	readOnly, err := os.Open(image)
	if err != nil {
		t.Fatal(err)
	}
	if err := vm.Machine().PlugDisk(ctx, disk, readOnly); err == nil || !strings.Contains(err.Error(), "blockdev-add") {
		t.Fatalf("a writable disk over a read-only descriptor: %v, want QEMU's refusal at blockdev-add", err)
	}
	readOnly.Close()

	f, err := os.OpenFile(image, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := vm.Machine().PlugDisk(ctx, disk, f); err != nil {
		t.Fatalf("plug: %v", err)
	}
	f.Close()                                                                        // QEMU holds its own copy
	if err := vm.Machine().PlugDisk(ctx, disk, nil); !errdefs.IsAlreadyExists(err) { // refused before any file is used
		t.Errorf("plugging hot0 twice: %v, want AlreadyExists", err)
	}
	// 32 MiB is 65536 sectors
	waitDisks(t, vm, "vmpod-hot0 65536", true)

	if err := vm.Machine().UnplugDisk(ctx, "hot0"); err != nil {
		t.Fatalf("unplug: %v", err)
	}
	waitDisks(t, vm, "vmpod-hot0", false)
	if err := vm.Machine().UnplugDisk(ctx, "hot0"); !errdefs.IsNotFound(err) {
		t.Errorf("unplugging hot0 again: %v, want NotFound", err)
	}
	// the unplug freed the id, its block node and its root port: the disk plugs again
	if f, err = os.OpenFile(image, os.O_RDWR, 0); err != nil {
		t.Fatal(err)
	}
	if err := vm.Machine().PlugDisk(ctx, disk, f); err != nil {
		t.Fatalf("plug after the unplug: %v", err)
	}
	f.Close()
	waitDisks(t, vm, "vmpod-hot0 65536", true)
	if err := vm.Machine().UnplugDisk(ctx, "hot0"); err != nil {
		t.Fatalf("second unplug: %v", err)
	}

	micro := testenv.StartVM(t, testenv.VMConfig(t, "hotdisk-micro"))
	if err := micro.Machine().PlugDisk(ctx, disk, nil); !errdefs.IsNotImplemented(err) {
		t.Errorf("plugging into a microvm: %v, want NotImplemented", err)
	}
	// without ACPI the guest would never see the disk (measured): refused up front
	cfg = testenv.VMConfig(t, "hotdisk-noacpi")
	cfg.Type, cfg.NoACPI = machine.Q35, true
	noACPI := testenv.StartVM(t, cfg)
	if err := noACPI.Machine().PlugDisk(ctx, disk, nil); !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "features.acpi") {
		t.Errorf("plugging into a q35 without ACPI: %v, want FailedPrecondition naming features.acpi", err)
	}
}

var diskListings int

// waitDisks polls the guest's virtio disks (serial and size, from a container) until
// want is among them (present) or not.
func waitDisks(t *testing.T, vm *vmpodagent.Guest, want string, present bool) {
	t.Helper()
	var out string
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(time.Second) {
		diskListings++
		_, out, _ = run(t, vm, fmt.Sprintf("disks%d", diskListings), nil, "sh", "-c",
			`for d in /sys/block/vd*; do [ -e "$d" ] && echo "$(cat $d/serial) $(cat $d/size)"; done; true`)
		if strings.Contains(out, want) == present {
			return
		}
	}
	t.Fatalf("the guest's disks: %q; want %q present=%v", out, want, present)
}
