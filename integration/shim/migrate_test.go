package shim_test

import (
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmpod/vmpod/api/annotations"
	"github.com/vmpod/vmpod/api/vmspec"
	"github.com/vmpod/vmpod/integration/testenv"
	"github.com/vmpod/vmpod/runtime/vmm"
)

// TestContainerPodMigratesToAnotherPod (issue 12, docs/design/212): a container pod's
// guest moves into another pod on the same containerd, the target made from the same
// spec and annotated as a migration's target, through the execs the controller drives
// (vmspec.MigrateAcceptCommand, vmspec.MigrateCommand). Both pods run on QEMU 10 and
// virtiofsd 1.13 (hack/qemu-next.sh), which migrate virtio-fs. The container counts in
// memory and to stdout, keeps the count in its rootfs and holds open a file it wrote: in
// the target the same process goes on counting, from where it was, in the target's
// rootfs; its log goes on in the target container's log; execs reach it there, and were
// refused before the guest came. The source's container stays running (a kubelet would
// restart it), refusing execs, until the pod is removed.
func TestContainerPodMigratesToAnotherPod(t *testing.T) {
	testenv.RequireTestbed(t)
	qemu, virtiofsd := testenv.QEMUNext(t)
	counter := testenv.ContainerConfig{
		Metadata: testenv.Metadata{Name: "counter"},
		Command: sh(`printf 'first\nsecond\n' > /lines; exec 3< /lines; read a <&3; echo "$a" > /got-before; i=0; ` +
			`while :; do i=$((i+1)); echo "count $i"; echo $i > /counter.new; mv /counter.new /counter; ` +
			`if [ -e /go ] && [ ! -e /got-after ]; then read b <&3; echo "$b" > /got-after; fi; sleep 0.2; done`),
	}
	var src, dst *testenv.Pod
	var srcID, dstID string
	testenv.WithNodeConfig(t, fmt.Sprintf("qemu = %q\nvirtiofsd = %q\nmachine = \"q35\"\ntemplates = false\n", qemu, virtiofsd), func() {
		src = testenv.RunPod(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: "mig-src"}, Hostname: "mig-src"})
		srcID = src.Container(counter)
		waitLog(t, srcID, "count 3")
		dst = testenv.RunPod(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: "mig-dst"}, Hostname: "mig-src",
			Annotations: map[string]string{annotations.MigrationTarget: src.ID}})
		dstID = dst.Container(counter)
	})
	if state, _ := inspect(t, dstID); state != "CONTAINER_RUNNING" {
		t.Fatalf("the target's container is %s before the guest came, want running (a placeholder)", state)
	}
	if out, err := testenv.Cmd("crictl", "exec", "-s", dstID, "true"); err == nil || !strings.Contains(err.Error(), "has not arrived") {
		t.Errorf("exec in the target before the guest came: %v %q, want refused: the guest has not arrived", err, out)
	}

	targetTLS, sourceTLS, err := vmspec.NewMigrationCredentials()
	if err != nil {
		t.Fatal(err)
	}
	accept, _ := json.Marshal(vmspec.MigrationAccept{TLS: targetTLS, TimeoutSeconds: 120})
	out, err := testenv.ExecStdin(dstID, accept, time.Minute, vmspec.MigrateAcceptCommand)
	if err != nil {
		t.Fatal(err)
	}
	var listening vmspec.MigrationListening
	if err := json.Unmarshal([]byte(out), &listening); err != nil {
		t.Fatalf("accept's answer %q: %v", out, err)
	}
	before := countIn(t, srcID)
	request, _ := json.Marshal(vmspec.MigrationRequest{Target: listening.Address, TLS: sourceTLS})
	start := time.Now()
	progress, err := testenv.ExecStdin(srcID, request, 5*time.Minute, vmspec.MigrateCommand)
	elapsed := time.Since(start)
	t.Logf("migration (%v): %s", elapsed.Round(time.Millisecond), lastLine(progress))
	if err != nil {
		t.Fatal(err)
	}

	// the target takes the guest over once the source has committed: its agent, the
	// containers' processes, the pod's addresses
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		_, err := testenv.Cmd("crictl", "exec", "-s", dstID, "true")
		if err == nil {
			t.Logf("the target runs the guest %v after the migration's end", time.Since(start.Add(elapsed)).Round(time.Millisecond))
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("exec in the target 30 s after the migration: %v", err)
		}
	}
	// the same process counts on in the target, from where it was
	after := countIn(t, dstID)
	if after < before {
		t.Fatalf("the target's container counts %d, the source's was at %d before the move: not the same process", after, before)
	}
	time.Sleep(time.Second)
	if later := countIn(t, dstID); later <= after {
		t.Fatalf("the count stays at %d in the target: the process does not run", later)
	}
	// the file it held open is read on, in the target's rootfs
	testenv.Crictl(t, "exec", "-s", dstID, "touch", "/go")
	waitFile := time.Now().Add(30 * time.Second)
	for {
		got, _ := testenv.Cmd("crictl", "exec", "-s", dstID, "cat", "/got-before", "/got-after")
		if slices.Equal(strings.Fields(got), []string{"first", "second"}) {
			break
		}
		if time.Now().After(waitFile) {
			t.Fatalf("the file the container held open: %q, want its two lines, read on both sides of the move", got)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if hostname := strings.TrimSpace(testenv.Crictl(t, "exec", "-s", dstID, "hostname")); hostname != "mig-src" {
		t.Errorf("the guest's hostname in the target: %q", hostname)
	}

	// the log goes on: the source's has the counts up to the move, the target's from there,
	// each count once
	srcLog, _ := testenv.Cmd("crictl", "logs", srcID)
	dstLog := waitLog(t, dstID, fmt.Sprintf("count %d", after+2))
	counts := append(logCounts(t, srcLog), logCounts(t, dstLog)...)
	for i, n := range counts {
		if n != i+1 {
			t.Fatalf("the counts across both logs are not 1, 2, 3, ... once each: at %d: %d (source's log ends %q, target's starts %q)", i, n, tail(srcLog), head(dstLog))
		}
	}
	if len(logCounts(t, dstLog)) == 0 || len(logCounts(t, srcLog)) == 0 {
		t.Fatalf("each log should hold some counts: source %d, target %d", len(logCounts(t, srcLog)), len(logCounts(t, dstLog)))
	}

	// the source stays, its container running, and refuses what needs the guest
	if state, _ := inspect(t, srcID); state != "CONTAINER_RUNNING" {
		t.Errorf("the source's container is %s after the move, want running until the pod is removed", state)
	}
	if _, err := testenv.Cmd("crictl", "exec", "-s", srcID, "true"); err == nil || !strings.Contains(err.Error(), "moved to") {
		t.Errorf("exec in the source after the move: %v, want refused: the guest moved", err)
	}
	if _, err := testenv.ExecStdin(srcID, request, time.Minute, vmspec.MigrateCommand); err == nil || !strings.Contains(err.Error(), "moved to") {
		t.Errorf("a second migration of the moved pod: %v, want refused", err)
	}
	if pid := vmm.QEMUOf(testenv.PodStateDir(t, src.ID)); pid > 0 {
		t.Errorf("the source's QEMU (pid %d) still runs after the move", pid)
	}
	testenv.Crictl(t, "stop", "--timeout", "10", srcID)
	if state, code := inspect(t, srcID); state != "CONTAINER_EXITED" || code != 143 {
		t.Errorf("the source's container after stop: %s %d, want exited 143 (SIGTERM)", state, code)
	}
}

// countIn is the count the container last wrote to /counter.
func countIn(t *testing.T, id string) int {
	t.Helper()
	out := testenv.Crictl(t, "exec", "-s", id, "cat", "/counter")
	n, err := strconv.Atoi(strings.TrimSpace(out))
	if err != nil {
		t.Fatalf("/counter: %q", out)
	}
	return n
}

// logCounts are the counts of "count N" lines in a CRI log's text.
func logCounts(t *testing.T, log string) []int {
	var out []int
	for _, line := range strings.Split(log, "\n") {
		if n, ok := strings.CutPrefix(strings.TrimSpace(line), "count "); ok {
			v, err := strconv.Atoi(n)
			if err != nil {
				t.Fatalf("log line %q", line)
			}
			out = append(out, v)
		}
	}
	return out
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

func tail(s string) string {
	if len(s) > 80 {
		return s[len(s)-80:]
	}
	return s
}

func head(s string) string {
	if len(s) > 80 {
		return s[:80]
	}
	return s
}
