package bench

import (
	"bufio"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmpod/vmpod/integration/testenv"
	"github.com/vmpod/vmpod/qmp"
	"github.com/vmpod/vmpod/runtime/vmm"
)

// TestBenchMigration (issue 12): live migration of a 512 MiB Debian guest between two
// machines on this host, idle and while a guest process rewrites 256 MiB of tmpfs in a
// loop (without and with auto-converge), and while it writes text over 128 MiB faster than
// a 32 MiB/s stream carries it (auto-converge, or post-copy after 5 s). The guest moves
// back and forth, so one boot
// serves every round. Per migration: QEMU's total time, downtime and bytes sent, and the
// downtime seen from outside: the longest gap in replies to a ping every 10 ms from the
// host side of the guest's network (both machines' taps on one bridge; the gap includes
// the switch of the bridge to the target's port, which the guest's announcement drives).
func TestBenchMigration(t *testing.T) {
	requireBench(t)
	n := rounds(3)
	disk := testenv.GuestDisk(t)
	ctx := testenv.Context(t, 30*time.Minute)
	root := testenv.StateRoot(t)

	ns := testenv.NewBridgeNet(t, "10.99.0.1/24")

	const mac = "02:00:00:00:99:02"
	seq := 0
	machineOn := func(incoming bool) *testenv.GuestVM {
		seq++
		name := fmt.Sprintf("mig%d", seq)
		tap := ns.Tap(fmt.Sprintf("migtap%d", seq))
		cfg := testenv.GuestVMConfig(t, root, name, disk, 512)
		cfg.NICs = []vmm.NIC{{Tap: tap, MAC: mac}}
		cfg.Incoming = incoming
		return testenv.StartGuestVM(t, ctx, cfg)
	}

	cur := machineOn(false)
	cur.WaitAgent(ctx, 4*time.Minute)
	cur.Sh(ctx, "ip link set eth0 up && ip addr add 10.99.0.2/24 dev eth0")

	type result struct {
		info       qmp.MigrationInfo
		gap        time.Duration
		postCopied bool // QEMU switched it to post-copy
		err        error
	}
	migrate := func(opts vmm.MigrationOptions) result {
		var postCopied bool
		opts.Progress = func(i qmp.MigrationInfo) { postCopied = postCopied || i.Status == qmp.MigrationPostcopyActive }
		next := machineOn(true)
		out, in := testenv.MigrationStream(t)
		if err := next.AcceptMigration(ctx, in, opts); err != nil {
			t.Fatal(err)
		}
		pinger, gaps := pingGaps(t, ns.Name, "10.99.0.2")
		time.Sleep(time.Second) // a few replies before
		incoming := make(chan error, 1)
		go func() {
			info, err := next.AwaitIncoming(ctx)
			if err == nil && info.Status == qmp.MigrationPostcopyActive {
				_, err = next.AwaitPostCopy(ctx) // the guest runs here, its memory arriving
			}
			incoming <- err
		}()
		info, err := cur.Migrate(ctx, out, opts)
		if err != nil {
			_ = pinger.Process.Kill()
			<-gaps
			_ = next.Kill()
			return result{info: info, err: err}
		}
		if err := <-incoming; err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Second)               // replies after, from the target
		_ = pinger.Process.Signal(syscall.SIGINT) // ping ends, its replies read
		gap := <-gaps
		cur.Quit(ctx)
		cur = next
		cur.WaitAgent(ctx, time.Minute)
		return result{info: info, gap: gap, postCopied: postCopied}
	}
	summary := func(name string, rs []result) {
		var total, down, seen sample
		var sent []string
		failed, postCopied := 0, 0
		for _, r := range rs {
			if r.err != nil {
				failed++
				t.Logf("%s: %v", name, r.err)
				continue
			}
			total = append(total, r.info.TotalTime)
			down = append(down, r.info.Downtime)
			seen = append(seen, r.gap)
			sent = append(sent, fmt.Sprintf("%d", r.info.Transferred()>>20))
			if r.postCopied {
				postCopied++
			}
		}
		if len(total) == 0 {
			report(t, "migration, %s: none completed (%d of %d failed, see the log)", name, failed, len(rs))
			return
		}
		report(t, "migration, %s: total %s", name, total)
		report(t, "migration, %s: downtime (QEMU) %s", name, down)
		report(t, "migration, %s: longest ping gap %s  (10 ms interval)", name, seen)
		report(t, "migration, %s: MiB sent %s; %d of %d failed (the completion timeout or an error, see the log); %d switched to post-copy", name, strings.Join(sent, ", "), failed, len(rs), postCopied)
	}
	fast := vmm.MigrationOptions{MaxBandwidth: 1 << 30, DowntimeLimit: 50 * time.Millisecond, CompletionTimeout: time.Minute}

	var idle []result
	for range n {
		idle = append(idle, migrate(fast))
	}
	summary("idle 512 MiB guest", idle)

	cur.Sh(ctx, "setsid sh -c 'while :; do dd if=/dev/zero of=/dev/shm/dirty bs=1M count=256 conv=notrunc 2>/dev/null; done' </dev/null >/dev/null 2>&1 & echo $! > /dev/shm/dirty.pid")
	time.Sleep(3 * time.Second)
	var dirty, converged []result
	for range n {
		dirty = append(dirty, migrate(fast))
	}
	summary("guest rewriting 256 MiB, no auto-converge", dirty)
	auto := fast
	auto.AutoConverge = true
	for range n {
		converged = append(converged, migrate(auto))
	}
	summary("guest rewriting 256 MiB, auto-converge", converged)

	// pages of zeros travel as a flag each: the writer above barely loads the stream. One
	// that writes text, over a stream capped at 32 MiB/s, outruns it: auto-converge has to
	// throttle the guest, post-copy moves it after 5 s.
	cur.Sh(ctx, "kill $(cat /dev/shm/dirty.pid); pkill -x dd; "+
		"setsid sh -c 'while :; do yes vmpod-dirty | dd of=/dev/shm/dirty bs=1M count=128 iflag=fullblock conv=notrunc 2>/dev/null; done' </dev/null >/dev/null 2>&1 &")
	time.Sleep(3 * time.Second)
	capped := vmm.MigrationOptions{MaxBandwidth: 32 << 20, DowntimeLimit: 50 * time.Millisecond, CompletionTimeout: time.Minute, AutoConverge: true}
	var throttled []result
	for range n {
		throttled = append(throttled, migrate(capped))
	}
	summary("guest writing text over 128 MiB, 32 MiB/s, auto-converge", throttled)

	// post-copy: the target QEMU, a user of its own, needs the node's leave to handle its
	// page faults (docs/design/209)
	testenv.AllowUserfaultfd(t, true)
	post := capped
	post.AutoConverge, post.PostCopy, post.CompletionTimeout = false, true, 5*time.Second
	var postCopied []result
	for range n {
		postCopied = append(postCopied, migrate(post))
	}
	summary("guest writing text over 128 MiB, 32 MiB/s, post-copy after 5 s", postCopied)
}

