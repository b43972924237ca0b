package cluster

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmpod/vmpod/api/vmspec"
	"github.com/vmpod/vmpod/integration/testenv"
)

// kubevirtVM is a VirtualMachine as KubeVirt's user guide writes one: a containerDisk
// (the test guest: Debian with cloud-init and qemu-guest-agent, pushed to the cluster's
// registry by hack/images.sh), cloud-init user data, masquerade networking and the guest
// agent as the readiness probe. The test converts it with `kubectl vmpod convert`.
const kubevirtVM = `apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: debian
spec:
  running: true
  template:
    metadata:
      labels: {kubevirt.io/vm: debian}
    spec:
      terminationGracePeriodSeconds: 120
      domain:
        cpu: {cores: 1, maxSockets: 2}
        memory: {guest: 1Gi, maxGuest: 1536Mi}
        devices:
          disks:
          - name: containerdisk
            disk: {bus: virtio}
          - name: cloudinitdisk
            disk: {bus: virtio}
          interfaces:
          - name: default
            masquerade: {}
      networks:
      - name: default
        pod: {}
      readinessProbe:
        guestAgentPing: {}
        initialDelaySeconds: 5
        periodSeconds: 5
      volumes:
      - name: containerdisk
        containerDisk:
          image: docker.io/vmpod-test/debian-vm:bookworm
      - name: cloudinitdisk
        cloudInitNoCloud:
          userData: |
            #cloud-config
            write_files:
              - path: /var/tmp/e2e.txt
                content: "written by cloud-init on a kubelet node\n"
            runcmd:
              - [systemd-run, --unit=e2e-http, python3, -m, http.server, "8080", --directory, /var/tmp]
`

const vmBootWithin = 6 * time.Minute // TCG on 2 shared cores: the guest agent answers in ~30-90 s

