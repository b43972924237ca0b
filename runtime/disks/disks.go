// Package disks finds a VM pod's disks in the compute container's OCI spec and opens them
// for QEMU: image volumes (KubeVirt's containerDisk), filesystem PVCs' disk.img and block
// PVCs. A pod author names volumes, never paths (api/vmspec); the files are opened by the
// shim inside their volume's mount (os.Root: no symlink or ".." leaves it) and handed to
// QEMU as fds, so QEMU never resolves a path a pod controls. Images are probed before
// QEMU sees them: a qcow2 with a backing file, a corrupt or truncated one is refused.
package disks

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/vmpod/vmpod/api/vmspec"
	"github.com/vmpod/vmpod/devices"
	"github.com/vmpod/vmpod/runtime/vmm"
)

// Options say where the shim may put what it makes for the disks.
type Options struct {
	// ScratchDir holds the qcow2 overlays that take a containerDisk's guest writes: the
	// compute container's writable rootfs, so the kubelet counts them as the pod's
	// ephemeral storage and they go with the container.
	ScratchDir string
	// QEMUImg is qemu-img, which probes and checks images and makes overlays.
	QEMUImg string
	// FirstFDSet numbers the fd sets the disks' files go into.
	FirstFDSet int
}

// Disk is one opened disk.
type Disk struct {
	Spec   vmspec.Disk
	File   *os.File // the image or block device, opened for QEMU
	Format string   // raw or qcow2
	Size   int64    // virtual size in bytes
	// Overlay is the qcow2 overlay taking the guest's writes (image disks), or "", and
	// OverlayFile it opened for QEMU (which may not reach the scratch dir itself).
	Overlay     string
	OverlayFile *os.File
	// Blank is the file of an empty disk, made in the scratch dir, or "".
	Blank string
}

// Set is a VM's opened disks; Close releases them.
type Set struct {
	Disks []*Disk
	opts  Options
}

// Open finds and opens every disk of vm in spec. On error nothing stays open or made,
// and the error names the disk (disks[i]) and what is wrong.
func Open(ctx context.Context, vm *vmspec.VM, spec *specs.Spec, opts Options) (_ *Set, retErr error) {
	set := &Set{opts: opts}
	defer func() {
		if retErr != nil {
			_ = set.Close()
		}
	}()
	for i, d := range vm.Disks {
		disk, err := open(ctx, d, spec, opts)
		if err != nil && d.Volume == "" {
			return nil, fmt.Errorf("disks[%d] (%s): %w", i, d.Name, err)
		}
		if err != nil {
			return nil, fmt.Errorf("disks[%d] (%s, volume %s): %w", i, d.Name, d.Volume, err)
		}
		set.Disks = append(set.Disks, disk)
	}
	return set, nil
}

func open(ctx context.Context, d vmspec.Disk, spec *specs.Spec, opts Options) (*Disk, error) {
	var f *os.File
	var err error
	writable := !d.ReadOnly && d.Device != vmspec.DeviceCDROM
	switch d.Source {
	case vmspec.SourceImage:
		f, err = openImageVolume(spec, d.Volume)
	case vmspec.SourceFile:
		f, err = openInVolume(spec, d.Volume, vmspec.DiskImageFile, writable)
	case vmspec.SourceBlock:
		f, err = openBlockVolume(spec, d.Volume, writable)
	case vmspec.SourceEmpty:
		return makeBlank(opts, d)
	default:
		err = fmt.Errorf("source %q: want image, file or block", d.Source)
	}
	if err != nil {
		return nil, err
	}
	disk := &Disk{Spec: d, File: f}
	info, err := probe(ctx, opts.QEMUImg, f, d.Source == vmspec.SourceBlock)
	if err != nil {
		_ = f.Close()
		return nil, err
	}
	disk.Format, disk.Size = info.format, info.size
	if d.Source != vmspec.SourceImage && disk.Format != "raw" {
		_ = f.Close()
		return nil, fmt.Errorf("a %s volume holds a raw disk, this one is %s", d.Source, disk.Format)
	}
	if d.Source == vmspec.SourceImage && writable {
		// the image is shared and read-only: the guest writes to a throwaway overlay
		if disk.Overlay, disk.OverlayFile, err = makeOverlay(ctx, opts, d.Name, disk.Size); err != nil {
			_ = f.Close()
			return nil, err
		}
	}
	return disk, nil
}

