package runtime_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/integration/testenv"
	"github.com/vmpod/vmpod/runtime"
	"github.com/vmpod/vmpod/runtime/rootfssync"
	"github.com/vmpod/vmpod/runtime/vmm"
	"github.com/vmpod/vmpod/runtime/vmpodagent"
)

// TestContainerVMMigratesWithItsShare (issue 12, docs/design/211): a container pod's VM
// moves to another machine with its container running from a rootfs on virtio-fs.
// virtiofsd's state — the files the guest has open — travels in QEMU's stream (QEMU >= 8.2,
// virtiofsd >= 1.11: hack/qemu-next.sh). Each machine has its own rootfs, an overlay of
// the same image, as on two nodes: what the container wrote (the source's upper
// directory) is mirrored into the target's over a connection (rootfssync's stream, as
// between nodes) while the container runs, and once more
// while the guest is stopped, before virtiofsd's state arrives. The container's init
// holds open a file it wrote itself and keeps a counter in the rootfs; on the target the
// same process goes on counting in the target's tree, reads on in the file it held open,
// and the adopted agent execs into the container. The host's QEMU 7.2 refuses such a
// migration up front, its guest untouched.
func TestContainerVMMigratesWithItsShare(t *testing.T) {
	testenv.Require(t)
	qemu, virtiofsd := testenv.QEMUNext(t)
	ctx := testenv.Context(t, 5*time.Minute)

	old := testenv.StartVM(t, testenv.VMConfig(t, "mig-fs-old"))
	out, _ := testenv.MigrationStream(t)
	if _, err := old.Machine().Migrate(ctx, out, vmm.MigrationOptions{}); !errdefs.IsNotImplemented(err) {
		t.Errorf("migrating a virtio-fs machine on QEMU 7.2: %v, want NotImplemented", err)
	}
	if _, err := old.Agent().Ping(ctx); err != nil {
		t.Errorf("the refused machine's guest: %v", err)
	}

	config := func(name string) vmpodagent.Config {
		cfg := testenv.VMConfig(t, name)
		cfg.Type = machine.Q35
		cfg.QEMUPath, cfg.VirtiofsdPath = qemu, virtiofsd
		return cfg
	}
	src := testenv.StartVM(t, config("mig-fs-src"))
	busybox := testenv.BusyboxRootfs(t)
	from := testenv.NewOverlay(t, busybox)
	if err := from.Mount(t); err != nil {
		t.Fatal(err)
	}
	// The container holds open a file it wrote itself (in the upper directory alone), and
	// deletes a file of the image's (a whiteout): both must be in the target's tree. Once
	// the host says the first copy is made (/mirrored), it opens one more file, /late,
	// and appends to it: only the copy made with the guest stopped has it.
	script := `printf 'first\nsecond\n' > /lines; rm /etc/group; exec 3< /lines; read a <&3; echo "$a" > /got-before; i=0; ` +
		`while :; do i=$((i+1)); echo $i; echo $i > /counter.new; mv /counter.new /counter; ` +
		`if [ -e /mirrored ] && [ ! -e /late ]; then exec 4>> /late; fi; [ -e /late ] && echo $i >&4; ` +
		`if [ -e /go ] && [ ! -e /got-after ]; then read b <&3; echo "$b" > /got-after; fi; sleep 0.1; done`
	// its stdout, a line per count, is copied to each machine's writer in turn: the
	// target's copy goes on where the source's stopped
	var outputs [3]testenv.Buffer
	init, err := src.CreateContainer(ctx, "main", from.Merged, testenv.Spec("sh", "-c", script), runtime.Stdio{Stdout: &outputs[0], Stderr: os.Stderr})
	if err != nil {
		t.Fatal(err)
	}
	if err := src.Agent().StartContainer(ctx, "main"); err != nil {
		t.Fatal(err)
	}
	rootfs := from.Merged // where the test reads what the container writes; the target's after the move
	read := func(name string) string {
		b, _ := os.ReadFile(filepath.Join(rootfs, name))
		return string(b)
	}
	counter := func() int {
		n, _ := strconv.Atoi(strings.TrimSpace(read("counter")))
		return n
	}
	counting := func(where string) int {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for start := counter(); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
			if n := counter(); n > start && start > 0 {
				return n
			} else if start == 0 {
				start = n
			}
		}
		t.Fatalf("%s: the container's counter stands at %d", where, counter())
		return 0
	}
	counting("source")

	// the target's rootfs: the same image, and what the container wrote so far, sent
	// over a TCP connection as between two nodes
	to := testenv.NewOverlay(t, busybox)
	tree := rootfssync.Over(from.Upper, testenv.MirrorConnection(t, to.Upper))
	if c, err := tree.Pass(ctx, true); err != nil {
		t.Fatal(err)
	} else {
		t.Logf("the container's writes mirrored while it runs: %+v", c)
	}
	if err := os.WriteFile(filepath.Join(from.Merged, "mirrored"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(30 * time.Second); read("late") == "" && time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
	}
	before := counting("source, /late open")

	// A migration that cannot complete in time is cancelled: the guest runs on at the
	// source, its virtio-fs share served as before. (Cancelled later, at the switchover,
	// with the guest and its devices already stopped, QEMU 10 resumes a guest whose
	// processes then crash: docs/design/211.)
	refusing, err := vmpodagent.Receive(ctx, config("mig-fs-cancelled"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = refusing.Kill() })
	out, in := testenv.MigrationStream(t)
	if err := refusing.AcceptMigration(ctx, in, vmm.MigrationOptions{}); err != nil {
		t.Fatal(err)
	}
	_, err = src.Machine().Migrate(ctx, out, vmm.MigrationOptions{MaxBandwidth: 1 << 20, CompletionTimeout: time.Second})
	if !errors.Is(err, vmm.ErrMigrationCancelled) {
		t.Fatalf("a migration past its completion timeout: %v, want ErrMigrationCancelled", err)
	}
	before = max(before, counting("source, after a cancelled migration"))

	move := testenv.MoveContainerVM(t, ctx, src, config("mig-fs-dst"), "main", to, tree, vmm.MigrationOptions{MaxBandwidth: 1 << 30})
	dst := move.Guest
	if move.Last.Copied == 0 {
		t.Errorf("the copy made with the guest stopped copied nothing (%+v): want /late and the counter", move.Last)
	}
	init, err = dst.AdoptProcess("main", "", init.Pid(), runtime.Stdio{Stdout: &outputs[1]}, init.HandOverOutput())
	if err != nil {
		t.Fatal(err)
	}
	rootfs = to.Merged

	after := counting("target")
	if after <= before {
		t.Errorf("the counter went back: %d on the target, %d before the move", after, before)
	}
	// /late, which the container opened after the first copy, is appended to on the target
	// (after was written there: the source had quit)
	lateAtLeast := func(where string, n int) {
		t.Helper()
		time.Sleep(500 * time.Millisecond)
		lines := strings.Fields(read("late"))
		last := -1
		if len(lines) > 0 {
			last, _ = strconv.Atoi(lines[len(lines)-1])
		}
		if last < n {
			t.Errorf("/late on the %s ends %q, want %d or more: the file the container opened last is not written there", where, lines[max(0, len(lines)-3):], n)
		}
	}
	lateAtLeast("target", after)
	if err := os.WriteFile(filepath.Join(rootfs, "go"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	var got []byte
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		if got, _ = os.ReadFile(filepath.Join(rootfs, "got-after")); len(got) > 0 {
			break
		}
	}
	if _, err := os.Stat(filepath.Join(rootfs, "etc", "group")); !os.IsNotExist(err) {
		t.Errorf("the image's /etc/group, which the container removed: %v on the target, want it gone", err)
	}
	if b, _ := os.ReadFile(filepath.Join(rootfs, "got-before")); string(b) != "first\n" || string(got) != "second\n" {
		t.Errorf("the file the container held open: read %q before the move and %q after, want \"first\" then \"second\"", b, got)
	}
	var stdout testenv.Buffer
	p, err := dst.Exec(ctx, "main", "after-move", testenv.Spec("cat", "/got-before").Process, runtime.Stdio{Stdout: &stdout})
	if err != nil {
		t.Fatalf("exec through the adopted agent: %v", err)
	}
	if exit, err := testenv.WaitOutput(ctx, p); err != nil || exit.Status != 0 || stdout.String() != "first\n" {
		t.Errorf("exec through the adopted agent: exit %v, %v, output %q", exit, err, stdout.String())
	}
	_ = p.Remove(ctx)

	// and on again: virtiofsd's state, handed over once, is handed over a second time, and
	// the rootfs mirrored from the target's overlay, mounted and in use, into a third
	if _, err := os.ReadFile(filepath.Join(rootfs, "late")); err != nil {
		t.Fatal(err)
	}
	before = counting("target, before the second move")
	third := testenv.NewOverlay(t, busybox)
	tree = rootfssync.Over(to.Upper, testenv.MirrorConnection(t, third.Upper))
	if c, err := tree.Pass(ctx, true); err != nil {
		t.Fatal(err)
	} else {
		t.Logf("second move: the container's writes mirrored while it runs: %+v", c)
	}
	moved := testenv.MoveContainerVM(t, ctx, dst, config("mig-fs-third"), "main", third, tree, vmm.MigrationOptions{MaxBandwidth: 1 << 30}).Guest
	if _, err := moved.AdoptProcess("main", "", init.Pid(), runtime.Stdio{Stdout: &outputs[2]}, init.HandOverOutput()); err != nil {
		t.Fatal(err)
	}
	rootfs = third.Merged
	after = counting("third machine")
	if after <= before {
		t.Errorf("the counter went back: %d on the third machine, %d before the second move", after, before)
	}
	lateAtLeast("third machine", after) // a file the container opened on the first machine

	// the container's stdout, as each machine's writer got it: one count after the other,
	// none twice, none missing, some on each machine
	next := 1
	for i := range outputs {
		lines := strings.Fields(outputs[i].String())
		if len(lines) == 0 {
			t.Errorf("machine %d's copy of the container's stdout is empty", i+1)
		}
		for _, line := range lines {
			if line != strconv.Itoa(next) {
				t.Fatalf("machine %d's copy of the container's stdout has %q where %d comes next (it has %d lines)", i+1, line, next, len(lines))
			}
			next++
		}
	}
	t.Logf("the container's stdout: %d lines across three machines' copies, in order, none lost or twice", next-1)
	if b, _ := os.ReadFile(filepath.Join(rootfs, "got-before")); string(b) != "first\n" {
		t.Errorf("the third machine's rootfs: /got-before %q", b)
	}
	var again testenv.Buffer
	p, err = moved.Exec(ctx, "main", "after-second-move", testenv.Spec("cat", "/got-after").Process, runtime.Stdio{Stdout: &again})
	if err != nil {
		t.Fatalf("exec after the second move: %v", err)
	}
	if exit, err := testenv.WaitOutput(ctx, p); err != nil || exit.Status != 0 || again.String() != "second\n" {
		t.Errorf("exec after the second move: exit %v, %v, output %q", exit, err, again.String())
	}
	_ = p.Remove(ctx)
	if err := moved.RemoveContainer(context.Background(), "main", true); err != nil {
		t.Errorf("remove the container on the third machine: %v", err)
	}
}

// TestAFailedSwitchoverEndsTheTCGGuest (docs/design/211): under TCG a virtio-fs guest
// resumed after its migration's pause before the switchover runs stale translations of
// the pages virtiofsd wrote meanwhile (its processes die of SIGSEGV). A migration whose
// last step before the switchover fails (here: the rootfs's last pass, as a target out of
// room would fail it) therefore ends the source's guest instead of resuming it
// (vmm.ErrGuestLost), and its QEMU is gone.
func TestAFailedSwitchoverEndsTheTCGGuest(t *testing.T) {
	testenv.Require(t)
	qemu, virtiofsd := testenv.QEMUNext(t)
	ctx := testenv.Context(t, 5*time.Minute)
	config := func(name string) vmpodagent.Config {
		cfg := testenv.VMConfig(t, name)
		cfg.Type = machine.Q35
		cfg.QEMUPath, cfg.VirtiofsdPath = qemu, virtiofsd
		return cfg
	}
	srcCfg := config("mig-lost-src")
	src, err := vmpodagent.Boot(ctx, srcCfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = src.Kill()
		testenv.AssertNoLeaks(t, srcCfg.StateDir)
	})
	if src.Machine().Accel() != machine.TCG {
		t.Skip("the stale translations are TCG's: on KVM the guest resumes")
	}
	rootfs := testenv.NewOverlay(t, testenv.BusyboxRootfs(t))
	if err := rootfs.Mount(t); err != nil {
		t.Fatal(err)
	}
	if _, err := src.CreateContainer(ctx, "main", rootfs.Merged, testenv.Spec("sh", "-c", "while :; do cat /etc/passwd > /dev/null; sleep 0.1; done"), runtime.Stdio{}); err != nil {
		t.Fatal(err)
	}
	if err := src.Agent().StartContainer(ctx, "main"); err != nil {
		t.Fatal(err)
	}
	dstCfg := config("mig-lost-dst")
	m, err := vmpodagent.Receive(ctx, dstCfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = m.Kill()
		testenv.AssertNoLeaks(t, dstCfg.StateDir)
	})
	out, in := testenv.MigrationStream(t)
	if err := m.AcceptMigration(ctx, in, vmm.MigrationOptions{}); err != nil {
		t.Fatal(err)
	}
	lastPass := errors.New("the rootfs's last pass: no space left on the target")
	_, err = src.Machine().Migrate(ctx, out, vmm.MigrationOptions{MaxBandwidth: 1 << 30,
		BeforeSwitchover: func(context.Context) error { return lastPass }})
	if !errors.Is(err, vmm.ErrGuestLost) || !errors.Is(err, lastPass) {
		t.Fatalf("a migration failing at its switchover under TCG: %v, want ErrGuestLost saying why", err)
	}
	select {
	case <-src.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("the source's QEMU still runs the guest that could not be resumed")
	}
}
