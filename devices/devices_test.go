package devices

import (
	"errors"
	"os"
	"reflect"
	"strings"
	"testing"
)

var (
	onMMIO   = Placement{Transport: MMIO}
	onPCIe0  = Placement{Transport: PCI, Bus: "pcie.0", Addr: 5}
	onPort   = Placement{Transport: PCI, Bus: "rp2"}
	testFile = os.NewFile(0, "test") // only its identity matters
)

// render returns the arguments of d's Spec at p, with tap fds numbered from 3.
func render(t *testing.T, d Device, p Placement) []string {
	t.Helper()
	s, err := d.Spec(p)
	if err != nil {
		t.Fatal(err)
	}
	args, _ := s.args(false, nil)
	return args
}

func TestDeviceArgs(t *testing.T) {
	tests := []struct {
		name string
		dev  Device
		at   Placement
		want []string
	}{
		{"blk raw file on pcie.0", &VirtioBlk{DeviceID: "disk0", Path: "/img/root,v2.img", ReadOnly: true, Serial: "root", BootIndex: 1}, onPCIe0, []string{
			"-blockdev", "driver=raw,node-name=disk0-drive,read-only=on,file.driver=file,file.filename=/img/root,,v2.img",
			"-device", "virtio-blk-pci,id=disk0,bus=pcie.0,addr=0x5.0,drive=disk0-drive,serial=root,bootindex=1"}},
		{"blk qcow2 block device on a root port", &VirtioBlk{DeviceID: "pvc1", Path: "/dev/sdb", Format: "qcow2", BlockDevice: true, Direct: true, Discard: true}, onPort, []string{
			"-blockdev", "driver=qcow2,node-name=pvc1-drive,cache.direct=on,discard=unmap,file.driver=host_device,file.filename=/dev/sdb",
			"-device", "virtio-blk-pci,id=pvc1,bus=rp2,drive=pvc1-drive"}},
		{"blk on mmio", &VirtioBlk{DeviceID: "disk0", Path: "/img/a"}, onMMIO, []string{
			"-blockdev", "driver=raw,node-name=disk0-drive,file.driver=file,file.filename=/img/a",
			"-device", "virtio-blk-device,id=disk0,drive=disk0-drive"}},
		{"net tap fd", &VirtioNet{DeviceID: "eth0", MAC: "52:54:00:12:34:56", TapFiles: []*os.File{testFile}}, onPCIe0, []string{
			"-netdev", "tap,id=eth0-tap,fd=3,vhost=off",
			"-device", "virtio-net-pci,id=eth0,bus=pcie.0,addr=0x5.0,netdev=eth0-tap,mac=52:54:00:12:34:56"}},
		{"net multiqueue fds", &VirtioNet{DeviceID: "eth0", MAC: "52:54:00:12:34:56", TapFiles: []*os.File{testFile, testFile}}, onPort, []string{
			"-netdev", "tap,id=eth0-tap,fds=3:4,vhost=off",
			"-device", "virtio-net-pci,id=eth0,bus=rp2,netdev=eth0-tap,mac=52:54:00:12:34:56,mq=on,vectors=6"}},
		{"e1000 for a guest without virtio", &VirtioNet{DeviceID: "eth0", MAC: "52:54:00:12:34:56", TapFiles: []*os.File{testFile}, Model: "e1000e"}, onPCIe0, []string{
			"-netdev", "tap,id=eth0-tap,fd=3,vhost=off",
			"-device", "e1000e,id=eth0,bus=pcie.0,addr=0x5.0,netdev=eth0-tap,mac=52:54:00:12:34:56"}},
		{"disk: scsi cdrom", &Disk{DeviceID: "cd0", Bus: BusSCSI, CDROM: true, Controller: "scsi0", Image: Blockdev{Format: "raw", Protocol: "file", Filename: "/dev/fdset/3", ReadOnly: true}, BootIndex: 2}, onPCIe0, []string{
			"-blockdev", "driver=raw,node-name=cd0-drive,read-only=on,file.driver=file,file.filename=/dev/fdset/3",
			"-device", "scsi-cd,id=cd0,bus=scsi0.0,drive=cd0-drive,bootindex=2"}},
		{"disk: sata over a base", &Disk{DeviceID: "d0", Bus: BusSATA, Port: 1, Serial: "root",
			Image:   Blockdev{Format: "qcow2", Protocol: "file", Filename: "/scratch/ov.qcow2"},
			Backing: &Blockdev{Format: "qcow2", Protocol: "file", Filename: "/dev/fdset/1", ReadOnly: true}}, onPCIe0, []string{
			"-blockdev", "driver=qcow2,node-name=d0-base,read-only=on,file.driver=file,file.filename=/dev/fdset/1",
			"-blockdev", "driver=qcow2,node-name=d0-drive,backing=d0-base,file.driver=file,file.filename=/scratch/ov.qcow2",
			"-device", "ide-hd,id=d0,bus=ide.1,drive=d0-drive,serial=root"}},
		{"net tap by name on mmio", &VirtioNet{DeviceID: "eth0", MAC: "52:54:00:12:34:56", TapName: "tap0", Queues: 2, Vhost: true}, onMMIO, []string{
			"-netdev", "tap,id=eth0-tap,ifname=tap0,script=no,downscript=no,queues=2,vhost=on",
			"-device", "virtio-net-device,id=eth0,netdev=eth0-tap,mac=52:54:00:12:34:56,mq=on"}},
		{"virtio-fs on mmio", &VirtioFS{DeviceID: "rootfs", SocketPath: "/run/vmpod/a,b/vfs.sock", Tag: "vmpod", QueueSize: 1024}, onMMIO, []string{
			"-chardev", "socket,id=rootfs-sock,path=/run/vmpod/a,,b/vfs.sock",
			"-device", "vhost-user-fs-device,id=rootfs,chardev=rootfs-sock,tag=vmpod,queue-size=1024"}},
		{"virtio-fs on pci", &VirtioFS{DeviceID: "rootfs", SocketPath: "/run/vfs.sock", Tag: "vmpod"}, onPCIe0, []string{
			"-chardev", "socket,id=rootfs-sock,path=/run/vfs.sock",
			"-device", "vhost-user-fs-pci,id=rootfs,bus=pcie.0,addr=0x5.0,chardev=rootfs-sock,tag=vmpod"}},
		{"9p", &Virtio9P{DeviceID: "share", Path: "/srv/share", MountTag: "share", ReadOnly: true, RemapInodes: true}, onMMIO, []string{
			"-fsdev", "local,id=share-fsdev,path=/srv/share,security_model=passthrough,readonly=on,multidevs=remap",
			"-device", "virtio-9p-device,id=share,fsdev=share-fsdev,mount_tag=share"}},
		{"9p mapped-xattr on pci", &Virtio9P{DeviceID: "share", Path: "/srv/share", MountTag: "share", SecurityModel: "mapped-xattr"}, onPCIe0, []string{
			"-fsdev", "local,id=share-fsdev,path=/srv/share,security_model=mapped-xattr",
			"-device", "virtio-9p-pci,id=share,bus=pcie.0,addr=0x5.0,fsdev=share-fsdev,mount_tag=share"}},
		{"serial with agent port", &VirtioSerial{DeviceID: "vser0", Ports: []SerialPort{{DeviceID: "agent", Name: "vmpod.agent", SocketPath: "/run/agent.sock"}}}, onMMIO, []string{
			"-chardev", "socket,id=agent-sock,path=/run/agent.sock,server=on,wait=off",
			"-device", "virtio-serial-device,id=vser0",
			"-device", "virtserialport,id=agent,bus=vser0.0,chardev=agent-sock,name=vmpod.agent"}},
		{"serial on pci", &VirtioSerial{DeviceID: "vser0", Ports: []SerialPort{{DeviceID: "agent", Name: "vmpod.agent", SocketPath: "/run/agent.sock"}}}, onPCIe0, []string{
			"-chardev", "socket,id=agent-sock,path=/run/agent.sock,server=on,wait=off",
			"-device", "virtio-serial-pci,id=vser0,bus=pcie.0,addr=0x5.0",
			"-device", "virtserialport,id=agent,bus=vser0.0,chardev=agent-sock,name=vmpod.agent"}},
		{"rng", &VirtioRNG{DeviceID: "rng0"}, onPCIe0, []string{"-device", "virtio-rng-pci,id=rng0,bus=pcie.0,addr=0x5.0"}},
		{"rng on mmio", &VirtioRNG{DeviceID: "rng0"}, onMMIO, []string{"-device", "virtio-rng-device,id=rng0"}},
		{"balloon on a root port", &VirtioBalloon{DeviceID: "balloon0"}, onPort, []string{"-device", "virtio-balloon-pci,id=balloon0,bus=rp2"}},
		{"vsock on mmio", &Vsock{DeviceID: "vsock0", GuestCID: 3}, onMMIO, []string{"-device", "vhost-vsock-device,id=vsock0,guest-cid=3"}},
		{"balloon", &VirtioBalloon{DeviceID: "balloon0", DeflateOnOOM: true, FreePageReporting: true}, onMMIO, []string{
			"-device", "virtio-balloon-device,id=balloon0,deflate-on-oom=on,free-page-reporting=on"}},
		{"balloon hinting free pages", &VirtioBalloon{DeviceID: "balloon0", FreePageReporting: true, FreePageHint: true}, onPCIe0, []string{
			"-object", "iothread,id=balloon0-io",
			"-device", "virtio-balloon-pci,id=balloon0,bus=pcie.0,addr=0x5.0,free-page-reporting=on,free-page-hint=on,iothread=balloon0-io"}},
		{"vsock", &Vsock{DeviceID: "vsock0", GuestCID: 42}, onPCIe0, []string{"-device", "vhost-vsock-pci,id=vsock0,bus=pcie.0,addr=0x5.0,guest-cid=42"}},
		{"virtio-mem", &VirtioMem{DeviceID: "vmem0", Size: 1 << 30, RequestedSize: 256 << 20}, onPort, []string{
			"-object", "memory-backend-ram,id=vmem0-mem,size=1073741824",
			"-device", "virtio-mem-pci,id=vmem0,bus=rp2,memdev=vmem0-mem,requested-size=268435456"}},
		{"vfio", &VFIO{DeviceID: "gpu0", Host: PCIAddress{Bus: 0x3b, Device: 0, Function: 1}}, onPort, []string{
			"-device", "vfio-pci,id=gpu0,bus=rp2,host=0000:3b:00.1"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := render(t, tt.dev, tt.at); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("args\n got %q\nwant %q", got, tt.want)
			}
		})
	}
}

