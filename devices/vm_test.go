package devices

import (
	"errors"
	"fmt"
	"os"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/vmpod/vmpod/api/machine"
)

func microvm() Machine {
	return Machine{
		Name: "pod-a", Type: machine.MicroVM, Accel: machine.TCG, VCPUs: 1, Memory: 512 << 20,
		Kernel: "/k/vmlinux", Initrd: "/k/initrd.img", Append: "console=ttyS0 tsc_early_khz=2700000",
		QMPSocket: "/run/vm/qmp.sock", ConsoleLog: "/run/vm/console.log", Sandbox: true,
	}
}

func q35(ports int) Machine {
	return Machine{
		Name: "pod-b", Type: machine.Q35, Accel: machine.KVM, VCPUs: 2, MaxVCPUs: 4, Memory: 1 << 30, MaxMemory: 4 << 30,
		Kernel: "/k/vmlinux", Firmware: QbootFirmware, QMPSocket: "/run/vm/qmp.sock", RootPorts: ports,
	}
}

func TestMicrovmArgv(t *testing.T) {
	vm, err := NewVM(microvm(),
		&VirtioFS{DeviceID: "rootfs", SocketPath: "/run/vm/vfs.sock", Tag: "vmpod"},
		&VirtioSerial{DeviceID: "vser0", Ports: []SerialPort{{DeviceID: "agent", Name: "vmpod.agent", SocketPath: "/run/vm/agent.sock"}}},
		&VirtioRNG{DeviceID: "rng0"},
	)
	if err != nil {
		t.Fatal(err)
	}
	args, files := vm.Render()
	want := []string{
		"-name", "guest=pod-a,debug-threads=on",
		"-machine", "microvm,memory-backend=mem", // virtio-fs asks for shared RAM
		"-accel", "tcg", "-cpu", "qemu64,+arat", "-smp", "cpus=1,maxcpus=1", "-m", "size=512M",
		"-object", "memory-backend-memfd,id=mem,size=536870912,share=on",
		"-nodefaults", "-no-user-config", "-display", "none",
		"-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny", "-no-reboot",
		"-global", "virtio-mmio.force-legacy=false",
		"-kernel", "/k/vmlinux", "-initrd", "/k/initrd.img", "-append", "console=ttyS0 tsc_early_khz=2700000",
		"-chardev", "socket,id=qmp,path=/run/vm/qmp.sock,server=on,wait=off", "-mon", "chardev=qmp,mode=control",
		"-chardev", "file,id=console,path=/run/vm/console.log,append=on", "-serial", "chardev:console",
		"-chardev", "socket,id=rootfs-sock,path=/run/vm/vfs.sock",
		"-device", "vhost-user-fs-device,id=rootfs,chardev=rootfs-sock,tag=vmpod",
		"-chardev", "socket,id=agent-sock,path=/run/vm/agent.sock,server=on,wait=off",
		"-device", "virtio-serial-device,id=vser0",
		"-device", "virtserialport,id=agent,bus=vser0.0,chardev=agent-sock,name=vmpod.agent",
		"-device", "virtio-rng-device,id=rng0",
	}
	if !reflect.DeepEqual(args, want) {
		t.Errorf("argv\n got %q\nwant %q", args, want)
	}
	if len(files) != 0 {
		t.Errorf("files %v, want none", files)
	}
}

