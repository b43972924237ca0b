// Integration tests of VM pods: a real Debian guest (hack/vm-guest-image.sh) booted by
// containerd-shim-vmpod-v2 under a real containerd 2.4, driven through CRI with crictl as
// the kubelet drives a pod the vmpod controller rendered (docs/design/110-vm-pods.md).
package vmpod_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/api/vmspec"
	"github.com/vmpod/vmpod/integration/testenv"
)

// The test guest, as make test prepares it.
const (
	envGuestImage = "VMPOD_VM_GUEST_IMAGE" // containerDisk reference in the test bed's registry
	envGuestRaw   = "VMPOD_VM_GUEST_RAW"   // the same disk as a sparse raw file
)

// Under TCG on 2 busy cores the guest agent answers after ~25-35 s and cloud-init's
// effects show after ~40-60 s (reference/full-os-guest); the bounds leave room.
const (
	agentWithin     = 4 * time.Minute
	cloudInitWithin = 5 * time.Minute
	powerOffWithin  = 2 * time.Minute
)

func guestImage(t *testing.T) string {
	t.Helper()
	testenv.RequireTestbed(t)
	img := os.Getenv(envGuestImage)
	if img == "" {
		t.Skipf("VM pod test: needs the test guest (%s; make test builds it with hack/vm-guest-image.sh)", envGuestImage)
	}
	testenv.Crictl(t, "pull", img)
	return img
}

func guestRaw(t *testing.T) string {
	t.Helper()
	testenv.RequireTestbed(t)
	raw := os.Getenv(envGuestRaw)
	if raw == "" {
		t.Skipf("VM pod test: needs the test guest (%s; make test builds it with hack/vm-guest-image.sh)", envGuestRaw)
	}
	return raw
}

// computeImage is the compute container's image: the shim never runs it (the controller
// renders the pause image; any image does).
func computeImage(t *testing.T) string { return testenv.BusyboxImage(t) }

func annotation(t *testing.T, vm vmspec.VM) map[string]string {
	t.Helper()
	vm.Version = vmspec.Version
	b, err := vm.Encode()
	if err != nil {
		t.Fatalf("vm spec: %v", err)
	}
	return map[string]string{vmspec.Annotation: string(b)}
}

// testSSHKey is a public key the containerDisk test's user-data gives a user.
const testSSHKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHZtcG9kLXRlc3Qta2V5LW5vdC1hLXJlYWwtb25lLTAx vmpod-test"

// Keys of the access credentials: one through cloud-init's meta-data, one through the guest
// agent.
const (
	noCloudKey    = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHZtcG9kLW5vY2xvdWQta2V5LW5vdC1hLXJlYWwtb25l nocloud"
	guestAgentKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHZtcG9kLWd1ZXN0YWdlbnQta2V5LW5vdC1yZWFsLTAx guestagent"
	rotatedKey    = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHZtcG9kLWd1ZXN0YWdlbnQta2V5LXJvdGF0ZWQtMDAy rotated"
	// how the guest agent's keys appear in authorized_keys: marked as the shim's
	guestAgentLine = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHZtcG9kLWd1ZXN0YWdlbnQta2V5LW5vdC1yZWFsLTAx vmpod:guestagent"
	rotatedLine    = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHZtcG9kLWd1ZXN0YWdlbnQta2V5LXJvdGF0ZWQtMDAy vmpod:rotated"
)

