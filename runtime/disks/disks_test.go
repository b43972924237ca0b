package disks

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/vmpod/vmpod/api/vmspec"
	"github.com/vmpod/vmpod/devices"
)

func qemuImg(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("qemu-img")
	if err != nil {
		t.Skip("needs qemu-img (Debian qemu-utils; hack/install-deps.sh installs it)")
	}
	return p
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v: %s", name, args, err, out)
	}
}

// volume makes a directory standing for a read-only volume's mount (an image volume's) and
// a spec that mounts it; pvcVolume one that is mounted read-write, as a PVC's.
func volume(t *testing.T, spec *specs.Spec, name string) string {
	return mountVolume(t, spec, name, "ro")
}

func pvcVolume(t *testing.T, spec *specs.Spec, name string) string {
	return mountVolume(t, spec, name, "rw")
}

func mountVolume(t *testing.T, spec *specs.Spec, name, mode string) string {
	dir := t.TempDir()
	spec.Mounts = append(spec.Mounts, specs.Mount{Destination: vmspec.VolumeMountPath(name), Type: "bind", Source: dir, Options: []string{"rbind", mode}})
	return dir
}

func opts(t *testing.T) Options {
	return Options{ScratchDir: t.TempDir(), QEMUImg: qemuImg(t), FirstFDSet: 10}
}

func imageDisk(vol string) vmspec.VM {
	return vmspec.VM{Disks: []vmspec.Disk{{Name: "root", Volume: vol, Source: vmspec.SourceImage, Device: vmspec.DeviceDisk, Bus: vmspec.BusVirtio, BootOrder: 1}}}
}

func TestImageVolume(t *testing.T) {
	o := opts(t)
	spec := &specs.Spec{}
	dir := volume(t, spec, "cd")
	os.Mkdir(filepath.Join(dir, "disk"), 0o755)
	run(t, o.QEMUImg, "create", "-q", "-f", "qcow2", filepath.Join(dir, "disk", "fedora.qcow2"), "64M")
	vm := imageDisk("cd")
	set, err := Open(context.Background(), &vm, spec, o)
	if err != nil {
		t.Fatal(err)
	}
	d := set.Disks[0]
	if d.Format != "qcow2" || d.Size != 64<<20 || d.Overlay == "" || !strings.HasPrefix(d.Overlay, o.ScratchDir) {
		t.Fatalf("disk %+v", d)
	}
	devs, files, err := set.Machine()
	if err != nil {
		t.Fatal(err)
	}
	disk := devs[0].(*devices.Disk)
	// the overlay too is a descriptor: QEMU may not reach the scratch dir (docs/design/014)
	if len(files) != 2 || files[0].Set != 10 || disk.Backing == nil || disk.Backing.Filename != "/dev/fdset/10" || !disk.Backing.ReadOnly ||
		files[1].Set != 11 || files[1].File != d.OverlayFile || disk.Image.Filename != "/dev/fdset/11" || disk.BootIndex != 1 || disk.Serial != "root" {
		t.Fatalf("device %+v backing %+v files %+v", disk, disk.Backing, files)
	}
	if _, err := disk.Spec(devices.Placement{Transport: devices.PCI, Bus: "pcie.0", Addr: 5}); err != nil {
		t.Fatal(err)
	}
	overlay := d.Overlay
	if err := set.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(overlay); !os.IsNotExist(err) {
		t.Fatalf("overlay left behind: %v", err)
	}
}

func TestFileAndCdrom(t *testing.T) {
	o := opts(t)
	spec := &specs.Spec{}
	pvc := pvcVolume(t, spec, "data")
	run(t, "truncate", "-s", "32M", filepath.Join(pvc, "disk.img"))
	iso := volume(t, spec, "installer")
	os.Mkdir(filepath.Join(iso, "disk"), 0o755)
	run(t, "truncate", "-s", "2M", filepath.Join(iso, "disk", "debian.iso"))
	vm := vmspec.VM{Disks: []vmspec.Disk{
		{Name: "data", Volume: "data", Source: vmspec.SourceFile, Device: vmspec.DeviceDisk, Bus: vmspec.BusSCSI},
		{Name: "cd", Volume: "installer", Source: vmspec.SourceImage, Device: vmspec.DeviceCDROM, Bus: vmspec.BusSATA, ReadOnly: true},
	}}
	set, err := Open(context.Background(), &vm, spec, o)
	if err != nil {
		t.Fatal(err)
	}
	defer set.Close()
	if set.Disks[0].Format != "raw" || set.Disks[0].Overlay != "" || set.Disks[1].Overlay != "" {
		t.Fatalf("disks %+v %+v", set.Disks[0], set.Disks[1])
	}
	devs, _, err := set.Machine()
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := devs[0].(*devices.VirtioSCSI); !ok || len(devs) != 3 {
		t.Fatalf("want a virtio-scsi controller first, got %#v", devs)
	}
	if cd := devs[2].(*devices.Disk); !cd.CDROM || !cd.Image.ReadOnly || cd.Port != 0 {
		t.Fatalf("cdrom %+v", cd)
	}
}