func TestPCIOnlyDevicesRefuseMMIO(t *testing.T) {
	for _, d := range []Device{
		&VirtioMem{DeviceID: "vmem0", Size: 1 << 30},
		&VFIO{DeviceID: "gpu0", Host: PCIAddress{Bus: 1}},
	} {
		_, err := d.Spec(onMMIO)
		var fe *FieldError
		if !errors.As(err, &fe) || !strings.Contains(fe.Problem, "needs PCI") {
			t.Errorf("%s on MMIO: %v, want a needs-PCI FieldError", d.ID(), err)
		}
	}
}

func TestInvalidDeviceFieldsAreNamed(t *testing.T) {
	long := strings.Repeat("x", 40)
	tests := []struct {
		dev        Device
		wantDevice string
		wantField  string
	}{
		{&VirtioBlk{DeviceID: "0disk", Path: "/a"}, `virtio-blk "0disk"`, "DeviceID"},
		{&VirtioBlk{DeviceID: "disk 0", Path: "/a"}, `virtio-blk "disk 0"`, "DeviceID"},
		{&VirtioBlk{DeviceID: "disk0", Path: "rel/a"}, `virtio-blk "disk0"`, "Path"},
		{&VirtioBlk{DeviceID: "disk0", Path: "/a\nb"}, `virtio-blk "disk0"`, "Path"},
		{&VirtioBlk{DeviceID: "disk0", Path: "/a", Serial: "s\x00"}, `virtio-blk "disk0"`, "Serial"},
		{&VirtioBlk{DeviceID: "disk0", Path: "/a", Serial: "123456789012345678901"}, `virtio-blk "disk0"`, "Serial"},
		{&VirtioBlk{DeviceID: "disk0", Path: "/a", Format: "vmdk"}, `virtio-blk "disk0"`, "Format"},
		{&VirtioBlk{DeviceID: "a-very-long-disk-identifier-1", Path: "/a"}, `virtio-blk "a-very-long-disk-identifier-1"`, "DeviceID"},
		{&VirtioNet{DeviceID: "eth0", MAC: "52:54:00:12:34", TapName: "t"}, `virtio-net "eth0"`, "MAC"},
		{&VirtioNet{DeviceID: "eth0", MAC: "01:00:5e:00:00:01", TapName: "t"}, `virtio-net "eth0"`, "MAC"},
		{&VirtioNet{DeviceID: "eth0", MAC: "52:54:00:12:34:56"}, `virtio-net "eth0"`, "TapFiles"},
		{&VirtioNet{DeviceID: "eth0", MAC: "52:54:00:12:34:56", TapName: "t", TapFiles: []*os.File{testFile}}, `virtio-net "eth0"`, "TapName"},
		{&VirtioNet{DeviceID: "eth0", MAC: "52:54:00:12:34:56", TapFiles: []*os.File{testFile}, Queues: 2}, `virtio-net "eth0"`, "Queues"},
		{&VirtioNet{DeviceID: "eth0", MAC: "52:54:00:12:34:56", TapFiles: []*os.File{testFile}, Model: "rtl8139"}, `virtio-net "eth0"`, "Model"},
		{&Disk{DeviceID: "d", Bus: BusVirtio, CDROM: true, Image: Blockdev{Format: "raw", Protocol: "file", Filename: "/a", ReadOnly: true}}, `disk "d"`, "CDROM"},
		{&Disk{DeviceID: "d", Bus: BusSATA, Port: 6, Image: Blockdev{Format: "raw", Protocol: "file", Filename: "/a"}}, `disk "d"`, "Port"},
		{&Disk{DeviceID: "d", Bus: BusVirtio, Image: Blockdev{Format: "raw", Protocol: "file", Filename: "/a"}, Backing: &Blockdev{Format: "raw", Protocol: "file", Filename: "/b", ReadOnly: true}}, `disk "d"`, "Image.Format"},
		{&VirtioFS{DeviceID: "fs", SocketPath: "/s", Tag: long}, `vhost-user-fs "fs"`, "Tag"},
		{&VirtioFS{DeviceID: "fs", SocketPath: "/s", Tag: "t", QueueSize: 1000}, `vhost-user-fs "fs"`, "QueueSize"},
		{&VirtioFS{DeviceID: "fs", SocketPath: "s", Tag: "t"}, `vhost-user-fs "fs"`, "SocketPath"},
		{&Virtio9P{DeviceID: "p", Path: "/p", MountTag: strings.Repeat("t", 32)}, `virtio-9p "p"`, "MountTag"},
		{&Virtio9P{DeviceID: "p", Path: "/p", MountTag: "t", SecurityModel: "mapped"}, `virtio-9p "p"`, "SecurityModel"},
		{&VirtioSerial{DeviceID: "vser0", Ports: []SerialPort{{DeviceID: "a", Name: "x", SocketPath: "/a"}, {DeviceID: "b", Name: "x", SocketPath: "/b"}}}, `virtio-serial "vser0"`, "Ports[1].Name"},
		{&VirtioSerial{DeviceID: "vser0", Ports: []SerialPort{{DeviceID: "a", Name: "x\ny", SocketPath: "/a"}}}, `virtio-serial "vser0"`, "Ports[0].Name"},
		{&Vsock{DeviceID: "v", GuestCID: 2}, `vhost-vsock "v"`, "GuestCID"},
		{&VirtioMem{DeviceID: "m", Size: 3 << 20}, `virtio-mem "m"`, "Size"},
		{&VirtioMem{DeviceID: "m", Size: 2 << 20, RequestedSize: 4 << 20}, `virtio-mem "m"`, "RequestedSize"},
		{&VirtioRNG{DeviceID: "rng,0"}, `virtio-rng "rng,0"`, "DeviceID"},
		{&VirtioBalloon{}, `virtio-balloon ""`, "DeviceID"},
	}
	for _, tt := range tests {
		_, err := tt.dev.Spec(onPort)
		var fe *FieldError
		if !errors.As(err, &fe) {
			t.Errorf("%#v: error %v, want a *FieldError", tt.dev, err)
			continue
		}
		if fe.Device != tt.wantDevice || fe.Field != tt.wantField {
			t.Errorf("%#v: FieldError{%s, %s}, want {%s, %s} (%v)", tt.dev, fe.Device, fe.Field, tt.wantDevice, tt.wantField, err)
		}
	}
}

