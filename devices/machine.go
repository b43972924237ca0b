package devices

import (
	"fmt"
	"os"
	"strconv"

	"github.com/vmpod/vmpod/api/machine"
)

// QbootFirmware is qboot, the minimal firmware that boots a direct-kernel q35
// guest faster than the default SeaBIOS.
const QbootFirmware = "/usr/share/qemu/qboot.rom"

// MaxMicrovmDevices is how many virtio-mmio slots microvm has (with its default
// second IOAPIC): each virtio device takes one, virtio-serial ports do not.
const MaxMicrovmDevices = 24

// Reserved ids: the machine's own chardevs and RAM backend.
const (
	qmpChardevID     = "qmp"
	consoleChardevID = "console"
	ramBackendID     = "mem"
)

// Machine is the VM's hardware apart from its devices.
type Machine struct {
	// Name names the VM in ps and QEMU's thread names (-name, debug-threads).
	Name string
	Type machine.Type // machine.Q35 or machine.MicroVM
	// Accel is machine.KVM or machine.TCG (resolved: never machine.AccelAuto).
	Accel machine.Accel
	// CPUModel overrides the CPU model. By default it is "host" under KVM and
	// "qemu64,+arat" under TCG: microvm has no HPET, and without ARAT the guest's
	// LAPIC timer cannot serve high-resolution timers, which turns every sleep
	// into a 4 ms tick (measured: ttrpc round trips 0.7 ms with ARAT, 3.3 ms
	// without).
	CPUModel string
	// HyperV enlightenments become hv-* flags of the CPU. They are KVM's: under TCG QEMU
	// accepts most of them, implements none and refuses vpindex.
	HyperV *machine.HyperV
	// KVMHidden hides KVM's CPUID signature from the guest (kvm=off), for guest drivers
	// that refuse to run in a VM.
	KVMHidden bool
	// NoACPI builds the machine without ACPI tables; NoSMM without System Management Mode
	// (q35), which UEFI secure boot needs. Both are on by default, as in QEMU.
	NoACPI, NoSMM bool
	// Sandbox turns on QEMU's seccomp filter: no exec or fork, no setuid, no obsolete
	// syscalls, no changes to scheduling, memory policy or resource limits — what an
	// exploit of a device model reaches for first. The shim pins vCPUs and moves cgroups
	// from outside, which the filter does not restrict.
	Sandbox bool
	// TCGCacheMiB caps TCG's translated-code cache (tb-size); 0 leaves QEMU's default
	// (1 GiB reserved, filled as the guest runs code). Ignored under KVM, which has none.
	TCGCacheMiB int
	// TCGSingleThread runs every vCPU on one host thread (thread=single) instead of one
	// thread each. QEMU 7.2's multi-threaded TCG aborts when a vCPU is hot-plugged while
	// the running vCPUs hold every region of the code cache (tcg_region_initial_alloc's
	// assertion); with one thread there is nothing to allocate. Ignored under KVM.
	TCGSingleThread bool
	VCPUs           int
	// MaxVCPUs above VCPUs leaves room to hot-plug vCPUs (q35 only); 0 means VCPUs.
	MaxVCPUs int
	// Cores and Threads give the guest a topology: sockets of Cores*Threads vCPUs, as
	// many as max(MaxVCPUs, VCPUs) fills (vCPUs are hot-plugged in that topology's
	// order, so whole sockets when the counts are multiples of a socket). 0 and 0 leave it
	// to QEMU (7.2: one socket of cores on q35). A guest's licensing (Windows client
	// editions run at most two sockets) and its scheduler see it.
	Cores, Threads int
	Memory         uint64 // guest RAM in bytes, a multiple of 1 MiB
	// MaxMemory above Memory leaves address space for memory devices
	// (virtio-mem); q35 only. 0 means none.
	MaxMemory uint64
	// MemorySlots is the number of DIMM slots; virtio-mem does not need any.
	MemorySlots int
	// SharedMemory backs guest RAM with a shared memfd. vhost-user devices
	// (virtio-fs) need it and turn it on by themselves.
	SharedMemory bool
	// RAMFile, if set, is the shared guest RAM instead of a memfd QEMU makes: a file the
	// runtime made (a memfd it filled with a template's RAM, docs/design/022), which QEMU
	// inherits and maps shared. It implies SharedMemory.
	RAMFile *os.File
	Kernel  string // a PVH vmlinux or a bzImage; "" boots from firmware
	Initrd  string
	// Append is the kernel command line, passed as one argument (no escaping).
	// Under TCG, microvm guests need tsc_early_khz=<host TSC kHz>: microvm has
	// no timer to calibrate the TSC against.
	Append string
	// Firmware replaces the default firmware (-bios); QbootFirmware is the fast
	// choice for q35 direct kernel boot.
	Firmware  string
	QMPSocket string // the unix socket QEMU's QMP monitor listens on
	// QMPListener is a listening unix socket QEMU inherits for its QMP monitor, instead
	// of QMPSocket: a QEMU running as a user of its own creates nothing on the host.
	QMPListener *os.File
	// ConsoleLog receives the guest's serial console (ttyS0), appended.
	ConsoleLog string
	// ConsoleSocket serves the serial console on a unix socket instead (a VM pod's
	// console log and attach), or ConsoleListener on an inherited listening socket. At
	// most one of ConsoleLog, ConsoleSocket and ConsoleListener.
	ConsoleSocket   string
	ConsoleListener *os.File
	// Inherit are files QEMU inherits as fds 3, 4, ... in this order, for what it opens by
	// name: InheritedPath(i) names Inherit[i] (/proc/self/fd/<n>). The kernel, initrd and
	// firmware are given so when QEMU's user may not reach their paths: reopening an fd's
	// magic link checks the file's own permissions, not its directories'.
	Inherit []*os.File
	// UEFI boots OVMF from pflash instead of Firmware or the default SeaBIOS (q35).
	UEFI *UEFI
	// FDSets are fds QEMU inherits into fd sets (-add-fd), for images a device opens
	// as /dev/fdset/<set>: the shim opens a pod's disk inside its volume, QEMU never
	// resolves the pod's paths itself.
	FDSets []FDSet
	// Reboot lets a guest reboot reset the machine; without it QEMU exits
	// (-no-reboot), as a container pod's guest must not come back by itself.
	Reboot bool
	// ExitOnPanic makes QEMU exit with status 1 when the guest reports a panic
	// (pvpanic), instead of pausing the guest.
	ExitOnPanic bool
	// VNCSocket serves the guest's display (a VGA device) over VNC on a unix socket.
	VNCSocket string
	// VNCClients serves the display over VNC to clients the runtime hands to QEMU one
	// connection at a time (QMP add_client), instead of on VNCSocket.
	VNCClients bool
	// UUID is the SMBIOS system UUID, also given as the system serial number.
	UUID string
	// RootPorts is the number of PCIe root ports created at boot for hotplug
	// (q35 only, up to MaxRootPorts).
	RootPorts int
	// PCIHole64 sizes q35's 64-bit PCI MMIO window (0: QEMU's default), for passed-through
	// devices with large BARs (GPUs) that the default window cannot map.
	PCIHole64 uint64
	// StartPaused starts with the vCPUs stopped (-S) until QMP cont.
	StartPaused bool
	// IncomingMigration makes QEMU wait for migrate-incoming (-incoming defer).
	IncomingMigration bool
	// UnalignedRAM gives the guest 8 KiB more RAM than Memory, so that the RAM block is
	// no multiple of 256 KiB. Under TCG, QEMU before 9.0 syncs an aligned block's dirty
	// bitmap 64 pages at a time without resetting the TCG TLB (fixed upstream by
	// 03bfc2188f, "physmem: Fix migration dirty bitmap coherency with TCG memory
	// access"): the guest's later writes to those pages are never sent, and a migrated
	// guest crashes (measured with QEMU 7.2: 2 migrations of 2; 8 of 8 fine with the
	// unaligned size, which takes the page-by-page path). Ignored with shared memory,
	// whose backend object has Memory's size. docs/design/207.
	UnalignedRAM bool
}

