package cluster

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/vmpod/vmpod/integration/testenv"
)

// TestVirtualMachineLiveMigration: a KubeVirt VM with evictionStrategy LiveMigrate, its
// disk a DataVolume on shared (ReadWriteMany) storage, moves between the two vmpod nodes
// without stopping: a file in the guest's tmpfs and a process counting in it survive, the
// guest answers through its Service from a runc pod on the third node, and a connection to
// the source pod's IP does not survive (the documented limit of masquerade: the pod IP is
// the pod's, and the target is another pod). A target pod deleted half-way fails its
// migration and the guest runs on where it was. An eviction is refused, and `kubectl drain`
// of the VM's node completes by migrating it.
func TestVirtualMachineLiveMigration(t *testing.T) {
	c := testenv.RequireCluster(t)
	raw := os.Getenv("VMPOD_VM_GUEST_RAW")
	qcow2 := filepath.Join(filepath.Dir(raw), "disk.qcow2")
	if _, err := os.Stat(qcow2); raw == "" || err != nil {
		t.Fatalf("the test guest's disk.qcow2 next to VMPOD_VM_GUEST_RAW=%q: %v", raw, err)
	}
	if _, err := exec.LookPath("kubectl-vmpod"); err != nil {
		t.Fatalf("kubectl-vmpod not on PATH (hack/cluster.sh env puts _output/bin there): %v", err)
	}
	ns := c.Namespace(t)
	dir := t.TempDir()
	if err := os.Link(qcow2, filepath.Join(dir, "disk.qcow2")); err != nil {
		st, _ := os.Stat(qcow2)
		copyPrefix(t, qcow2, filepath.Join(dir, "disk.qcow2"), st.Size())
	}
	base := imageServer(t, c, ns, dir)
	applyConverted(t, c, ns, strings.NewReplacer("NAME", "shared-root", "URL", base+"/disk.qcow2",
		"STORAGE", "    accessModes: [ReadWriteMany]\n    storageClassName: vmpod-shared\n    resources: {requests: {storage: 1500Mi}}\n").Replace(cdiDataVolume))
	waitDataVolume(t, c, ns, "shared-root", "Succeeded", 6*time.Minute)

	const vm = "mover"
	manifest := strings.NewReplacer("name: debian", "name: "+vm, "kubevirt.io/vm: debian", "kubevirt.io/vm: "+vm,
		"memory: {guest: 1Gi, maxGuest: 1536Mi}", "memory: {guest: 512Mi, maxGuest: 768Mi}",
		"terminationGracePeriodSeconds: 120\n", "terminationGracePeriodSeconds: 120\n      evictionStrategy: LiveMigrate\n",
		"containerDisk:\n          image: docker.io/vmpod-test/debian-vm:bookworm", "dataVolume:\n          name: shared-root").Replace(kubevirtVM)
	if !strings.Contains(manifest, "evictionStrategy: LiveMigrate") || !strings.Contains(manifest, "guest: 512Mi, maxGuest: 768Mi") ||
		!strings.Contains(manifest, "maxSockets: 2") || !strings.Contains(manifest, "shared-root") {
		t.Fatal("the VM manifest changed: this test no longer gives its VM what it needs")
	}
	applyConverted(t, c, ns, manifest)
	t.Cleanup(func() { _, _ = c.KubectlErr("delete", "vm.vmpod.dev", "-n", ns, vm, "--wait=true", "--timeout=150s") })
	pod := waitVM(t, c, ns, vm, vmBootWithin, "Running", "True")

	// the guest's state a migration must keep: a file in tmpfs, a process counting, and
	// cloud-init's web server (port 8080) behind a Service
	guest := func(args ...string) string {
		t.Helper()
		p := c.Kubectl(t, "get", "vm.vmpod.dev", "-n", ns, vm, "-o", "jsonpath={.status.podName}")
		return strings.TrimSpace(c.Kubectl(t, append([]string{"exec", "-n", ns, p, "-c", "compute", "--"}, args...)...))
	}
	// cloud-init (its web server among its runcmd) finishes well after the guest agent
	// answers under TCG
	if !testenv.PollWithin(4*time.Minute, func() bool {
		out, _ := c.KubectlErr("exec", "-n", ns, pod, "-c", "compute", "--", "cat", "/var/tmp/e2e.txt")
		return strings.Contains(out, "written by cloud-init")
	}) {
		t.Fatalf("cloud-init did not finish in the guest")
	}
	marker := guest("sh", "-c", "head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \\n' > /dev/shm/marker; cat /dev/shm/marker")
	// (systemd-run's command line is systemd's: it would expand "$$" and "${...}")
	guest("systemd-run", "--unit=counter", "sh", "-c", "i=0; while :; do i=$((i+1)); echo $i > /run/counter; sleep 0.2; done")
	var pid string
	testenv.WaitForWithin(t, 30*time.Second, "the counting process to start", func() bool {
		pid = guest("systemctl", "show", "-p", "MainPID", "--value", "counter")
		return pid != "" && pid != "0"
	})
	count := func() int {
		t.Helper()
		var err error
		for range 5 { // a read may meet the file as the shell truncated it
			var n int
			if n, err = strconv.Atoi(guest("cat", "/run/counter")); err == nil {
				return n
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Fatalf("the guest's counter: %v", err)
		return 0
	}
	bootID := guest("cat", "/proc/sys/kernel/random/boot_id")
	guest("sh", "-c", "cat /proc/sys/kernel/random/boot_id > /var/tmp/boot_id")
	svc, err := c.Client.CoreV1().Services(ns).Create(t.Context(), &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: vm},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"kubevirt.io/vm": vm},
			Ports: []corev1.ServicePort{{Port: 80, TargetPort: intstr.FromInt32(8080)}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create service: %v", err)
	}
	client := runcClient(t, c, ns)
	fromClient := func(script string) (string, error) {
		return c.KubectlErr("exec", "-n", ns, client, "--", "sh", "-c", script)
	}
	// GET /boot_id with nc (busybox's wget segfaults in this image): the response holds
	// the guest's boot id
	get := func(addr string) string {
		out, _ := fromClient(fmt.Sprintf(`printf 'GET /boot_id HTTP/1.0\r\n\r\n' | nc -w 5 %s`, addr))
		return out
	}
	viaService := func() bool { return strings.Contains(get(svc.Spec.ClusterIP+" 80"), bootID) }
	testenv.WaitForWithin(t, 2*time.Minute, "the guest's web server through its Service", viaService)

	// a connection to the source pod's IP, open across the migration, its request sent after
	sourceIP := c.Kubectl(t, "get", "pod", "-n", ns, pod, "-o", "jsonpath={.status.podIP}")
	if out := get(sourceIP + " 8080"); !strings.Contains(out, bootID) {
		t.Fatalf("the guest through its pod IP %s before the migration: %q", sourceIP, out)
	}
	// (the background processes hold none of the exec's stdio: the exec would wait for them)
	if _, err := fromClient("mkfifo /tmp/req && (sleep 3600 > /tmp/req 2>/dev/null </dev/null &) && (nc " + sourceIP + " 8080 < /tmp/req > /tmp/resp 2>&1 &) && sleep 1"); err != nil {
		t.Fatalf("open a connection to the source pod: %v", err)
	}

	// an eviction is refused by the VM's PodDisruptionBudget once the disruption controller
	// has counted its pod (before that, the API server refuses any eviction it guards)
	testenv.WaitForWithin(t, time.Minute, "the disruption controller to count the VM's pod", func() bool {
		pdb, err := c.Client.PolicyV1().PodDisruptionBudgets(ns).Get(t.Context(), "vmpod-"+vm, metav1.GetOptions{})
		return err == nil && pdb.Status.ObservedGeneration == pdb.Generation && pdb.Status.ExpectedPods == 1 &&
			pdb.Status.CurrentHealthy == 1 && pdb.Status.DisruptionsAllowed == 0
	})
	err = c.Client.PolicyV1().Evictions(ns).Evict(t.Context(), &policyv1.Eviction{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: pod}})
	if !apierrors.IsTooManyRequests(err) {
		t.Errorf("evicting the LiveMigrate VM's pod: %v, want 429 (its disruption budget)", err)
	}

	// resized in place first (a second socket, 256 MiB more): the target pod boots at the
	// spec's size and takes the guest's from the source (docs/design/209)
	// (errors as 0: a poll asks again)
	memTotalOf := func(meminfo string) int {
		if f := strings.Fields(meminfo); len(f) >= 2 {
			kib, _ := strconv.Atoi(f[1])
			return kib
		}
		return 0
	}
	memTotal := func() int {
		t.Helper()
		kib := memTotalOf(guest("grep", "MemTotal", "/proc/meminfo"))
		if kib == 0 {
			t.Fatal("the guest's MemTotal: none")
		}
		return kib
	}
	bootMem := memTotal()
	c.Kubectl(t, "patch", "vm.vmpod.dev", "-n", ns, vm, "--type=merge", "-p",
		`{"spec":{"template":{"spec":{"domain":{"cpu":{"sockets":2},"memory":{"guest":"768Mi"}}}}}}`)
	var nproc, meminfo string
	if !testenv.PollWithin(2*time.Minute, func() bool {
		nproc, _ = c.KubectlErr("exec", "-n", ns, pod, "-c", "compute", "--", "nproc")
		meminfo, _ = c.KubectlErr("exec", "-n", ns, pod, "-c", "compute", "--", "grep", "MemTotal", "/proc/meminfo")
		return strings.TrimSpace(nproc) == "2" && memTotalOf(meminfo)-bootMem >= 250<<10
	}) {
		t.Fatalf("the resize: the guest has %q vCPUs and %q (%d KiB at boot); want 2 and 256 MiB more", nproc, meminfo, bootMem)
	}
	grownMem := memTotal()

	// a disk plugged in while the VM runs, on shared storage: it moves with the guest, at
	// its PCI address (each target pod gets an attachment pod of its own, docs/design/209).
	// Read and written past the guest's page cache (O_DIRECT), so each hop shows the
	// target's QEMU has the image open for writing.
	const hp = "mig-hp"
	sharedBlankDataVolume(t, c, ns, hp)
	c.Kubectl(t, "vmpod", "addvolume", "-n", ns, vm, "--volume-name="+hp)
	hpDisk := "/dev/disk/by-id/virtio-" + hp
	testenv.WaitForWithin(t, 3*time.Minute, "the hot-plugged disk in the guest", func() bool {
		out, _ := c.KubectlErr("exec", "-n", ns, pod, "-c", "compute", "--", "ls", "/dev/disk/by-id")
		return strings.Contains(out, "virtio-"+hp)
	})
	hop := 0
	writeDisk := func() string {
		t.Helper()
		hop++
		mark := fmt.Sprintf("hop-%d-%s", hop, marker[:8])
		guest("sh", "-c", "printf %-512s "+mark+" | dd of="+hpDisk+" bs=512 count=1 oflag=direct conv=fsync 2>/dev/null")
		return mark
	}
	readDisk := func() string {
		return strings.TrimSpace(guest("sh", "-c", "dd if="+hpDisk+" bs=512 count=1 iflag=direct 2>/dev/null"))
	}
	diskMark := writeDisk()

	// 1. kubectl vmpod migrate: to the other vmpod node
	before := count()
	sourceNode := c.Kubectl(t, "get", "vm.vmpod.dev", "-n", ns, vm, "-o", "jsonpath={.status.nodeName}")
	first := migrate(t, c, ns, vm)
	st := waitMigration(t, c, ns, first, "Succeeded", 5*time.Minute)
	t.Logf("migration %s: %s -> %s, %s", first, st.from, st.to, st.figures)
	if st.from != sourceNode || st.to == sourceNode || !slices.Contains(vmpodNodes, st.to) {
		t.Errorf("migrated from %s to %s; the VM was on %s, want the other vmpod node", st.from, st.to, sourceNode)
	}
	target := waitVM(t, c, ns, vm, 2*time.Minute, "Running", "True")
	if target == pod {
		t.Fatalf("the VM's pod is still %s", pod)
	}
	if now := c.Kubectl(t, "get", "vm.vmpod.dev", "-n", ns, vm, "-o", "jsonpath={.status.nodeName}"); now != st.to {
		t.Errorf("the VM's status says node %s, the migration %s", now, st.to)
	}
	testenv.WaitForWithin(t, 2*time.Minute, "the source pod to go", func() bool {
		_, err := c.Client.CoreV1().Pods(ns).Get(t.Context(), pod, metav1.GetOptions{})
		return apierrors.IsNotFound(err)
	})
	checkGuestKept := func(when string, before int) {
		t.Helper()
		if got := guest("cat", "/dev/shm/marker"); got != marker {
			t.Errorf("%s: the tmpfs file holds %q, was %q", when, got, marker)
		}
		if got := guest("cat", "/proc/sys/kernel/random/boot_id"); got != bootID {
			t.Errorf("%s: boot id %q, was %q: the guest rebooted", when, got, bootID)
		}
		if got := guest("sh", "-c", "kill -0 "+pid+" && echo alive"); got != "alive" {
			t.Errorf("%s: the counting process %s: %q", when, pid, got)
		}
		a := count()
		time.Sleep(time.Second)
		if b := count(); a <= before || b <= a {
			t.Errorf("%s: the counter went %d, %d, %d: want it counting on", when, before, a, b)
		}
		if n, m := guest("nproc"), memTotal(); n != "2" || m != grownMem {
			t.Errorf("%s: %s vCPUs and %d KiB, want the resized guest's 2 and %d KiB", when, n, m, grownMem)
		}
		if got := readDisk(); got != diskMark {
			t.Errorf("%s: the hot-plugged disk holds %q, want %q", when, got, diskMark)
		} else if diskMark = writeDisk(); readDisk() != diskMark {
			t.Errorf("%s: the hot-plugged disk does not keep a write (%q)", when, readDisk())
		}
		var phase string
		if !testenv.PollWithin(time.Minute, func() bool {
			phase, _ = c.KubectlErr("get", "vm.vmpod.dev", "-n", ns, vm, "-o", `jsonpath={.status.volumeStatus[?(@.name=="`+hp+`")].phase}`)
			return phase == "Ready"
		}) {
			t.Errorf("%s: the hot-plugged volume is %q, want Ready", when, phase)
		}
	}
	checkGuestKept("after the migration", before)
	testenv.WaitForWithin(t, 2*time.Minute, "the Service to reach the migrated guest", viaService)
	// the held connection: its request now goes to an address no pod has
	_, _ = fromClient(`printf 'GET /boot_id HTTP/1.0\r\n\r\n' > /tmp/req`)
	time.Sleep(10 * time.Second)
	if out, _ := fromClient("cat /tmp/resp"); strings.Contains(out, bootID) {
		t.Errorf("a connection to the source pod's IP answered after the migration (%q): masquerade's documented limit no longer holds, update docs/design/209", out)
	}

	// 2. a target pod that goes away half-way: the migration fails, the guest runs on
	before = count()
	here := c.Kubectl(t, "get", "vm.vmpod.dev", "-n", ns, vm, "-o", "jsonpath={.status.nodeName}")
	failing := migrate(t, c, ns, vm, "--bandwidth-mib=1") // long enough to pull the target away
	waitMigration(t, c, ns, failing, "Running", 5*time.Minute)
	targetPod := c.Kubectl(t, "get", "vmim", "-n", ns, failing, "-o", "jsonpath={.status.targetPod}")
	deleted := time.Now()
	c.Kubectl(t, "delete", "pod", "-n", ns, targetPod, "--wait=false")
	failed := waitMigration(t, c, ns, failing, "Failed", 3*time.Minute)
	t.Logf("migration %s with its target deleted: failed %v later: %s", failing, time.Since(deleted).Round(time.Second), failed.reason)
	if failed.reason == "" {
		t.Errorf("the failed migration gives no reason")
	}
	if p := waitVM(t, c, ns, vm, 2*time.Minute, "Running", "True"); p != target {
		t.Errorf("the VM's pod is %s after a failed migration, want %s still", p, target)
	}
	if now := c.Kubectl(t, "get", "vm.vmpod.dev", "-n", ns, vm, "-o", "jsonpath={.status.nodeName}"); now != here {
		t.Errorf("the VM is on %s after a failed migration, was on %s", now, here)
	}
	checkGuestKept("after a failed migration", before)

	// 3. post-copy: at 1 MiB/s the migration cannot complete in its 2 s; allowed to, it
	// switches to post-copy and succeeds. First to nodes whose QEMU may not handle its own
	// page faults: the target refuses up front, the guest runs on where it was.
	allow := testenv.AllowUserfaultfd(t, false) // the nodes share this host's kernel
	postCopy := []string{"--bandwidth-mib=1", "--completion-timeout-per-gib=2", "--allow-post-copy"}
	before = count()
	refused := waitMigration(t, c, ns, migrate(t, c, ns, vm, postCopy...), "Failed", 5*time.Minute)
	if !strings.Contains(refused.reason, "vm.unprivileged_userfaultfd") {
		t.Errorf("post-copy to a node that cannot: failed with %q, want the reason naming vm.unprivileged_userfaultfd", refused.reason)
	}
	if p := waitVM(t, c, ns, vm, 2*time.Minute, "Running", "True"); p != target {
		t.Errorf("the VM's pod is %s after a refused post-copy migration, want %s still", p, target)
	}
	checkGuestKept("after a refused post-copy migration", before)
	allow(true)
	before = count()
	pc := migrate(t, c, ns, vm, postCopy...)
	st = waitMigration(t, c, ns, pc, "Succeeded", 5*time.Minute)
	t.Logf("post-copy migration %s: %s -> %s, %s", pc, st.from, st.to, st.figures)
	if st.from != here || st.to == here {
		t.Errorf("post-copy migrated from %s to %s; the VM was on %s", st.from, st.to, here)
	}
	target = waitVM(t, c, ns, vm, 2*time.Minute, "Running", "True")
	checkGuestKept("after a post-copy migration", before)
	here = st.to

	// 4. kubectl drain of the VM's node: cordoned, the controller migrates the VM away, the
	// drain's retried eviction finds the source pod gone
	before = count()
	t.Cleanup(func() { _, _ = c.KubectlErr("uncordon", here) })
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	drain := c.Command(ctx, "drain", here, "--pod-selector=vmpod.dev/vm-name="+vm, "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=7m")
	t0 := time.Now()
	out, err := drain.CombinedOutput()
	if err != nil {
		t.Fatalf("kubectl drain %s: %v\n%s", here, err, out)
	}
	t.Logf("kubectl drain %s completed in %v", here, time.Since(t0).Round(time.Second))
	if !strings.Contains(string(out), "disruption budget") {
		t.Logf("kubectl drain never saw its eviction refused (the migration was quicker than its first retry?):\n%s", out)
	}
	if now := c.Kubectl(t, "get", "vm.vmpod.dev", "-n", ns, vm, "-o", "jsonpath={.status.nodeName}"); now == here || !slices.Contains(vmpodNodes, now) {
		t.Errorf("after draining %s the VM is on %q", here, now)
	}
	// (the source pod goes before the migration's last status write)
	var evac string
	if !testenv.PollWithin(time.Minute, func() bool {
		evac, _ = c.KubectlErr("get", "vmim", "-n", ns, "-l", "vmpod.dev/evacuation=true", "-o",
			`jsonpath={range .items[*]}{.metadata.annotations.vmpod\.dev/evacuation-node} {.status.phase}{"\n"}{end}`)
		return strings.Contains(evac, here+" Succeeded")
	}) {
		t.Errorf("the evacuation migrations: %q, want one off %s Succeeded", evac, here)
	}
	waitVM(t, c, ns, vm, 2*time.Minute, "Running", "True")
	checkGuestKept("after the drain", before)
}