// secretVolume is a host directory laid out as the kubelet lays out a Secret volume: each
// key a symlink into ..data.
func secretVolume(t *testing.T, data map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	ts := filepath.Join(dir, "..2026_12_03_00_00_00.000000001")
	if err := os.Mkdir(ts, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Base(ts), filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	for k, v := range data {
		if err := os.WriteFile(filepath.Join(ts, k), []byte(v), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink("..data/"+k, filepath.Join(dir, k)); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// updateSecretVolume changes a secretVolume's content the way the kubelet does when the
// Secret changes: a new timestamped directory, and ..data swapped to it atomically.
func updateSecretVolume(t *testing.T, dir string, data map[string]string) {
	t.Helper()
	ts := filepath.Join(dir, fmt.Sprintf("..2026_12_04_00_00_00.%09d", time.Now().Nanosecond()))
	if err := os.Mkdir(ts, 0o755); err != nil {
		t.Fatal(err)
	}
	for k, v := range data {
		if err := os.WriteFile(filepath.Join(ts, k), []byte(v), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Lstat(filepath.Join(dir, k)); err != nil {
			if err := os.Symlink("..data/"+k, filepath.Join(dir, k)); err != nil {
				t.Fatal(err)
			}
		}
	}
	tmp := filepath.Join(dir, "..data_tmp")
	if err := os.Symlink(filepath.Base(ts), tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
}

func baseVM() vmspec.VM {
	return vmspec.VM{CPU: vmspec.CPU{Sockets: 1, Cores: 1, Threads: 1}, MemoryMiB: 1024, Machine: machine.Q35,
		Firmware: vmspec.Firmware{Type: vmspec.FirmwareBIOS}, UUID: "5b0e8f6c-8e1f-4a51-9c3b-2f2d7c1a0b01",
		Interfaces: []vmspec.Interface{{Name: "default", PodInterface: "eth0", Model: vmspec.ModelVirtio}}}
}

// compute creates (and starts) the VM pod's compute container with extra mounts and devices.
func compute(t *testing.T, pod *testenv.Pod, mounts []testenv.Mount, devs []testenv.Device, start bool) string {
	t.Helper()
	return computeWith(t, pod, testenv.ContainerConfig{Mounts: mounts, Devices: devs}, start)
}

// computeWith creates (and starts) the compute container of cfg, which need not name
// itself, its image, its log or stdio.
func computeWith(t *testing.T, pod *testenv.Pod, cfg testenv.ContainerConfig, start bool) string {
	t.Helper()
	cfg.Metadata = testenv.Metadata{Name: vmspec.ComputeContainer}
	cfg.Image = map[string]string{"image": computeImage(t)}
	cfg.LogPath = fmt.Sprintf("compute-%d.log", time.Now().UnixNano())
	cfg.Stdin, cfg.Tty = true, true
	path := testenv.WriteJSON(t, "compute.json", cfg)
	id := testenv.Crictl(t, "create", pod.ID, path, pod.Config)
	if start {
		testenv.Crictl(t, "start", id)
	}
	return id
}

// execIn runs a command in the guest through CRI ExecSync (the guest agent).
func execIn(id string, timeout time.Duration, args ...string) (string, error) {
	return testenv.Cmd("crictl", append([]string{"exec", "-s", "--timeout", fmt.Sprint(int(timeout.Seconds())), id}, args...)...)
}

// waitExec retries a command until it succeeds and its output contains want.
func waitExec(t *testing.T, id string, within time.Duration, want string, args ...string) string {
	t.Helper()
	deadline := time.Now().Add(within)
	var out string
	var err error
	for time.Now().Before(deadline) {
		out, err = execIn(id, 20*time.Second, args...)
		if err == nil && strings.Contains(out, want) {
			return out
		}
		time.Sleep(2 * time.Second)
	}
	t.Fatalf("exec %v did not give %q within %v: %q, %v\nconsole:\n%s", args, want, within, out, err, consoleTail(id))
	return ""
}

// waitLog waits for the container's log (the serial console) to show want.
func waitLog(t *testing.T, id, want string, within time.Duration) {
	t.Helper()
	var logs string
	for deadline := time.Now().Add(within); time.Now().Before(deadline); time.Sleep(time.Second) {
		if logs = testenv.Crictl(t, "logs", id); strings.Contains(logs, want) {
			return
		}
	}
	t.Errorf("the container log (serial console) lacks %q after %v:\n%s", want, within, logs)
}

func consoleTail(id string) string {
	out, _ := testenv.Cmd("crictl", "logs", "--tail", "40", id)
	return out
}

type containerStatus struct {
	State    string `json:"state"`
	ExitCode int    `json:"exitCode"`
	Pid      int
}

func status(t *testing.T, id string) containerStatus {
	t.Helper()
	var v struct {
		Status containerStatus `json:"status"`
		Info   struct {
			Pid int `json:"pid"`
		} `json:"info"`
	}
	if err := json.Unmarshal([]byte(testenv.Crictl(t, "inspect", id)), &v); err != nil {
		t.Fatal(err)
	}
	v.Status.Pid = v.Info.Pid
	return v.Status
}

func waitExited(t *testing.T, id string, within time.Duration) int {
	t.Helper()
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		if st := status(t, id); st.State == "CONTAINER_EXITED" {
			return st.ExitCode
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("container %s still running after %v\nconsole:\n%s", id, within, consoleTail(id))
	return 0
}

func podIP(t *testing.T, pod *testenv.Pod) string { t.Helper(); return pod.IP() }

// attachSees attaches to the serial console, presses Enter every second and waits for want.
func attachSees(t *testing.T, id, want string, within time.Duration) {
	t.Helper()
	cmd := exec.Command("crictl", "attach", "-i", id)
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	cmd.Stderr = io.Discard
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	found := make(chan string, 1)
	go func() {
		var seen strings.Builder
		r := bufio.NewReader(stdout)
		buf := make([]byte, 4096)
		for {
			n, err := r.Read(buf)
			seen.Write(buf[:n])
			if strings.Contains(seen.String(), want) {
				found <- seen.String()
				return
			}
			if err != nil {
				found <- ""
				return
			}
		}
	}()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	deadline := time.After(within)
	for {
		select {
		case out := <-found:
			if out == "" {
				t.Fatalf("attach ended before %q appeared", want)
			}
			return
		case <-tick.C:
			_, _ = io.WriteString(stdin, "\r")
		case <-deadline:
			t.Fatalf("attach: no %q within %v", want, within)
		}
	}
}

// portForward runs `crictl port-forward` of the pod's port to a free local port, which it
// returns, until the test ends.
func portForward(t *testing.T, pod *testenv.Pod, port int) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	local := l.Addr().(*net.TCPAddr).Port
	l.Close()
	pf := exec.Command("crictl", "port-forward", pod.ID, fmt.Sprintf("%d:%d", local, port))
	if err := pf.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pf.Process.Kill(); _ = pf.Wait() })
	return local
}

// vncBanner reaches the VM's display through a CRI port-forward of port 5900, as
// `kubectl port-forward` (and `kubectl vmpod vnc`) do, and reads the RFB greeting.
func vncBanner(t *testing.T, pod *testenv.Pod) {
	t.Helper()
	port := portForward(t, pod, 5900)
	var banner []byte
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		conn, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), time.Second)
		if err != nil {
			continue
		}
		_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		banner = make([]byte, 12)
		n, _ := io.ReadFull(conn, banner)
		conn.Close()
		banner = banner[:n]
		if n == 12 {
			break
		}
	}
	if !strings.HasPrefix(string(banner), "RFB ") {
		t.Errorf("VNC through port-forward 5900: got %q, want an RFB greeting", banner)
	}
}

// The acceptance flow of a VM pod from a containerDisk: cloud-init, the guest agent, the
// console, the pod IP, reboot in place, ACPI power-off on SIGTERM, and a crash.
func TestVMPodFromContainerDisk(t *testing.T) {
	t.Parallel() // two TCG guests at a time: each keeps about one of the 2 cores busy
	img := guestImage(t)
	vm := baseVM()
	vm.Disks = []vmspec.Disk{{Name: "root", Volume: "rootdisk", Source: vmspec.SourceImage, Device: vmspec.DeviceDisk, Bus: vmspec.BusVirtio, BootOrder: 1}}
	vm.CloudInit = &vmspec.CloudInit{Bus: vmspec.BusSATA, UserData: "#cloud-config\nwrite_files:\n  - path: /var/tmp/hello.txt\n    content: \"hello from vmpod cloud-init\\n\"\n" +
		"users:\n  - name: vmpod\n    ssh_authorized_keys: [\"" + testSSHKey + "\"]\n"}
	vm.AccessCredentials = []vmspec.AccessCredential{
		{SecretVolume: "keys-nocloud", Propagation: vmspec.PropagateNoCloud},
		{SecretVolume: "keys-agent", Propagation: vmspec.PropagateGuestAgent, Users: []string{"vmpod"}},
	}
	pod := testenv.RunPod(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: "vm-cd"}, Hostname: "vm-cd-guest", Annotations: annotation(t, vm)})
	termLog := filepath.Join(t.TempDir(), "termination-log")
	os.WriteFile(termLog, nil, 0o644)
	agentSecret := secretVolume(t, map[string]string{"ops": guestAgentKey})
	mounts := []testenv.Mount{
		{ContainerPath: vmspec.VolumeMountPath("rootdisk"), Image: &testenv.ImageSpec{Image: img}, Readonly: true},
		{ContainerPath: "/dev/termination-log", HostPath: termLog},
		{ContainerPath: vmspec.VolumeMountPath("keys-nocloud"), HostPath: secretVolume(t, map[string]string{"key": "# team\n" + noCloudKey + "\n"}), Readonly: true},
		{ContainerPath: vmspec.VolumeMountPath("keys-agent"), HostPath: agentSecret, Readonly: true},
	}
	t0 := time.Now()
	id := compute(t, pod, mounts, nil, true)
	qemu := status(t, id).Pid
	if cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", qemu)); !strings.Contains(string(cmdline), "qemu-system") {
		t.Fatalf("the compute container's pid %d is not QEMU: %q", qemu, cmdline)
	}

	waitExec(t, id, agentWithin, "", vmspec.GuestAgentPingCommand)
	t.Logf("guest agent answers %v after start", time.Since(t0).Round(time.Second))
	out := waitExec(t, id, cloudInitWithin, "hello from vmpod cloud-init", "cat", "/var/tmp/hello.txt")
	t.Logf("cloud-init's file after %v: %q", time.Since(t0).Round(time.Second), out)
	// set_hostname too runs after write_files
	if host := waitExec(t, id, time.Minute, "vm-cd-guest", "hostname"); strings.TrimSpace(host) != "vm-cd-guest" {
		t.Errorf("guest hostname %q; want the pod's, vm-cd-guest", host)
	}
	if _, err := execIn(id, 20*time.Second, "false"); err == nil {
		t.Error("exec of false succeeded")
	}
	// cloud-init writes files before it creates users (write_files precedes users_groups in
	// the same stage), so under TCG the key can land seconds after hello.txt
	waitExec(t, id, time.Minute, testSSHKey, "cat", "/home/vmpod/.ssh/authorized_keys")
	// access credentials: the guest agent adds its key once the account exists; cloud-init
	// read the other from its meta-data (public-keys)
	waitExec(t, id, time.Minute, guestAgentLine, "cat", "/home/vmpod/.ssh/authorized_keys")
	waitExec(t, id, time.Minute, noCloudKey, "cat", "/run/cloud-init/instance-data.json")
	// the Secret changes (a key rotated): the agent's key follows it, cloud-init's stays
	updateSecretVolume(t, agentSecret, map[string]string{"ops": rotatedKey})
	keys := waitExec(t, id, time.Minute, rotatedLine, "cat", "/home/vmpod/.ssh/authorized_keys")
	if !strings.Contains(keys, testSSHKey) {
		t.Errorf("the key rotation took cloud-init's key too:\n%s", keys)
	}
	for deadline := time.Now().Add(time.Minute); strings.Contains(keys, guestAgentLine) && time.Now().Before(deadline); time.Sleep(2 * time.Second) {
		keys, _ = execIn(id, 20*time.Second, "cat", "/home/vmpod/.ssh/authorized_keys")
	}
	if strings.Contains(keys, guestAgentLine) {
		t.Errorf("the key the Secret dropped is still authorized:\n%s", keys)
	}
	// the VM's identity: SMBIOS UUID and serial from the spec, and cloud-init's instance-id,
	// the same again after the reboot below
	for _, f := range []string{"product_uuid", "product_serial"} {
		if got, err := execIn(id, 20*time.Second, "cat", "/sys/class/dmi/id/"+f); err != nil || !strings.EqualFold(strings.TrimSpace(got), vm.UUID) {
			t.Errorf("guest %s %q, %v; want the VM's UUID %s", f, got, err, vm.UUID)
		}
	}
	instanceID := strings.TrimSpace(waitExec(t, id, time.Minute, "", "cat", "/var/lib/cloud/data/instance-id"))
	if instanceID == "" {
		t.Error("cloud-init recorded no instance-id")
	}

	ip := podIP(t, pod)
	waitExec(t, id, time.Minute, ip+"/", "ip", "-4", "-o", "addr", "show", "eth0")
	if out, err := exec.Command("ping", "-c", "3", "-W", "5", ip).CombinedOutput(); err != nil {
		t.Errorf("the host cannot reach the guest on the pod IP %s: %v\n%s", ip, err, out)
	}
	var info vmspec.GuestInfo
	if out, err := execIn(id, 30*time.Second, vmspec.GuestInfoCommand); err != nil || json.Unmarshal([]byte(out), &info) != nil {
		t.Errorf("guest info: %q, %v", out, err)
	} else if info.OS == nil || info.OS.ID != "debian" || info.Hostname != "vm-cd-guest" || !strings.Contains(fmt.Sprint(info.Interfaces), ip+"/") {
		t.Errorf("guest info %+v (os %+v): want debian, the pod's hostname and IP", info, info.OS)
	}

	for _, want := range []string{"Linux version", "login:"} {
		waitLog(t, id, want, 2*time.Minute)
	}
	attachSees(t, id, "login:", time.Minute)
	vncBanner(t, pod)

	// reboot inside the guest: the pod and the container live on, the guest boots again
	bootID := strings.TrimSpace(waitExec(t, id, time.Minute, "-", "cat", "/proc/sys/kernel/random/boot_id"))
	_, _ = execIn(id, 20*time.Second, "systemctl", "reboot")
	deadline := time.Now().Add(agentWithin)
	for {
		out, err := execIn(id, 20*time.Second, "cat", "/proc/sys/kernel/random/boot_id")
		if err == nil && strings.TrimSpace(out) != bootID && strings.TrimSpace(out) != "" {
			break
		}
		if st := status(t, id); st.State != "CONTAINER_RUNNING" {
			t.Fatalf("the container is %s after a guest reboot", st.State)
		}
		if time.Now().After(deadline) {
			t.Fatalf("no new boot id within %v of a guest reboot: %q %v\nconsole:\n%s", agentWithin, out, err, consoleTail(id))
		}
		time.Sleep(3 * time.Second)
	}
	if st := status(t, id); st.Pid != qemu {
		t.Errorf("QEMU changed across the guest reboot: %d -> %d", qemu, st.Pid)
	}
	if after, err := execIn(id, 20*time.Second, "cat", "/var/lib/cloud/data/instance-id"); err != nil || strings.TrimSpace(after) != instanceID {
		t.Errorf("cloud-init's instance-id after the reboot %q, %v; want the same %q", after, err, instanceID)
	}

	// SIGTERM (crictl stop) = ACPI power-down: the guest shuts down and the container exits 0
	t1 := time.Now()
	testenv.Crictl(t, "stop", "--timeout", fmt.Sprint(int(powerOffWithin.Seconds())), id)
	if code := waitExited(t, id, 10*time.Second); code != 0 {
		t.Errorf("exit code %d after an ACPI power-down, want 0\nconsole:\n%s", code, consoleTail(id))
	}
	t.Logf("power-off took %v", time.Since(t1).Round(time.Second))
	if b, _ := os.ReadFile(termLog); !strings.Contains(string(b), "powered off") {
		t.Errorf("termination message %q", b)
	}
	testenv.Crictl(t, "rm", id)

	// the VM boots again in the same pod as a new compute container; kill -9 of QEMU is
	// an exit with its reason
	id2 := compute(t, pod, mounts, nil, true)
	waitExec(t, id2, agentWithin, "", vmspec.GuestAgentPingCommand)
	if err := syscall.Kill(status(t, id2).Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if code := waitExited(t, id2, 30*time.Second); code != 137 {
		t.Errorf("exit code %d after kill -9 of QEMU, want 137", code)
	}
	if b, _ := os.ReadFile(termLog); !strings.Contains(string(b), "QEMU was killed by killed") && !strings.Contains(string(b), "QEMUCrashed") {
		t.Errorf("termination message %q, want the crash", b)
	}
}