// unalignedRAMSlack is what UnalignedRAM adds: QEMU rounds RAM to 8 KiB.
const unalignedRAMSlack = 8 << 10

// UEFI is OVMF's code and the VM's own variable store, both pflash.
type UEFI struct {
	Code string // read-only firmware image
	Vars string // this VM's writable copy of the variable store
	// SecureBoot runs an SMM build of OVMF (Code must be one, Vars a template with keys
	// enrolled): the machine gets SMM, and only SMM code may write the variable store, so
	// the guest cannot turn secure boot off behind the firmware's back.
	SecureBoot bool
}

// FDSet is one file QEMU inherits and adds to fd set Set.
type FDSet struct {
	File *os.File
	Set  int
	// Opaque describes the file (-add-fd opaque=, shown by query-fdsets and ps).
	Opaque string
}

// InheritedPath is how QEMU names Machine.Inherit[i]: Render passes those first.
func InheritedPath(i int) string { return "/proc/self/fd/" + strconv.Itoa(3+i) }

// FDSetPath is how a device names the file of fd set set.
func FDSetPath(set int) string { return "/dev/fdset/" + strconv.Itoa(set) }

const mib = 1 << 20

// Reserved node names: the UEFI pflash images.
const (
	pflashCodeNode = "pflash-code"
	pflashVarsNode = "pflash-vars"
)