// OpenHotplug opens d, a disk to plug into the running VM (vmspec.ParseHotplugDisk's: a
// file or block volume of the compute container), as a boot disk's is opened: inside its
// volume, probed, raw.
func OpenHotplug(ctx context.Context, d vmspec.Disk, spec *specs.Spec, opts Options) (*Disk, error) {
	if d.Source != vmspec.SourceFile && d.Source != vmspec.SourceBlock {
		return nil, fmt.Errorf("disk %s: source %q: only a file or block volume is hot-plugged", d.Name, d.Source)
	}
	disk, err := open(ctx, d, spec, opts)
	if err != nil {
		return nil, fmt.Errorf("disk %s (volume %s): %w", d.Name, d.Volume, err)
	}
	return disk, nil
}

// HasVolume says whether the container of spec has d's volume where d's source puts it: a
// bind mount at VolumeMountPath (file) or a device at BlockDevicePath (block).
func HasVolume(spec *specs.Spec, d vmspec.Disk) bool {
	switch d.Source {
	case vmspec.SourceFile, vmspec.SourceImage:
		_, err := bindMountAt(spec, vmspec.VolumeMountPath(d.Volume))
		return err == nil
	case vmspec.SourceBlock:
		if spec.Linux == nil {
			return false
		}
		for _, dev := range spec.Linux.Devices {
			if filepath.Clean(dev.Path) == vmspec.BlockDevicePath(d.Volume) {
				return true
			}
		}
	}
	return false
}

// VolumePath is where a container has d's volume (HasVolume).
func VolumePath(d vmspec.Disk) string {
	if d.Source == vmspec.SourceBlock {
		return vmspec.BlockDevicePath(d.Volume)
	}
	return vmspec.VolumeMountPath(d.Volume)
}

// VirtioBlk is the device that plugs d into a running VM as id: a virtio disk named by its
// serial, as the boot disks are.
func (d *Disk) VirtioBlk(id string) devices.VirtioBlk {
	return devices.VirtioBlk{DeviceID: id, Format: d.Format, BlockDevice: d.Spec.Source == vmspec.SourceBlock,
		ReadOnly: d.Spec.ReadOnly, Serial: serial(d.Spec.Name)}
}

// mountOf is the host source of the compute container's bind mount at dest.
func mountOf(spec *specs.Spec, dest string) (string, error) {
	m, err := bindMountAt(spec, dest)
	if err != nil {
		return "", err
	}
	return m.Source, nil
}

// bindMountAt is the compute container's bind mount at dest.
func bindMountAt(spec *specs.Spec, dest string) (specs.Mount, error) {
	for _, m := range spec.Mounts {
		if filepath.Clean(m.Destination) == dest && (m.Type == "bind" || hasOption(m.Options, "bind") || hasOption(m.Options, "rbind")) {
			return m, nil
		}
	}
	return specs.Mount{}, fmt.Errorf("the compute container has no volume mounted at %s (is the volume in the pod?)", dest)
}

func hasOption(opts []string, o string) bool {
	for _, x := range opts {
		if x == o {
			return true
		}
	}
	return false
}

// openImageVolume opens the one regular file in disk/ of an image volume, read-only.
func openImageVolume(spec *specs.Spec, volume string) (*os.File, error) {
	src, err := mountOf(spec, vmspec.VolumeMountPath(volume))
	if err != nil {
		return nil, err
	}
	root, err := os.OpenRoot(src)
	if err != nil {
		return nil, fmt.Errorf("image volume: %w", err)
	}
	defer root.Close()
	dir, err := root.Open(vmspec.ContainerDiskDir)
	if err != nil {
		return nil, fmt.Errorf("image volume: %s/: %w (a containerDisk image holds its disk in /%s)", vmspec.ContainerDiskDir, errors.Unwrap(err), vmspec.ContainerDiskDir)
	}
	entries, err := dir.ReadDir(-1)
	_ = dir.Close()
	if err != nil {
		return nil, fmt.Errorf("image volume: %s/: %w", vmspec.ContainerDiskDir, err)
	}
	var files []string
	for _, e := range entries {
		switch {
		case e.Type().IsRegular():
			files = append(files, e.Name())
		case e.Type()&fs.ModeSymlink != 0:
			return nil, fmt.Errorf("image volume: %s/%s is a symbolic link: a containerDisk's disk must be a regular file", vmspec.ContainerDiskDir, e.Name())
		}
	}
	slices.Sort(files)
	if len(files) != 1 {
		return nil, fmt.Errorf("image volume: %s/ holds %d regular files (%s), want exactly one disk image", vmspec.ContainerDiskDir, len(files), strings.Join(files, ", "))
	}
	return openRegular(root, filepath.Join(vmspec.ContainerDiskDir, files[0]), false)
}