// copySparse copies the raw guest disk (sparse, ~1 GiB apparent) to dst.
func copySparse(t *testing.T, src, dst string) {
	t.Helper()
	if out, err := exec.Command("cp", "--sparse=always", src, dst).CombinedOutput(); err != nil {
		t.Fatalf("copy the guest disk: %v: %s", err, out)
	}
}

// losetup attaches file to a loop device for the test.
func losetup(t *testing.T, file string) string {
	t.Helper()
	out, err := exec.Command("losetup", "--find", "--show", file).Output()
	if err != nil {
		t.Fatalf("losetup: %v", err)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v: %s", dev, err, out)
		}
	})
	return dev
}

// UEFI with secure boot (OVMF's SMM build, Microsoft's keys → Debian's signed shim, GRUB
// and kernel) from a block PVC (a loop device), with a filesystem PVC's disk.img as a
// second, data disk on SCSI.
func TestVMPodUEFIFromBlockDevice(t *testing.T) {
	t.Parallel() // two TCG guests at a time: each keeps about one of the 2 cores busy
	raw := guestRaw(t)
	dir := t.TempDir()
	copySparse(t, raw, filepath.Join(dir, "root.raw"))
	dev := losetup(t, filepath.Join(dir, "root.raw"))
	pvc := filepath.Join(dir, "pvc")
	os.Mkdir(pvc, 0o755)
	if out, err := exec.Command("truncate", "-s", "64M", filepath.Join(pvc, vmspec.DiskImageFile)).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	vm := baseVM()
	vm.Firmware = vmspec.Firmware{Type: vmspec.FirmwareUEFI, SecureBoot: true}
	vm.Disks = []vmspec.Disk{
		{Name: "root", Volume: "root", Source: vmspec.SourceBlock, Device: vmspec.DeviceDisk, Bus: vmspec.BusVirtio, BootOrder: 1},
		{Name: "data", Volume: "data", Source: vmspec.SourceFile, Device: vmspec.DeviceDisk, Bus: vmspec.BusSCSI},
	}
	pod := testenv.RunPod(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: "vm-uefi"}, Hostname: "vm-uefi", Annotations: annotation(t, vm)})
	id := compute(t, pod,
		[]testenv.Mount{{ContainerPath: vmspec.VolumeMountPath("data"), HostPath: pvc}},
		[]testenv.Device{{ContainerPath: vmspec.BlockDevicePath("root"), HostPath: dev, Permissions: "rwm"}}, true)
	waitExec(t, id, agentWithin, "", vmspec.GuestAgentPingCommand)
	if out := waitExec(t, id, time.Minute, "efi", "ls", "/sys/firmware"); !strings.Contains(out, "efi") {
		t.Errorf("the guest did not boot through UEFI: /sys/firmware has %q", out)
	}
	// the SecureBoot variable: 4 bytes of attributes, then 1 = on
	if out, err := execIn(id, 30*time.Second, "od", "-An", "-tu1", "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"); err != nil || !strings.HasSuffix(strings.TrimSpace(out), " 1") {
		t.Errorf("secure boot is not on in the guest: SecureBoot = %q, %v", out, err)
	}
	waitExec(t, id, time.Minute, "scsi-0QEMU_QEMU_HARDDISK_data", "ls", "/dev/disk/by-id")
	// the guest writes to the PVC: the bytes land in disk.img on the host
	if _, err := execIn(id, 30*time.Second, "sh", "-c", "printf vmpod-was-here | dd of=/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_data conv=fsync 2>/dev/null"); err != nil {
		t.Fatalf("write to the data disk: %v", err)
	}
	testenv.Crictl(t, "stop", "--timeout", fmt.Sprint(int(powerOffWithin.Seconds())), id)
	if code := waitExited(t, id, 10*time.Second); code != 0 {
		t.Errorf("exit code %d after power-off, want 0", code)
	}
	b := make([]byte, 14)
	f, _ := os.Open(filepath.Join(pvc, vmspec.DiskImageFile))
	f.ReadAt(b, 0)
	f.Close()
	if string(b) != "vmpod-was-here" {
		t.Errorf("disk.img starts with %q, want the guest's write", b)
	}
}

