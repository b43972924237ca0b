package bench

import (
	"bufio"
	"encoding/json"
	"fmt"
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
	"github.com/vmpod/vmpod/runtime/vmm"
)

// podRoundGap is about how long a pod round's guest runs between its arrival and its next
// migration.
const podRoundGap = 5 * time.Second

// TestBenchPodMigration (issue 12, docs/design/209): a 512 MiB Debian guest migrated between
// VM pods through the shims' execs (TLS between the pods' network namespaces, the
// two-phase switchover), against the same guest migrated between two bare machines over a
// socket pair in this run, with the same bandwidth and downtime limit. Per migration:
// QEMU's total time and downtime, the migrate exec's wall time as a client sees it, and the
// downtime seen from outside: the time from the source pod's last reply to a 10 ms ping
// to the target pod's first.
func TestBenchPodMigration(t *testing.T) {
	requireBench(t)
	dir, _ := vmGuest(t)
	criClient(t) // the test bed's containerd
	n := rounds(3)
	ctx := testenv.Context(t, 30*time.Minute)
	const memMiB = 512
	fast := vmspec.MigrationRequestOptions{BandwidthMiB: 1024, DowntimeLimitMs: 50}

	// the baseline: the machine layer alone, a socket pair between two QEMUs
	root := testenv.StateRoot(t)
	disk := testenv.GuestDisk(t)
	seq := 0
	machineOn := func(incoming bool) *testenv.GuestVM {
		seq++
		cfg := testenv.GuestVMConfig(t, root, fmt.Sprintf("bmig%d", seq), disk, memMiB)
		cfg.Incoming = incoming
		return testenv.StartGuestVM(t, ctx, cfg)
	}
	cur := machineOn(false)
	cur.WaitAgent(ctx, agentReadyWithin)
	var bareTotal, bareDown sample
	var bareSent []string
	for range n {
		next := machineOn(true)
		// the guest runs as long between migrations as in the pod rounds below (a target
		// pod's start, the accept, a second of pings): measured, a TCG guest that has run a
		// while migrates several times slower than one that just arrived (0.3 s against
		// 2.5-3 s for the same ~190 MiB), so a baseline that migrates at once is no baseline
		time.Sleep(podRoundGap)
		out, in := testenv.MigrationStream(t)
		if err := next.AcceptMigration(ctx, in, vmm.MigrationOptions{}); err != nil {
			t.Fatal(err)
		}
		info, err := cur.Migrate(ctx, out, vmm.MigrationOptions{MaxBandwidth: uint64(fast.BandwidthMiB) << 20, DowntimeLimit: time.Duration(fast.DowntimeLimitMs) * time.Millisecond})
		if err != nil {
			t.Fatalf("bare migration: %v", err)
		}
		if _, err := next.AwaitIncoming(ctx); err != nil {
			t.Fatal(err)
		}
		cur.Quit(ctx)
		cur = next
		cur.WaitAgent(ctx, time.Minute)
		bareTotal, bareDown = append(bareTotal, info.TotalTime), append(bareDown, info.Downtime)
		bareSent = append(bareSent, fmt.Sprint(info.Transferred()>>20))
	}
	cur.Quit(ctx)

	// VM pods: a file volume both mount
	pvc := t.TempDir()
	if out, err := exec.Command("cp", "--sparse=always", filepath.Join(dir, "disk.raw"), filepath.Join(pvc, vmspec.DiskImageFile)).CombinedOutput(); err != nil {
		t.Fatalf("copy the guest disk: %v: %s", err, out)
	}
	vm := vmspec.VM{Version: vmspec.Version, CPU: vmspec.CPU{Sockets: 1, Cores: 1, Threads: 1}, MemoryMiB: memMiB, Machine: machine.Q35,
		Firmware: vmspec.Firmware{Type: vmspec.FirmwareBIOS}, UUID: "5b0e8f6c-8e1f-4a51-9c3b-2f2d7c1a0b02",
		Disks:      []vmspec.Disk{{Name: "root", Volume: "root", Source: vmspec.SourceFile, Device: vmspec.DeviceDisk, Bus: vmspec.BusVirtio, BootOrder: 1}},
		Interfaces: []vmspec.Interface{{Name: "default", PodInterface: "eth0", Model: vmspec.ModelVirtio, Binding: vmspec.BindingMasquerade}}}
	target := vm
	target.Migration = &vmspec.Migration{Role: vmspec.RoleTarget}
	pod := func(spec vmspec.VM) (*testenv.Pod, string) {
		ann, err := spec.Encode()
		if err != nil {
			t.Fatal(err)
		}
		seq++
		p := testenv.RunPod(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: fmt.Sprintf("bench-mig-%d", seq), Namespace: "vmpod-bench"},
			Hostname: "bench-mig", Annotations: map[string]string{vmspec.Annotation: string(ann)}})
		id := p.Container(testenv.ContainerConfig{Metadata: testenv.Metadata{Name: vmspec.ComputeContainer}, Image: map[string]string{"image": testenv.BusyboxImage(t)},
			LogPath: "compute.log", Stdin: true, Tty: true, Mounts: []testenv.Mount{{ContainerPath: vmspec.VolumeMountPath("root"), HostPath: pvc}}})
		return p, id
	}
	srcPod, srcID := pod(vm)
	for deadline := time.Now().Add(agentReadyWithin); ; time.Sleep(time.Second) {
		if _, err := testenv.Cmd("crictl", "exec", "-s", "--timeout", "5", srcID, vmspec.GuestAgentPingCommand); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the source pod's guest agent never answered")
		}
	}
	time.Sleep(idleSettle / 2) // the rest of boot, so the rounds migrate an idle guest
	type rounds struct {
		total, down, wall, seen sample
		sent                    []string
	}
	// migrate moves the guest n times with opts, each time into a new target pod
	migrate := func(opts vmspec.MigrationRequestOptions) rounds {
		var r rounds
		for i := range n {
			dstPod, dstID := pod(target)
			tc, sc, err := vmspec.NewMigrationCredentials()
			if err != nil {
				t.Fatal(err)
			}
			out, err := crictlExecStdin(dstID, vmspec.MigrationAccept{TLS: tc}, vmspec.MigrateAcceptCommand)
			if err != nil {
				t.Fatalf("round %d: accept: %v", i, err)
			}
			var l vmspec.MigrationListening
			if err := json.Unmarshal([]byte(out), &l); err != nil {
				t.Fatalf("round %d: accept printed %q", i, out)
			}
			srcPings, dstPings := pingTimes(t, srcPod.IP()), pingTimes(t, dstPod.IP())
			time.Sleep(time.Second) // replies before
			start := time.Now()
			out, err = crictlExecStdin(srcID, vmspec.MigrationRequest{Target: l.Address, TLS: sc, Options: opts}, vmspec.MigrateCommand)
			wall := time.Since(start)
			if err != nil {
				t.Fatalf("round %d: migrate: %v\n%s", i, err, out)
			}
			time.Sleep(2 * time.Second) // replies after, from the target
			lastSrc, firstDst := last(srcPings()), dstPings()
			var gap time.Duration = -1
			for _, ts := range firstDst {
				if ts.After(lastSrc) {
					gap = ts.Sub(lastSrc)
					break
				}
			}
			if gap < 0 {
				t.Fatalf("round %d: the target pod never answered a ping after the source's last reply", i)
			}
			lines := strings.Split(strings.TrimSpace(out), "\n")
			var final vmspec.MigrationProgress
			if err := json.Unmarshal([]byte(lines[len(lines)-1]), &final); err != nil || final.Status != "completed" {
				t.Fatalf("round %d: last line %q", i, lines[len(lines)-1])
			}
			r.total = append(r.total, time.Duration(final.ElapsedMs)*time.Millisecond)
			r.down = append(r.down, time.Duration(final.DowntimeMs)*time.Millisecond)
			r.wall, r.seen = append(r.wall, wall), append(r.seen, gap)
			r.sent = append(r.sent, fmt.Sprint(final.TransferredBytes>>20))
			srcPod, srcID = dstPod, dstID
		}
		return r
	}
	idle := migrate(fast)
	report(t, "pod migration, idle %d MiB guest: total (QEMU) %s; bare machines %s: ratio %.2f", memMiB, idle.total, bareTotal, ratio(idle.total, bareTotal))
	report(t, "pod migration, idle %d MiB guest: downtime (QEMU) %s; bare machines %s", memMiB, idle.down, bareDown)
	report(t, "pod migration, idle %d MiB guest: MiB sent %s; bare machines %s", memMiB, strings.Join(idle.sent, ", "), strings.Join(bareSent, ", "))
	report(t, "pod migration, idle %d MiB guest: migrate exec (client) %s; outside downtime (last source reply to first target reply, 10 ms ping) %s", memMiB, idle.wall, idle.seen)

	// a guest rewriting 256 MiB of tmpfs in a loop, with auto-converge (the controller's
	// default, KubeVirt's): TestBenchMigration has the same guest between bare machines
	if _, err := testenv.Cmd("crictl", "exec", "-s", "--timeout", "20", srcID, "sh", "-c",
		"setsid sh -c 'while :; do dd if=/dev/zero of=/dev/shm/dirty bs=1M count=256 conv=notrunc 2>/dev/null; done' </dev/null >/dev/null 2>&1 &"); err != nil {
		t.Fatalf("start the dirtying loop: %v", err)
	}
	time.Sleep(3 * time.Second)
	auto := fast
	auto.AutoConverge = true
	dirty := migrate(auto)
	report(t, "pod migration, guest rewriting 256 MiB, auto-converge: total (QEMU) %s; downtime (QEMU) %s; outside downtime %s; MiB sent %s",
		dirty.total, dirty.down, dirty.seen, strings.Join(dirty.sent, ", "))
}

