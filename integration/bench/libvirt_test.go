package bench

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The libvirt baseline: the VM-pod test guest started through libvirt's QEMU driver, with
// the daemons a KubeVirt node runs per VM (virt-launcher's virtqemud and virtlogd).
// hack/libvirt-baseline.sh starts them (make bench does) and prints these variables. On
// Debian bookworm the QEMU daemon is libvirtd with only the QEMU driver loaded: bookworm
// packages no virtqemud (the script says why that stands in for it).
const (
	// envLibvirtRun is the baseline's run dir: the daemons' pid files and libvirt's
	// /run/libvirt (QEMU pid files under run/qemu).
	envLibvirtRun = "VMPOD_LIBVIRT_RUN"
	// envLibvirtURI is the connection URI; virsh reads it too.
	envLibvirtURI = "LIBVIRT_DEFAULT_URI"
)

// libvirtAvailable says whether make bench (hack/libvirt-baseline.sh start) started libvirt.
func libvirtAvailable() bool {
	return os.Getenv(envLibvirtRun) != "" && os.Getenv(envLibvirtURI) != ""
}

func requireLibvirt(t *testing.T) (run, uri string) {
	t.Helper()
	if !libvirtAvailable() {
		t.Skipf("libvirt baseline: needs %s and %s (make bench starts libvirt; by hand: eval \"$(hack/libvirt-baseline.sh start)\", then hack/libvirt-baseline.sh stop)",
			envLibvirtRun, envLibvirtURI)
	}
	return os.Getenv(envLibvirtRun), os.Getenv(envLibvirtURI)
}

func virsh(uri string, args ...string) (string, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.Command("virsh", append([]string{"-q", "-c", uri}, args...)...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("virsh %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// libvirtVM is one transient domain started with virsh create.
type libvirtVM struct {
	Name    string
	QEMUPid int
	uri     string
	stopped bool
}

// libvirtDomainXML is the hardware vmpod gives a VM pod (see bareVMBoot), as libvirt
// spells it: q35 with SeaBIOS (no <loader>), 1 vCPU, 1024 MiB, TCG with vmpod's 64 MiB
// code cache and CPU model, the disk on virtio-blk (boot order 1), a virtio NIC on
// user-mode networking, the guest agent's virtio-serial port, VGA with VNC (on a unix
// socket), pvpanic (the ISA panic device) and a serial console logged through virtlogd.
// libvirt adds nothing vmpod lacks but the PCIe root ports it places devices on: the USB
// controller and the memory balloon it would add by default are turned off, as vmpod has
// neither.
func libvirtDomainXML(name, disk string) string {
	esc := func(s string) string {
		var b bytes.Buffer
		_ = xml.EscapeText(&b, []byte(s))
		return b.String()
	}
	return fmt.Sprintf(`<domain type='qemu'>
  <name>%[1]s</name>
  <memory unit='MiB'>1024</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <features><acpi/><tcg><tb-cache unit='MiB'>64</tb-cache></tcg></features>
  <cpu mode='custom' match='exact' check='none'><model fallback='forbid'>qemu64</model><feature policy='require' name='arat'/></cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='%[2]s'/>
      <target dev='vda' bus='virtio'/>
      <boot order='1'/>
    </disk>
    <interface type='user'><model type='virtio'/></interface>
    <serial type='pty'><log file='/var/log/libvirt/qemu/%[1]s-serial0.log'/></serial>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <graphics type='vnc'><listen type='socket'/></graphics>
    <video><model type='vga'/></video>
    <panic model='isa'/>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
`, esc(name), esc(disk))
}

// startLibvirtVM boots a qcow2 overlay over baseQcow2 through libvirt (virsh create) with
// the hardware vmpod gives a VM pod, and returns once the guest agent answers
// `virsh qemu-agent-command <dom> '{"execute":"guest-ping"}'`, with the time from the start
// of virsh create to that answer.
func startLibvirtVM(t *testing.T, baseQcow2 string, name string) (*libvirtVM, time.Duration) {
	t.Helper()
	run, uri := requireLibvirt(t)
	disk := overlay(t, baseQcow2)
	domXML := filepath.Join(filepath.Dir(disk), "domain.xml")
	if err := os.WriteFile(domXML, []byte(libvirtDomainXML(name, disk)), 0o644); err != nil {
		t.Fatal(err)
	}
	v := &libvirtVM{Name: name, uri: uri}
	start := time.Now()
	if _, err := virsh(uri, "create", domXML); err != nil {
		t.Fatalf("libvirt: %v", err)
	}
	t.Cleanup(func() { v.Stop(t) }) // before t.TempDir's cleanup removes the disk
	pidFile := filepath.Join(run, "run", "qemu", name+".pid")
	b, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatalf("libvirt: QEMU's pid: %v", err)
	}
	if v.QEMUPid, err = strconv.Atoi(strings.TrimSpace(string(b))); err != nil {
		t.Fatalf("libvirt: %s: %v", pidFile, err)
	}
	deadline := time.Now().Add(agentReadyWithin)
	for {
		_, err := virsh(uri, "qemu-agent-command", "--timeout", "2", name, `{"execute":"guest-ping"}`)
		if err == nil {
			return v, time.Since(start)
		}
		if time.Now().After(deadline) {
			t.Fatalf("libvirt: no guest agent after %v: %v", agentReadyWithin, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// Stop destroys the domain (virsh destroy) and waits for its QEMU to be gone.
func (v *libvirtVM) Stop(t *testing.T) {
	t.Helper()
	if v.stopped {
		return
	}
	v.stopped = true
	_, err := virsh(v.uri, "destroy", v.Name)
	deadline := time.Now().Add(30 * time.Second)
	for v.QEMUPid > 0 && syscall.Kill(v.QEMUPid, 0) == nil {
		if time.Now().After(deadline) {
			t.Errorf("libvirt: QEMU (pid %d) of %s still runs 30s after virsh destroy (%v)", v.QEMUPid, v.Name, err)
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		// a domain that is already gone (its guest powered off) is no error
		if _, lookup := virsh(v.uri, "domid", v.Name); lookup == nil {
			t.Errorf("libvirt: %v", err)
		}
	}
}

// libvirtDaemonPids are the pids of the QEMU driver's daemon (virtqemud's stand-in,
// libvirtd with only the QEMU driver) and virtlogd, for a memory measurement.
func libvirtDaemonPids(t *testing.T) []int {
	t.Helper()
	run, _ := requireLibvirt(t)
	var pids []int
	for _, name := range []string{"libvirtd", "virtlogd"} {
		b, err := os.ReadFile(filepath.Join(run, name+".pid"))
		if err != nil {
			t.Fatalf("libvirt: %s's pid: %v", name, err)
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err == nil {
			err = syscall.Kill(pid, 0)
		}
		if err != nil {
			t.Fatalf("libvirt: %s (%s) is not running: %v", name, strings.TrimSpace(string(b)), err)
		}
		pids = append(pids, pid)
	}
	return pids
}
