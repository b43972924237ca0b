package vmm

import (
	"slices"
	"strings"
	"testing"

	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/devices"
)

// argAfter is the argument that follows flag in args.
func argAfter(args []string, flag string) string {
	if i := slices.Index(args, flag); i >= 0 && i+1 < len(args) {
		return args[i+1]
	}
	return ""
}

// A microvm cannot hot-plug: its growth room is in the machine from boot, and the kernel
// is told to leave it offline.
func TestMicrovmGrowthRoomIsBootedOffline(t *testing.T) {
	for _, tc := range []struct {
		name              string
		vcpus, maxVCPUs   int
		memMiB, maxMemMiB int
		smp, mem          string
		params, notParams []string
	}{
		{"no growth", 1, 1, 512, 0, "cpus=1,maxcpus=1", "size=512M", nil, []string{"maxcpus=", "mem="}},
		{"growth", 1, 4, 576, 8192, "cpus=4,maxcpus=4", "size=8192M", []string{"maxcpus=1", "mem=576M"}, nil},
		// the growth room is whole 128 MiB blocks after the one the boot memory ends in
		{"unaligned maximum", 2, 2, 576, 1000, "cpus=2,maxcpus=2", "size=1024M", []string{"mem=576M"}, []string{"maxcpus="}},
		// mem= is an address: RAM above 3 GiB lives above 4 GiB
		{"above 3 GiB", 1, 1, 3584, 4096, "cpus=1,maxcpus=1", "size=4096M", []string{"mem=4608M"}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := Config{Name: "g", Type: machine.MicroVM, VCPUs: tc.vcpus, MaxVCPUs: tc.maxVCPUs, MemoryMiB: tc.memMiB, MaxMemoryMiB: tc.maxMemMiB,
				Boot: Boot{Kernel: "/k/vmlinux", KernelParams: []string{"quiet"}}, SharedFS: machine.NoSharedFS, Console: ConsoleNone}
			args := tcgArgs(t, c)
			if got := argAfter(args, "-smp"); got != tc.smp {
				t.Errorf("-smp %q, want %q", got, tc.smp)
			}
			if got := argAfter(args, "-m"); got != tc.mem {
				t.Errorf("-m %q, want %q", got, tc.mem)
			}
			params := strings.Fields(argAfter(args, "-append"))
			for _, p := range tc.params {
				if !slices.Contains(params, p) {
					t.Errorf("kernel command line %q lacks %s", params, p)
				}
			}
			for _, p := range tc.notParams {
				if slices.ContainsFunc(params, func(s string) bool { return strings.HasPrefix(s, p) }) {
					t.Errorf("kernel command line %q has %s", params, p)
				}
			}
			// the room's parameters come after the guest layer's, so that theirs cannot undo it
			quiet := slices.Index(params, "quiet")
			for i, p := range params {
				if (strings.HasPrefix(p, "mem=") || strings.HasPrefix(p, "maxcpus=")) && i < quiet {
					t.Errorf("kernel command line %q: %s before the guest layer's parameters", params, p)
				}
			}
			// RAM the guest may never use is a memfd, not anonymous memory counted at start
			shared := slices.ContainsFunc(args, func(a string) bool { return strings.HasPrefix(a, "memory-backend-memfd,") })
			if grows := len(tc.params) > 0; shared != grows {
				t.Errorf("memfd-backed RAM %v, want %v: %q", shared, grows, args)
			}
		})
	}
}