// TestVirtualMachine: a user's KubeVirt VirtualMachine, converted and applied, boots on the
// vmpod node through the in-cluster controller and a real kubelet; it becomes Ready by its
// guest agent; cloud-init ran; the console shows a login prompt; guestosinfo, port-forward
// and vnc reach the guest; pause, unpause, stop, start and restart change the guest and the
// VM's status follows; deleting the VM powers the guest off.
func TestVirtualMachine(t *testing.T) {
	c := testenv.RequireCluster(t)
	// alongside the DataVolume test's VMs: each TCG guest keeps about one core busy, and the
	// two together take 4-5 minutes less than one after the other on a 2-core CI machine
	t.Parallel()
	if _, err := exec.LookPath("kubectl-vmpod"); err != nil {
		t.Fatalf("kubectl-vmpod not on PATH (hack/cluster.sh env puts _output/bin there): %v", err)
	}
	ns := c.Namespace(t)

	converted := kubectlStdin(t, c, kubevirtVM, "vmpod", "convert", "-f", "-")
	kubectlStdin(t, c, converted, "apply", "-n", ns, "-f", "-")

	pod := waitVM(t, c, ns, "debian", vmBootWithin, "Running", "True")
	node := c.Kubectl(t, "get", "vm.vmpod.dev", "-n", ns, "debian", "-o", "jsonpath={.status.nodeName}")
	if !slices.Contains(vmpodNodes, node) {
		t.Errorf("VM runs on %q, want a vmpod node %v", node, vmpodNodes)
	}

	// exec reaches the guest through its agent; the agent answers before cloud-init is done
	var out string
	if !testenv.PollWithin(3*time.Minute, func() bool {
		out, _ = c.KubectlErr("exec", "-n", ns, pod, "-c", "compute", "--", "cat", "/var/tmp/e2e.txt")
		return strings.Contains(out, "written by cloud-init")
	}) {
		t.Errorf("cloud-init's file in the guest: %q", out)
	}

	// the serial console through the API server's attach, as a user types
	consoleLogin(t, c, ns, "debian")

	guestOSInfo(t, c, ns, "debian")
	guestPortForward(t, c, ns, "debian")
	vncGreeting(t, c, ns, "debian")
	liveResize(t, c, ns, "debian", pod)

	// pause: the vCPUs stop, the guest agent cannot answer (Ready goes False) and the status
	// says Paused; unpause: the same guest (not rebooted) answers again
	bootID := c.Kubectl(t, "exec", "-n", ns, pod, "-c", "compute", "--", "cat", "/proc/sys/kernel/random/boot_id")
	c.Kubectl(t, "vmpod", "pause", "-n", ns, "debian")
	waitVM(t, c, ns, "debian", 2*time.Minute, "Paused", "False")
	if _, err := c.KubectlErr("exec", "-n", ns, pod, "-c", "compute", "--", "true"); err == nil || !strings.Contains(err.Error(), "paused") {
		t.Errorf("exec into a paused VM: %v, want an error saying it is paused", err)
	}
	c.Kubectl(t, "vmpod", "unpause", "-n", ns, "debian")
	waitVM(t, c, ns, "debian", 2*time.Minute, "Running", "True")
	if again := c.Kubectl(t, "exec", "-n", ns, pod, "-c", "compute", "--", "cat", "/proc/sys/kernel/random/boot_id"); again != bootID {
		t.Errorf("boot id %q after unpause, was %q: the guest rebooted", again, bootID)
	}

	// stop: the guest powers off, the pod goes, the status says Stopped
	firstUID := c.Kubectl(t, "get", "vm.vmpod.dev", "-n", ns, "debian", "-o", "jsonpath={.status.podUID}")
	stopped := time.Now()
	c.Kubectl(t, "vmpod", "stop", "-n", ns, "debian")
	waitVMStopped(t, c, ns, "debian")
	t.Logf("stop: the VM Stopped with no pod after %v", time.Since(stopped).Round(time.Second))

	// start: a new pod boots the guest again
	c.Kubectl(t, "vmpod", "start", "-n", ns, "debian")
	waitVM(t, c, ns, "debian", vmBootWithin, "Running", "True")
	uid := c.Kubectl(t, "get", "vm.vmpod.dev", "-n", ns, "debian", "-o", "jsonpath={.status.podUID}")
	if uid == firstUID {
		t.Errorf("start: the VM still has pod %s", uid)
	}

	// restart: replaced by another pod, Ready again. The old pod goes as a stop's does
	// (the guest powers off within the pod's grace period), so it has a stop's time.
	restarted := time.Now()
	c.Kubectl(t, "vmpod", "restart", "-n", ns, "debian")
	if !testenv.PollWithin(vmStopWithin, func() bool {
		now, _ := c.KubectlErr("get", "vm.vmpod.dev", "-n", ns, "debian", "-o", "jsonpath={.status.podUID}")
		return now != "" && now != uid
	}) {
		t.Fatalf("restart: the VM's pod %s not replaced after %v\n%s", uid, vmStopWithin, vmReport(c, ns, "debian"))
	}
	t.Logf("restart: the VM's pod replaced after %v", time.Since(restarted).Round(time.Second))
	pod = waitVM(t, c, ns, "debian", vmBootWithin, "Running", "True")

	// delete: the guest gets the ACPI power button and is gone well within its grace period.
	// A guest still booting first stops all it was starting (cloud-init, networking): a
	// just-booted guest took 38 s to power off on an idle machine here and 74 s in this
	// test, against 11 s for a booted one, so the check is of a booted guest.
	var state string
	if !testenv.PollWithin(3*time.Minute, func() bool {
		state, _ = c.KubectlErr("exec", "-n", ns, pod, "-c", "compute", "--", "timeout", "60", "systemctl", "is-system-running", "--wait")
		return strings.Contains(state, "running") || strings.Contains(state, "degraded")
	}) {
		t.Fatalf("the restarted guest did not finish booting: systemctl is-system-running says %q", state)
	}
	start := time.Now()
	c.Kubectl(t, "delete", "vm.vmpod.dev", "-n", ns, "debian", "--wait=true", "--timeout=150s")
	testenv.WaitForWithin(t, 2*time.Minute, "the VM's pod to go", func() bool {
		pods, _ := c.KubectlErr("get", "pods", "-n", ns, "-l", "vmpod.dev/vm-name=debian", "-o", "name")
		return strings.TrimSpace(pods) == ""
	})
	took := time.Since(start)
	t.Logf("VM deleted and its pod gone in %v", took.Round(time.Second))
	if took > 120*time.Second {
		t.Errorf("deleting the VM took %v: more than its 120 s grace period (the guest ignored the power button?)", took)
	}
}

