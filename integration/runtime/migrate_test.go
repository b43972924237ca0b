package runtime_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/vmpod/vmpod/integration/testenv"
	"github.com/vmpod/vmpod/qmp"
	"github.com/vmpod/vmpod/runtime/vmm"
)

// TestLiveMigration (issue 12, docs/design/207): a running Debian guest moves between two
// machines on this host. A process in the guest keeps a counter in tmpfs; it goes on
// counting on the target, where a file written before the move is still in tmpfs. Before
// that, a migration cancelled half-way (its stream throttled to 1 MiB/s) leaves the source
// running and counting, and its target ends. Both machines open the same disk overlay:
// QEMU keeps the target's image inactive until the state has arrived. After three hops
// with a guest writing all along, one at 1 MiB/s switches to post-copy; a last post-copy
// whose stream is cut after the switch loses the guest, and both machines say so.
func TestLiveMigration(t *testing.T) {
	testenv.Require(t)
	disk := testenv.GuestDisk(t)
	ctx := testenv.Context(t, 10*time.Minute)
	root := testenv.StateRoot(t)
	config := func(name string, incoming bool) vmm.Config {
		cfg := testenv.GuestVMConfig(t, root, name, disk, 512)
		cfg.Incoming = incoming
		// room to grow (a virtio-mem device): under TCG the RAM's 8 KiB of slack must not
		// eat into it, or QEMU refuses the device at start
		cfg.MaxMemoryMiB = 1024
		return cfg
	}
	counter := func(g *testenv.GuestVM) int {
		t.Helper()
		n, err := strconv.Atoi(g.Sh(ctx, "cat /dev/shm/counter"))
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	counting := func(g *testenv.GuestVM, where string) int {
		t.Helper()
		a := counter(g)
		time.Sleep(1500 * time.Millisecond)
		b := counter(g)
		if b <= a {
			t.Fatalf("%s: the guest's counter stands at %d", where, b)
		}
		return b
	}

	src := testenv.StartGuestVM(t, ctx, config("mig-src", false))
	src.WaitAgent(ctx, 4*time.Minute)
	token := fmt.Sprint(time.Now().UnixNano())
	src.Sh(ctx, "echo "+token+" > /dev/shm/token; "+
		"setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /dev/shm/counter.new; mv /dev/shm/counter.new /dev/shm/counter; sleep 0.1; done' </dev/null >/dev/null 2>&1 & "+
		"echo $! > /dev/shm/counter.pid; sleep 0.5")
	counting(src, "source, before")

	// A migration that cannot finish in time is cancelled; the source runs on.
	slow := testenv.StartGuestVM(t, ctx, config("mig-slow", true))
	slowOut, slowIn := testenv.MigrationStream(t)
	if err := slow.AcceptMigration(ctx, slowIn, vmm.MigrationOptions{}); err != nil {
		t.Fatal(err)
	}
	var polls int
	_, err := src.Migrate(ctx, slowOut, vmm.MigrationOptions{
		MaxBandwidth:      1 << 20,
		CompletionTimeout: 2 * time.Second,
		Progress:          func(qmp.MigrationInfo) { polls++ },
	})
	if !errors.Is(err, vmm.ErrMigrationCancelled) {
		t.Fatalf("a migration past its completion timeout: %v, want ErrMigrationCancelled", err)
	}
	t.Logf("cancelled as asked (%d polls): %v", polls, err)
	select {
	case <-slow.Done():
	case <-time.After(30 * time.Second):
		t.Error("the target of a cancelled migration still runs")
	}
	after := counting(src, "source, after the cancelled migration")

	// The real one.
	dst := testenv.StartGuestVM(t, ctx, config("mig-dst", true))
	out, in := testenv.MigrationStream(t)
	if _, err := dst.Migrate(ctx, in, vmm.MigrationOptions{}); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("migrating a target that received nothing: %v, want FailedPrecondition", err)
	}
	if err := dst.AcceptMigration(ctx, in, vmm.MigrationOptions{}); err != nil {
		t.Fatal(err)
	}
	incoming := make(chan error, 1)
	go func() { _, err := dst.AwaitIncoming(ctx); incoming <- err }()
	info, err := src.Migrate(ctx, out, vmm.MigrationOptions{DowntimeLimit: 50 * time.Millisecond, MaxBandwidth: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	if err := <-incoming; err != nil {
		t.Fatal(err)
	}
	t.Logf("migrated: total %v, downtime %v, setup %v, %d MiB sent, %d dirty syncs",
		info.TotalTime, info.Downtime, info.SetupTime, info.RAM.Transferred>>20, info.RAM.DirtySyncCount)
	if st, err := src.Monitor().Status(ctx); err != nil || st.State != qmp.RunStatePostMigrate {
		t.Errorf("source after the migration: %+v, %v; want postmigrate", st, err)
	}
	src.Quit(ctx)

	dst.WaitAgent(ctx, time.Minute)
	if n := counting(dst, "target"); n <= after {
		t.Errorf("the counter went back: %d on the target, %d on the source before", n, after)
	}
	if got := dst.Sh(ctx, "cat /dev/shm/token"); got != token {
		t.Errorf("tmpfs file on the target: %q, want %q", got, token)
	}
	if out := dst.Sh(ctx, "kill -0 $(cat /dev/shm/counter.pid) && echo alive"); out != "alive" {
		t.Errorf("the counting process on the target: %q", out)
	}

	// Back and forth while the guest writes the same pages over and over: a shell appends
	// consecutive numbers to a tmpfs file as fast as it can (its variable and the file's
	// last page stay hot in the TLB). A migration that loses guest writes (QEMU 7.2 under
	// TCG without vmm's unaligned RAM: design 207) breaks the sequence, or the guest's
	// kernel.
	dst.Sh(ctx, "setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i >> /dev/shm/seq; done' </dev/null >/dev/null 2>&1 & echo $! > /dev/shm/seq.pid; sleep 0.5")
	lines := func(g *testenv.GuestVM) int {
		t.Helper()
		n, err := strconv.Atoi(g.Sh(ctx, "wc -l < /dev/shm/seq"))
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	written := lines(dst)
	cur := dst
	for i := range 3 {
		next := testenv.StartGuestVM(t, ctx, config(fmt.Sprintf("mig-hop%d", i), true))
		out, in := testenv.MigrationStream(t)
		if err := next.AcceptMigration(ctx, in, vmm.MigrationOptions{}); err != nil {
			t.Fatal(err)
		}
		go func() { _, err := next.AwaitIncoming(ctx); incoming <- err }()
		info, err := cur.Migrate(ctx, out, vmm.MigrationOptions{DowntimeLimit: 50 * time.Millisecond, MaxBandwidth: 1 << 30, AutoConverge: true})
		if err != nil {
			t.Fatalf("hop %d: %v", i, err)
		}
		// a machine that arrived by migration must not take its own arrival for the
		// end of its departure
		if info.TotalTime == 0 || info.RAM == nil {
			t.Errorf("hop %d: Migrate returned %+v: not this migration's account", i, info)
		}
		if err := <-incoming; err != nil {
			t.Fatalf("hop %d: %v", i, err)
		}
		cur.Quit(ctx)
		cur = next
		cur.WaitAgent(ctx, time.Minute)
		counting(cur, fmt.Sprintf("hop %d", i))
		n := lines(cur)
		if n <= written {
			t.Fatalf("hop %d: the writer's sequence stands at %d lines", i, n)
		}
		written = n
	}

	// Post-copy (KubeVirt's allowPostCopy): the stream throttled to 1 MiB/s as in the
	// cancelled migration above, the writer dirtying pages all along; at its completion
	// timeout the migration switches to post-copy instead of cancelling, the guest runs on
	// the target at once and the target pulls the pages it faults on. A target whose QEMU
	// may not handle its own page faults refuses before anything is sent.
	next := testenv.StartGuestVM(t, ctx, config("mig-postcopy", true))
	out, in = testenv.MigrationStream(t)
	allowUserfaultfd := testenv.AllowUserfaultfd(t, false)
	if err := next.AcceptMigration(ctx, in, vmm.MigrationOptions{PostCopy: true}); !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "vm.unprivileged_userfaultfd") {
		t.Errorf("post-copy to a QEMU that may not use userfaultfd: %v, want FailedPrecondition naming the sysctl", err)
	}
	allowUserfaultfd(true)

	// A cancel at the switch to post-copy: a migration that may switch stops before it,
	// the guest paused and nothing of its devices sent; cancelled there, the guest runs on
	// here (vmpod resumes it: QEMU 7.2 leaves it stopped) and the target never ran it. (A
	// cancel QEMU 7.2 takes once the switch has begun loses the guest.)
	{
		spare := testenv.StartGuestVM(t, ctx, config("mig-pc-cancel", true))
		sout, sin := testenv.MigrationStream(t)
		if err := spare.AcceptMigration(ctx, sin, vmm.MigrationOptions{PostCopy: true}); err != nil {
			t.Fatal(err)
		}
		spareIn := make(chan error, 1)
		go func() { _, err := spare.AwaitIncoming(ctx); spareIn <- err }()
		mctx, cancelMigration := context.WithCancel(ctx)
		var phases []qmp.MigrationStatus
		_, err := cur.Migrate(mctx, sout, vmm.MigrationOptions{
			MaxBandwidth: 1 << 20, CompletionTimeout: 2 * time.Second, PostCopy: true,
			Progress: func(i qmp.MigrationInfo) {
				if len(phases) == 0 || phases[len(phases)-1] != i.Status {
					phases = append(phases, i.Status)
				}
				if i.Status == qmp.MigrationPreSwitchover {
					cancelMigration() // the pause before the switch to post-copy (the pre-copy cannot end at 1 MiB/s)
				}
			},
		})
		cancelMigration()
		if !errors.Is(err, vmm.ErrMigrationCancelled) || !slices.Contains(phases, qmp.MigrationPreSwitchover) {
			t.Errorf("cancelled at the pause before the switch: %v (phases %v), want a cancel after pre-switchover", err, phases)
		}
		if st, err := cur.Monitor().Status(ctx); err != nil || st.State != qmp.RunStateRunning {
			t.Errorf("the source after a cancel at the switch: %+v, %v; want the guest running", st, err)
		}
		counting(cur, "after a cancel at the switch to post-copy")
		if err := <-spareIn; err == nil {
			t.Error("the target of a migration cancelled before its switch got the guest")
		}
		t.Logf("cancelled at the switch to post-copy: phases %v, %v", phases, err)
	}

	if err := next.AcceptMigration(ctx, in, vmm.MigrationOptions{PostCopy: true}); err != nil {
		t.Fatal(err)
	}
	arrived := make(chan qmp.MigrationStatus, 1)
	go func() {
		info, err := next.AwaitIncoming(ctx)
		arrived <- info.Status
		if err == nil && info.Status == qmp.MigrationPostcopyActive {
			_, err = next.AwaitPostCopy(ctx) // the guest runs; the rest of its memory follows
		}
		incoming <- err
	}()
	var phases []qmp.MigrationStatus
	info, err = cur.Migrate(ctx, out, vmm.MigrationOptions{
		MaxBandwidth: 1 << 20, CompletionTimeout: 2 * time.Second, PostCopy: true,
		Progress: func(i qmp.MigrationInfo) {
			if len(phases) == 0 || phases[len(phases)-1] != i.Status {
				phases = append(phases, i.Status)
			}
		},
	})
	if err != nil {
		t.Fatalf("post-copy: %v (phases %v)", err, phases)
	}
	if err := <-incoming; err != nil {
		t.Fatalf("post-copy target: %v", err)
	}
	t.Logf("post-copy: total %v, downtime %v, %d MiB sent; phases %v; the target could run the guest at %q",
		info.TotalTime, info.Downtime, info.Transferred()>>20, phases, <-arrived)
	if !slices.Contains(phases, qmp.MigrationPostcopyActive) {
		t.Errorf("phases %v: the migration never ran as post-copy", phases)
	}
	cur.Quit(ctx)
	cur = next
	cur.WaitAgent(ctx, time.Minute)
	counting(cur, "after post-copy")
	if n := lines(cur); n <= written {
		t.Errorf("after post-copy: the writer's sequence stands at %d lines", n)
	}

	time.Sleep(time.Second)
	if out := cur.Sh(ctx, "kill -0 $(cat /dev/shm/seq.pid) || echo 'the writer is gone'; "+
		"awk 'NR > 1 && $1 != prev + 1 { print \"line \" NR \": \" $1 \" after \" prev } { prev = $1 }' /dev/shm/seq > /dev/shm/seq.breaks || echo 'awk failed'; head -5 /dev/shm/seq.breaks; "+
		"dmesg | grep -E 'BUG|Oops|corrupt|general protection' || true"); out != "" {
		t.Errorf("after 3 hops and a post-copy with a writer: %s", out)
	}

	// A post-copy whose stream breaks after the switch (the network between two nodes
	// going): the guest is whole in neither machine, and both say so.
	last := testenv.StartGuestVM(t, ctx, config("mig-cut", true))
	out, in, cut := pacedStream(t, 1<<20)
	if err := last.AcceptMigration(ctx, in, vmm.MigrationOptions{PostCopy: true}); err != nil {
		t.Fatal(err)
	}
	go func() {
		// cut once the target runs the guest, its memory still coming at 1 MiB/s
		info, err := last.AwaitIncoming(ctx)
		if err == nil && info.Status != qmp.MigrationPostcopyActive {
			err = fmt.Errorf("the guest arrived whole (%s) before the cut", info.Status)
		}
		if err == nil {
			cut()
			_, err = last.AwaitPostCopy(ctx)
		}
		incoming <- err
	}()
	_, err = cur.Migrate(ctx, out, vmm.MigrationOptions{CompletionTimeout: 2 * time.Second, PostCopy: true})
	if !errors.Is(err, vmm.ErrPostCopyBroken) {
		t.Errorf("the source of a post-copy cut after its switch: %v, want ErrPostCopyBroken", err)
	}
	if err := <-incoming; !errors.Is(err, vmm.ErrPostCopyBroken) {
		t.Errorf("the target of a post-copy cut after its switch: %v, want ErrPostCopyBroken", err)
	}
	// the source stopped the guest at the switch for good; the target's vCPUs stall on the
	// pages that never come (QEMU still calls that running): its owner ends it (a pod's
	// shim quits it, runtime/pod loseGuest)
	if st, err := cur.Monitor().Status(ctx); err != nil || st.State == qmp.RunStateRunning {
		t.Errorf("the source after a broken post-copy: %+v, %v; want the guest stopped there", st, err)
	}
}

// pacedStream is a migration stream through a relay that carries the source's bytes at
// about rate bytes a second (the return path as it comes); cut breaks it, and both QEMUs
// see their connection end, as when the network between two nodes goes.
func pacedStream(t *testing.T, rate int) (source, target *os.File, cut func()) {
	t.Helper()
	pair := func(name string) (*os.File, net.Conn) {
		fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		qemuEnd, relayEnd := os.NewFile(uintptr(fds[0]), name), os.NewFile(uintptr(fds[1]), name+"-relay")
		defer relayEnd.Close() // FileConn holds its own copy
		conn, err := net.FileConn(relayEnd)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { qemuEnd.Close(); conn.Close() })
		return qemuEnd, conn
	}
	source, fromSource := pair("migration-source")
	target, toTarget := pair("migration-target")
	go func() {
		buf := make([]byte, 64<<10)
		start, sent := time.Now(), 0
		for {
			n, err := fromSource.Read(buf)
			if n > 0 {
				if _, err := toTarget.Write(buf[:n]); err != nil {
					return
				}
				sent += n
				time.Sleep(time.Duration(sent)*time.Second/time.Duration(rate) - time.Since(start))
			}
			if err != nil {
				return
			}
		}
	}()
	go func() { _, _ = io.Copy(fromSource, toTarget) }() // post-copy's page requests
	var once sync.Once
	return source, target, func() { once.Do(func() { fromSource.Close(); toTarget.Close() }) }
}