// migrate creates a VirtualMachineMigration of the VM with kubectl vmpod migrate, its
// policy knobs as the command's flags ("--bandwidth-mib=1", say), and returns its name.
func migrate(t *testing.T, c *testenv.Cluster, ns, vm string, flags ...string) string {
	t.Helper()
	out := c.Kubectl(t, append([]string{"vmpod", "migrate", "-n", ns, vm}, flags...)...)
	f := strings.Fields(out) // "VM <vm>: migration <name> created ..."
	if len(f) < 4 || f[2] != "migration" {
		t.Fatalf("kubectl vmpod migrate printed %q", out)
	}
	return f[3]
}

type migrationStatus struct{ from, to, reason, figures string }

// waitMigration waits for the migration's phase and returns its status.
func waitMigration(t *testing.T, c *testenv.Cluster, ns, name, phase string, within time.Duration) migrationStatus {
	t.Helper()
	var last string
	if !testenv.PollWithin(within, func() bool {
		last, _ = c.KubectlErr("get", "vmim", "-n", ns, name, "-o", "jsonpath={.status.phase}|{.status.sourceNode}|{.status.targetNode}|{.status.failureReason}|"+
			"{.status.totalBytes} bytes, {.status.transferredBytes} sent, downtime {.status.downtimeMs} ms")
		return strings.HasPrefix(last, phase+"|")
	}) {
		desc, _ := c.KubectlErr("describe", "vmim", "-n", ns, name)
		pods, _ := c.KubectlErr("get", "pods", "-n", ns, "-o", "wide")
		t.Fatalf("migration %s: not %s after %v (last %q)\n%s\n%s", name, phase, within, last, desc, pods)
	}
	f := strings.SplitN(last, "|", 5)
	return migrationStatus{from: f[1], to: f[2], reason: f[3], figures: f[4]}
}
