// Package nestedvfio proves vmpod's PCI passthrough on a real VFIO device without a GPU:
// an L1 QEMU guest (q35, an emulated intel-iommu, an emulated edu device and an e1000e NIC)
// runs vmpod's device path (l1host: devices.Sysfs.CheckVFIO, BindVFIO, BAR sizing,
// vmm.Start with HostDevices, Machine.PlugVFIO); its L2 guest drives the cold-plugged edu
// through its BAR and takes a DHCP lease through the hot-plugged e1000e.
//
// Under TCG the L2 is emulated inside an emulator, yet the whole run takes about 3 minutes
// on 2 cores (L1 boot 35 s, L2 boot 50 s): `make test` runs it. Its transcript and timing
// are in docs/nested-vfio.md. By hand:
//
//	VMPOD_INTEGRATION=1 VMPOD_NESTED_GUEST=$(hack/vm-guest-image.sh --nested) \
//	  go test -v -count=1 ./integration/nestedvfio/
package nestedvfio

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmpod/vmpod/integration/testenv"
)

const (
	envGuest = "VMPOD_NESTED_GUEST" // hack/vm-guest-image.sh --nested's output directory
	envOut   = "VMPOD_NESTED_OUT"   // optional: where the proof's transcript is copied
)

// fatPartitionOffset is where hack/vm-guest-image.sh puts the FAT partition holding the
// guest's kernel and initrd (p1 at sector 2048).
const fatPartitionOffset = 2048 * 512

func TestNestedVFIOPassthrough(t *testing.T) {
	testenv.Require(t)
	guest := os.Getenv(envGuest)
	if guest == "" {
		t.Skipf("nested VFIO proof: %s is not set (make test builds the L1 image: hack/vm-guest-image.sh --nested)", envGuest)
	}
	w := t.TempDir()
	run := func(name string, args ...string) {
		t.Helper()
		cmd := exec.Command(name, args...)
		cmd.Env = append(os.Environ(), "MTOOLS_SKIP_CHECK=1")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
		}
	}

	// vmpod's side, built for the L1 guest (static: the guest has no Go toolchain).
	build := exec.Command("go", "build", "-o", filepath.Join(w, "l1host"), "./l1host")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build l1host: %v\n%s", err, out)
	}

	disk := filepath.Join(guest, "disk.raw")
	fat := disk + "@@" + strconv.Itoa(fatPartitionOffset)
	run("mcopy", "-i", fat, "::vmlinuz", filepath.Join(w, "vmlinuz"))
	run("mcopy", "-i", fat, "::initrd.img", filepath.Join(w, "initrd.img"))
	run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", disk, filepath.Join(w, "l1.qcow2"))

	payload := filepath.Join(w, "payload.img")
	run("mkfs.vfat", "-C", "-n", "PAYLOAD", payload, "65536")
	run("mcopy", "-i", payload, filepath.Join(w, "l1host"), "testdata/run.sh", "testdata/l2-init", "testdata/udhcpc.sh", "::")

	seed := filepath.Join(w, "seed.img")
	write(t, filepath.Join(w, "user-data"), "#cloud-config\nruncmd:\n"+
		"  - [sh, -c, 'mkdir -p /mnt/payload && mount -o ro LABEL=PAYLOAD /mnt/payload && sh /mnt/payload/run.sh']\n")
	write(t, filepath.Join(w, "meta-data"), "instance-id: nested-vfio\nlocal-hostname: l1\n")
	write(t, filepath.Join(w, "network-config"), "network: {config: disabled}\n")
	run("mkfs.vfat", "-C", "-n", "CIDATA", seed, "2048")
	run("mcopy", "-i", seed, filepath.Join(w, "user-data"), filepath.Join(w, "meta-data"), filepath.Join(w, "network-config"), "::")

	console, proof := filepath.Join(w, "console.log"), filepath.Join(w, "proof.log")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	qemu := exec.CommandContext(ctx, "qemu-system-x86_64",
		"-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "2048",
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		// first: the IOMMU must exist before the devices it translates for
		"-device", "intel-iommu,intremap=on,caching-mode=on",
		"-kernel", filepath.Join(w, "vmlinuz"), "-initrd", filepath.Join(w, "initrd.img"),
		"-append", "root=LABEL=rootfs ro console=ttyS0,115200 net.ifnames=0 intel_iommu=on",
		"-drive", "file="+filepath.Join(w, "l1.qcow2")+",if=virtio,format=qcow2",
		"-drive", "file="+seed+",if=virtio,format=raw,readonly=on",
		"-drive", "file="+payload+",if=virtio,format=raw,readonly=on",
		"-device", "edu",
		"-netdev", "user,id=n0", "-device", "e1000e,netdev=n0",
		"-serial", "file:"+console, "-serial", "file:"+proof,
	)
	// an interrupted or timed-out go test must not leave L1 running
	qemu.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	start := time.Now()
	out, err := qemu.CombinedOutput()
	elapsed := time.Since(start)
	transcript, _ := os.ReadFile(proof)
	t.Logf("L1 ran %.0f s; transcript:\n%s", elapsed.Seconds(), transcript)
	if dst := os.Getenv(envOut); dst != "" {
		write(t, dst, string(transcript)+"\n(L1 QEMU ran "+elapsed.Round(time.Second).String()+")\n")
	}
	if err != nil {
		t.Fatalf("L1 QEMU: %v\n%s\nconsole tail:\n%s", err, out, testenv.TailFile(console, 60))
	}

	for _, want := range []*regexp.Regexp{
		regexp.MustCompile(`L1host: cold-plug /dev/vfio/\d+: function \S+ \(1234:11e8\)`),
		regexp.MustCompile(`L2-EDU \S+ BAR0 0x[0-9a-f]+ identification 0x010000ED`),
		regexp.MustCompile(`L2-EDU liveness check: wrote 0x12345678, read 0xEDCBA987`),
		regexp.MustCompile(`L1host: bound \S+ to vfio-pci; group node /dev/vfio/\d+`),
		regexp.MustCompile(`L1host: PlugVFIO \S+ took \d+ ms`),
		regexp.MustCompile(`L2-HOTPLUGGED \S+ 8086:10d3`),
		regexp.MustCompile(`L2: eth0 is driven by e1000e`),
		regexp.MustCompile(`L2-LINK eth0 up, carrier 1`),
		regexp.MustCompile(`L2-DHCP lease 10\.0\.2\.\d+/24`),
		regexp.MustCompile(`L1host: PASS`),
		regexp.MustCompile(`L1-EXIT 0`),
	} {
		if !want.Match(transcript) {
			t.Errorf("the transcript lacks %q", want)
		}
	}
	if t.Failed() {
		t.Logf("L1 console tail:\n%s", testenv.TailFile(console, 60))
	}
}

func write(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}