// pingGaps pings addr every 10 ms from netns ns until the process is interrupted, then
// sends the longest gap between consecutive replies (ping -D timestamps).
func pingGaps(t *testing.T, ns, addr string) (*exec.Cmd, <-chan time.Duration) {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", ns, "ping", "-D", "-n", "-i", "0.01", addr)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	gaps := make(chan time.Duration, 1)
	begin := float64(time.Now().UnixMicro()) / 1e6
	go func() {
		var last, longest float64
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			// "[1796436311.092660] 64 bytes from 10.99.0.2: icmp_seq=1 ttl=64 time=0.3 ms"
			l := sc.Text()
			if !strings.HasPrefix(l, "[") || !strings.Contains(l, "bytes from") {
				continue
			}
			ts, err := strconv.ParseFloat(l[1:strings.IndexByte(l, ']')], 64)
			if err != nil {
				continue
			}
			if last != 0 && ts-last > longest {
				longest = ts - last
			}
			last = ts
		}
		// the silence after the last reply counts too: a target that never answers must
		// not report a short gap
		end := float64(time.Now().UnixMicro()) / 1e6
		switch {
		case last == 0:
			longest = end - begin
		case end-last > longest:
			longest = end - last
		}
		_ = cmd.Wait()
		gaps <- time.Duration(longest * float64(time.Second))
	}()
	return cmd, gaps
}
