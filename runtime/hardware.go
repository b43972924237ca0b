package runtime

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
	"github.com/vmpod/vmpod/devices"
)

const (
	// shareTag is the virtio-fs / 9p mount tag of the shared directory.
	shareTag = "vmpod"
	// hotplugRootPorts are the PCIe root ports a q35 VM gets for hot-plugged devices.
	hotplugRootPorts = 4
	// memoryDeviceID is the virtio-mem device that carries memory above MemoryMiB.
	memoryDeviceID = "vmem0"
	// tcgCodeCacheMiB caps TCG's translated-code cache. QEMU's default reserves 1 GiB and an
	// idle pod had filled 111 MiB of it; at 64 MiB exec latency is unchanged (257 vs 263 ms
	// p50), at 32 MiB the cache thrashes (503 ms). KVM has no such cache.
	tcgCodeCacheMiB = 64
)

// bootPlan is everything resolved before QEMU starts.
type bootPlan struct {
	cfg    Config
	accel  accelChoice
	tscKHz int // 0 unless microvm under TCG
	paths  vmPaths
}

type vmPaths struct {
	agentSock, qmpSock, virtiofsdSock, shared string
}

func newPaths(stateDir string) vmPaths {
	return vmPaths{
		agentSock:     filepath.Join(stateDir, "agent.sock"),
		qmpSock:       filepath.Join(stateDir, "qmp.sock"),
		virtiofsdSock: filepath.Join(stateDir, "virtiofsd.sock"),
		shared:        filepath.Join(stateDir, "shared"),
	}
}

// kernelCmdline is the guest kernel command line: console, panic behaviour, what the
// agent needs to know, then the admin's extra parameters. Never anything from a pod.
func (b bootPlan) kernelCmdline() string {
	params := []string{"console=ttyS0", "quiet", "panic=-1"}
	if b.cfg.Machine == MachineMicroVM {
		params = append(params, "pci=off")
		if b.tscKHz > 0 {
			params = append(params, "tsc_early_khz="+strconv.Itoa(b.tscKHz))
		}
	}
	switch b.cfg.SharedFS {
	case SharedFSVirtioFS:
		params = append(params, agentv1.KernelParamShare+"=virtiofs:"+shareTag)
	case SharedFS9P:
		params = append(params, agentv1.KernelParamShare+"=9p:"+shareTag)
	}
	if b.cfg.Debug {
		params = append(params, agentv1.KernelParamDebug)
	}
	return strings.Join(append(params, b.cfg.KernelParams...), " ")
}

// hardware is the VM as package devices models it: the machine and its devices, from
// which QEMU's argv is rendered and hotplugs are placed.
func (b bootPlan) hardware() (*devices.VM, error) {
	c := b.cfg
	m := devices.Machine{
		Name:       c.Name,
		Type:       devices.MachineType(c.Machine),
		Accel:      devices.Accel(b.accel.accel),
		VCPUs:      c.VCPUs,
		MaxVCPUs:   c.MaxVCPUs,
		Memory:     uint64(c.MemoryMiB) << 20,
		Kernel:     c.Kernel,
		Initrd:     c.Initrd,
		Append:     b.kernelCmdline(),
		QMPSocket:  b.paths.qmpSock,
		ConsoleLog: c.LogPath,
	}
	if b.accel.accel == AccelTCG {
		m.TCGCacheMiB = tcgCodeCacheMiB
	}
	devs := []devices.Device{
		&devices.VirtioSerial{DeviceID: "vser0", Ports: []devices.SerialPort{
			{DeviceID: "agent", Name: agentv1.PortName, SocketPath: b.paths.agentSock},
		}},
		&devices.VirtioRNG{DeviceID: "rng0"},
	}
	if c.Machine == MachineQ35 {
		m.Firmware = devices.QbootFirmware
		m.RootPorts = hotplugRootPorts
		if c.MaxMemoryMiB > c.MemoryMiB {
			m.MaxMemory = uint64(c.MaxMemoryMiB) << 20
			devs = append(devs, &devices.VirtioMem{DeviceID: memoryDeviceID, Size: uint64(c.MaxMemoryMiB-c.MemoryMiB) << 20})
		}
	}
	switch c.SharedFS {
	case SharedFSVirtioFS:
		devs = append(devs, &devices.VirtioFS{DeviceID: "share", SocketPath: b.paths.virtiofsdSock, Tag: shareTag})
	case SharedFS9P:
		devs = append(devs, &devices.Virtio9P{DeviceID: "share", Path: b.paths.shared, MountTag: shareTag, SecurityModel: "passthrough"})
	}
	for i, nic := range c.NICs {
		devs = append(devs, &devices.VirtioNet{DeviceID: fmt.Sprintf("net%d", i), MAC: nic.MAC, TapFiles: []*os.File{nic.Tap}})
	}
	return devices.NewVM(m, devs...)
}