// liveResize: sockets and guest memory raised within the VM's room reach the running guest
// through an in-place resize of its pod (the controller patches pods/resize, the kubelet
// admits it and sends CRI UpdateContainerResources, the shim hot-plugs): the guest has a
// second vCPU and 512 MiB more, in the same pod and boot, and no restart is required.
func liveResize(t *testing.T, c *testenv.Cluster, ns, vm, pod string) {
	t.Helper()
	guest := func(args ...string) string {
		out, _ := c.KubectlErr(append([]string{"exec", "-n", ns, pod, "-c", "compute", "--"}, args...)...)
		return strings.TrimSpace(out)
	}
	memTotal := func() int {
		f := strings.Fields(guest("grep", "MemTotal", "/proc/meminfo"))
		if len(f) < 2 {
			t.Fatalf("MemTotal: %q", f)
		}
		kib, _ := strconv.Atoi(f[1])
		return kib
	}
	if n := guest("nproc"); n != "1" {
		t.Fatalf("nproc %q before the resize, want 1", n)
	}
	before, bootID := memTotal(), guest("cat", "/proc/sys/kernel/random/boot_id")
	t0 := time.Now()
	c.Kubectl(t, "patch", "vm.vmpod.dev", "-n", ns, vm, "--type=merge", "-p",
		`{"spec":{"template":{"spec":{"domain":{"cpu":{"sockets":2},"memory":{"guest":"1536Mi"}}}}}}`)
	testenv.WaitForWithin(t, 2*time.Minute, "the guest to have 2 vCPUs", func() bool { return guest("nproc") == "2" })
	t.Logf("live resize: the guest has its second vCPU after %v", time.Since(t0).Round(time.Second))
	testenv.WaitForWithin(t, time.Minute, "the guest to have 512 MiB more", func() bool { return memTotal()-before >= 500<<10 })
	// the kubelet reports what the runtime applied
	testenv.WaitForWithin(t, time.Minute, "the pod's status to show the new limits", func() bool {
		l, _ := c.KubectlErr("get", "pod", "-n", ns, pod, "-o", "jsonpath={.status.containerStatuses[0].resources.limits.cpu} {.status.containerStatuses[0].resources.limits.memory}")
		return l == "2 1536Mi"
	})
	if again := guest("cat", "/proc/sys/kernel/random/boot_id"); again != bootID {
		t.Errorf("boot id %q after the resize, was %q: the guest rebooted", again, bootID)
	}
	if rr := c.Kubectl(t, "get", "vm.vmpod.dev", "-n", ns, vm, "-o", `jsonpath={.status.conditions[?(@.type=="RestartRequired")].status}`); rr != "False" {
		t.Errorf("RestartRequired %q after a resize within the room, want False", rr)
	}
}

// waitVM waits for the VM's printable status and Ready and returns its pod's name.
func waitVM(t *testing.T, c *testenv.Cluster, ns, name string, within time.Duration, status, ready string) string {
	t.Helper()
	var last string
	ok := testenv.PollWithin(within, func() bool {
		last, _ = c.KubectlErr("get", "vm.vmpod.dev", "-n", ns, name, "-o",
			`jsonpath={.status.printableStatus} {.status.conditions[?(@.type=="Ready")].status} {.status.podName}`)
		f := strings.Fields(last)
		return len(f) == 3 && f[0] == status && f[1] == ready
	})
	if !ok {
		t.Fatalf("VM %s: not %s/Ready=%s after %v (last: %q)\n%s", name, status, ready, within, last, vmReport(c, ns, name))
	}
	return strings.Fields(last)[2]
}

