package runtime_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/integration/testenv"
	"github.com/vmpod/vmpod/runtime/vmpodagent"
	"github.com/vmpod/vmpod/runtime/vmtemplate"
)

// TestTemplate: guests restored from a template (docs/design/022). The first q35 guest
// makes the template (a machine booted and saved), later ones restore it; each gets its
// shared directory plugged and mounted (a container runs from its rootfs) and randomness
// of its own; a saved state QEMU refuses is removed and the guest booted instead; a
// microvm, which cannot be a template's, boots.
func TestTemplate(t *testing.T) {
	testenv.Require(t)
	dir := filepath.Join(testenv.StateRoot(t), "templates")
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	store := &vmtemplate.Store{Dir: dir}
	logs := map[*vmpodagent.Guest]string{}
	boot := func(name string, typ machine.Type) *vmpodagent.Guest {
		t.Helper()
		cfg := testenv.VMConfig(t, name)
		cfg.Type = typ
		// runc's app containers, whose warm-up the restore runs (docs/design/021)
		cfg.Boot.KernelParams = append(cfg.Boot.KernelParams, agentv1.KernelParamRuncApps)
		g := startFromStore(t, store, cfg)
		logs[g] = cfg.LogPath
		return g
	}
	states := func() []string { return savedStates(dir) }
	// what a container sees of the guest's randomness, through the shared rootfs
	sample := func(g *vmpodagent.Guest, id string) (random, bootID string) {
		t.Helper()
		exit, out, errOut := run(t, g, id, nil, "sh", "-c", "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; cat /proc/sys/kernel/random/boot_id")
		if exit.Status != 0 {
			t.Fatalf("%s: exit %d: %s", id, exit.Status, errOut)
		}
		lines := strings.Fields(out)
		if len(lines) != 2 || len(lines[0]) != 32 {
			t.Fatalf("%s: output %q: want 16 random bytes in hex and a boot id", id, out)
		}
		return lines[0], lines[1]
	}

	a := boot("tmpl-a", machine.Q35)
	if s := states(); len(s) != 1 {
		t.Fatalf("after the first q35 guest: saved states %v, want one", s)
	}
	if procs := testenv.ProcessesMentioning(dir); len(procs) > 0 {
		t.Errorf("the template machine outlived its save: %v", procs)
	}
	if leftovers, _ := filepath.Glob(filepath.Join(dir, "*.vm")); len(leftovers) > 0 {
		t.Errorf("the template machine's state dir is left: %v", leftovers)
	}
	// runc is warmed up after the restore (docs/design/021), not in the template's boot
	testenv.WaitForWithin(t, time.Minute, "the restored agent to warm runc up", func() bool {
		b, _ := os.ReadFile(logs[a])
		return bytes.Contains(b, []byte("runc warmed up"))
	})
	if tlogs, _ := filepath.Glob(filepath.Join(dir, "*.log")); len(tlogs) != 1 {
		t.Errorf("template machine logs %v, want one", tlogs)
	} else if b, _ := os.ReadFile(tlogs[0]); bytes.Contains(b, []byte("runc warm")) {
		t.Errorf("the template machine warmed runc up before it was saved:\n%s", b)
	}
	b := boot("tmpl-b", machine.Q35)
	// each restored guest's generator is reseeded from the host's before anything runs in
	// it: two guests could read different bytes without it (the kernel mixes in what each
	// has seen since the restore), so the reseed itself is what is checked first
	for g, name := range map[*vmpodagent.Guest]string{a: "tmpl-a", b: "tmpl-b"} {
		// (the console may lag the agent's answer a little)
		testenv.WaitForWithin(t, 10*time.Second, name+", restored from the template, to say it was reseeded from the host", func() bool {
			log, _ := os.ReadFile(logs[g])
			return bytes.Contains(log, []byte("random number generator reseeded from the host"))
		})
	}
	randA, bootA := sample(a, "rand-a")
	randB, bootB := sample(b, "rand-b")
	if randA == randB {
		t.Errorf("two guests restored from one template read the same random bytes %s: the restore did not reseed", randA)
	}
	// the kernel makes the boot id at its first read, which no template guest does before
	// it is saved: each restore makes its own, from its reseeded pool
	if bootA == bootB {
		t.Errorf("two guests restored from one template have the same boot id %s", bootA)
	}

	// a state QEMU refuses: removed, the guest booted, the next guest makes a new one
	s := states()[0]
	if err := os.Truncate(s, 4096); err != nil {
		t.Fatal(err)
	}
	c := boot("tmpl-c", machine.Q35)
	if _, err := os.Stat(s); !os.IsNotExist(err) {
		t.Errorf("a refused state is still there (%v)", err)
	}
	if exit, out, _ := run(t, c, "after-refused", nil, "echo", "booted"); exit.Status != 0 || out != "booted\n" {
		t.Errorf("guest booted after a refused state: exit %d, %q", exit.Status, out)
	}
	boot("tmpl-d", machine.Q35)
	if s := states(); len(s) != 1 {
		t.Errorf("after a refused state: saved states %v, want a new one", s)
	}

	// a microvm has no hotplug, so no template: it boots
	m := boot("tmpl-micro", machine.MicroVM)
	if exit, _, _ := run(t, m, "micro", nil, "true"); exit.Status != 0 {
		t.Errorf("microvm guest: exit %d", exit.Status)
	}
	if s := states(); len(s) != 1 {
		t.Errorf("a microvm made a template: %v", s)
	}
}

