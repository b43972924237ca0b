package runtime

import (
	"fmt"
	"path/filepath"
	"strconv"
	"strings"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
)

// shareTag is the virtio-fs / 9p mount tag of the shared directory.
const shareTag = "vmpod"

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
// agent needs to know, then the admin's extra parameters.
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

// qemuArgs renders QEMU's command line. NIC i is passed as fd 3+i.
func (b bootPlan) qemuArgs() []string {
	c := b.cfg
	mmio := c.Machine == MachineMicroVM
	dev := func(name string) string {
		if mmio {
			return name + "-device"
		}
		return name + "-pci"
	}
	machine := string(c.Machine) + ",accel=" + string(b.accel.accel)
	if c.SharedFS == SharedFSVirtioFS {
		machine += ",memory-backend=mem"
	}
	cpu := "host"
	if b.accel.accel == AccelTCG {
		// ARAT: without it microvm has no usable high-resolution timer (4 ms ticks).
		cpu = "qemu64,+arat"
	}
	args := []string{
		"-name", c.Name + ",debug-threads=on",
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-machine", machine,
		"-cpu", cpu,
		"-m", fmt.Sprintf("%dM", c.MemoryMiB),
		"-smp", fmt.Sprintf("%d,maxcpus=%d", c.VCPUs, c.MaxVCPUs),
		"-kernel", c.Kernel, "-initrd", c.Initrd, "-append", b.kernelCmdline(),
		"-chardev", "file,id=console,path=" + escape(c.LogPath) + ",append=on",
		"-serial", "chardev:console",
		"-chardev", "socket,id=agent,path=" + escape(b.paths.agentSock) + ",server=on,wait=off",
		"-device", dev("virtio-serial") + ",id=vser0",
		"-device", "virtserialport,bus=vser0.0,chardev=agent,name=" + agentv1.PortName,
		"-qmp", "unix:" + escape(b.paths.qmpSock) + ",server=on,wait=off",
		"-device", dev("virtio-rng"),
	}
	if c.Machine == MachineQ35 {
		args = append(args, "-bios", DefaultQboot)
	}
	switch c.SharedFS {
	case SharedFSVirtioFS:
		args = append(args,
			"-object", fmt.Sprintf("memory-backend-memfd,id=mem,size=%dM,share=on", c.MemoryMiB),
			"-chardev", "socket,id=vfs,path="+escape(b.paths.virtiofsdSock),
			"-device", dev("vhost-user-fs")+",chardev=vfs,tag="+shareTag)
		if mmio {
			args = append(args, "-global", "virtio-mmio.force-legacy=false")
		}
	case SharedFS9P:
		args = append(args,
			"-fsdev", "local,id=fs0,path="+escape(b.paths.shared)+",security_model=passthrough",
			"-device", dev("virtio-9p")+",fsdev=fs0,mount_tag="+shareTag)
	}
	for i, nic := range c.NICs {
		args = append(args,
			"-netdev", fmt.Sprintf("tap,id=net%d,fd=%d,vhost=off", i, 3+i),
			"-device", fmt.Sprintf("%s,netdev=net%d,mac=%s", dev("virtio-net"), i, nic.MAC))
	}
	return args
}

// escape doubles commas, QEMU's escape inside option values.
func escape(s string) string { return strings.ReplaceAll(s, ",", ",,") }