// BIOS boot from a filesystem PVC's disk.img, on SATA; QEMU in the container's cgroup; a
// guest panic.
func TestVMPodFromDiskImg(t *testing.T) {
	t.Parallel() // two TCG guests at a time: each keeps about one of the 2 cores busy
	raw := guestRaw(t)
	pvc := t.TempDir()
	copySparse(t, raw, filepath.Join(pvc, vmspec.DiskImageFile))
	vm := baseVM()
	vm.Disks = []vmspec.Disk{{Name: "root", Volume: "root", Source: vmspec.SourceFile, Device: vmspec.DeviceDisk, Bus: vmspec.BusSATA, BootOrder: 1},
		{Name: "scratch", Source: vmspec.SourceEmpty, Device: vmspec.DeviceDisk, Bus: vmspec.BusVirtio, SizeMiB: 3 << 10}}
	// a named CPU model the test bed's config allows, and enlightenments, which a TCG node
	// boots without (the shim logs it)
	vm.CPU.Model = "Nehalem"
	vm.Features.HyperV = &machine.HyperV{Relaxed: true, VAPIC: true, VPIndex: true, SynIC: true}
	// room to grow by a socket and 512 MiB (resizeVM, below)
	vm.CPU.MaxSockets, vm.MaxMemoryMiB = 2, vm.MemoryMiB+512
	vmUID := fmt.Sprintf("vm-file-%d", time.Now().UnixNano())
	pod := testenv.RunPod(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: "vm-file", UID: vmUID}, Hostname: "vm-file", Annotations: annotation(t, vm)})
	termLog := filepath.Join(t.TempDir(), "termination-log")
	os.WriteFile(termLog, nil, 0o644)
	// a volume no disk uses at boot: plugged in while the VM runs, below
	data := t.TempDir()
	if err := os.WriteFile(filepath.Join(data, vmspec.DiskImageFile), append([]byte("vmpod hot-plugged disk"), make([]byte, 64<<20-22)...), 0o644); err != nil {
		t.Fatal(err)
	}
	// the controller's limits: the VM's size (docs/design/106, 208)
	id := computeWith(t, pod, testenv.ContainerConfig{
		Mounts: []testenv.Mount{{ContainerPath: vmspec.VolumeMountPath("root"), HostPath: pvc},
			{ContainerPath: vmspec.VolumeMountPath("data"), HostPath: data},
			{ContainerPath: "/dev/termination-log", HostPath: termLog}},
		Linux: map[string]any{"resources": map[string]any{"cpu_period": 100000, "cpu_quota": 100000, "memory_limit_in_bytes": vm.MemoryMiB << 20}},
	}, true)
	// QEMU is the compute container: it runs in the container's cgroup
	if cg, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", status(t, id).Pid)); !strings.Contains(string(cg), id) {
		t.Errorf("QEMU's cgroups do not name the compute container %s:\n%s", id, cg)
	}
	// and under its seccomp sandbox, firmware, disks and all
	qemu := status(t, id).Pid
	if st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", qemu)); !strings.Contains(string(st), "\nSeccomp:\t2\n") || strings.Contains(string(st), "\nUid:\t0\t") {
		t.Errorf("QEMU has no seccomp filter or runs as root:\n%s", st)
	}
	// as a user of its own it reaches its disks only through the descriptors the shim
	// opened: not by path, its own disk image included (docs/design/014)
	for _, path := range []string{filepath.Join(pvc, vmspec.DiskImageFile), filepath.Join(data, vmspec.DiskImageFile)} {
		if code, out := testenv.AsUserOf(t, int(qemu), "head -c1 "+path+" >/dev/null"); code == 0 {
			t.Errorf("QEMU's user can open %s", path)
		} else {
			t.Logf("QEMU's user opening %s: %s", path, strings.TrimSpace(out))
		}
	}
	waitExec(t, id, agentWithin, "", vmspec.GuestAgentPingCommand)
	waitExec(t, id, time.Minute, "(Nehalem Class Core i7)", "grep", "-m1", "model name", "/proc/cpuinfo")
	waitExec(t, id, time.Minute, "ata-QEMU_HARDDISK_root", "ls", "/dev/disk/by-id")
	// the empty disk: the one virtio disk, 3 GiB, named by its serial
	waitExec(t, id, time.Minute, "virtio-scratch", "ls", "/dev/disk/by-id")
	if size := strings.TrimSpace(waitExec(t, id, time.Minute, "", "cat", "/sys/block/vda/size")); size != fmt.Sprint(3<<30/512) {
		t.Errorf("empty disk: %s sectors, want 3 GiB", size)
	}
	// the data volume, attached while the VM runs: the guest sees the disk and its bytes;
	// refusals name the field; detached, it is gone from the guest
	attach := `{"name": "data", "volume": "data", "source": "file"}`
	if out, err := execIn(id, time.Minute, vmspec.AttachDiskCommand, attach); err != nil || !strings.Contains(out, "disk data attached") {
		t.Fatalf("%s: %q, %v", vmspec.AttachDiskCommand, out, err)
	}
	waitExec(t, id, time.Minute, "vmpod hot-plugged disk", "head", "-c", "22", "/dev/disk/by-id/virtio-data")
	if out, err := execIn(id, time.Minute, vmspec.AttachDiskCommand, attach, "extra"); err == nil || !strings.Contains(err.Error(), "takes one argument") {
		t.Errorf("%s with two arguments: %q, %v", vmspec.AttachDiskCommand, out, err)
	}
	// said again, the same attach is no error (the controller repeats what it wants)
	if out, err := execIn(id, time.Minute, vmspec.AttachDiskCommand, attach); err != nil || !strings.Contains(out, "disk data attached already") {
		t.Errorf("%s again: %q, %v; want it attached already", vmspec.AttachDiskCommand, out, err)
	}
	for arg, want := range map[string]string{
		`{"name": "alias", "volume": "data", "source": "file"}`:    "holds the image of disk data",
		`{"name": "root", "volume": "data", "source": "file"}`:     "is the name of disks[0]",
		`{"name": "other", "volume": "nothere", "source": "file"}`: "no volume mounted at /vmpod/volumes/nothere",
	} {
		if out, err := execIn(id, time.Minute, vmspec.AttachDiskCommand, arg); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s %s: %q, %v; want a failure saying %q", vmspec.AttachDiskCommand, arg, out, err, want)
		}
	}
	// a paused VM cannot answer an unplug: refused, saying so, until it runs again
	if out, err := execIn(id, time.Minute, vmspec.PauseCommand); err != nil || !strings.Contains(out, "paused") {
		t.Fatalf("%s: %q, %v", vmspec.PauseCommand, out, err)
	}
	if out, err := execIn(id, time.Minute, vmspec.DetachDiskCommand, "data"); err == nil || !strings.Contains(err.Error(), "paused") {
		t.Errorf("%s while paused: %q, %v; want a refusal saying it is paused", vmspec.DetachDiskCommand, out, err)
	}
	if out, err := execIn(id, time.Minute, vmspec.UnpauseCommand); err != nil || !strings.Contains(out, "running") {
		t.Fatalf("%s: %q, %v", vmspec.UnpauseCommand, out, err)
	}
	if out, err := execIn(id, 3*time.Minute, vmspec.DetachDiskCommand, "data"); err != nil || !strings.Contains(out, "disk data detached") {
		t.Fatalf("%s: %q, %v", vmspec.DetachDiskCommand, out, err)
	}
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(2 * time.Second) {
		out := waitExec(t, id, time.Minute, "virtio-scratch", "ls", "/dev/disk/by-id")
		if !strings.Contains(out, "virtio-data") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the detached disk is still in the guest: %q", out)
		}
	}
	// detached, the name and the volume are free again
	if out, err := execIn(id, time.Minute, vmspec.AttachDiskCommand, attach); err != nil || !strings.Contains(out, "disk data attached") {
		t.Fatalf("%s after the detach: %q, %v", vmspec.AttachDiskCommand, out, err)
	}
	waitExec(t, id, time.Minute, "vmpod hot-plugged disk", "head", "-c", "22", "/dev/disk/by-id/virtio-data")
	attachFromPod(t, id, vmUID)
	plugInterface(t, id, pod.ID)
	resizeVM(t, id)
	// CRI stats of the compute container are QEMU's cgroup's
	var stats struct {
		Stats []struct {
			CPU struct {
				UsageCoreNanoSeconds struct{ Value string } `json:"usageCoreNanoSeconds"`
			} `json:"cpu"`
			Memory struct {
				WorkingSetBytes struct{ Value string } `json:"workingSetBytes"`
			} `json:"memory"`
		} `json:"stats"`
	}
	if err := json.Unmarshal([]byte(testenv.Crictl(t, "stats", "-o", "json", "--id", id)), &stats); err != nil || len(stats.Stats) != 1 {
		t.Fatalf("crictl stats: %v %+v", err, stats)
	}
	if ws, _ := strconv.ParseInt(stats.Stats[0].Memory.WorkingSetBytes.Value, 10, 64); ws < 100<<20 {
		t.Errorf("the VM's working set is %d bytes: want QEMU's (a booted 1 GiB guest uses well over 100 MiB)", ws)
	}
	if cpu, _ := strconv.ParseInt(stats.Stats[0].CPU.UsageCoreNanoSeconds.Value, 10, 64); cpu == 0 {
		t.Error("the VM has used no CPU time, says CRI")
	}
	// a kernel panic reaches QEMU through pvpanic: the container fails, saying why
	_, _ = execIn(id, 20*time.Second, "sh", "-c", "echo c > /proc/sysrq-trigger")
	if code := waitExited(t, id, time.Minute); code != 1 {
		t.Errorf("exit code %d after a guest panic, want 1", code)
	}
	if b, _ := os.ReadFile(termLog); !strings.Contains(string(b), "GuestPanicked") {
		t.Errorf("termination message %q, want the panic", b)
	}
}

