package vmpod_test

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmpod/vmpod/api/vmspec"
	"github.com/vmpod/vmpod/integration/testenv"
)

// execStdin runs a migration exec with its request as JSON on stdin (nil: none).
func execStdin(id string, stdin any, timeout time.Duration, args ...string) (string, error) {
	var b []byte
	if stdin != nil {
		var err error
		if b, err = json.Marshal(stdin); err != nil {
			return "", err
		}
	}
	return testenv.ExecStdin(id, b, timeout, args...)
}

// guestCount reads the counter the guest's counting loop keeps in its tmpfs (renamed into
// place, so a read never sees it half-written).
func guestCount(t *testing.T, id string) int {
	t.Helper()
	out := waitExec(t, id, time.Minute, "", "cat", "/dev/shm/count")
	n, err := strconv.Atoi(strings.TrimSpace(out))
	if err != nil {
		t.Fatalf("the guest's counter: %q", out)
	}
	return n
}

// TestVMPodLiveMigration (issue 12, docs/design/209): a running Debian guest moves from one
// VM pod to another through the shims' migration execs, over TLS between the pods' network
// namespaces, its disk on storage both pods mount. The guest's memory (a tmpfs file, a
// counting process, a web server) carries over, it keeps its address behind the
// masquerade binding and answers on the target pod's IP; the source's container ends
// Migrated. A stranger's credentials are refused with the source untouched, and a
// cancelled migration leaves the guest running where it was.
func TestVMPodLiveMigration(t *testing.T) {
	raw := guestRaw(t)
	pvc := t.TempDir() // both pods mount it: on one host, what an RWX volume is between nodes
	copySparse(t, raw, filepath.Join(pvc, vmspec.DiskImageFile))
	vm := baseVM()
	vm.MemoryMiB = 512
	vm.Interfaces[0].Binding = vmspec.BindingMasquerade
	vm.Disks = []vmspec.Disk{{Name: "root", Volume: "root", Source: vmspec.SourceFile, Device: vmspec.DeviceDisk, Bus: vmspec.BusVirtio, BootOrder: 1}}
	rootMount := testenv.Mount{ContainerPath: vmspec.VolumeMountPath("root"), HostPath: pvc}
	// a volume the running guest gets as a hot-plugged disk, which moves with it (the
	// target plugs it on the source's root port), and one plugged and unplugged before it
	// so that the two ports differ from what a fresh plug would take
	data, pad := t.TempDir(), t.TempDir()
	if err := os.WriteFile(filepath.Join(data, vmspec.DiskImageFile), append([]byte("vmpod hot-plugged disk"), make([]byte, 16<<20-22)...), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(pad, vmspec.DiskImageFile), make([]byte, 16<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	dataMount := testenv.Mount{ContainerPath: vmspec.VolumeMountPath("data"), HostPath: data}
	padMount := testenv.Mount{ContainerPath: vmspec.VolumeMountPath("pad"), HostPath: pad}
	target := vm
	target.Migration = &vmspec.Migration{Role: vmspec.RoleTarget}

	src := testenv.RunPod(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: "vm-mig-src"}, Hostname: "vm-mig", Annotations: annotation(t, vm)})
	termLog := filepath.Join(t.TempDir(), "termination-log")
	os.WriteFile(termLog, nil, 0o644)
	srcID := compute(t, src, []testenv.Mount{rootMount, dataMount, padMount, {ContainerPath: "/dev/termination-log", HostPath: termLog}}, nil, true)
	waitExec(t, srcID, agentWithin, "", vmspec.GuestAgentPingCommand)
	// Devices plugged into the running guest, which move with it: the target plugs them
	// on the source's root ports. A volume as a hot-plugged disk, and one plugged and
	// unplugged around it and the NIC below, so that their ports differ from what fresh
	// plugs would take (pad rp0, data rp1, the NIC rp2, then pad's rp0 free again).
	// A network as a hot-plugged NIC (multus' dynamic networks controller adds one so):
	// each pod's link for it hangs off one host bridge, as a multus bridge network's links
	// do, and the target pod has its own from the start, as multus gives a new pod the
	// networks of its annotation (docs/design/209). The source's and the target's have
	// the guest's address, as a network with static IPAM gives them; the others have none.
	attachData := `{"name": "data", "volume": "data", "source": "file"}`
	plugDisks := func(args ...[]string) {
		t.Helper()
		for _, a := range args {
			if out, err := execIn(srcID, 3*time.Minute, a...); err != nil {
				t.Fatalf("%v: %q, %v", a, out, err)
			}
		}
	}
	plugDisks([]string{vmspec.AttachDiskCommand, `{"name": "pad", "volume": "pad", "source": "file"}`}, []string{vmspec.AttachDiskCommand, attachData})
	waitExec(t, srcID, time.Minute, "vmpod hot-plugged disk", "head", "-c", "22", "/dev/disk/by-id/virtio-data")
	// (after cloud-init's network stage: without a network config of the user's it falls
	// back to one NIC, and it once chose a NIC plugged before it ran over eth0)
	waitExec(t, srcID, 5*time.Minute, "ActiveState=active", "systemctl", "show", "-p", "ActiveState", "cloud-init.service")
	br := testenv.PodBridge(t, "10.250.9.1/24")
	srcNet1 := testenv.AddBridgedPodInterface(t, src.ID, "net1", br, "10.250.9.2/24")
	nic := guestNIC(t, srcID, srcNet1.MAC, "10.250.9.2/24")
	pingGuest(t, br, "10.250.9.2", 10*time.Second)
	plugDisks([]string{vmspec.DetachDiskCommand, "pad"})
	// state that lives only in the guest's memory
	pid := strings.TrimSpace(waitExec(t, srcID, time.Minute, "", "sh", "-c",
		"echo moved > /dev/shm/marker; nohup sh -c 'i=0; while :; do i=$((i+1)); echo $i > /dev/shm/count.new; mv /dev/shm/count.new /dev/shm/count; sleep 0.1; done' >/dev/null 2>&1 & echo $!"))
	if _, err := execIn(srcID, 30*time.Second, "sh", "-c", "cd /dev/shm && nohup python3 -m http.server 8080 >/dev/null 2>&1 &"); err != nil {
		t.Fatalf("start a web server in the guest: %v", err)
	}

	dst := testenv.RunPod(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: "vm-mig-dst"}, Hostname: "vm-mig", Annotations: annotation(t, target)})
	dstNet1 := testenv.AddBridgedPodInterface(t, dst.ID, "net1", br, "10.250.9.2/24")
	dstID := compute(t, dst, []testenv.Mount{rootMount, dataMount}, nil, true)
	if st := status(t, dstID); st.State != "CONTAINER_RUNNING" {
		t.Fatalf("the target's compute container: %s", st.State)
	}
	targetCreds, sourceCreds, err := vmspec.NewMigrationCredentials()
	if err != nil {
		t.Fatal(err)
	}

	// refused up front, each saying why: the wrong pod for each verb, no request on stdin,
	// a request on the command line
	for _, c := range []struct {
		id    string
		stdin any
		args  []string
		want  string
	}{
		{srcID, vmspec.MigrationAccept{TLS: targetCreds}, []string{vmspec.MigrateAcceptCommand}, "no migration target"},
		{dstID, vmspec.MigrationRequest{Target: "10.0.0.1:49152", TLS: sourceCreds}, []string{vmspec.MigrateCommand}, "own guest has not arrived"},
		{srcID, nil, []string{vmspec.MigrateCommand}, "the request goes on stdin"},
		{srcID, nil, []string{vmspec.MigrateCommand, "{}"}, "takes no arguments"},
	} {
		if out, err := execStdin(c.id, c.stdin, time.Minute, c.args...); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v: %q, %v; want a refusal saying %q", c.args, out, err, c.want)
		}
	}

	out, err := execStdin(dstID, vmspec.MigrationAccept{TLS: targetCreds}, time.Minute, vmspec.MigrateAcceptCommand)
	if err != nil {
		t.Fatalf("%s: %v", vmspec.MigrateAcceptCommand, err)
	}
	var listening vmspec.MigrationListening
	if err := json.Unmarshal([]byte(out), &listening); err != nil {
		t.Fatalf("%s printed %q: %v", vmspec.MigrateAcceptCommand, out, err)
	}
	if want := net.JoinHostPort(podIP(t, dst), fmt.Sprint(vmspec.MigrationPort)); listening.Address != want {
		t.Errorf("the target listens on %s, want the pod's IP and port, %s", listening.Address, want)
	}
	if _, err := execStdin(dstID, vmspec.MigrationAccept{TLS: targetCreds}, time.Minute, vmspec.MigrateAcceptCommand); err == nil || !strings.Contains(err.Error(), "already listening") {
		t.Errorf("a second accept: %v, want a refusal", err)
	}

	// a source with another migration's credentials: the TLS handshake fails, nothing moves
	_, strangerCreds, _ := vmspec.NewMigrationCredentials()
	if out, err := execStdin(srcID, vmspec.MigrationRequest{Target: listening.Address, TLS: strangerCreds}, time.Minute, vmspec.MigrateCommand); err == nil {
		t.Fatalf("a migration with a stranger's credentials: %q", out)
	} else {
		t.Logf("with a stranger's credentials: %v", err)
	}
	before := guestCount(t, srcID)

	start := time.Now()
	req := vmspec.MigrationRequest{Target: listening.Address, TLS: sourceCreds, Options: vmspec.MigrationRequestOptions{BandwidthMiB: 1024, AutoConverge: true}}
	out, err = execStdin(srcID, req, 5*time.Minute, vmspec.MigrateCommand)
	if err != nil {
		t.Fatalf("%s: %v\n%s", vmspec.MigrateCommand, err, out)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	var final vmspec.MigrationProgress
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &final); err != nil || final.Status != "completed" || final.TransferredBytes == 0 {
		t.Fatalf("the migration's last line %q (%v): want completed, with bytes sent", lines[len(lines)-1], err)
	}
	t.Logf("migrated in %v (exec), QEMU: %d ms, downtime %d ms, %d MiB sent, %d progress lines",
		time.Since(start).Round(time.Millisecond), final.ElapsedMs, final.DowntimeMs, final.TransferredBytes>>20, len(lines))

	// the source's container ends, saying where the guest went
	if code := waitExited(t, srcID, time.Minute); code != 0 {
		t.Errorf("the source's compute container exited %d, want 0", code)
	}
	if b, _ := os.ReadFile(termLog); !strings.HasPrefix(string(b), vmspec.MigratedReason+": the guest moved to "+listening.Address) {
		t.Errorf("the source's termination message %q", b)
	}
	// the source pod never boots the guest again (a restarted container would run a second
	// copy from the same disk)
	again := testenv.WriteJSON(t, "compute.json", testenv.ContainerConfig{Metadata: testenv.Metadata{Name: vmspec.ComputeContainer, Attempt: 1},
		Image: map[string]string{"image": computeImage(t)}, LogPath: "compute-again.log", Mounts: []testenv.Mount{rootMount}})
	// (CRI creates the container's record; the task, and so the VM, comes with its start)
	newID := testenv.Crictl(t, "create", src.ID, again, src.Config)
	if out, err := testenv.Cmd("crictl", "start", newID); err == nil || !strings.Contains(err.Error(), "does not boot it again") {
		t.Errorf("a new compute container in the source pod: %q, %v; want a refusal", out, err)
	}
	// the hot-plugged NIC came along, on the target's link: with the source's link gone (as
	// with its pod), the guest answers there, and with its address flushed it gets it again
	// from the target's DHCP server, which answers the guest's MAC (a client of its own:
	// the one the source's test started keeps its lease)
	testenv.RemovePodInterface(t, srcNet1)
	// (the host asks anew who has the address: the target pod's own stack has it too, and
	// answers only if its link is not mirrored into the guest)
	if out, err := exec.Command("ip", "neigh", "flush", "dev", br).CombinedOutput(); err != nil {
		t.Fatalf("ip neigh flush dev %s: %v: %s", br, err, out)
	}
	pingGuest(t, br, "10.250.9.2", time.Minute)
	if out, _ := exec.Command("ip", "neigh", "show", "10.250.9.2", "dev", br).Output(); !strings.Contains(string(out), srcNet1.MAC) {
		t.Errorf("10.250.9.2 answered from %q, want the guest's MAC %s", out, srcNet1.MAC)
	}
	if out, err := execIn(dstID, 2*time.Minute, "sh", "-c", "ip -4 addr flush dev "+nic+" && dhclient -1 -pf /run/dhclient-moved.pid -lf /run/dhclient-moved.leases "+nic); err != nil {
		t.Errorf("the guest's DHCP on its moved NIC %s: %q, %v", nic, out, err)
	}
	waitExec(t, dstID, 30*time.Second, "10.250.9.2/24", "ip", "-4", "addr", "show", "dev", nic)
	// the guest runs on in the target: its memory came along
	if got := strings.TrimSpace(waitExec(t, dstID, 2*time.Minute, "moved", "cat", "/dev/shm/marker")); got != "moved" {
		t.Errorf("the tmpfs file: %q", got)
	}
	if _, err := execIn(dstID, 20*time.Second, "kill", "-0", pid); err != nil {
		t.Errorf("the counting process %s is gone: %v", pid, err)
	}
	// the hot-plugged disk came along, where the guest had it, writable once the guest is
	// here; the target's shim knows it (the controller's attach after a move finds it so)
	waitExec(t, dstID, time.Minute, "vmpod hot-plugged disk", "head", "-c", "22", "/dev/disk/by-id/virtio-data")
	if _, err := execIn(dstID, time.Minute, "sh", "-c", "printf moved-disk | dd of=/dev/disk/by-id/virtio-data bs=512 seek=1 conv=fsync"); err != nil {
		t.Errorf("write to the moved disk: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(data, vmspec.DiskImageFile)); len(b) < 522 || string(b[512:522]) != "moved-disk" {
		t.Errorf("the data image after the guest's write in the target: %q at 512, want moved-disk", b[512:min(len(b), 522)])
	}
	if out, err := execIn(dstID, time.Minute, vmspec.AttachDiskCommand, attachData); err != nil || !strings.Contains(out, "attached already") {
		t.Errorf("%s in the target: %q, %v; want the disk attached already", vmspec.AttachDiskCommand, out, err)
	}
	after := guestCount(t, dstID)
	time.Sleep(2 * time.Second)
	if later := guestCount(t, dstID); after < before || later <= after {
		t.Errorf("the counter: %d before the migration, %d and %d after: want it to go on", before, after, later)
	}
	// behind NAT the guest keeps its address, and the target pod's IP reaches it
	waitExec(t, dstID, time.Minute, vmspec.MasqueradeGuest+"/24", "ip", "-4", "-o", "addr", "show", "eth0")
	url := fmt.Sprintf("http://%s:8080/marker", podIP(t, dst))
	var body []byte
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(time.Second) {
		if body, _ = exec.Command("curl", "-sf", "--max-time", "5", url).Output(); strings.TrimSpace(string(body)) == "moved" {
			break
		}
	}
	if strings.TrimSpace(string(body)) != "moved" {
		t.Errorf("GET %s: %q, want the guest's web server, moved along", url, body)
	}

	// a migration cancelled half-way: the guest runs on where it is, the would-be target ends
	dst2 := testenv.RunPod(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: "vm-mig-dst2"}, Hostname: "vm-mig", Annotations: annotation(t, target)})
	testenv.AddBridgedPodInterface(t, dst2.ID, "net1", br, "")
	termLog2 := filepath.Join(t.TempDir(), "termination-log")
	os.WriteFile(termLog2, nil, 0o644)
	dst2ID := compute(t, dst2, []testenv.Mount{rootMount, dataMount, {ContainerPath: "/dev/termination-log", HostPath: termLog2}}, nil, true)
	t2, s2, _ := vmspec.NewMigrationCredentials()
	out, err = execStdin(dst2ID, vmspec.MigrationAccept{TLS: t2}, time.Minute, vmspec.MigrateAcceptCommand)
	if err != nil {
		t.Fatalf("%s: %v", vmspec.MigrateAcceptCommand, err)
	}
	if err := json.Unmarshal([]byte(out), &listening); err != nil {
		t.Fatal(err)
	}
	slow := make(chan error, 1)
	go func() {
		// 1 MiB/s: a 512 MiB guest would take minutes
		_, err := execStdin(dstID, vmspec.MigrationRequest{Target: listening.Address, TLS: s2, Options: vmspec.MigrationRequestOptions{BandwidthMiB: 1}}, 5*time.Minute, vmspec.MigrateCommand)
		slow <- err
	}()
	time.Sleep(5 * time.Second)
	cancelled := func() vmspec.MigrationCancelled {
		t.Helper()
		out, err := execIn(dstID, 3*time.Minute, vmspec.MigrateCancelCommand)
		var a vmspec.MigrationCancelled
		if err != nil || json.Unmarshal([]byte(out), &a) != nil {
			t.Fatalf("%s: %q, %v", vmspec.MigrateCancelCommand, out, err)
		}
		return a
	}
	// the cancel returns once the migration has ended, saying the guest stayed
	if a := cancelled(); !a.WasInFlight || a.GuestMoved {
		t.Errorf("%s: %+v, want a migration ended with the guest here", vmspec.MigrateCancelCommand, a)
	}
	select {
	case err := <-slow:
		if err == nil || !strings.Contains(err.Error(), "cancelled") {
			t.Errorf("the cancelled migration's exec: %v, want a failure saying it was cancelled", err)
		}
	case <-time.After(2 * time.Minute):
		t.Fatal("the cancelled migration's exec did not end")
	}
	if a := cancelled(); a.WasInFlight || a.GuestMoved {
		t.Errorf("%s again: %+v, want none in flight and the guest here", vmspec.MigrateCancelCommand, a)
	}
	n := guestCount(t, dstID)
	time.Sleep(2 * time.Second)
	if m := guestCount(t, dstID); m <= n {
		t.Errorf("after the cancel the counter stands at %d, then %d", n, m)
	}
	if st := status(t, dstID); st.State != "CONTAINER_RUNNING" {
		t.Errorf("the VM's container after the cancel: %s", st.State)
	}
	if code := waitExited(t, dst2ID, 2*time.Minute); code != 1 {
		t.Errorf("the abandoned target exited %d, want 1", code)
	}
	if b, _ := os.ReadFile(termLog2); !strings.HasPrefix(string(b), vmspec.MigrationFailedReason) {
		t.Errorf("the abandoned target's termination message %q", b)
	}

	// targets whose devices differ from the source's: refused by their QEMU, each at its
	// own point of the stream, and the guest runs on where it was
	for _, c := range []struct {
		name   string
		edit   func(*vmspec.VM)
		want   string
		noData bool // the target's compute container lacks the hot-plugged disk's volume
		noNet1 bool // the target pod lacks the hot-plugged NIC's network
	}{
		// refused before the stream begins: the target cannot plug the guest's disk, or NIC
		{"no volume for the hot-plugged disk", func(*vmspec.VM) {}, "the target refused the guest: plug the guest's hot-plugged disk on rp1: disk data", true, false},
		{"no network for the hot-plugged NIC", func(*vmspec.VM) {}, "the target refused the guest: shape.nics[0].interface: the guest has a NIC for pod interface net1", false, true},
		// an e1000e NIC brings a ROM, a RAM block the source lacks: the target fails at
		// the stream's start, and the source's QEMU hears of it through the stream
		{"an e1000e NIC", func(vm *vmspec.VM) { vm.Interfaces[0].Model = vmspec.ModelE1000E }, "migrate: failed", false, false},
		// the disk on SATA: the RAM matches, the virtio-blk state (sent last, the guest
		// stopped) does not. The source's QEMU has completed; the target says it failed,
		// and the source resumes its guest: the switchover's first phase
		{"the disk on SATA", func(vm *vmspec.VM) { vm.Disks[0].Bus = vmspec.BusSATA }, "the guest runs on here", false, false},
	} {
		odd := target
		odd.Interfaces = append([]vmspec.Interface{}, target.Interfaces...)
		odd.Disks = append([]vmspec.Disk{}, target.Disks...)
		c.edit(&odd)
		pod := testenv.RunPod(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: "vm-mig-odd"}, Hostname: "vm-mig", Annotations: annotation(t, odd)})
		if !c.noNet1 {
			testenv.AddBridgedPodInterface(t, pod.ID, "net1", br, "")
		}
		mounts := []testenv.Mount{rootMount, dataMount}
		if c.noData {
			mounts = mounts[:1]
		}
		oddID := compute(t, pod, mounts, nil, true)
		to, so, _ := vmspec.NewMigrationCredentials()
		out, err := execStdin(oddID, vmspec.MigrationAccept{TLS: to}, time.Minute, vmspec.MigrateAcceptCommand)
		if err != nil {
			t.Fatalf("%s: %s: %v", c.name, vmspec.MigrateAcceptCommand, err)
		}
		if err := json.Unmarshal([]byte(out), &listening); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		out, err = execStdin(dstID, vmspec.MigrationRequest{Target: listening.Address, TLS: so, Options: vmspec.MigrationRequestOptions{BandwidthMiB: 1024}}, 5*time.Minute, vmspec.MigrateCommand)
		if err == nil || !strings.Contains(err.Error(), c.want) || time.Since(start) > time.Minute {
			t.Errorf("to a target with %s: %v after %v\n%s; want a prompt failure saying %q", c.name, err, time.Since(start), out, c.want)
		} else {
			t.Logf("to a target with %s, after %v: %v", c.name, time.Since(start).Round(time.Millisecond), err)
		}
		n := guestCount(t, dstID)
		time.Sleep(2 * time.Second)
		if m := guestCount(t, dstID); m <= n {
			t.Errorf("%s: after the failed migration the counter stands at %d, then %d", c.name, n, m)
		}
		if st := status(t, dstID); st.State != "CONTAINER_RUNNING" {
			t.Errorf("%s: the VM's container after the failed migration: %s", c.name, st.State)
		}
		if code := waitExited(t, oddID, 2*time.Minute); code != 1 {
			t.Errorf("the target with %s exited %d, want 1", c.name, code)
		}
	}

	// the target follows its pod's netns for the NIC it plugged for the source: the link
	// leaving (CNI DEL) unplugs it
	testenv.RemovePodInterface(t, dstNet1)
	waitNICGone(t, dstID, nic)

	// a target stopped before any guest arrived ends at once, saying so (nothing to power off)
	idle := testenv.RunPod(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: "vm-mig-idle"}, Hostname: "vm-mig", Annotations: annotation(t, target)})
	idleLog := filepath.Join(t.TempDir(), "termination-log")
	os.WriteFile(idleLog, nil, 0o644)
	idleID := compute(t, idle, []testenv.Mount{rootMount, {ContainerPath: "/dev/termination-log", HostPath: idleLog}}, nil, true)
	stopped := time.Now()
	testenv.Crictl(t, "stop", "--timeout", "60", idleID)
	if d := time.Since(stopped); d > 20*time.Second {
		t.Errorf("stopping a target that waits for its guest took %v", d)
	}
	if code := waitExited(t, idleID, time.Minute); code != 1 {
		t.Errorf("the stopped target exited %d, want 1", code)
	}
	if b, _ := os.ReadFile(idleLog); !strings.Contains(string(b), "before the guest arrived") {
		t.Errorf("the stopped target's termination message %q", b)
	}
}

// pingGuest pings ip through bridge until it answers, for at most within.
func pingGuest(t *testing.T, bridge, ip string, within time.Duration) {
	t.Helper()
	var out []byte
	var err error
	for deadline := time.Now().Add(within); time.Now().Before(deadline); time.Sleep(time.Second) {
		if out, err = exec.Command("ping", "-c", "1", "-W", "2", "-I", bridge, ip).CombinedOutput(); err == nil {
			return
		}
	}
	t.Errorf("ping %s through %s for %v: %v\n%s", ip, bridge, within, err, out)
}