func (m *Machine) validate() error {
	c := &checker{device: "machine"}
	c.text("Name", m.Name)
	c.oneOf("Type", string(m.Type), string(machine.MicroVM), string(machine.Q35))
	c.oneOf("Accel", string(m.Accel), string(machine.KVM), string(machine.TCG))
	if err := machine.CheckCPUModel(m.CPUModel); err != nil {
		c.fail("CPUModel", "%v", err)
	}
	if m.HyperV != nil {
		if err := m.HyperV.Check(); err != nil {
			c.fail("HyperV", "%v", err)
		}
	}
	if m.NoSMM && m.UEFI != nil && m.UEFI.SecureBoot {
		c.fail("NoSMM", "secure boot needs SMM")
	}
	if (m.NoACPI || m.NoSMM) && m.Type != machine.Q35 {
		c.fail("NoACPI/NoSMM", "only q35 has ACPI and SMM switches")
	}
	if m.TCGCacheMiB < 0 {
		c.fail("TCGCacheMiB", "%d is negative", m.TCGCacheMiB)
	}
	if m.VCPUs < 1 {
		c.fail("VCPUs", "%d; need at least 1", m.VCPUs)
	}
	if m.MaxVCPUs != 0 && m.MaxVCPUs < m.VCPUs {
		c.fail("MaxVCPUs", "%d is below VCPUs (%d)", m.MaxVCPUs, m.VCPUs)
	}
	if m.MaxVCPUs > m.VCPUs && m.Type != machine.Q35 {
		c.fail("MaxVCPUs", "vCPU hotplug needs q35")
	}
	if m.Cores != 0 || m.Threads != 0 {
		if perSocket := m.Cores * m.Threads; m.Cores < 1 || m.Threads < 1 {
			c.fail("Cores/Threads", "%d cores of %d threads; set both, at least 1", m.Cores, m.Threads)
		} else if all := max(m.MaxVCPUs, m.VCPUs); all%perSocket != 0 {
			c.fail("Cores/Threads", "%d vCPUs are not whole sockets of %d cores of %d threads", all, m.Cores, m.Threads)
		}
	}
	if m.Memory == 0 || m.Memory%mib != 0 {
		c.fail("Memory", "%d is not a positive multiple of 1 MiB", m.Memory)
	}
	if m.MaxMemory != 0 {
		if m.MaxMemory <= m.Memory || m.MaxMemory%mib != 0 {
			c.fail("MaxMemory", "%d must be a multiple of 1 MiB above Memory (%d)", m.MaxMemory, m.Memory)
		}
		if m.Type != machine.Q35 {
			c.fail("MaxMemory", "memory devices need q35")
		}
	}
	if m.MemorySlots < 0 || (m.MemorySlots > 0 && m.MaxMemory == 0) {
		c.fail("MemorySlots", "%d needs MaxMemory", m.MemorySlots)
	}
	for _, f := range []struct{ field, path string }{
		{"Kernel", m.Kernel}, {"Initrd", m.Initrd}, {"Firmware", m.Firmware}, {"ConsoleLog", m.ConsoleLog},
		{"ConsoleSocket", m.ConsoleSocket}, {"VNCSocket", m.VNCSocket}, {"QMPSocket", m.QMPSocket},
	} {
		if f.path != "" {
			c.path(f.field, f.path)
		}
	}
	if m.Kernel == "" && (m.Initrd != "" || m.Append != "") {
		c.fail("Kernel", "Initrd and Append need a Kernel")
	}
	c.text("Append", m.Append)
	c.text("UUID", m.UUID)
	if (m.QMPSocket == "") == (m.QMPListener == nil) {
		c.fail("QMPSocket", "give a socket path or QMPListener, one of them")
	}
	if m.VNCSocket != "" && m.VNCClients {
		c.fail("VNCClients", "the display is served on VNCSocket or to handed-over clients, not both")
	}
	for i, f := range m.Inherit {
		if f == nil {
			c.fail(fmt.Sprintf("Inherit[%d]", i), "missing")
		}
	}
	if m.RootPorts < 0 || m.RootPorts > MaxRootPorts {
		c.fail("RootPorts", "%d is outside 0..%d", m.RootPorts, MaxRootPorts)
	}
	if m.PCIHole64 != 0 && m.Type != machine.Q35 {
		c.fail("PCIHole64", "the 64-bit PCI window is q35's")
	}
	if m.RootPorts > 0 && m.Type != machine.Q35 {
		c.fail("RootPorts", "PCIe root ports need q35")
	}
	if n := btoi(m.ConsoleLog != "") + btoi(m.ConsoleSocket != "") + btoi(m.ConsoleListener != nil); n > 1 {
		c.fail("ConsoleSocket", "the console goes to one of ConsoleLog, ConsoleSocket and ConsoleListener")
	}
	if m.UEFI != nil {
		c.path("UEFI.Code", m.UEFI.Code)
		c.path("UEFI.Vars", m.UEFI.Vars)
		if m.Type != machine.Q35 {
			c.fail("UEFI", "OVMF needs q35")
		}
		if m.Firmware != "" || m.Kernel != "" {
			c.fail("UEFI", "UEFI boots from a disk: no Firmware, no Kernel")
		}
	}
	sets := map[int]bool{}
	for i, s := range m.FDSets {
		field := fmt.Sprintf("FDSets[%d]", i)
		if s.File == nil {
			c.fail(field+".File", "missing")
		}
		if s.Set < 0 || sets[s.Set] {
			c.fail(field+".Set", "%d is negative or used twice", s.Set)
		}
		sets[s.Set] = true
	}
	return c.Err()
}