// An empty disk is a sparse raw file of its size in the scratch dir, made afresh on every
// boot and removed with the set.
func TestEmptyDisk(t *testing.T) {
	o := opts(t)
	vm := vmspec.VM{Disks: []vmspec.Disk{{Name: "scratch", Source: vmspec.SourceEmpty, Device: vmspec.DeviceDisk, Bus: vmspec.BusVirtio, SizeMiB: 1 << 20}}}
	// what an earlier boot left: the next boot's disk starts empty all the same
	os.WriteFile(filepath.Join(o.ScratchDir, ".vmpod-empty-scratch.raw"), []byte("old data"), 0o600)
	set, err := Open(context.Background(), &vm, &specs.Spec{}, o)
	if err != nil {
		t.Fatal(err)
	}
	d := set.Disks[0]
	if d.Format != "raw" || d.Size != 1<<40 || d.Blank != filepath.Join(o.ScratchDir, ".vmpod-empty-scratch.raw") {
		t.Fatalf("disk %+v", d)
	}
	fi, err := os.Stat(d.Blank)
	if err != nil {
		t.Fatal(err)
	}
	if used := fi.Sys().(*syscall.Stat_t).Blocks * 512; fi.Size() != 1<<40 || used > 1<<20 {
		t.Errorf("empty disk: size %d, %d bytes allocated; want 1 TiB, sparse", fi.Size(), used)
	}
	head := make([]byte, 8)
	if _, err := d.File.ReadAt(head, 0); err != nil || string(head) != "\x00\x00\x00\x00\x00\x00\x00\x00" {
		t.Errorf("empty disk starts with %q, %v; want zeros", head, err)
	}
	devs, _, err := set.Machine()
	if err != nil {
		t.Fatal(err)
	}
	if disk := devs[0].(*devices.Disk); disk.Image.Format != "raw" || disk.Image.ReadOnly || disk.Backing != nil || disk.Serial != "scratch" {
		t.Errorf("device %+v", disk)
	}
	if err := set.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(d.Blank); !os.IsNotExist(err) {
		t.Errorf("empty disk left behind: %v", err)
	}

	o.ScratchDir = filepath.Join(o.ScratchDir, "missing")
	if _, err := Open(context.Background(), &vm, &specs.Spec{}, o); err == nil || !strings.HasPrefix(err.Error(), "disks[0] (scratch): empty disk:") {
		t.Errorf("no scratch dir: got %v", err)
	}
}