// resizeVM: raising the compute container's limits (what the kubelet sends for an in-place
// pod resize) hot-plugs a socket and 512 MiB into the guest, which has them online (a
// Debian guest onlines neither itself: the guest agent does); limits the VM cannot follow
// are refused, naming the limit. docs/design/208.
func resizeVM(t *testing.T, id string) {
	t.Helper()
	memTotalKiB := func() int {
		out := waitExec(t, id, time.Minute, "MemTotal", "grep", "MemTotal", "/proc/meminfo")
		kib, err := strconv.Atoi(strings.Fields(out)[1])
		if err != nil {
			t.Fatalf("MemTotal: %q", out)
		}
		return kib
	}
	waitExec(t, id, time.Minute, "1", "nproc")
	before := memTotalKiB()
	started := time.Now()
	testenv.Crictl(t, "update", "--cpu-period", "100000", "--cpu-quota", "200000", "--memory", strconv.Itoa(1536<<20), id)
	t.Logf("resize to 2 vCPUs, 1536 MiB: %v", time.Since(started).Round(time.Millisecond))
	if !testenv.PollWithin(time.Minute, func() bool {
		out, err := execIn(id, 20*time.Second, "nproc")
		return err == nil && strings.TrimSpace(out) == "2"
	}) {
		// what the guest kernel made of the hot-added CPU
		out, err := execIn(id, 20*time.Second, "sh", "-c", "grep -H . /sys/devices/system/cpu/cpu*/online; dmesg | grep -i -e cpu -e smpboot | tail -n 20")
		t.Fatalf("the guest has not 2 vCPUs online a minute after the resize; the guest says (%v):\n%s", err, out)
	}
	// the new vCPU is a second socket (1 core of 1 thread each)
	waitExec(t, id, time.Minute, "1", "cat", "/sys/devices/system/cpu/cpu1/topology/physical_package_id")
	grown := memTotalKiB()
	if grown-before < 500<<10 {
		t.Errorf("MemTotal %d KiB after the resize, %d KiB before: want 512 MiB more", grown, before)
	}
	// a guest reboot keeps the size: the vCPU is present at boot, and the memory the
	// device plugs again at boot is onlined again (the guest would leave it offline)
	bootID := strings.TrimSpace(waitExec(t, id, time.Minute, "", "cat", "/proc/sys/kernel/random/boot_id"))
	_, _ = execIn(id, 20*time.Second, "systemctl", "reboot")
	for deadline := time.Now().Add(agentWithin); ; time.Sleep(3 * time.Second) {
		out, err := execIn(id, 20*time.Second, "cat", "/proc/sys/kernel/random/boot_id")
		if err == nil && strings.TrimSpace(out) != bootID && strings.TrimSpace(out) != "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no new boot id within %v of a guest reboot: %q %v\nconsole:\n%s", agentWithin, out, err, consoleTail(id))
		}
	}
	waitExec(t, id, time.Minute, "2", "nproc")
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(2 * time.Second) {
		if after := memTotalKiB(); after-before >= 500<<10 {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("MemTotal %d KiB after a reboot of the grown guest, %d KiB before the growth: want 512 MiB more", after, before)
		}
	}
	for args, want := range map[string]string{
		"--cpu-period 100000 --cpu-quota 250000": "whole vCPUs",
		"--cpu-period 100000 --cpu-quota 300000": "3 vCPUs, the VM can have 2 (its cpu.maxSockets)",
		"--memory " + strconv.Itoa(2048<<20):     "2048 MiB, the VM can have 1536 MiB (its maxMemoryMiB)",
		// QEMU 7.2 under TCG does not survive a vCPU unplug (runtime/vmm)
		"--cpu-period 100000 --cpu-quota 100000": "does not survive a vCPU unplug",
	} {
		if out, err := testenv.Cmd("crictl", append([]string{"update"}, append(strings.Fields(args), id)...)...); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("crictl update %s: %q, %v; want a refusal saying %q", args, out, err, want)
		}
	}
	waitExec(t, id, time.Minute, "2", "nproc")
	// memory given back: the blocks were onlined movable, so the guest can empty them
	started = time.Now()
	testenv.Crictl(t, "update", "--memory", strconv.Itoa(1024<<20), id)
	t.Logf("shrink to 1024 MiB: %v", time.Since(started).Round(time.Millisecond))
	if after := memTotalKiB(); after > before+(8<<10) {
		t.Errorf("MemTotal %d KiB after the shrink: want the %d KiB of before the growth", after, before)
	}
}