// TestTemplateMadeOnce: two machines of one shape started at once on a node without their
// template: one makes it (under the template's lock) and is restored from it, the other
// boots rather than wait; one template results and both guests run containers.
func TestTemplateMadeOnce(t *testing.T) {
	testenv.Require(t)
	dir := filepath.Join(testenv.StateRoot(t), "templates")
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	store := &vmtemplate.Store{Dir: dir}
	var cfgs []vmpodagent.Config
	for _, name := range []string{"once-a", "once-b"} {
		cfg := testenv.VMConfig(t, name)
		cfg.Type = machine.Q35
		cfgs = append(cfgs, cfg)
	}
	guests := make([]*vmpodagent.Guest, len(cfgs))
	errs := make([]error, len(cfgs))
	var wg sync.WaitGroup
	for i, cfg := range cfgs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			guests[i], errs[i] = store.Boot(ctx, cfg)
		}()
	}
	wg.Wait()
	for i, g := range guests {
		if g == nil {
			continue
		}
		t.Cleanup(func() {
			if err := g.Stop(context.Background()); err != nil {
				t.Errorf("stop %s: %v", cfgs[i].Name, err)
			}
			testenv.AssertNoLeaks(t, cfgs[i].StateDir)
		})
	}
	for i, err := range errs {
		if err != nil {
			t.Fatalf("%s: %v", cfgs[i].Name, err)
		}
	}
	if s := savedStates(dir); len(s) != 1 {
		t.Errorf("templates %v, want one", s)
	}
	restored := 0
	for i, g := range guests {
		if exit, out, _ := run(t, g, "once-"+strconv.Itoa(i), nil, "echo", "up"); exit.Status != 0 || out != "up\n" {
			t.Errorf("%s: exit %d, %q", cfgs[i].Name, exit.Status, out)
		}
		if g.Machine().Config().RestoreFrom != nil {
			restored++
		}
	}
	if restored != 1 {
		t.Errorf("%d of the two guests were restored, want the one that made the template", restored)
	}
}

// TestTemplateOfTheBaseMemory: with a base memory (vmtemplate.Store.BaseMemoryMiB) a
// machine with more memory, below the base's double, restores the base machine's template
// and gets the rest plugged (virtio-mem) before it is handed over: one template serves
// both sizes and the guest sees its whole memory. Memory above the template's that is not
// whole virtio-mem blocks gets a template of its own size.
func TestTemplateOfTheBaseMemory(t *testing.T) {
	testenv.Require(t)
	dir := filepath.Join(testenv.StateRoot(t), "templates")
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	store := &vmtemplate.Store{Dir: dir, BaseMemoryMiB: 512}
	// the node's maximum, 2048 MiB, as the shim sizes the room: whole virtio-mem blocks
	boot := func(name string, memMiB int) *vmpodagent.Guest {
		t.Helper()
		cfg := testenv.VMConfig(t, name)
		cfg.Type, cfg.MemoryMiB, cfg.MaxMemoryMiB = machine.Q35, memMiB, memMiB+(2048-memMiB)/2*2
		return startFromStore(t, store, cfg)
	}
	memTotalMiB := func(g *vmpodagent.Guest, id string) int {
		t.Helper()
		exit, out, errOut := run(t, g, id, nil, "awk", "/^MemTotal:/ { print int($2 / 1024) }", "/proc/meminfo")
		if exit.Status != 0 {
			t.Fatalf("%s: exit %d: %s", id, exit.Status, errOut)
		}
		n, err := strconv.Atoi(strings.TrimSpace(out))
		if err != nil {
			t.Fatalf("%s: MemTotal %q: %v", id, out, err)
		}
		return n
	}
	states := func() []string { return savedStates(dir) }

	small := boot("base-512", 512)
	big := boot("base-1000", 1000)
	if s := states(); len(s) != 1 {
		t.Errorf("after a 512 and a 1000 MiB machine: templates %v, want the base's alone", s)
	}
	if big.Machine().Config().RestoreFrom == nil || big.Machine().Config().MemoryMiB != 512 {
		t.Errorf("the 1000 MiB machine: restored from %v at %d MiB, want the 512 MiB template", big.Machine().Config().RestoreFrom, big.Machine().Config().MemoryMiB)
	}
	mSmall, mBig := memTotalMiB(small, "mem-512"), memTotalMiB(big, "mem-1000")
	// MemTotal leaves out what the kernel reserved for itself: compare the difference
	if d := mBig - mSmall; d < 488-16 || d > 488+16 {
		t.Errorf("MemTotal %d MiB restored at 1000 MiB, %d MiB at 512: want 488 MiB more", mBig, mSmall)
	}

	// 1 MiB above a whole block: a template of its own
	odd := boot("base-1001", 1001)
	if s := states(); len(s) != 2 {
		t.Errorf("after a 1001 MiB machine: templates %v, want a second one", s)
	}
	if odd.Machine().Config().RestoreFrom == nil || odd.Machine().Config().MemoryMiB != 1001 {
		t.Errorf("the 1001 MiB machine: restored from %v at %d MiB, want its own template", odd.Machine().Config().RestoreFrom, odd.Machine().Config().MemoryMiB)
	}
}