// The CPU model and Hyper-V enlightenments depend on the accelerator: the host's CPU and
// the enlightenments are KVM's, and a VM that asks for host-passthrough on an emulating
// node is refused rather than given another CPU.
func TestCPUModelAndEnlightenmentsFollowTheAccelerator(t *testing.T) {
	hv := &machine.HyperV{Relaxed: true, Spinlocks: 8191}
	for _, tc := range []struct {
		name    string
		accel   machine.Accel
		model   string
		cpu     string // -cpu, "" for an error
		wantErr string
	}{
		{"kvm default", machine.KVM, "", "host,hv-relaxed=on,hv-spinlocks=8191", ""},
		{"kvm host-model", machine.KVM, machine.CPUHostModel, "host,hv-relaxed=on,hv-spinlocks=8191", ""},
		{"kvm passthrough", machine.KVM, machine.CPUHostPassthrough, "host,hv-relaxed=on,hv-spinlocks=8191", ""},
		{"kvm named", machine.KVM, "Skylake-Server", "Skylake-Server,hv-relaxed=on,hv-spinlocks=8191", ""},
		{"tcg default", machine.TCG, "", "qemu64,+arat", ""},
		{"tcg named", machine.TCG, "Nehalem", "Nehalem", ""},
		{"tcg passthrough", machine.TCG, machine.CPUHostPassthrough, "", "cpu model host-passthrough needs KVM"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := Config{Name: "g", Type: machine.Q35, VCPUs: 1, MaxVCPUs: 1, MemoryMiB: 512, CPUModel: tc.model, HyperV: hv,
				Boot: Boot{Firmware: Firmware{Type: FirmwareBIOS}}, SharedFS: machine.NoSharedFS, Console: ConsoleNone}
			b := bootPlan{cfg: c, accel: accelChoice{accel: tc.accel, reason: "test"}, paths: newPaths("/run/vm/g")}
			vm, err := b.hardware(nil, nil)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("hardware() = %v, want an error with %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			args, _ := vm.Render()
			if got := argAfter(args, "-cpu"); got != tc.cpu {
				t.Errorf("-cpu %q, want %q", got, tc.cpu)
			}
		})
	}
}

// Free page reporting adds a balloon that reports, and nothing else changes: every other
// device keeps its argument, PCI slot included, whether a node turns it on or not.
func TestFreePageReportingMovesNoDevice(t *testing.T) {
	for _, typ := range []machine.Type{machine.Q35, machine.MicroVM} {
		t.Run(string(typ), func(t *testing.T) {
			render := func(reporting bool) []string {
				c := Config{Name: "g", Type: typ, VCPUs: 1, MaxVCPUs: 1, MemoryMiB: 512, Boot: Boot{Kernel: "/k/vmlinux"}, SharedFS: machine.NoSharedFS,
					Console: ConsoleNone, VNC: typ == machine.Q35, Ports: []string{"agent"}, FreePageReporting: reporting}
				return tcgArgs(t, c)
			}
			devicesOf := func(args []string) (all []string, balloon string) {
				for i, a := range args {
					if a != "-device" || i+1 == len(args) {
						continue
					}
					if strings.Contains(args[i+1], "virtio-balloon") {
						balloon = args[i+1]
					} else {
						all = append(all, args[i+1])
					}
				}
				return all, balloon
			}
			off, noBalloon := devicesOf(render(false))
			on, balloon := devicesOf(render(true))
			if noBalloon != "" || !strings.Contains(balloon, "free-page-reporting=on") {
				t.Errorf("balloon without reporting %q, with it %q", noBalloon, balloon)
			}
			if !slices.Equal(on, off) {
				t.Errorf("the other devices differ with free page reporting:\n%q\nwithout:\n%q", on, off)
			}
		})
	}
}

// A guest whose RAM is a shared memfd (virtio-fs) hints its free pages to a migration,
// on the balloon's own I/O thread; one whose RAM is QEMU's anonymous memory does not.
func TestFreePageHintWithSharedRAM(t *testing.T) {
	for _, tc := range []struct {
		fs   machine.SharedFS
		hint bool
	}{{machine.VirtioFS, true}, {machine.NineP, false}, {machine.NoSharedFS, false}} {
		t.Run(string(tc.fs), func(t *testing.T) {
			c := Config{Name: "g", Type: machine.Q35, VCPUs: 1, MaxVCPUs: 1, MemoryMiB: 512, Boot: Boot{Kernel: "/k/vmlinux"}, SharedFS: tc.fs,
				Console: ConsoleNone, Ports: []string{"agent"}, FreePageReporting: true}
			args := tcgArgs(t, c)
			joined := strings.Join(args, " ")
			hints := strings.Contains(joined, "free-page-hint=on,iothread=balloon0-io") && strings.Contains(joined, "-object iothread,id=balloon0-io")
			if hints != tc.hint {
				t.Errorf("free page hints %v, want %v: %q", hints, tc.hint, args)
			}
		})
	}
}

