package vmm

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/devices"
)

const (
	// ShareTag is the virtio-fs / 9p mount tag of the shared directory.
	ShareTag = "vmpod"
	// hotplugRootPorts are the PCIe root ports a q35 machine gets for hot-plugged devices.
	hotplugRootPorts = 4
	// templateNICs is how many NICs a restored template machine plugs at most: a pod with
	// more boots (each takes a root port of its own, as does the virtio-fs device).
	templateNICs = 3
	// memoryDeviceID is the virtio-mem device that carries memory above MemoryMiB.
	memoryDeviceID = "vmem0"
	// TCGCodeCacheMiB caps TCG's translated-code cache. QEMU's default reserves 1 GiB and an
	// idle pod had filled 111 MiB of it; at 64 MiB exec latency is unchanged (257 vs 263 ms
	// p50), at 32 MiB the cache thrashes (503 ms). KVM has no such cache.
	TCGCodeCacheMiB = 64
)

// bootPlan is everything resolved before QEMU starts.
type bootPlan struct {
	cfg    Config
	accel  accelChoice
	tscKHz int // 0 unless microvm under TCG
	// zeroPagesOnAlloc: the guest kernel zeroes the pages it allocates (init_on_alloc=1),
	// for a QEMU whose TCG finds translations by physical page alone (x86, QEMU >= 8.1)
	// and a virtiofsd writing file pages into guest RAM behind TCG's back: without it a
	// page that held code runs its stale translations once virtiofsd refilled it with
	// another binary (docs/design/020; measured under QEMU 10: most execs died)
	zeroPagesOnAlloc bool
	paths            paths
	host             hostCPU // what the accelerator was chosen from
}

type paths struct {
	stateDir, qmpSock, virtiofsdSock, shared, console, uefiVars string
}

func newPaths(stateDir string) paths {
	return paths{
		stateDir:      stateDir,
		qmpSock:       filepath.Join(stateDir, "qmp.sock"),
		virtiofsdSock: filepath.Join(stateDir, "virtiofsd.sock"),
		shared:        filepath.Join(stateDir, "shared"),
		console:       filepath.Join(stateDir, "console.sock"),
		uefiVars:      filepath.Join(stateDir, "uefi-vars.fd"),
	}
}

// port is the host socket of the i-th virtio-serial port: numbered, since a port's name
// ("org.qemu.guest_agent.0") would push the path past sun_path's 108 bytes.
func (p paths) port(i int) string { return filepath.Join(p.stateDir, "port"+strconv.Itoa(i)+".sock") }

// kernelCmdline is the guest layer's kernel command line with what the machine type needs
// around it: microvm has no PCI and, under TCG, no timer to calibrate the TSC against; its
// growth room is vCPUs the kernel leaves offline and RAM above mem= (OfflineGrowth), put
// last so that a node's own maxcpus= or mem= cannot take the room away unnoticed.
func (b bootPlan) kernelCmdline() string {
	var params []string
	c := b.cfg
	if c.Type == machine.MicroVM {
		params = append(params, "pci=off")
		if b.tscKHz > 0 {
			// tsc=reliable: every vCPU reads the one host TSC, but Linux marks a TSC
			// unstable on a non-Intel CPU model with several possible CPUs and falls
			// back to jiffies, which keeps a 250 Hz tick running in an idle guest
			// (measured: 4.4 % of a host core per idle pod)
			params = append(params, "tsc_early_khz="+strconv.Itoa(b.tscKHz), "tsc=reliable")
		}
	}
	if b.zeroPagesOnAlloc {
		params = append(params, "init_on_alloc=1")
	}
	params = append(params, c.Boot.KernelParams...)
	if c.OfflineGrowth() {
		if c.MaxVCPUs > c.VCPUs {
			params = append(params, "maxcpus="+strconv.Itoa(c.VCPUs))
		}
		if c.MemoryLimitMiB() > c.MemoryMiB {
			params = append(params, fmt.Sprintf("mem=%dM", microvmMemLimitMiB(c.MemoryMiB)))
		}
	}
	return strings.Join(params, " ")
}

// microvmRAMBelow4GMiB is how much of a microvm's RAM QEMU maps below 4 GiB; the rest
// starts at 4 GiB (measured: the e820 map of -m 4096 is usable up to 0xbfffffff, then
// from 0x100000000).
const microvmRAMBelow4GMiB = 3072

// microvmMemLimitMiB is mem= for a microvm kernel that should use memMiB of its RAM:
// mem= is the highest physical address the kernel may use, not an amount.
func microvmMemLimitMiB(memMiB int) int {
	if memMiB > microvmRAMBelow4GMiB {
		return memMiB + 4096 - microvmRAMBelow4GMiB
	}
	return memMiB
}

// ProbeBlockMiB is the unit in which a microvm's offline RAM comes online: the guest
// kernel's memory block (128 MiB on x86-64 below 64 GiB), which memory/probe adds whole.
// The block the boot memory ends in is the kernel's, in part: growth starts after it.
const ProbeBlockMiB = 128