// vmReport is what a failed wait on a VM prints: its namespace's pods, the VM's
// description (status, conditions, events), its pods' events and the end of their serial
// consoles (a guest slow to boot or to power off shows why there).
func vmReport(c *testenv.Cluster, ns, name string) string {
	pods, _ := c.KubectlErr("get", "pods", "-n", ns, "-o", "wide")
	desc, _ := c.KubectlErr("describe", "vm.vmpod.dev", "-n", ns, name)
	events, _ := c.KubectlErr("get", "events", "-n", ns, "--sort-by=.lastTimestamp", "--field-selector=involvedObject.kind=Pod")
	console, _ := c.KubectlErr("logs", "-n", ns, "-l", "vmpod.dev/vm-name="+name, "-c", "compute", "--tail=25", "--prefix")
	return fmt.Sprintf("pods:\n%s\n%s\npod events:\n%s\nconsoles:\n%s", pods, desc, events, console)
}

// vmStopWithin bounds a VM's stop: the guest has its pod's grace period (120 s) to power
// off, then the kubelet ends the pod.
const vmStopWithin = 3 * time.Minute

func waitVMStopped(t *testing.T, c *testenv.Cluster, ns, name string) {
	t.Helper()
	if !testenv.PollWithin(vmStopWithin, func() bool {
		st, _ := c.KubectlErr("get", "vm.vmpod.dev", "-n", ns, name, "-o", "jsonpath={.status.printableStatus}")
		pods, _ := c.KubectlErr("get", "pods", "-n", ns, "-l", "vmpod.dev/vm-name="+name, "-o", "name")
		return st == "Stopped" && strings.TrimSpace(pods) == ""
	}) {
		t.Fatalf("VM %s not Stopped with no pod after %v\n%s", name, vmStopWithin, vmReport(c, ns, name))
	}
}

// consoleLogin attaches `kubectl vmpod console` with a pipe for stdin, presses Enter until
// the guest's getty answers with a login prompt, then detaches with Ctrl-].
func consoleLogin(t *testing.T, c *testenv.Cluster, ns, name string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := c.Command(ctx, "vmpod", "console", "-n", ns, name)
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatalf("kubectl vmpod console: %v", err)
	}
	found := make(chan bool, 1)
	go func() {
		r := bufio.NewReader(stdout)
		var seen strings.Builder
		buf := make([]byte, 4096)
		for {
			n, err := r.Read(buf)
			seen.Write(buf[:n])
			if strings.Contains(seen.String(), "login:") {
				found <- true
				return
			}
			if err != nil {
				found <- false
				return
			}
		}
	}()
	ticker := time.NewTicker(2 * time.Second)
	defer ticker.Stop()
	ok := false
wait:
	for {
		select {
		case ok = <-found:
			break wait
		case <-ticker.C:
			_, _ = io.WriteString(stdin, "\r")
		case <-ctx.Done():
			break wait
		}
	}
	_, _ = stdin.Write([]byte{0x1d}) // Ctrl-]: detach
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
		<-done
		t.Errorf("kubectl vmpod console did not detach on Ctrl-]")
	}
	if !ok {
		t.Errorf("kubectl vmpod console: no login prompt")
	}
}

// guestOSInfo: kubectl vmpod guestosinfo reports the guest as its agent sees it: the OS
// the image holds and the masquerade address the shim's DHCP gave it.
func guestOSInfo(t *testing.T, c *testenv.Cluster, ns, name string) {
	t.Helper()
	out := c.Kubectl(t, "vmpod", "guestosinfo", "-n", ns, name)
	var info vmspec.GuestInfo
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("kubectl vmpod guestosinfo printed %q: %v", out, err)
	}
	if info.AgentVersion == "" || info.OS == nil || info.OS.ID != "debian" || info.Hostname == "" {
		t.Errorf("guestosinfo: agent %q, OS %+v, hostname %q; want the agent's version, Debian and a hostname", info.AgentVersion, info.OS, info.Hostname)
	}
	var ips []string
	for _, i := range info.Interfaces {
		ips = append(ips, i.IPs...)
	}
	if !slices.ContainsFunc(ips, func(ip string) bool { return strings.HasPrefix(ip, "10.0.2.2/") }) {
		t.Errorf("guestosinfo: addresses %q, want the masquerade address 10.0.2.2", ips)
	}
}