func TestPropertyText(t *testing.T) {
	for _, tt := range []struct {
		p    Property
		want string
	}{
		{StringProp("a", `x"y,z`), `x"y,z`},
		{BoolProp("a", true), "on"},
		{BoolProp("a", false), "off"},
		{UintProp("a", 1<<40), "1099511627776"},
		{IntProp("a", -1), "-1"},
	} {
		if got := tt.p.Text(); got != tt.want {
			t.Errorf("%s.Text() = %q, want %q", tt.p.Value, got, tt.want)
		}
	}
	if got := newOptions("d").add("k", "a,b,,c").String(); got != "d,k=a,,b,,,,c" {
		t.Errorf("escaped option %q", got)
	}
}

func TestPCIAddress(t *testing.T) {
	for in, want := range map[string]string{"0000:01:00.0": "0000:01:00.0", "3b:1f.7": "0000:3b:1f.7", "ABCD:ff:00.3": "abcd:ff:00.3"} {
		a, err := ParsePCIAddress(in)
		if err != nil || a.String() != want {
			t.Errorf("ParsePCIAddress(%q) = %v, %v; want %s", in, a, err, want)
		}
	}
	for _, bad := range []string{"", "01:00", "0000:01:20.0", "0000:01:00.8", "0000:100:00.0", "x:01:00.0", "0000:01:00.0.1"} {
		if a, err := ParsePCIAddress(bad); err == nil {
			t.Errorf("ParsePCIAddress(%q) = %v, want an error", bad, a)
		}
	}
}
