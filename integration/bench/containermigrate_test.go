package bench

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/integration/testenv"
	"github.com/vmpod/vmpod/runtime"
	"github.com/vmpod/vmpod/runtime/rootfssync"
	"github.com/vmpod/vmpod/runtime/vmm"
	"github.com/vmpod/vmpod/runtime/vmpodagent"
)

// TestBenchContainerVMMigration (issue 12, docs/design/211): a container pod's VM (q35,
// 512 MiB, QEMU 10 and virtiofsd 1.13: hack/qemu-next.sh) moves between two machines on
// this host with its container running: virtiofsd's state in QEMU's stream, the
// container's writes mirrored over TCP (rootfssync) while it runs and once more with the
// guest stopped. The baseline, alternating in the same run: the same machine with
// neither virtio-fs nor a container. Each guest moves back and forth, so one boot serves
// every round. Per migration: QEMU's total time, downtime and bytes sent; for the
// container, the time the stopped guest waited for the last pass and its share, and the
// downtime seen from the guest: the longest gap between a heartbeat's writes to its
// rootfs (a line every 10 ms, no process started per line), as the host sees them land,
// next to the gap the same heartbeat shows for a 20 ms pause of the guest alone.
func TestBenchContainerVMMigration(t *testing.T) {
	requireBench(t)
	n := rounds(5)
	qemu, virtiofsd := testenv.QEMUNext(t)
	busybox := testenv.BusyboxRootfs(t)
	ctx := testenv.Context(t, 20*time.Minute)
	seq := 0
	config := func(shared machine.SharedFS) vmpodagent.Config {
		seq++
		cfg := testenv.VMConfig(t, fmt.Sprintf("cvm%d", seq))
		cfg.Type, cfg.SharedFS = machine.Q35, shared
		cfg.QEMUPath, cfg.VirtiofsdPath = qemu, virtiofsd
		return cfg
	}
	opts := vmm.MigrationOptions{MaxBandwidth: 1 << 30, DowntimeLimit: 50 * time.Millisecond, CompletionTimeout: time.Minute}

	bare := testenv.StartVM(t, config(machine.NoSharedFS))
	carrier := testenv.StartVM(t, config(machine.VirtioFS))
	rootfs := testenv.NewOverlay(t, busybox)
	if err := rootfs.Mount(t); err != nil {
		t.Fatal(err)
	}
	heartbeat := `mkfifo /wait; exec 4<>/wait 3>>/heartbeat; i=0; while :; do i=$((i+1)); echo $i >&3; read -t 0.01 x <&4; done`
	if _, err := carrier.CreateContainer(ctx, "main", rootfs.Merged, testenv.Spec("sh", "-c", heartbeat), runtime.Stdio{Stderr: os.Stderr}); err != nil {
		t.Fatal(err)
	}
	if err := carrier.Agent().StartContainer(ctx, "main"); err != nil {
		t.Fatal(err)
	}
	beats := watchHeartbeat(filepath.Join(rootfs.Merged, "heartbeat"))
	defer beats.stop()
	time.Sleep(2 * time.Second)
	interval := beats.longestGap(time.Now().Add(-time.Second), time.Now())
	// what the heartbeat sees of a stop alone: the guest paused for 20 ms (QMP stop, cont)
	var paused sample
	for range n {
		start := time.Now()
		if err := carrier.Machine().Pause(ctx); err != nil {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
		if err := carrier.Machine().Resume(ctx); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Second)
		paused = append(paused, beats.longestGap(start, time.Now()))
	}

	// hop moves the container VM on to a new machine whose rootfs is a new overlay of the
	// image, and returns what the move did and the longest heartbeat gap the host saw
	hop := func() (testenv.ContainerVMMove, time.Duration) {
		to := testenv.NewOverlay(t, busybox)
		tree := rootfssync.Over(rootfs.Upper, testenv.MirrorConnection(t, to.Upper))
		if _, err := tree.Pass(ctx, true); err != nil {
			t.Fatal(err)
		}
		beats.also(filepath.Join(to.Merged, "heartbeat"))
		start := time.Now()
		move := testenv.MoveContainerVM(t, ctx, carrier, config(machine.VirtioFS), "main", to, tree, opts)
		carrier, rootfs = move.Guest, to
		time.Sleep(time.Second) // beats after, from the target's tree
		if beats.longestGap(time.Now().Add(-500*time.Millisecond), time.Now()) >= 500*time.Millisecond {
			var out testenv.Buffer
			p, err := carrier.Exec(ctx, "main", "ps", testenv.Spec("ps", "-o", "pid,stat,args").Process, runtime.Stdio{Stdout: &out, Stderr: &out})
			if err == nil {
				_, err = testenv.WaitOutput(ctx, p)
			}
			fi, _ := os.Stat(filepath.Join(to.Merged, "heartbeat"))
			t.Fatalf("the heartbeat stopped after the move (%v; heartbeat %d bytes): %s", err, fi.Size(), out.String())
		}
		return move, beats.longestGap(start, time.Now())
	}

	var bareTotal, bareDown, total, down, seen, switchover sample
	var bareSent, sent []uint64
	for range n {
		move := testenv.MoveContainerVM(t, ctx, bare, config(machine.NoSharedFS), "", testenv.Overlay{}, nil, opts)
		bare = move.Guest
		bareTotal, bareDown = append(bareTotal, move.Info.TotalTime), append(bareDown, move.Info.Downtime)
		bareSent = append(bareSent, move.Info.Transferred()>>20)

		move, gap := hop()
		total, down = append(total, move.Info.TotalTime), append(down, move.Info.Downtime)
		sent = append(sent, move.Info.Transferred()>>20)
		switchover = append(switchover, move.Switchover)
		seen = append(seen, gap)
	}

	// The last pass walks the whole upper directory with the guest stopped: a container
	// that wrote many files makes it longer, changed or not. 20 000 empty files in 100
	// directories, written into the container's rootfs by the host (through the overlay,
	// as virtiofsd writes the guest's: faster than the guest's shell under TCG, and the
	// walk is the same).
	const files, dirs = 20000, 100
	for d := range dirs {
		dir := filepath.Join(rootfs.Merged, "many", fmt.Sprintf("d%03d", d))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for f := range files / dirs {
			if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("f%04d", f)), nil, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	var manyDown, manySwitchover, manySeen sample
	for range min(n, 3) {
		move, gap := hop()
		manyDown, manySwitchover, manySeen = append(manyDown, move.Info.Downtime), append(manySwitchover, move.Switchover), append(manySeen, gap)
	}
	report(t, "container VM migration, bare machine (no virtio-fs, no container): total %s", bareTotal)
	report(t, "container VM migration, bare machine: downtime (QEMU) %s; MiB sent %v", bareDown, bareSent)
	report(t, "container VM migration, a container running (virtio-fs, rootfs mirrored): total %s", total)
	report(t, "container VM migration, a container running: downtime (QEMU) %s; MiB sent %v", down, sent)
	report(t, "container VM migration, a container running: last mirror pass + mount + share, guest stopped %s", switchover)
	report(t, "container VM migration, a container running: longest heartbeat gap %s (%s between beats before; a 20 ms QMP stop alone: %s)", seen, ms(interval), paused)
	report(t, "container VM migration, container / bare machine (p50): total %.2f, downtime %.2f", ratio(total, bareTotal), ratio(down, bareDown))
	report(t, "container VM migration, %d more files in the upper directory, unchanged since the live pass: last pass + mount + share %s; downtime (QEMU) %s; heartbeat gap %s", files, manySwitchover, manyDown, manySeen)
}

// heartbeat follows a file a guest appends to, as the host sees it grow: every change of
// size is a beat. The file moves with the guest (also), so every path given is watched.
type heartbeat struct {
	mu    sync.Mutex
	paths []string
	sizes map[string]int64
	at    []time.Time
	done  chan struct{}
	wg    sync.WaitGroup
}

func watchHeartbeat(path string) *heartbeat {
	h := &heartbeat{paths: []string{path}, sizes: map[string]int64{}, done: make(chan struct{})}
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		for {
			select {
			case <-h.done:
				return
			case <-time.After(time.Millisecond):
			}
			h.mu.Lock()
			for _, p := range h.paths {
				if fi, err := os.Stat(p); err == nil && fi.Size() != h.sizes[p] {
					if _, known := h.sizes[p]; known {
						h.at = append(h.at, time.Now())
					}
					h.sizes[p] = fi.Size()
				}
			}
			h.mu.Unlock()
		}
	}()
	return h
}

func (h *heartbeat) also(path string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.paths = append(h.paths, path)
}

// longestGap is the longest time between two beats, or between from or to and the beat
// nearest it, within [from, to].
func (h *heartbeat) longestGap(from, to time.Time) time.Duration {
	h.mu.Lock()
	defer h.mu.Unlock()
	var longest time.Duration
	prev := from
	for _, at := range h.at {
		if at.Before(from) || at.After(to) {
			continue
		}
		longest = max(longest, at.Sub(prev))
		prev = at
	}
	return max(longest, to.Sub(prev))
}

func (h *heartbeat) stop() {
	close(h.done)
	h.wg.Wait()
}