// guestPortForward: kubectl vmpod port-forward reaches a port the guest listens on (the
// HTTP server cloud-init's runcmd started) through the API server, the kubelet and the
// shim, both as a local port and on stdin/stdout (what ssh's ProxyCommand uses).
func guestPortForward(t *testing.T, c *testenv.Cluster, ns, name string) {
	t.Helper()
	var out string
	if !testenv.PollWithin(2*time.Minute, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		cmd := c.Command(ctx, "vmpod", "port-forward", "--stdio", "-n", ns, name, "8080")
		cmd.Stdin = strings.NewReader("GET /e2e.txt HTTP/1.0\r\n\r\n")
		b, _ := cmd.CombinedOutput()
		out = string(b)
		return strings.Contains(out, "written by cloud-init")
	}) {
		t.Fatalf("kubectl vmpod port-forward --stdio to the guest's port 8080: %q", out)
	}
	if got := forwardedGet(t, c, "/e2e.txt", "vmpod", "port-forward", "-n", ns, name, "0:8080"); !strings.Contains(got, "written by cloud-init") {
		t.Errorf("GET through kubectl vmpod port-forward: %q", got)
	}
}

// vncGreeting: kubectl vmpod vnc forwards a local port to the VM's display, which greets
// with the RFB protocol version.
func vncGreeting(t *testing.T, c *testenv.Cluster, ns, name string) {
	t.Helper()
	cmd := c.Command(context.Background(), "vmpod", "vnc", "-n", ns, name)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("kubectl vmpod vnc: %v", err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	line, err := bufio.NewReader(stdout).ReadString('\n')
	m := regexp.MustCompile(`vnc://(127\.0\.0\.1:\d+)`).FindStringSubmatch(line)
	if err != nil || m == nil {
		t.Fatalf("kubectl vmpod vnc printed %q (%v), want the local address", line, err)
	}
	conn, err := net.DialTimeout("tcp", m[1], 10*time.Second)
	if err != nil {
		t.Fatalf("connect to the VNC forward: %v", err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	greeting := make([]byte, 12)
	if _, err := io.ReadFull(conn, greeting); err != nil || !strings.HasPrefix(string(greeting), "RFB 003.") {
		t.Errorf("VNC through kubectl vmpod vnc: read %q (%v), want an RFB greeting", greeting, err)
	}
}

// kubectlStdin runs kubectl with input on stdin and returns its stdout.
func kubectlStdin(t *testing.T, c *testenv.Cluster, input string, args ...string) string {
	t.Helper()
	cmd := c.Command(context.Background(), args...)
	cmd.Stdin = strings.NewReader(input)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("kubectl %s: %v: %s", strings.Join(args, " "), err, stderr.String())
	}
	if stderr.Len() > 0 {
		t.Logf("kubectl %s: %s", strings.Join(args, " "), strings.TrimSpace(stderr.String()))
	}
	return string(out)
}

// TestVirtualMachineUnschedulable: a VM no node can hold says so on the VM (status and the
// Ready condition carry the scheduler's reason), not as a silent Pending.
func TestVirtualMachineUnschedulable(t *testing.T) {
	c := testenv.RequireCluster(t)
	ns := c.Namespace(t)
	huge := strings.Replace(strings.Replace(kubevirtVM, "name: debian", "name: huge", 1), "memory: {guest: 1Gi, maxGuest: 1536Mi}", "memory: {guest: 4000Gi}", 1)
	if !strings.Contains(huge, "4000Gi") {
		t.Fatal("the VM manifest changed: this test no longer makes its VM huge")
	}
	kubectlStdin(t, c, kubectlStdin(t, c, huge, "vmpod", "convert", "-f", "-"), "apply", "-n", ns, "-f", "-")
	var last string
	if !testenv.PollWithin(time.Minute, func() bool {
		last, _ = c.KubectlErr("get", "vm.vmpod.dev", "-n", ns, "huge", "-o",
			`jsonpath={.status.printableStatus}|{.status.conditions[?(@.type=="Ready")].reason}|{.status.conditions[?(@.type=="Ready")].message}`)
		f := strings.Split(last, "|")
		return len(f) == 3 && f[0] == "ErrorUnschedulable" && f[1] == "PodUnschedulable" && strings.Contains(f[2], "Insufficient memory")
	}) {
		t.Fatalf("VM huge: status|reason|message = %q, want ErrorUnschedulable, PodUnschedulable and the scheduler's Insufficient memory", last)
	}
}