func TestQ35ArgvPlacesEndpointsAndRootPorts(t *testing.T) {
	tapA, tapB := os.NewFile(100, "tapA"), os.NewFile(101, "tapB")
	vm, err := NewVM(q35(9),
		&VirtioBlk{DeviceID: "disk0", Path: "/img/root.img"},
		&VirtioNet{DeviceID: "eth0", MAC: "52:54:00:00:00:01", TapFiles: []*os.File{tapA}},
		&VirtioNet{DeviceID: "eth1", MAC: "52:54:00:00:00:02", TapFiles: []*os.File{tapB}},
	)
	if err != nil {
		t.Fatal(err)
	}
	args, files := vm.Render()
	joined := strings.Join(args, " ")
	for _, want := range []string{
		"-machine q35 -accel kvm -cpu host -smp cpus=2,maxcpus=4 -m size=1024M,maxmem=4096M",
		"-bios /usr/share/qemu/qboot.rom -kernel /k/vmlinux",
		// Root ports: eight functions per slot from 0x18, multifunction on function 0.
		"-device pcie-root-port,id=rp0,bus=pcie.0,addr=0x18.0,multifunction=on,chassis=1",
		"-device pcie-root-port,id=rp7,bus=pcie.0,addr=0x18.7,chassis=8",
		"-device pcie-root-port,id=rp8,bus=pcie.0,addr=0x19.0,chassis=9",
		// Endpoints: one slot each from 0x1, in order.
		"virtio-blk-pci,id=disk0,bus=pcie.0,addr=0x1.0,",
		"-netdev tap,id=eth0-tap,fd=3,vhost=off -device virtio-net-pci,id=eth0,bus=pcie.0,addr=0x2.0,",
		"-netdev tap,id=eth1-tap,fd=4,vhost=off -device virtio-net-pci,id=eth1,bus=pcie.0,addr=0x3.0,",
	} {
		if !strings.Contains(joined, want) {
			t.Errorf("argv lacks %q:\n%s", want, joined)
		}
	}
	if strings.Contains(joined, "addr=0x19.0,multifunction") {
		t.Error("a slot with a single root port is marked multifunction")
	}
	if strings.Contains(joined, "memory-backend") || strings.Contains(joined, "force-legacy") {
		t.Error("q35 without vhost-user got a shared RAM backend or a virtio-mmio global")
	}
	if !reflect.DeepEqual(files, []*os.File{tapA, tapB}) {
		t.Errorf("files %v, want the taps in fd order", files)
	}
}

func TestMachineValidation(t *testing.T) {
	tests := []struct {
		edit  func(*Machine)
		field string
	}{
		{func(m *Machine) { m.Type = "pc" }, "Type"},
		{func(m *Machine) { m.Accel = "hvf" }, "Accel"},
		{func(m *Machine) { m.VCPUs = 0 }, "VCPUs"},
		{func(m *Machine) { m.MaxVCPUs = 2 }, "MaxVCPUs"}, // microvm has no vCPU hotplug
		{func(m *Machine) { m.Memory = 512<<20 + 1 }, "Memory"},
		{func(m *Machine) { m.MaxMemory = 1 << 30 }, "MaxMemory"}, // microvm has no memory devices
		{func(m *Machine) { m.Kernel = "vmlinux" }, "Kernel"},
		{func(m *Machine) { m.Kernel = ""; m.Initrd = "" }, "Kernel"}, // Append without Kernel
		{func(m *Machine) { m.Append = "console=ttyS0\ninit=/bin/sh" }, "Append"},
		{func(m *Machine) { m.QMPSocket = "" }, "QMPSocket"},
		{func(m *Machine) { m.ConsoleLog = "console.log" }, "ConsoleLog"},
		{func(m *Machine) { m.RootPorts = 2 }, "RootPorts"},
		{func(m *Machine) { m.Name = "a\x00b" }, "Name"},
		{func(m *Machine) { m.NoACPI = true }, "NoACPI/NoSMM"}, // microvm has neither switch
		{func(m *Machine) { m.HyperV = &machine.HyperV{SynIC: true} }, "HyperV"},
		{func(m *Machine) { m.Cores = 2 }, "Cores/Threads"},               // threads left out
		{func(m *Machine) { m.Cores, m.Threads = 2, 1 }, "Cores/Threads"}, // 1 vCPU is not whole 2-core sockets
	}
	for _, tt := range tests {
		m := microvm()
		tt.edit(&m)
		_, err := NewVM(m)
		var fe *FieldError
		if !errors.As(err, &fe) || fe.Device != "machine" || fe.Field != tt.field {
			t.Errorf("%+v: %v, want a machine FieldError for %s", m, err, tt.field)
		}
	}
	m := q35(MaxRootPorts + 1)
	if _, err := NewVM(m); err == nil {
		t.Errorf("%d root ports accepted", m.RootPorts)
	}
}