func ratio(a, b sample) float64 {
	if b.pct(0.5) == 0 {
		return 0
	}
	return float64(a.pct(0.5)) / float64(b.pct(0.5))
}

func last(ts []time.Time) time.Time {
	if len(ts) == 0 {
		return time.Time{}
	}
	return ts[len(ts)-1]
}

// pingTimes pings addr every 10 ms from the host; the returned func stops it and gives
// the times of the replies.
func pingTimes(t *testing.T, addr string) func() []time.Time {
	t.Helper()
	cmd := exec.Command("ping", "-D", "-n", "-i", "0.01", addr)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan []time.Time, 1)
	go func() {
		var ts []time.Time
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			l := sc.Text() // "[1796436311.092660] 64 bytes from 10.99.0.2: icmp_seq=1 ..."
			if !strings.HasPrefix(l, "[") || !strings.Contains(l, "bytes from") {
				continue
			}
			f, err := strconv.ParseFloat(l[1:strings.IndexByte(l, ']')], 64)
			if err == nil {
				ts = append(ts, time.UnixMicro(int64(f*1e6)))
			}
		}
		_ = cmd.Wait()
		done <- ts
	}()
	return func() []time.Time {
		_ = cmd.Process.Signal(syscall.SIGINT)
		return <-done
	}
}

// crictlExecStdin runs a migration exec with stdin's JSON as its stdin.
func crictlExecStdin(id string, stdin any, args ...string) (string, error) {
	b, err := json.Marshal(stdin)
	if err != nil {
		return "", err
	}
	return testenv.ExecStdin(id, b, 10*time.Minute, args...)
}