func TestBadDisks(t *testing.T) {
	o := opts(t)
	cases := []struct {
		name  string
		setup func(t *testing.T, spec *specs.Spec) vmspec.VM
		want  string
	}{
		{"no such volume", func(t *testing.T, spec *specs.Spec) vmspec.VM { return imageDisk("cd") }, "no volume mounted at /vmpod/volumes/cd"},
		{"no disk dir", func(t *testing.T, spec *specs.Spec) vmspec.VM { volume(t, spec, "cd"); return imageDisk("cd") }, "disk/"},
		{"zero disk files", func(t *testing.T, spec *specs.Spec) vmspec.VM {
			os.Mkdir(filepath.Join(volume(t, spec, "cd"), "disk"), 0o755)
			return imageDisk("cd")
		}, "holds 0 regular files"},
		{"two disk files", func(t *testing.T, spec *specs.Spec) vmspec.VM {
			d := filepath.Join(volume(t, spec, "cd"), "disk")
			os.Mkdir(d, 0o755)
			os.WriteFile(filepath.Join(d, "a.img"), []byte("x"), 0o644)
			os.WriteFile(filepath.Join(d, "b.img"), []byte("x"), 0o644)
			return imageDisk("cd")
		}, "holds 2 regular files (a.img, b.img)"},
		{"symlink out of the volume", func(t *testing.T, spec *specs.Spec) vmspec.VM {
			d := filepath.Join(volume(t, spec, "cd"), "disk")
			os.Mkdir(d, 0o755)
			os.Symlink("/etc/shadow", filepath.Join(d, "disk.img"))
			return imageDisk("cd")
		}, "symbolic link"},
		{"disk dir is a symlink out", func(t *testing.T, spec *specs.Spec) vmspec.VM {
			os.Symlink("/etc", filepath.Join(volume(t, spec, "cd"), "disk"))
			return imageDisk("cd")
		}, "disk/"},
		{"disk.img links out", func(t *testing.T, spec *specs.Spec) vmspec.VM {
			os.Symlink("../../../../etc/passwd", filepath.Join(pvcVolume(t, spec, "pvc"), "disk.img"))
			return vmspec.VM{Disks: []vmspec.Disk{{Name: "d", Volume: "pvc", Source: vmspec.SourceFile, Device: vmspec.DeviceDisk, Bus: vmspec.BusVirtio}}}
		}, "not a regular file"},
		{"writable disk on a read-only mount", func(t *testing.T, spec *specs.Spec) vmspec.VM {
			os.WriteFile(filepath.Join(volume(t, spec, "pvc"), "disk.img"), make([]byte, 1<<20), 0o644)
			return vmspec.VM{Disks: []vmspec.Disk{{Name: "d", Volume: "pvc", Source: vmspec.SourceFile, Device: vmspec.DeviceDisk, Bus: vmspec.BusVirtio}}}
		}, "mounted read-only in the compute container"},
		{"qcow2 disk.img", func(t *testing.T, spec *specs.Spec) vmspec.VM {
			run(t, o.QEMUImg, "create", "-q", "-f", "qcow2", filepath.Join(pvcVolume(t, spec, "pvc"), "disk.img"), "8M")
			return vmspec.VM{Disks: []vmspec.Disk{{Name: "d", Volume: "pvc", Source: vmspec.SourceFile, Device: vmspec.DeviceDisk, Bus: vmspec.BusVirtio}}}
		}, "holds a raw disk, this one is qcow2"},
		{"backing file", func(t *testing.T, spec *specs.Spec) vmspec.VM {
			d := filepath.Join(volume(t, spec, "cd"), "disk")
			os.Mkdir(d, 0o755)
			run(t, o.QEMUImg, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/passwd", filepath.Join(d, "x.qcow2"), "8M")
			return imageDisk("cd")
		}, "backing file"},
		{"external data file", func(t *testing.T, spec *specs.Spec) vmspec.VM {
			d := filepath.Join(volume(t, spec, "cd"), "disk")
			os.Mkdir(d, 0o755)
			run(t, o.QEMUImg, "create", "-q", "-f", "qcow2", "-o", "data_file="+filepath.Join(t.TempDir(), "outside.raw"), filepath.Join(d, "x.qcow2"), "8M")
			return imageDisk("cd")
		}, "external file"},
		{"encrypted qcow2", func(t *testing.T, spec *specs.Spec) vmspec.VM {
			d := filepath.Join(volume(t, spec, "cd"), "disk")
			os.Mkdir(d, 0o755)
			// the header's crypt_method set by hand: making a LUKS image benchmarks the CPU,
			// which fails on a busy machine
			img := filepath.Join(d, "x.qcow2")
			run(t, o.QEMUImg, "create", "-q", "-f", "qcow2", img, "8M")
			f, _ := os.OpenFile(img, os.O_RDWR, 0)
			f.WriteAt([]byte{0, 0, 0, 2}, qcow2CryptMethod)
			f.Close()
			return imageDisk("cd")
		}, "encrypted"},
		{"truncated qcow2", func(t *testing.T, spec *specs.Spec) vmspec.VM {
			d := filepath.Join(volume(t, spec, "cd"), "disk")
			os.Mkdir(d, 0o755)
			raw := filepath.Join(t.TempDir(), "raw")
			run(t, "dd", "if=/dev/urandom", "of="+raw, "bs=1M", "count=4", "status=none")
			img := filepath.Join(d, "x.qcow2")
			run(t, o.QEMUImg, "convert", "-q", "-f", "raw", "-O", "qcow2", raw, img)
			run(t, "truncate", "-s", "1M", img)
			return imageDisk("cd")
		}, "qemu-img check"},
		{"empty raw", func(t *testing.T, spec *specs.Spec) vmspec.VM {
			d := filepath.Join(volume(t, spec, "cd"), "disk")
			os.Mkdir(d, 0o755)
			os.WriteFile(filepath.Join(d, "x.img"), nil, 0o644)
			return imageDisk("cd")
		}, "empty"},
		{"char device for a block volume", func(t *testing.T, spec *specs.Spec) vmspec.VM {
			spec.Linux = &specs.Linux{Devices: []specs.LinuxDevice{{Path: vmspec.BlockDevicePath("blk"), Type: "c", Major: 1, Minor: 3}}}
			return vmspec.VM{Disks: []vmspec.Disk{{Name: "d", Volume: "blk", Source: vmspec.SourceBlock, Device: vmspec.DeviceDisk, Bus: vmspec.BusVirtio}}}
		}, "want a block device"},
		{"no block device", func(t *testing.T, spec *specs.Spec) vmspec.VM {
			return vmspec.VM{Disks: []vmspec.Disk{{Name: "d", Volume: "blk", Source: vmspec.SourceBlock, Device: vmspec.DeviceDisk, Bus: vmspec.BusVirtio}}}
		}, "no block device at /vmpod/devices/blk"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			spec := &specs.Spec{}
			vm := tc.setup(t, spec)
			set, err := Open(context.Background(), &vm, spec, o)
			if err == nil {
				set.Close()
				t.Fatalf("opened; want an error with %q", tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "disks[0]") {
				t.Fatalf("got %q, want disks[0] and %q", err, tc.want)
			}
			if entries, _ := os.ReadDir(o.ScratchDir); len(entries) > 0 {
				t.Fatalf("left in the scratch dir: %v", entries)
			}
		})
	}
}