// A topology gives QEMU sockets of cores of threads, as many sockets as the most vCPUs
// fill: hot-plugged vCPUs then come a socket at a time.
func TestSMPTopology(t *testing.T) {
	for _, tt := range []struct {
		vcpus, maxVCPUs, cores, threads int
		want                            string
	}{
		{2, 4, 0, 0, "cpus=2,maxcpus=4"},
		{2, 6, 1, 1, "cpus=2,sockets=6,cores=1,threads=1,maxcpus=6"},
		{4, 8, 2, 2, "cpus=4,sockets=2,cores=2,threads=2,maxcpus=8"},
		{4, 0, 2, 1, "cpus=4,sockets=2,cores=2,threads=1,maxcpus=4"},
	} {
		m := q35(9)
		m.VCPUs, m.MaxVCPUs, m.Cores, m.Threads = tt.vcpus, tt.maxVCPUs, tt.cores, tt.threads
		vm, err := NewVM(m)
		if err != nil {
			t.Fatal(err)
		}
		args, _ := vm.Render()
		if joined := strings.Join(args, " "); !strings.Contains(joined, "-smp "+tt.want+" ") {
			t.Errorf("%d/%d vCPUs, %d cores of %d threads: argv lacks -smp %s:\n%s", tt.vcpus, tt.maxVCPUs, tt.cores, tt.threads, tt.want, joined)
		}
	}
}

// The CPU's flags follow the model; each enlightenment is QEMU's hv-* property, and the
// synthetic timers bring the reference TSC page they run on.
func TestCPUFlagsAndPlatformSwitches(t *testing.T) {
	m := q35(0)
	m.CPUModel = "Skylake-Client-IBRS"
	m.KVMHidden, m.NoACPI, m.NoSMM = true, true, true
	m.HyperV = &machine.HyperV{Relaxed: true, VAPIC: true, Spinlocks: 8191, VPIndex: true, Runtime: true, SynIC: true,
		SynICTimer: true, SynICTimerDirect: true, Reset: true, VendorID: "KVMKVMKVM", Frequencies: true,
		Reenlightenment: true, TLBFlush: true, IPI: true, EVMCS: true}
	vm, err := NewVM(m)
	if err != nil {
		t.Fatal(err)
	}
	args, _ := vm.Render()
	want := "Skylake-Client-IBRS,kvm=off,hv-relaxed=on,hv-vapic=on,hv-vpindex=on,hv-runtime=on,hv-synic=on," +
		"hv-time=on,hv-stimer=on,hv-stimer-direct=on,hv-reset=on,hv-frequencies=on,hv-reenlightenment=on," +
		"hv-tlbflush=on,hv-ipi=on,hv-evmcs=on,hv-spinlocks=8191,hv-vendor-id=KVMKVMKVM"
	if got := argAfter(args, "-cpu"); got != want {
		t.Errorf("-cpu %s\nwant %s", got, want)
	}
	if got := argAfter(args, "-machine"); got != "q35,smm=off,acpi=off" {
		t.Errorf("-machine %s", got)
	}
	// the defaults: the accelerator's model, no flags, QEMU's ACPI and SMM
	for accel, cpu := range map[machine.Accel]string{machine.KVM: "host", machine.TCG: "qemu64,+arat"} {
		m := q35(0)
		m.Accel = accel
		vm, err := NewVM(m)
		if err != nil {
			t.Fatal(err)
		}
		args, _ := vm.Render()
		if got := argAfter(args, "-cpu"); got != cpu {
			t.Errorf("%s: -cpu %s, want %s", accel, got, cpu)
		}
		if got := argAfter(args, "-machine"); got != "q35" {
			t.Errorf("%s: -machine %s, want q35", accel, got)
		}
	}
	// a 64-bit PCI window for large BARs reaches QEMU and, under UEFI, OVMF
	m = q35(0)
	m.Kernel, m.Firmware = "", ""
	m.UEFI = &UEFI{Code: "/usr/share/OVMF/OVMF_CODE_4M.fd", Vars: "/run/vm/vars.fd"}
	m.PCIHole64 = 128 << 30
	hole, err := NewVM(m)
	if err != nil {
		t.Fatal(err)
	}
	holeArgs, _ := hole.Render()
	if j := strings.Join(holeArgs, " "); !strings.Contains(j, "-global q35-pcihost.pci-hole64-size=137438953472") || !strings.Contains(j, "-fw_cfg name=opt/ovmf/X-PciMmio64Mb,string=131072") {
		t.Errorf("a 128 GiB window: %s", j)
	}
	// secure boot cannot do without SMM
	m = q35(0)
	m.Kernel, m.Firmware, m.NoSMM = "", "", true
	m.UEFI = &UEFI{Code: "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd", Vars: "/run/vm/vars.fd", SecureBoot: true}
	var fe *FieldError
	if _, err := NewVM(m); !errors.As(err, &fe) || fe.Field != "NoSMM" {
		t.Errorf("secure boot without SMM: %v, want a NoSMM FieldError", err)
	}
}