func (m *Machine) transport() Transport {
	if m.Type == machine.MicroVM {
		return MMIO
	}
	return PCI
}

// cpu is -cpu's value: the model and its flags.
func (m *Machine) cpu() string {
	var model string
	switch {
	case m.CPUModel != "":
		model = m.CPUModel
	case m.Accel == machine.KVM:
		model = "host"
	default:
		model = "qemu64,+arat"
	}
	o := newOptions(model)
	if m.KVMHidden {
		o.addBool("kvm", false)
	}
	if h := m.HyperV; h != nil {
		for _, f := range []struct {
			name string
			on   bool
		}{
			{"hv-relaxed", h.Relaxed}, {"hv-vapic", h.VAPIC}, {"hv-vpindex", h.VPIndex},
			{"hv-runtime", h.Runtime}, {"hv-synic", h.SynIC},
			// the synthetic timers run on the reference TSC page (hv-time)
			{"hv-time", h.SynICTimer}, {"hv-stimer", h.SynICTimer}, {"hv-stimer-direct", h.SynICTimerDirect},
			{"hv-reset", h.Reset}, {"hv-frequencies", h.Frequencies},
			{"hv-reenlightenment", h.Reenlightenment}, {"hv-tlbflush", h.TLBFlush}, {"hv-ipi", h.IPI},
			{"hv-evmcs", h.EVMCS},
		} {
			if f.on {
				o.addBool(f.name, true)
			}
		}
		if h.Spinlocks != 0 {
			o.addUint("hv-spinlocks", uint64(h.Spinlocks))
		}
		if h.VendorID != "" {
			o.add("hv-vendor-id", h.VendorID)
		}
	}
	return o.String()
}