// Passed-through functions sit on PCIe root ports of their own, before the hotplug ports,
// with the 64-bit window the caller sized; a microvm has no PCIe for them.
func TestHostDevicesOnRootPorts(t *testing.T) {
	gpu, _ := devices.ParsePCIAddress("0000:65:00.0")
	audio, _ := devices.ParsePCIAddress("0000:65:00.1")
	c := Config{Name: "g", Type: machine.Q35, VCPUs: 1, MaxVCPUs: 1, MemoryMiB: 512, Boot: Boot{Kernel: "/k/vmlinux"}, SharedFS: machine.NoSharedFS,
		Console: ConsoleNone, HostDevices: []devices.PCIAddress{gpu, audio}, PCIHole64: 128 << 30}
	args := tcgArgs(t, c)
	joined := strings.Join(args, " ")
	for _, want := range []string{"vfio-pci,id=hostdev0,bus=rp0,host=0000:65:00.0", "vfio-pci,id=hostdev1,bus=rp1,host=0000:65:00.1", "q35-pcihost.pci-hole64-size=137438953472"} {
		if !strings.Contains(joined, want) {
			t.Errorf("argv lacks %q:\n%s", want, joined)
		}
	}
	if n := strings.Count(joined, "pcie-root-port"); n != hotplugRootPorts+2 {
		t.Errorf("%d root ports, want %d: the hotplug ones and one per host device", n, hotplugRootPorts+2)
	}
	c.Type = machine.MicroVM
	b := bootPlan{cfg: c, accel: accelChoice{accel: machine.TCG}, paths: newPaths("/run/vm/g")}
	if _, err := b.hardware(nil, nil); err == nil || !strings.Contains(err.Error(), "needs machine q35") {
		t.Errorf("host devices on microvm: %v", err)
	}
}

// Under TCG a q35's RAM is 8 KiB past a multiple of 256 KiB, away from QEMU 7.2's
// dirty-bitmap fast path that loses guest writes in a migration (design 207); under KVM,
// on microvm and with shared memory (whose backend object is sized in MiB) it is as asked.
func TestTCGq35RAMIsUnaligned(t *testing.T) {
	for _, tc := range []struct {
		name  string
		typ   machine.Type
		accel machine.Accel
		fs    machine.SharedFS
		mem   string
	}{
		{"q35 TCG", machine.Q35, machine.TCG, machine.NoSharedFS, "size=524296K"},
		// the room for virtio-mem (maxmem minus RAM) stays 512 MiB: QEMU refuses a
		// virtio-mem device larger than that room (measured)
		{"q35 TCG, growth room", machine.Q35, machine.TCG, machine.NoSharedFS, "size=524296K,maxmem=1048584K"},
		{"q35 KVM", machine.Q35, machine.KVM, machine.NoSharedFS, "size=512M"},
		{"q35 TCG virtio-fs", machine.Q35, machine.TCG, machine.VirtioFS, "size=512M"},
		{"microvm TCG", machine.MicroVM, machine.TCG, machine.NoSharedFS, "size=512M"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := Config{Name: "g", Type: tc.typ, VCPUs: 1, MaxVCPUs: 1, MemoryMiB: 512, SharedFS: tc.fs, Console: ConsoleNone,
				Boot: Boot{Kernel: "/k/vmlinux"}, VirtiofsdPath: "/usr/libexec/virtiofsd"}
			if strings.Contains(tc.name, "growth room") {
				c.MaxMemoryMiB = 1024
			}
			if got := argAfter(renderedArgs(t, c, tc.accel), "-m"); got != tc.mem {
				t.Errorf("-m %q, want %q", got, tc.mem)
			}
		})
	}
}