func TestVMRejectsCrossDeviceConflicts(t *testing.T) {
	blk := func(id string) Device { return &VirtioBlk{DeviceID: id, Path: "/img"} }
	tests := []struct {
		name string
		m    Machine
		devs []Device
		want string
	}{
		{"duplicate device id", q35(1), []Device{blk("d"), &VirtioRNG{DeviceID: "d"}}, `device id "d"`},
		{"device named like a root port", q35(1), []Device{&VirtioRNG{DeviceID: "rp0"}}, `device id "rp0"`},
		{"port named like the machine's chardevs", microvm(), []Device{&VirtioSerial{DeviceID: "s", Ports: []SerialPort{{DeviceID: "qmp", Name: "a", SocketPath: "/a"}}}}, ""},
		{"memory devices beyond MaxMemory", q35(1), []Device{&VirtioMem{DeviceID: "m", Size: 4 << 30}}, "MaxMemory"},
		{"too many microvm devices", microvm(), func() (ds []Device) {
			for i := range MaxMicrovmDevices + 1 {
				ds = append(ds, &VirtioRNG{DeviceID: "rng" + string(rune('a'+i))})
			}
			return ds
		}(), "virtio-mmio slots"},
		{"too many pcie.0 endpoints", q35(1), func() (ds []Device) {
			for i := range MaxEndpoints + 1 {
				ds = append(ds, &VirtioRNG{DeviceID: "rng" + string(rune('a'+i))})
			}
			return ds
		}(), "pcie.0 has room"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := NewVM(tt.m, tt.devs...)
			if tt.want == "" {
				// "qmp-sock" does not collide with the chardev "qmp": must pass.
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("NewVM: %v, want an error mentioning %q", err, tt.want)
			}
		})
	}
}