// MemoryLimitMiB is the most memory the machine can grow to: MaxMemoryMiB on q35 (the
// caller sizes it in virtio-mem's blocks), on microvm the boot memory and as many whole
// probe blocks as fit below MaxMemoryMiB. Without growth room it is MemoryMiB.
func (c Config) MemoryLimitMiB() int {
	if c.MaxMemoryMiB <= c.MemoryMiB {
		return c.MemoryMiB
	}
	if !c.OfflineGrowth() {
		return c.MaxMemoryMiB
	}
	return c.MemoryMiB + (c.MaxMemoryMiB-c.MemoryMiB)/ProbeBlockMiB*ProbeBlockMiB
}

// machineSize is the vCPUs and RAM QEMU gets: the boot size, or on microvm with growth
// room everything the machine may grow to, since it has no hotplug (the kernel is told
// to leave the rest offline). That RAM ends on a block boundary: up to 127 MiB above
// MaxMemoryMiB, address space the guest never uses (the rest of the block it boots into).
func (c Config) machineSize() (vcpus, memMiB int) {
	if !c.OfflineGrowth() {
		return c.VCPUs, c.MemoryMiB
	}
	memMiB = c.MemoryMiB
	if grow := c.MemoryLimitMiB() - c.MemoryMiB; grow > 0 {
		memMiB = (c.MemoryMiB+ProbeBlockMiB-1)/ProbeBlockMiB*ProbeBlockMiB + grow
	}
	return c.MaxVCPUs, memMiB
}

// OfflineGrowth says the machine grows past its boot size by the guest onlining what it
// booted without (microvm: no hotplug) rather than by hotplug (q35).
func (c Config) OfflineGrowth() bool { return c.Type == machine.MicroVM }