// Under TCG a q35 machine that can grow vCPUs runs them on one thread: QEMU 7.2's
// multi-threaded TCG aborts when a vCPU is hot-plugged while the running ones hold every
// code-cache region (measured: a Debian guest's QEMU died at device_add). Others keep a
// thread per vCPU.
func TestTCGHotplugRunsOneThread(t *testing.T) {
	for _, tc := range []struct {
		name          string
		typ           machine.Type
		accel         machine.Accel
		vcpus, maxCPU int
		want          string
	}{
		{"q35 TCG, vCPU room", machine.Q35, machine.TCG, 1, 2, "tcg,thread=single,tb-size=64"},
		{"q35 TCG, no room", machine.Q35, machine.TCG, 2, 2, "tcg,tb-size=64"},
		{"q35 KVM, vCPU room", machine.Q35, machine.KVM, 1, 2, "kvm"},
		{"microvm TCG, room booted offline", machine.MicroVM, machine.TCG, 1, 2, "tcg,tb-size=64"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := Config{Name: "g", Type: tc.typ, VCPUs: tc.vcpus, MaxVCPUs: tc.maxCPU, MemoryMiB: 512, Console: ConsoleNone,
				Boot: Boot{Kernel: "/k/vmlinux"}}
			if got := argAfter(renderedArgs(t, c, tc.accel), "-accel"); got != tc.want {
				t.Errorf("-accel %q, want %q", got, tc.want)
			}
		})
	}
}

// renderedArgs is QEMU's argv for machine c under accel.
func renderedArgs(t *testing.T, c Config, accel machine.Accel) []string {
	t.Helper()
	b := bootPlan{cfg: c, accel: accelChoice{accel: accel}, paths: newPaths("/run/vm/g"), tscKHz: 1000000}
	vm, err := b.hardware(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	args, _ := vm.Render()
	return args
}

// A microvm under TCG (a TSC frequency to pass) gets the TSC's frequency and is told the
// TSC is reliable: without it the guest keeps time in jiffies and never stops its tick
// (docs/design/018). Under KVM, and on q35, neither.
func TestKernelCmdlineTSC(t *testing.T) {
	for _, tc := range []struct {
		typ    machine.Type
		tscKHz int
		want   []string
		absent []string
	}{
		{machine.MicroVM, 2600000, []string{"pci=off", "tsc_early_khz=2600000", "tsc=reliable"}, nil},
		{machine.MicroVM, 0, []string{"pci=off"}, []string{"tsc_early_khz", "tsc=reliable"}},
		{machine.Q35, 0, nil, []string{"pci=off", "tsc_early_khz", "tsc=reliable"}},
	} {
		line := bootPlan{cfg: Config{Type: tc.typ, VCPUs: 1, MemoryMiB: 512}, tscKHz: tc.tscKHz}.kernelCmdline()
		params := strings.Fields(line)
		for _, w := range tc.want {
			if !slices.Contains(params, w) {
				t.Errorf("%s, TSC %d kHz: %q lacks %s", tc.typ, tc.tscKHz, line, w)
			}
		}
		for _, a := range tc.absent {
			if strings.Contains(line, a) {
				t.Errorf("%s, TSC %d kHz: %q has %s", tc.typ, tc.tscKHz, line, a)
			}
		}
	}
}

// tcgArgs is QEMU's command line for c under TCG, as the shim would start it.
func tcgArgs(t *testing.T, c Config) []string {
	t.Helper()
	b := bootPlan{cfg: c, accel: accelChoice{accel: machine.TCG}, paths: newPaths("/run/vm/g")}
	vm, err := b.hardware(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	args, _ := vm.Render()
	return args
}