// openInVolume opens name inside the filesystem volume's mount.
func openInVolume(spec *specs.Spec, volume, name string, writable bool) (*os.File, error) {
	m, err := bindMountAt(spec, vmspec.VolumeMountPath(volume))
	if err != nil {
		return nil, err
	}
	if writable && hasOption(m.Options, "ro") {
		// the shim opens the volume on the host, past the container's read-only mount
		return nil, fmt.Errorf("the volume is mounted read-only in the compute container: its disk must be readOnly")
	}
	root, err := os.OpenRoot(m.Source)
	if err != nil {
		return nil, fmt.Errorf("filesystem volume: %w", err)
	}
	defer root.Close()
	return openRegular(root, name, writable)
}

// openRegular opens name in root and checks it is a regular file: not a symlink (even one
// that stays inside), not a device or a FIFO.
func openRegular(root *os.Root, name string, writable bool) (*os.File, error) {
	fi, err := root.Lstat(name)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, errors.Unwrap(err))
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file (%s)", name, fi.Mode().Type())
	}
	flag := os.O_RDONLY
	if writable {
		flag = os.O_RDWR
	}
	f, err := root.OpenFile(name, flag|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", name, errors.Unwrap(err))
	}
	if fi2, err := f.Stat(); err != nil || !fi2.Mode().IsRegular() || !os.SameFile(fi, fi2) {
		_ = f.Close()
		return nil, fmt.Errorf("%s changed while it was opened", name)
	}
	return f, nil
}