// hardware is the machine as package devices models it: from it QEMU's argv is rendered
// and hotplugs are placed. QEMU gets files' descriptors; without files (a check before
// anything is opened, and tests) the model names paths instead.
func (b bootPlan) hardware(files *hostFiles, ram *os.File) (*devices.VM, error) {
	c := b.cfg
	vcpus, memMiB := c.machineSize()
	m := devices.Machine{
		Name:    c.Name,
		Type:    c.Type,
		Accel:   b.accel.accel,
		VCPUs:   vcpus,
		Cores:   c.Cores,
		Threads: c.Threads,
		Memory:  uint64(memMiB) << 20,
		// RAM the guest may never touch must not count against the host's overcommit
		// limit: a memfd is accounted page by page as it is used, anonymous RAM at start.
		// and a template's, whose virtio-fs device is plugged after it is up
		SharedMemory:      (c.OfflineGrowth() && memMiB > c.MemoryMiB) || c.Template,
		RAMFile:           ram, // a template's (makeRAM)
		Reboot:            c.Reboot,
		StartPaused:       c.Paused,
		IncomingMigration: c.Incoming || c.RestoreFrom != nil,
		ExitOnPanic:       c.ExitOnPanic,
		UUID:              c.UUID,
		KVMHidden:         c.KVMHidden,
		NoACPI:            c.NoACPI,
		NoSMM:             c.NoSMM,
	}
	switch c.CPUModel {
	case "", machine.CPUHostModel: // the machine's choice for its accelerator
	case machine.CPUHostPassthrough:
		if b.accel.accel != machine.KVM {
			return nil, fmt.Errorf("cpu model %s needs KVM; this node emulates (TCG: %s)", c.CPUModel, b.accel.reason)
		}
		m.CPUModel = "host"
	default:
		m.CPUModel = c.CPUModel
	}
	if b.accel.accel == machine.KVM {
		m.HyperV = c.HyperV
	}
	m.VNCClients = c.VNC // DialVNC
	switch c.Console {
	case ConsoleLog:
		m.ConsoleLog = c.LogPath
	case ConsoleSocket:
		m.ConsoleSocket = b.paths.console
	}
	if c.Boot.Kernel != "" {
		m.Kernel, m.Initrd, m.Append = c.Boot.Kernel, c.Boot.Initrd, b.kernelCmdline()
		if c.Type == machine.Q35 {
			m.Firmware = devices.QbootFirmware
		}
	} else if c.Boot.Firmware.Type == FirmwareUEFI {
		m.UEFI = &devices.UEFI{Code: c.Boot.Firmware.Code, Vars: b.paths.uefiVars, SecureBoot: c.Boot.Firmware.SecureBoot}
	}
	for _, f := range c.Files {
		m.FDSets = append(m.FDSets, devices.FDSet{File: f.File, Set: f.Set})
	}
	if files == nil {
		m.QMPSocket = b.paths.qmpSock
	} else {
		m.QMPListener, m.Inherit = files.qmp, files.inherit
		m.FDSets = append(m.FDSets, files.fdSets...)
		if m.ConsoleSocket != "" {
			m.ConsoleSocket, m.ConsoleListener = "", files.console
		}
		if m.ConsoleLog != "" {
			m.ConsoleLog = files.consoleLog
		}
		if m.Kernel != "" {
			m.Kernel, m.Initrd, m.Firmware = files.kernel, files.initrd, files.firmware
		}
		if m.UEFI != nil {
			m.UEFI.Code, m.UEFI.Vars = files.uefiCode, files.uefiVars
		}
	}
	m.Sandbox = true // every VM: nothing vmpod asks of QEMU needs what the filter denies
	if b.accel.accel == machine.TCG {
		m.TCGCacheMiB = TCGCodeCacheMiB
		// what may migrate (VM pods, q35 container pods without virtio-fs) must not lose
		// guest writes to QEMU 7.2's TCG dirty-tracking bug (devices.Machine.UnalignedRAM)
		m.UnalignedRAM = c.Type == machine.Q35
		// a vCPU hot-plugged into multi-threaded TCG may abort QEMU (devices.Machine.
		// TCGSingleThread; docs/design/208): a machine that can grow vCPUs runs them all on
		// one thread
		m.TCGSingleThread = c.Type == machine.Q35 && c.MaxVCPUs > c.VCPUs
	}
	var devs []devices.Device
	if len(c.Ports) > 0 {
		ser := &devices.VirtioSerial{DeviceID: "vser0"}
		for i, name := range c.Ports {
			port := devices.SerialPort{DeviceID: fmt.Sprintf("port%d", i), Name: name, SocketPath: b.paths.port(i)}
			if files != nil {
				port.SocketPath, port.Listener = "", files.ports[i]
			}
			ser.Ports = append(ser.Ports, port)
		}
		devs = append(devs, ser)
	}
	devs = append(devs, &devices.VirtioRNG{DeviceID: "rng0"})
	if c.VNC {
		devs = append(devs, &devices.VGA{DeviceID: "video0"})
	}
	if len(c.HostDevices) > 0 && c.Type != machine.Q35 {
		return nil, fmt.Errorf("host devices: passthrough needs machine q35 (PCIe), not %s", c.Type)
	}
	if c.Type == machine.Q35 {
		m.MaxVCPUs = c.MaxVCPUs
		// a root port for each passed-through function (large BARs want one, and a
		// driver may insist on a PCIe link), and the hotplug ports besides
		m.RootPorts = hotplugRootPorts + len(c.HostDevices)
		if c.Template { // what a restore plugs takes root ports too
			m.RootPorts += 1 + templateNICs
		}
		m.PCIHole64 = c.PCIHole64
		if c.MaxMemoryMiB > c.MemoryMiB {
			m.MaxMemory = uint64(c.MaxMemoryMiB) << 20
			devs = append(devs, &devices.VirtioMem{DeviceID: memoryDeviceID, Size: uint64(c.MaxMemoryMiB-c.MemoryMiB) << 20})
		}
	}
	switch {
	case c.Template: // virtio-fs and NICs are plugged once it is up (restore)
	case c.SharedFS == machine.VirtioFS:
		fs := &devices.VirtioFS{DeviceID: shareDeviceID, SocketPath: b.paths.virtiofsdSock, Tag: ShareTag}
		if files != nil {
			fs.SocketPath, fs.Conn = "", files.virtiofsd
		}
		devs = append(devs, fs)
	case c.SharedFS == machine.NineP:
		devs = append(devs, &devices.Virtio9P{DeviceID: shareDeviceID, Path: b.paths.shared, MountTag: ShareTag, SecurityModel: "passthrough"})
	}
	for i, nic := range c.NICs {
		if !c.Template {
			devs = append(devs, nicDevice(nicID(i), nic))
		}
	}
	devs = append(devs, c.Devices...)
	if c.FreePageReporting {
		// The guest tells QEMU which memory it has freed, and QEMU gives it back to the
		// host; without it a VM keeps resident every page its guest ever touched.
		// The balloon never inflates: vmpod sizes guests by hotplug and growth room.
		// Last: whether a node reports free pages must not move any other device's slot
		// (a guest names NICs and disks by them, docs/design/202).
		// Guest RAM in a shared memfd (virtio-fs) also hints free pages to a migration:
		// QEMU reads every page it sends, and a read of a page the guest never touched
		// allocates it, on the source and (written) on the target; anonymous RAM reads
		// the zero page instead (docs/design/213).
		devs = append(devs, &devices.VirtioBalloon{DeviceID: "balloon0", FreePageReporting: true,
			FreePageHint: c.SharedFS == machine.VirtioFS})
	}
	vm, err := devices.NewVM(m, devs...)
	if err != nil {
		return nil, err
	}
	for i, a := range c.HostDevices {
		if _, err := vm.Hotplug(&devices.VFIO{DeviceID: fmt.Sprintf("hostdev%d", i), Host: a}); err != nil {
			return nil, fmt.Errorf("host device %s: %w", a, err)
		}
	}
	return vm, nil
}

// shareDeviceID is the shared directory's device.
const shareDeviceID = "share"

// nicID is the device id of Config.NICs[i].
func nicID(i int) string { return fmt.Sprintf("net%d", i) }

// nicDevice is the guest NIC for nic.
func nicDevice(id string, nic NIC) devices.Device {
	return &devices.VirtioNet{DeviceID: id, MAC: nic.MAC, TapFiles: []*os.File{nic.Tap}, Model: nic.Model}
}