// startFromStore starts cfg's guest through store (restored, made first, or booted) and
// registers its stop and the leak check with the test.
func startFromStore(t *testing.T, store *vmtemplate.Store, cfg vmpodagent.Config) *vmpodagent.Guest {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	g, err := store.Boot(ctx, cfg)
	if err != nil {
		t.Fatalf("%s: %v", cfg.Name, err)
	}
	t.Cleanup(func() {
		if err := g.Stop(context.Background()); err != nil {
			t.Errorf("stop %s: %v", cfg.Name, err)
		}
		testenv.AssertNoLeaks(t, cfg.StateDir)
	})
	return g
}

// savedStates lists the whole templates in dir.
func savedStates(dir string) []string {
	s, _ := filepath.Glob(filepath.Join(dir, "*.state"))
	return s
}

// TestTemplateChargedToItsCgroup: a template is made in the store's cgroup, which is left
// in place and keeps the template's RAM file charged after its maker ended — the node's
// cache, neither the first pod's memory nor the shim's — and lets it go when the template
// is removed. The machine restored from it runs outside it.
func TestTemplateChargedToItsCgroup(t *testing.T) {
	testenv.Require(t)
	dir := filepath.Join(testenv.StateRoot(t), "templates")
	group := fmt.Sprintf("/vmpod-it-templates-%d", time.Now().UnixNano())
	t.Cleanup(func() {
		_ = os.RemoveAll(dir) // the files first: their pages are what the cgroup holds
		dirs, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", "*", group))
		for _, d := range append(dirs, filepath.Join("/sys/fs/cgroup", group)) {
			_ = os.Remove(d)
		}
	})
	usage := func() int64 {
		t.Helper()
		b, err := os.ReadFile(cgroupFile(group, "memory.usage_in_bytes", "memory.current"))
		if err != nil {
			t.Fatalf("the template cgroup: %v", err)
		}
		n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	store := &vmtemplate.Store{Dir: dir, Cgroup: group}
	cfg := testenv.VMConfig(t, "charged")
	cfg.Type = machine.Q35
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	g, err := store.Boot(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if g.Machine().Config().RestoreFrom == nil {
		t.Errorf("the machine was booted, want it restored from the template it made")
	}
	procs, err := os.ReadFile(cgroupFile(group, "cgroup.procs", "cgroup.procs"))
	if err != nil {
		t.Fatal(err)
	}
	if p := strings.Fields(string(procs)); len(p) != 0 {
		t.Errorf("the template cgroup holds %v after the template was made: want its maker gone and the pod's machine elsewhere", p)
	}
	rams, _ := filepath.Glob(filepath.Join(dir, "*.ram"))
	if len(rams) != 1 {
		t.Fatalf("RAM files %v, want one template's", rams)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(rams[0], &st); err != nil {
		t.Fatal(err)
	}
	ram := st.Blocks * 512 // the pages the template's guest wrote
	held := usage()
	t.Logf("template RAM file %d MiB, its cgroup accounts %d MiB", ram>>20, held>>20)
	if held < ram {
		t.Errorf("the template cgroup accounts %d MiB, less than the template's RAM file (%d MiB): the file is charged elsewhere", held>>20, ram>>20)
	}
	if err := g.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	testenv.AssertNoLeaks(t, cfg.StateDir)
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	if left := usage(); held >= ram && left > held-ram*3/4 {
		t.Errorf("the template removed, its cgroup still accounts %d MiB of %d: want the RAM file's %d MiB gone with it", left>>20, held>>20, ram>>20)
	}
}