// plugInterface: an interface added to the running VM pod's netns (as multus' dynamic
// networks controller adds one) becomes a guest NIC with the interface's MAC, and the
// guest's DHCP on it gets the interface's address, reachable from the veth's other end;
// removed, the NIC leaves the guest. docs/design/205.
func plugInterface(t *testing.T, id, podID string) {
	t.Helper()
	net1 := testenv.AddPodInterface(t, podID, "net1", "10.250.8.1/24", "10.250.8.2/24")
	ifname := guestNIC(t, id, net1.MAC, "10.250.8.2/24")
	if b, err := exec.Command("ping", "-c", "1", "-W", "5", "-I", net1.Host, "10.250.8.2").CombinedOutput(); err != nil {
		t.Errorf("ping the guest's %s from the veth's other end: %v\n%s", ifname, err, b)
	}
	testenv.RemovePodInterface(t, net1)
	waitNICGone(t, id, ifname)
}

// guestNIC waits for the guest of compute container id to have a NIC with mac, has its
// DHCP client ask for an address on it, which must be cidr, and returns its name.
func guestNIC(t *testing.T, id, mac, cidr string) string {
	t.Helper()
	byMAC := `for i in /sys/class/net/*; do [ "$(cat $i/address)" = ` + mac + ` ] && basename $i; done; true`
	ifname := strings.TrimSpace(waitExec(t, id, time.Minute, "eth", "sh", "-c", byMAC))
	if out, err := execIn(id, time.Minute, "dhclient", "-1", ifname); err != nil {
		t.Fatalf("dhclient -1 %s in the guest: %q, %v", ifname, out, err)
	}
	waitExec(t, id, 30*time.Second, cidr, "ip", "-4", "addr", "show", "dev", ifname)
	return ifname
}

// waitNICGone waits for the guest of compute container id to have no NIC ifname.
func waitNICGone(t *testing.T, id, ifname string) {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(2 * time.Second) {
		out := waitExec(t, id, time.Minute, "eth0", "ls", "/sys/class/net")
		if !strings.Contains(out, ifname) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s is still in the guest after its pod interface went: %q", ifname, out)
		}
	}
}

// attachFromPod: a volume another pod on the node mounts (an attachment pod, run with runc
// as the controller runs one) is plugged into the VM of compute container id, whose pod's
// UID is vmUID, only once that pod lends it: in the VM pod's namespace and labelled
// vmpod.dev/attachment-for with its UID. Detached, it is gone; a detach of a disk that is
// not attached says so and succeeds.
func attachFromPod(t *testing.T, id, vmUID string) {
	t.Helper()
	const marker = "lent by an attachment pod"
	lent := t.TempDir()
	if err := os.WriteFile(filepath.Join(lent, vmspec.DiskImageFile), append([]byte(marker), make([]byte, 16<<20-len(marker))...), 0o644); err != nil {
		t.Fatal(err)
	}
	attachmentPod := func(name, namespace, lendsTo string) string {
		uid := fmt.Sprintf("%s-%d", name, time.Now().UnixNano())
		p := testenv.RunPodWith(t, "runc", testenv.PodConfig{Metadata: testenv.Metadata{Name: name, Namespace: namespace, UID: uid},
			Labels: map[string]string{vmspec.AttachmentForLabel: lendsTo}})
		p.Container(testenv.ContainerConfig{Metadata: testenv.Metadata{Name: "attach"}, Command: []string{"sleep", "3600"},
			Mounts: []testenv.Mount{{ContainerPath: vmspec.VolumeMountPath("lent"), HostPath: lent}}})
		return uid
	}
	lender := attachmentPod("lender", "", vmUID)
	disk := func(uid, volume string) string {
		return fmt.Sprintf(`{"name": "lent", "volume": %q, "source": "file", "attachmentPod": %q}`, volume, uid)
	}
	for arg, want := range map[string]string{
		disk("no-such-pod", "lent"):                                 "no container of it on this node",
		disk(attachmentPod("other-vm", "", "another-pod"), "lent"):  "does not lend its volumes to this pod (its label vmpod.dev/attachment-for is",
		disk(attachmentPod("elsewhere", "other-ns", vmUID), "lent"): "is in namespace other-ns, this pod in vmpod-test",
		disk(lender, "nothere"):                                     "has volume nothere (at /vmpod/volumes/nothere)",
	} {
		if out, err := execIn(id, time.Minute, vmspec.AttachDiskCommand, arg); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s %s: %q, %v; want a failure saying %q", vmspec.AttachDiskCommand, arg, out, err, want)
		}
	}
	if out, err := execIn(id, time.Minute, vmspec.AttachDiskCommand, disk(lender, "lent")); err != nil || !strings.Contains(out, "disk lent attached") {
		t.Fatalf("%s from the attachment pod: %q, %v", vmspec.AttachDiskCommand, out, err)
	}
	waitExec(t, id, time.Minute, marker, "head", "-c", fmt.Sprint(len(marker)), "/dev/disk/by-id/virtio-lent")
	if out, err := execIn(id, 3*time.Minute, vmspec.DetachDiskCommand, "lent"); err != nil || !strings.Contains(out, "disk lent detached") {
		t.Fatalf("%s lent: %q, %v", vmspec.DetachDiskCommand, out, err)
	}
	if out, err := execIn(id, time.Minute, vmspec.DetachDiskCommand, "lent"); err != nil || !strings.Contains(out, "disk lent is not attached") {
		t.Errorf("%s lent again: %q, %v; want success saying it is not attached", vmspec.DetachDiskCommand, out, err)
	}
}