func (m *Machine) accelOption() string {
	o := newOptions(string(m.Accel))
	if m.Accel == machine.TCG && m.TCGSingleThread {
		o.add("thread", "single")
	}
	if m.Accel == machine.TCG && m.TCGCacheMiB > 0 {
		o.add("tb-size", strconv.Itoa(m.TCGCacheMiB))
	}
	return o.String()
}

// smp is -smp: the boot vCPUs, the most there can be, and the topology if one is set.
func (m *Machine) smp() string {
	all := max(m.MaxVCPUs, m.VCPUs)
	o := newOptions("").add("cpus", strconv.Itoa(m.VCPUs))
	if m.Cores > 0 && m.Threads > 0 {
		o.add("sockets", strconv.Itoa(all/(m.Cores*m.Threads))).add("cores", strconv.Itoa(m.Cores)).add("threads", strconv.Itoa(m.Threads))
	}
	return o.add("maxcpus", strconv.Itoa(all)).String()
}

// sandboxOptions deny every class of syscall QEMU's seccomp filter can deny.
const sandboxOptions = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// args renders everything but the devices, appending what QEMU must inherit to files.
// shared says whether guest RAM must be a shared memfd.
func (m *Machine) args(shared bool, files []*os.File) ([]string, []*os.File) {
	args := []string{"-name", newOptions("").add("guest", orDefault(m.Name, "vmpod")).addBool("debug-threads", true).String()}
	machineOpts := newOptions(string(m.Type))
	if shared {
		machineOpts.add("memory-backend", ramBackendID)
	}
	if m.UEFI != nil {
		machineOpts.add("pflash0", pflashCodeNode).add("pflash1", pflashVarsNode)
		if m.UEFI.SecureBoot {
			machineOpts.addBool("smm", true)
		}
	}
	if m.NoSMM {
		machineOpts.addBool("smm", false)
	}
	if m.NoACPI {
		machineOpts.addBool("acpi", false)
	}
	args = append(args,
		"-machine", machineOpts.String(),
		"-accel", m.accelOption(),
		"-cpu", m.cpu(),
		"-smp", m.smp())
	// The slack is added to maxmem too: QEMU sizes the room for memory devices (virtio-mem)
	// as maxmem minus RAM, which must stay what the device model planned.
	var slack uint64
	if m.UnalignedRAM && !shared {
		slack = unalignedRAMSlack
	}
	size := func(n uint64) string {
		if slack == 0 {
			return megabytes(n)
		}
		return strconv.FormatUint((n+slack)>>10, 10) + "K"
	}
	mem := newOptions("").add("size", size(m.Memory))
	if m.MemorySlots > 0 {
		mem.add("slots", strconv.Itoa(m.MemorySlots))
	}
	if m.MaxMemory > 0 {
		mem.add("maxmem", size(m.MaxMemory))
	}
	args = append(args, "-m", mem.String())
	switch {
	case m.RAMFile != nil:
		// a descriptor QEMU reopens by path: memory-backend-file takes no fd
		path := "/proc/self/fd/" + strconv.Itoa(3+len(files))
		files = append(files, m.RAMFile)
		args = append(args, "-object", newOptions("memory-backend-file").add("id", ramBackendID).addUint("size", m.Memory).
			add("mem-path", path).addBool("share", true).String())
	case shared:
		args = append(args, "-object", MemoryBackend{ID: ramBackendID, Size: m.Memory, Shared: true}.option())
	}
	args = append(args, "-nodefaults", "-no-user-config", "-display", "none")
	if m.Sandbox {
		args = append(args, "-sandbox", sandboxOptions)
	}
	if !m.Reboot {
		args = append(args, "-no-reboot")
	}
	if m.ExitOnPanic {
		args = append(args, "-action", "panic=exit-failure")
	}
	switch {
	case m.VNCSocket != "":
		args = append(args, "-vnc", "unix:"+m.VNCSocket)
	case m.VNCClients:
		// VNC set up but listening nowhere: add_client hands it each connection
		args = append(args, "-vnc", "none")
	}
	if m.UUID != "" {
		args = append(args, "-uuid", m.UUID, "-smbios", newOptions("type=1").add("serial", m.UUID).String())
	}
	if m.PCIHole64 != 0 {
		args = append(args, "-global", fmt.Sprintf("q35-pcihost.pci-hole64-size=%d", m.PCIHole64))
	}
	if m.Type == machine.MicroVM {
		// Legacy virtio-mmio lacks VIRTIO_F_VERSION_1, which virtio-fs requires
		// (requests hang); modern virtio is better for every device, so always.
		args = append(args, "-global", "virtio-mmio.force-legacy=false")
	}
	if m.Firmware != "" {
		args = append(args, "-bios", m.Firmware)
	}
	if m.UEFI != nil {
		args = append(args,
			"-blockdev", newOptions("").add("driver", "file").add("node-name", pflashCodeNode).add("filename", m.UEFI.Code).addBool("read-only", true).String(),
			"-blockdev", newOptions("").add("driver", "file").add("node-name", pflashVarsNode).add("filename", m.UEFI.Vars).String())
		if m.UEFI.SecureBoot {
			args = append(args, "-global", "driver=cfi.pflash01,property=secure,value=on")
		}
		if m.PCIHole64 != 0 {
			// OVMF sizes its own 64-bit aperture (32 GiB by default in older builds)
			args = append(args, "-fw_cfg", fmt.Sprintf("name=opt/ovmf/X-PciMmio64Mb,string=%d", m.PCIHole64>>20))
		}
	}
	if m.Kernel != "" {
		args = append(args, "-kernel", m.Kernel)
	}
	if m.Initrd != "" {
		args = append(args, "-initrd", m.Initrd)
	}
	if m.Append != "" {
		args = append(args, "-append", m.Append)
	}
	qmp, files := Chardev{ID: qmpChardevID, Path: m.QMPSocket, Socket: m.QMPListener, Server: true}.render(files)
	args = append(args,
		"-chardev", qmp,
		"-mon", newOptions("").add("chardev", qmpChardevID).add("mode", "control").String())
	var console string
	switch {
	case m.ConsoleLog != "":
		console, files = Chardev{ID: consoleChardevID, Path: m.ConsoleLog, File: true}.render(files)
	case m.ConsoleSocket != "" || m.ConsoleListener != nil:
		console, files = Chardev{ID: consoleChardevID, Path: m.ConsoleSocket, Socket: m.ConsoleListener, Server: true}.render(files)
	}
	if console != "" {
		args = append(args, "-chardev", console, "-serial", "chardev:"+consoleChardevID)
	}
	if m.StartPaused {
		args = append(args, "-S")
	}
	if m.IncomingMigration {
		args = append(args, "-incoming", "defer")
	}
	return args, files
}

// megabytes renders a MiB-aligned size for -m, whose bare numbers mean MiB.
func megabytes(n uint64) string { return fmt.Sprintf("%dM", n/mib) }