func TestHotplugAllocatesAndReleasesRootPorts(t *testing.T) {
	vm, err := NewVM(q35(2), &VirtioBlk{DeviceID: "disk0", Path: "/img/root"})
	if err != nil {
		t.Fatal(err)
	}
	tap := os.NewFile(100, "tap")
	hpNet, err := vm.Hotplug(&VirtioNet{DeviceID: "eth1", MAC: "52:54:00:00:00:09", TapFiles: []*os.File{tap}})
	if err != nil {
		t.Fatal(err)
	}
	if hpNet.Port.ID != "rp0" || hpNet.Tap == nil || hpNet.Blockdev != nil || hpNet.Memory != nil {
		t.Fatalf("net hotplug %+v, want rp0 with a tap only", hpNet)
	}
	if got := hpNet.Tap.FDNames(); !slices.Equal(got, []string{"eth1-tap-fd0"}) {
		t.Errorf("FDNames %q", got)
	}
	wantDev := Frontend{Driver: "virtio-net-pci", ID: "eth1", Bus: "rp0",
		Props: []Property{StringProp("netdev", "eth1-tap"), StringProp("mac", "52:54:00:00:00:09")}}
	if !reflect.DeepEqual(hpNet.Device, wantDev) {
		t.Errorf("frontend %+v\nwant %+v", hpNet.Device, wantDev)
	}

	hpMem, err := vm.Hotplug(&VirtioMem{DeviceID: "vmem0", Size: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	if hpMem.Port.ID != "rp1" || hpMem.Memory == nil || hpMem.Memory.ID != "vmem0-mem" || hpMem.Memory.Shared {
		t.Fatalf("memory hotplug %+v", hpMem)
	}
	if _, err := vm.Hotplug(&VirtioBlk{DeviceID: "disk1", Path: "/img/1"}); err == nil || !strings.Contains(err.Error(), "no free root port") {
		t.Fatalf("third hotplug on two ports: %v", err)
	}
	// The running layout renders for a restart or a migration target.
	args, files := vm.Render()
	joined := strings.Join(args, " ")
	for _, want := range []string{"virtio-net-pci,id=eth1,bus=rp0,", "virtio-mem-pci,id=vmem0,bus=rp1,", "-netdev tap,id=eth1-tap,fd=3,"} {
		if !strings.Contains(joined, want) {
			t.Errorf("argv lacks %q", want)
		}
	}
	if len(files) != 1 || files[0] != tap {
		t.Errorf("files %v", files)
	}

	if err := vm.Release("eth1"); err != nil {
		t.Fatal(err)
	}
	hpBlk, err := vm.Hotplug(&VirtioBlk{DeviceID: "disk1", Path: "/img/1", ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	wantBlk := Blockdev{NodeName: "disk1-drive", Format: "raw", Protocol: "file", Filename: "/img/1", ReadOnly: true}
	if hpBlk.Port.ID != "rp0" || hpBlk.Blockdev == nil || *hpBlk.Blockdev != wantBlk {
		t.Fatalf("blk hotplug after release: %+v", hpBlk)
	}
	if err := vm.Release("disk0"); err == nil {
		t.Error("Release of a cold-plugged device succeeded")
	}
	if _, err := vm.Hotplug(&VirtioBlk{DeviceID: "disk0", Path: "/img/x"}); err == nil {
		t.Error("hotplug reusing a cold device's id succeeded")
	}
	if p, ok := vm.Ports().PortOf("disk0"); ok {
		t.Errorf("a failed hotplug kept root port %s", p.ID)
	}
}

func TestHotplugAtRebuildsALayout(t *testing.T) {
	vm, err := NewVM(q35(4))
	if err != nil {
		t.Fatal(err)
	}
	hp, err := vm.HotplugAt("rp3", &VirtioBlk{DeviceID: "disk7", Path: "/img/7"})
	if err != nil || hp.Port.ID != "rp3" {
		t.Fatalf("HotplugAt rp3: %+v, %v", hp, err)
	}
	if _, err := vm.HotplugAt("rp3", &VirtioRNG{DeviceID: "rng0"}); err == nil {
		t.Error("two devices on rp3")
	}
	if _, err := vm.HotplugAt("rp9", &VirtioRNG{DeviceID: "rng0"}); err == nil {
		t.Error("a device on a port that does not exist")
	}
	if hp, err := vm.Hotplug(&VirtioRNG{DeviceID: "rng0"}); err != nil || hp.Port.ID != "rp0" {
		t.Errorf("Hotplug after HotplugAt: %+v, %v; want rp0", hp, err)
	}
}

func TestHotplugRefusals(t *testing.T) {
	vm, err := NewVM(microvm())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := vm.Hotplug(&VirtioRNG{DeviceID: "rng0"}); err == nil || !strings.Contains(err.Error(), "has no hotplug") {
		t.Errorf("hotplug on microvm: %v", err)
	}
	vm, err = NewVM(q35(4))
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []Device{
		&VirtioFS{DeviceID: "fs", SocketPath: "/s", Tag: "t"},
		&Virtio9P{DeviceID: "p", Path: "/p", MountTag: "p"},
		&VirtioSerial{DeviceID: "s", Ports: []SerialPort{{DeviceID: "a", Name: "a", SocketPath: "/a"}}},
		&VirtioBlk{DeviceID: "bad id", Path: "/a"},
		&VirtioBalloon{DeviceID: "b", FreePageHint: true},
	} {
		if _, err := vm.Hotplug(d); err == nil {
			t.Errorf("hotplug of %s succeeded", d.ID())
		}
	}
	if n := len(vm.attached); n != 0 {
		t.Errorf("%d refused devices were recorded", n)
	}
	for _, p := range vm.Ports().Ports() {
		if _, err := vm.Ports().Claim(p.ID, "probe-"+p.ID); err != nil {
			t.Errorf("port %s still taken after refused hotplugs: %v", p.ID, err)
		}
	}
}

func TestSharedMemoryFollowsVhostUser(t *testing.T) {
	m := q35(1)
	vm, err := NewVM(m, &VirtioFS{DeviceID: "fs", SocketPath: "/s", Tag: "t"})
	if err != nil {
		t.Fatal(err)
	}
	hp, err := vm.Hotplug(&VirtioMem{DeviceID: "vmem0", Size: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	if !hp.Memory.Shared {
		t.Error("virtio-mem memory on a VM with virtio-fs is not shared; virtiofsd could not map it")
	}
	args, _ := vm.Render()
	joined := strings.Join(args, " ")
	for _, want := range []string{
		"-machine q35,memory-backend=mem",
		"-object memory-backend-memfd,id=mem,size=1073741824,share=on",
		"-object memory-backend-memfd,id=vmem0-mem,size=1073741824,share=on",
	} {
		if !strings.Contains(joined, want) {
			t.Errorf("argv lacks %q", want)
		}
	}
}

func TestPortAllocator(t *testing.T) {
	a, err := NewPortAllocator(3)
	if err != nil {
		t.Fatal(err)
	}
	for i, id := range []string{"a", "b", "c"} {
		p, err := a.Allocate(id)
		if err != nil || p.ID != "rp"+string(rune('0'+i)) {
			t.Fatalf("Allocate(%s) = %+v, %v", id, p, err)
		}
	}
	if _, err := a.Allocate("d"); err == nil {
		t.Fatal("allocated a fourth port out of three")
	}
	if _, err := a.Allocate("b"); err == nil {
		t.Fatal("allocated a second port to b")
	}
	if p, ok := a.Release("b"); !ok || p.ID != "rp1" {
		t.Fatalf("Release(b) = %+v, %v", p, ok)
	}
	if _, ok := a.Release("b"); ok {
		t.Fatal("released b twice")
	}
	if p, err := a.Allocate("d"); err != nil || p.ID != "rp1" {
		t.Fatalf("Allocate after Release = %+v, %v; want the freed rp1", p, err)
	}
	if _, err := NewPortAllocator(MaxRootPorts + 1); err == nil {
		t.Fatal("more than MaxRootPorts accepted")
	}
	last := rootPort(MaxRootPorts - 1)
	if last.Slot != lastRootPortSlot || last.Function != portsPerSlot-1 {
		t.Errorf("last root port at %#x.%d, want %#x.%d", last.Slot, last.Function, lastRootPortSlot, portsPerSlot-1)
	}
}

// argAfter is the argument that follows flag in args.
func argAfter(args []string, flag string) string {
	if i := slices.Index(args, flag); i >= 0 && i+1 < len(args) {
		return args[i+1]
	}
	return ""
}

func TestVirtioFSHotplugsOnAConnection(t *testing.T) {
	conn, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	vm, err := NewVM(q35(4))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := vm.Hotplug(&VirtioFS{DeviceID: "share", Conn: conn, Tag: "vmpod"}); err == nil || !strings.Contains(err.Error(), "shared guest RAM") {
		t.Errorf("virtio-fs plugged into a VM without shared RAM: %v", err)
	}
	m := q35(4)
	m.SharedMemory = true
	if vm, err = NewVM(m); err != nil {
		t.Fatal(err)
	}
	hp, err := vm.Hotplug(&VirtioFS{DeviceID: "share", Conn: conn, Tag: "vmpod"})
	if err != nil {
		t.Fatal(err)
	}
	if hp.Chardev == nil || hp.Chardev.Socket != conn || hp.Chardev.ID != "share-sock" {
		t.Errorf("chardev %+v: want share-sock on the connection", hp.Chardev)
	}
	if hp.Device.Driver != "vhost-user-fs-pci" || hp.Device.Bus != hp.Port.ID {
		t.Errorf("device %+v on port %s", hp.Device, hp.Port.ID)
	}
	// a chardev QEMU would have to open or listen on itself is not a hot-pluggable one
	if _, err := vm.Hotplug(&VirtioFS{DeviceID: "other", SocketPath: "/s", Tag: "t"}); err == nil || !strings.Contains(err.Error(), "chardev") {
		t.Errorf("virtio-fs on a socket path: %v", err)
	}
}

func TestRAMFileIsTheSharedGuestRAM(t *testing.T) {
	ram, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer ram.Close()
	m := q35(4)
	m.RAMFile = ram
	vm, err := NewVM(m)
	if err != nil {
		t.Fatal(err)
	}
	args, files := vm.Render()
	i := slices.Index(files, ram)
	if i < 0 {
		t.Fatalf("QEMU does not inherit the RAM file: %v", files)
	}
	joined := strings.Join(args, " ")
	for _, want := range []string{
		"-machine q35,memory-backend=mem",
		fmt.Sprintf("-object memory-backend-file,id=mem,size=1073741824,mem-path=/proc/self/fd/%d,share=on", 3+i),
	} {
		if !strings.Contains(joined, want) {
			t.Errorf("argv lacks %q: %s", want, joined)
		}
	}
	if strings.Contains(joined, "memory-backend-memfd,id=mem") {
		t.Error("a memfd besides the RAM file")
	}
}