// Bad input is refused with the field named, and leaves nothing (RunPod's cleanup checks
// the pod's state dir, processes and mounts are gone).
func TestVMPodBadInput(t *testing.T) {
	testenv.RequireTestbed(t)
	// an annotation the schema refuses: runp fails, naming the field
	bad := baseVM()
	bad.Disks = []vmspec.Disk{{Name: "root", Volume: "../etc", Source: vmspec.SourceImage, Device: vmspec.DeviceDisk, Bus: vmspec.BusVirtio}}
	raw, _ := json.Marshal(map[string]any{"version": vmspec.Version, "cpu": bad.CPU, "memoryMiB": 512, "firmware": bad.Firmware, "disks": bad.Disks, "hostPath": "/etc"})
	cfg := testenv.PodConfig{Metadata: testenv.Metadata{Name: "vm-bad", Namespace: "vmpod-test", UID: fmt.Sprint(time.Now().UnixNano())},
		Annotations: map[string]string{vmspec.Annotation: string(raw)}, LogDirectory: t.TempDir(), Linux: map[string]any{}}
	_, err := testenv.Cmd("crictl", "runp", "--runtime", "vmpod", testenv.WriteJSON(t, "bad.json", cfg))
	if err == nil || !strings.Contains(err.Error(), "hostPath") {
		t.Errorf("runp with an unknown field: %v, want the field named", err)
	}
	for _, p := range strings.Fields(testenv.Crictl(t, "pods", "-q", "--name", "vm-bad")) {
		t.Errorf("pod %s left after a refused runp", p)
		_, _ = testenv.Cmd("crictl", "rmp", "-f", p)
	}

	// a CPU model the node's admin has not allowed: runp fails naming it
	model := baseVM()
	model.CPU.Model = "Skylake-Server"
	cfg.Metadata.Name, cfg.Annotations = "vm-model", annotation(t, model)
	_, err = testenv.Cmd("crictl", "runp", "--runtime", "vmpod", testenv.WriteJSON(t, "model.json", cfg))
	if err == nil || !strings.Contains(err.Error(), "cpu.model: Skylake-Server is not one of the CPU models this node allows") {
		t.Errorf("runp with a CPU model the node does not allow: %v, want cpu.model named", err)
	}
	for _, p := range strings.Fields(testenv.Crictl(t, "pods", "-q", "--name", "vm-model")) {
		t.Errorf("pod %s left after a refused runp", p)
		_, _ = testenv.Cmd("crictl", "rmp", "-f", p)
	}

	// a disk naming a volume the pod lacks: create fails, the pod stays usable
	vm := baseVM()
	vm.Disks = []vmspec.Disk{{Name: "root", Volume: "missing", Source: vmspec.SourceFile, Device: vmspec.DeviceDisk, Bus: vmspec.BusVirtio, BootOrder: 1}}
	pod := testenv.RunPod(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: "vm-novol"}, Annotations: annotation(t, vm)})
	cc := testenv.ContainerConfig{Metadata: testenv.Metadata{Name: vmspec.ComputeContainer}, Image: map[string]string{"image": computeImage(t)}, Linux: map[string]any{}}
	// CRI creates the task (and so the VM) at StartContainer
	cid := testenv.Crictl(t, "create", pod.ID, testenv.WriteJSON(t, "c.json", cc), pod.Config)
	_, err = testenv.Cmd("crictl", "start", cid)
	if err == nil || !strings.Contains(err.Error(), "disks[0]") || !strings.Contains(err.Error(), "/vmpod/volumes/missing") {
		t.Errorf("start with a missing volume: %v, want disks[0] and the mount path named", err)
	}
	if procs := testenv.LiveProcessesMentioning(testenv.PodStateDir(t, pod.ID)); len(procs) > 0 {
		t.Errorf("a refused create left processes: %v", procs)
	}

	pvc := t.TempDir()
	os.WriteFile(filepath.Join(pvc, vmspec.DiskImageFile), make([]byte, 1<<20), 0o644)
	vm.Disks[0].Volume = "blank"

	// an access credential whose Secret holds no SSH key: create fails naming the
	// credential, the file and the line; nothing runs
	keyed := vm
	keyed.AccessCredentials = []vmspec.AccessCredential{{SecretVolume: "keys", Propagation: vmspec.PropagateGuestAgent, Users: []string{"root"}}}
	podKey := testenv.RunPod(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: "vm-badkey"}, Annotations: annotation(t, keyed)})
	cc.Mounts = []testenv.Mount{{ContainerPath: vmspec.VolumeMountPath("blank"), HostPath: pvc},
		{ContainerPath: vmspec.VolumeMountPath("keys"), HostPath: secretVolume(t, map[string]string{"ops": "password123\n"}), Readonly: true}}
	cid = testenv.Crictl(t, "create", podKey.ID, testenv.WriteJSON(t, "ck.json", cc), podKey.Config)
	_, err = testenv.Cmd("crictl", "start", cid)
	if err == nil || !strings.Contains(err.Error(), "accessCredentials[0] (secretVolume keys): ops line 1: not an SSH public key") {
		t.Errorf("start with a Secret that holds no key: %v, want the credential, file and line named", err)
	}
	if procs := testenv.LiveProcessesMentioning(testenv.PodStateDir(t, podKey.ID)); len(procs) > 0 {
		t.Errorf("a refused create left processes: %v", procs)
	}

	// a GPU the device plugin did not give (no VFIO device in the container), and a
	// "VFIO device" that is /dev/null: refused, naming what is missing or wrong
	gpu := vm
	gpu.GPUs = []vmspec.HostDevice{{Name: "gpu1", ResourceName: "nvidia.com/GA102GL_A10"}}
	for name, tc := range map[string]struct {
		devs []testenv.Device
		want string
	}{
		"no VFIO device": {nil, "gpus/hostDevices: 1 asked for, but the compute container was given 0 VFIO devices"},
		"not VFIO":       {[]testenv.Device{{ContainerPath: "/dev/vfio/7", HostPath: "/dev/null", Permissions: "rw"}}, "/dev/vfio/7: devices: char device 1:3"},
	} {
		podGPU := testenv.RunPod(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: "vm-gpu"}, Annotations: annotation(t, gpu)})
		cg := cc
		cg.Mounts, cg.Devices = []testenv.Mount{{ContainerPath: vmspec.VolumeMountPath("blank"), HostPath: pvc}}, tc.devs
		cid = testenv.Crictl(t, "create", podGPU.ID, testenv.WriteJSON(t, "cg.json", cg), podGPU.Config)
		if _, err = testenv.Cmd("crictl", "start", cid); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: start: %v, want %q", name, err, tc.want)
		}
		if procs := testenv.LiveProcessesMentioning(testenv.PodStateDir(t, podGPU.ID)); len(procs) > 0 {
			t.Errorf("%s: a refused create left processes: %v", name, procs)
		}
	}

	// a guest without an agent (a disk with nothing bootable): exec says so
	pod2 := testenv.RunPod(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: "vm-noagent"}, Annotations: annotation(t, vm)})
	id := compute(t, pod2, []testenv.Mount{{ContainerPath: vmspec.VolumeMountPath("blank"), HostPath: pvc}}, nil, true)
	_, err = execIn(id, 30*time.Second, "true")
	if err == nil || !strings.Contains(err.Error(), "guest agent did not answer") {
		t.Errorf("exec into a guest without an agent: %v, want the missing agent named", err)
	}
	if _, err := execIn(id, 30*time.Second, vmspec.GuestAgentPingCommand); err == nil {
		t.Error("guest-agent ping succeeded without an agent")
	}
	testenv.Crictl(t, "stop", "--timeout", "1", id)
	if code := waitExited(t, id, 30*time.Second); code != 137 {
		t.Errorf("a guest that ignores the power button: exit %d after the grace period, want 137", code)
	}
}