// openBlockVolume opens the host block device the CRI gave the compute container at
// BlockDevicePath(volume). The OCI spec names it only by major:minor; sysfs names its
// node in /dev, which is opened and checked to be that device.
func openBlockVolume(spec *specs.Spec, volume string, writable bool) (*os.File, error) {
	want := vmspec.BlockDevicePath(volume)
	var dev *specs.LinuxDevice
	if spec.Linux != nil {
		for i := range spec.Linux.Devices {
			if filepath.Clean(spec.Linux.Devices[i].Path) == want {
				dev = &spec.Linux.Devices[i]
			}
		}
	}
	if dev == nil {
		return nil, fmt.Errorf("the compute container has no block device at %s (is the volume a volumeDevice of the pod?)", want)
	}
	if dev.Type != "b" {
		return nil, fmt.Errorf("%s is a %q device, want a block device", want, dev.Type)
	}
	rdev := unix.Mkdev(uint32(dev.Major), uint32(dev.Minor))
	uevent, err := os.ReadFile(fmt.Sprintf("/sys/dev/block/%d:%d/uevent", dev.Major, dev.Minor))
	if err != nil {
		return nil, fmt.Errorf("block device %d:%d: %w", dev.Major, dev.Minor, err)
	}
	var name string
	for _, line := range strings.Split(string(uevent), "\n") {
		if v, ok := strings.CutPrefix(line, "DEVNAME="); ok {
			name = v
		}
	}
	if name == "" || !filepath.IsLocal(name) {
		return nil, fmt.Errorf("block device %d:%d: sysfs gives no usable name (%q)", dev.Major, dev.Minor, name)
	}
	flag := os.O_RDONLY
	if writable {
		flag = os.O_RDWR
	}
	f, err := os.OpenFile(filepath.Join("/dev", name), flag|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("block device %d:%d: %w", dev.Major, dev.Minor, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFBLK || st.Rdev != rdev {
		_ = f.Close()
		return nil, fmt.Errorf("block device %d:%d: /dev/%s is not that device", dev.Major, dev.Minor, name)
	}
	return f, nil
}

// makeOverlay creates an empty qcow2 of size bytes in the scratch dir. It records no
// backing file: the machine stacks it on the image's node (devices.Disk.Backing).
func makeOverlay(ctx context.Context, opts Options, name string, size int64) (string, *os.File, error) {
	if opts.ScratchDir == "" {
		return "", nil, errors.New("no scratch space for the disk's overlay")
	}
	base := ".vmpod-overlay-" + name + ".qcow2"
	path := filepath.Join(opts.ScratchDir, base)
	_ = os.Remove(path)
	if _, err := runQEMUImg(ctx, opts.QEMUImg, nil, "create", "-q", "-f", "qcow2", path, fmt.Sprint(size)); err != nil {
		return "", nil, fmt.Errorf("overlay: %w", err)
	}
	root, err := os.OpenRoot(opts.ScratchDir)
	if err == nil {
		defer root.Close()
		var f *os.File
		if f, err = root.OpenFile(base, os.O_RDWR, 0); err == nil {
			return path, f, nil
		}
	}
	_ = os.Remove(path)
	return "", nil, fmt.Errorf("overlay: %w", err)
}

// makeBlank makes an empty disk: a sparse raw file of the disk's size in the scratch dir.
// It stays linked there while the VM runs, so the kubelet counts what the guest writes as
// the pod's ephemeral storage.
func makeBlank(opts Options, d vmspec.Disk) (*Disk, error) {
	if opts.ScratchDir == "" {
		return nil, errors.New("no scratch space for an empty disk")
	}
	name := ".vmpod-empty-" + d.Name + ".raw"
	root, err := os.OpenRoot(opts.ScratchDir)
	if err != nil {
		return nil, fmt.Errorf("empty disk: %w", err)
	}
	defer root.Close()
	_ = root.Remove(name) // an earlier boot's: an empty disk starts empty
	f, err := root.OpenFile(name, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("empty disk: %w", err)
	}
	size := d.SizeMiB << 20
	if err := f.Truncate(size); err != nil {
		_ = f.Close()
		_ = root.Remove(name)
		return nil, fmt.Errorf("empty disk of %d MiB: %w", d.SizeMiB, err)
	}
	return &Disk{Spec: d, File: f, Format: "raw", Size: size, Blank: filepath.Join(opts.ScratchDir, name)}, nil
}

// Attach adds a disk the runtime made itself (the cloud-init data source): a raw image
// in f, read-only, which the set then owns.
func (s *Set) Attach(d vmspec.Disk, f *os.File) error {
	size, err := sizeOf(f, false)
	if err != nil {
		return fmt.Errorf("disk %s: %w", d.Name, err)
	}
	d.ReadOnly = true
	s.Disks = append(s.Disks, &Disk{Spec: d, File: f, Format: "raw", Size: size})
	return nil
}

// Close closes every disk's file and removes the overlays and empty disks.
func (s *Set) Close() error {
	var errs []error
	for _, d := range s.Disks {
		errs = append(errs, d.File.Close())
		if d.OverlayFile != nil {
			errs = append(errs, d.OverlayFile.Close())
		}
		for _, made := range []string{d.Overlay, d.Blank} {
			if made == "" {
				continue
			}
			if err := os.Remove(made); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// Machine is what the disks add to a machine: their devices (a virtio-scsi controller if
// a disk needs one), in the VM spec's order, and the files QEMU inherits as fd sets.
func (s *Set) Machine() ([]devices.Device, []vmm.FDSetFile, error) {
	var devs []devices.Device
	var files []vmm.FDSetFile
	sata, scsi := 0, false
	for i, d := range s.Disks {
		set := s.opts.FirstFDSet + i
		files = append(files, vmm.FDSetFile{File: d.File, Set: set})
		protocol := "file"
		if d.Spec.Source == vmspec.SourceBlock {
			protocol = "host_device"
		}
		image := devices.Blockdev{Format: d.Format, Protocol: protocol, Filename: devices.FDSetPath(set),
			ReadOnly: d.Spec.ReadOnly || d.Spec.Device == vmspec.DeviceCDROM}
		dev := &devices.Disk{DeviceID: fmt.Sprintf("disk%d", i), Bus: devices.DiskBus(d.Spec.Bus),
			CDROM: d.Spec.Device == vmspec.DeviceCDROM, Image: image, Serial: serial(d.Spec.Name), BootIndex: d.Spec.BootOrder}
		if d.OverlayFile != nil {
			// the overlays' sets follow the images'
			overlaySet := s.opts.FirstFDSet + len(s.Disks) + i
			files = append(files, vmm.FDSetFile{File: d.OverlayFile, Set: overlaySet})
			base := image
			base.ReadOnly = true
			dev.Backing = &base
			dev.Image = devices.Blockdev{Format: "qcow2", Protocol: "file", Filename: devices.FDSetPath(overlaySet)}
		}
		switch dev.Bus {
		case devices.BusSATA:
			dev.Port = sata
			sata++
		case devices.BusSCSI:
			dev.Controller, scsi = scsiController, true
		}
		devs = append(devs, dev)
	}
	if sata > maxSATA {
		return nil, nil, fmt.Errorf("disks: %d disks on bus sata; q35 has %d SATA ports", sata, maxSATA)
	}
	if scsi {
		devs = append([]devices.Device{&devices.VirtioSCSI{DeviceID: scsiController}}, devs...)
	}
	return devs, files, nil
}

const (
	scsiController = "scsi0"
	maxSATA        = 6
)

// serial is a disk name as a virtio/SCSI/ATA serial (at most 20 bytes).
func serial(name string) string {
	if len(name) > 20 {
		return name[:20]
	}
	return name
}