// The masquerade binding: the guest is 10.0.2.2 behind NAT in the pod; the pod's IP is
// forwarded to it (every port), its own connections leave with the pod's IP, and a
// port-forward reaches its ports. Pause and resume.
func TestVMPodMasquerade(t *testing.T) {
	t.Parallel() // two TCG guests at a time: each keeps about one of the 2 cores busy
	img := guestImage(t)
	vm := baseVM()
	vm.Interfaces[0].Binding = vmspec.BindingMasquerade
	vm.Disks = []vmspec.Disk{{Name: "root", Volume: "rootdisk", Source: vmspec.SourceImage, Device: vmspec.DeviceDisk, Bus: vmspec.BusVirtio, BootOrder: 1}}
	pod := testenv.RunPod(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: "vm-nat"}, Hostname: "vm-nat", Annotations: annotation(t, vm)})
	id := compute(t, pod, []testenv.Mount{{ContainerPath: vmspec.VolumeMountPath("rootdisk"), Image: &testenv.ImageSpec{Image: img}, Readonly: true}}, nil, true)
	waitExec(t, id, agentWithin, "", vmspec.GuestAgentPingCommand)
	waitExec(t, id, 2*time.Minute, vmspec.MasqueradeGuest+"/24", "ip", "-4", "-o", "addr", "show", "eth0")
	ip := podIP(t, pod)

	// the guest serves HTTP on 8080; the host reaches it on the pod's IP, and through a
	// CRI port-forward
	if _, err := execIn(id, 30*time.Second, "sh", "-c", "cd /etc && nohup python3 -m http.server 8080 >/dev/null 2>&1 &"); err != nil {
		t.Fatalf("start a web server in the guest: %v", err)
	}
	url := fmt.Sprintf("http://%s:8080/hostname", ip)
	var body []byte
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(time.Second) {
		if body, _ = exec.Command("curl", "-sf", "--max-time", "5", url).Output(); strings.TrimSpace(string(body)) == "vm-nat" {
			break
		}
	}
	if strings.TrimSpace(string(body)) != "vm-nat" {
		t.Errorf("GET %s through the NAT: %q, want the guest's hostname", url, body)
	}
	// pause (QMP stop) freezes the guest: it stops answering; resume brings it back
	if _, err := testenv.Cmd("ctr", "-n", "k8s.io", "task", "pause", id); err != nil {
		t.Fatalf("pause: %v", err)
	}
	if out, err := exec.Command("curl", "-sf", "--max-time", "3", url).Output(); err == nil {
		t.Errorf("a paused VM answered: %q", out)
	}
	if _, err := testenv.Cmd("ctr", "-n", "k8s.io", "task", "resume", id); err != nil {
		t.Fatalf("resume: %v", err)
	}
	if out, err := exec.Command("curl", "-sf", "--max-time", "10", url).Output(); err != nil || strings.TrimSpace(string(out)) != "vm-nat" {
		t.Errorf("after resume: %q, %v", out, err)
	}
	// the same through the execs the shim answers itself (what kubectl vmpod pause uses, the
	// kubelet having no pause): while paused, other execs and the agent probe fail at once
	if out, err := execIn(id, 20*time.Second, vmspec.PauseCommand); err != nil || strings.TrimSpace(out) != "paused" {
		t.Fatalf("exec %s: %q, %v", vmspec.PauseCommand, out, err)
	}
	if out, err := exec.Command("curl", "-sf", "--max-time", "3", url).Output(); err == nil {
		t.Errorf("a VM paused by exec answered: %q", out)
	}
	for _, args := range [][]string{{vmspec.GuestAgentPingCommand}, {"hostname"}} {
		t0 := time.Now()
		if out, err := execIn(id, 20*time.Second, args...); err == nil || !strings.Contains(err.Error(), "paused") || time.Since(t0) > 5*time.Second {
			t.Errorf("exec %v in a paused VM: %q, %v after %v; want a prompt error saying it is paused", args, out, err, time.Since(t0))
		}
	}
	if out, err := execIn(id, 20*time.Second, vmspec.UnpauseCommand); err != nil || strings.TrimSpace(out) != "running" {
		t.Fatalf("exec %s: %q, %v", vmspec.UnpauseCommand, out, err)
	}
	if out, err := exec.Command("curl", "-sf", "--max-time", "10", url).Output(); err != nil || strings.TrimSpace(string(out)) != "vm-nat" {
		t.Errorf("after unpause: %q, %v", out, err)
	}
	local := portForward(t, pod, 8080)
	body = nil
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
		if body, _ = exec.Command("curl", "-sf", "--max-time", "5", fmt.Sprintf("http://127.0.0.1:%d/hostname", local)).Output(); len(body) > 0 {
			break
		}
	}
	if strings.TrimSpace(string(body)) != "vm-nat" {
		t.Errorf("port-forward to the guest's 8080: %q, want its hostname", body)
	}

	// the guest's own connection to the host arrives from the pod's IP
	host, err := net.Listen("tcp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer host.Close()
	hostPort := host.Addr().(*net.TCPAddr).Port
	from := make(chan string, 1)
	go func() {
		c, err := host.Accept()
		if err == nil {
			from <- c.RemoteAddr().(*net.TCPAddr).IP.String()
			c.Close()
		}
	}()
	gw := strings.Fields(waitExec(t, id, 30*time.Second, "default via", "ip", "-4", "route", "show", "default"))
	if len(gw) < 3 || gw[2] != vmspec.MasqueradeGateway {
		t.Fatalf("the guest's default route %v, want via %s", gw, vmspec.MasqueradeGateway)
	}
	target := bridgeGateway(t, ip)
	if _, err := execIn(id, 30*time.Second, "bash", "-c", fmt.Sprintf("echo hi > /dev/tcp/%s/%d", target, hostPort)); err != nil {
		t.Fatalf("connect from the guest to the host: %v", err)
	}
	select {
	case got := <-from:
		if got != ip {
			t.Errorf("the guest's connection came from %s, want the pod's IP %s (masqueraded)", got, ip)
		}
	case <-time.After(30 * time.Second):
		t.Error("the guest's connection never arrived")
	}
}

// bridgeGateway is the host's address on the pod network: the first address of the pod's
// /24 (the test bed's CNI bridge is its gateway).
func bridgeGateway(t *testing.T, podIP string) string {
	t.Helper()
	ip := net.ParseIP(podIP).To4()
	if ip == nil {
		t.Fatalf("pod IP %q is not IPv4", podIP)
	}
	return net.IPv4(ip[0], ip[1], ip[2], 1).String()
}
