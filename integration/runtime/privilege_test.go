package runtime_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmpod/vmpod/integration/testenv"
	"github.com/vmpod/vmpod/runtime/vmpodagent"
)

// TestQEMUIsUnprivileged: each VM's QEMU runs as a uid of its own without capabilities,
// under its seccomp filter, and cannot reach another VM's state (docs/design/014). The
// reach is checked by a process with the first QEMU's credentials: what it cannot do, a
// guest that took over that QEMU cannot either.
func TestQEMUIsUnprivileged(t *testing.T) {
	testenv.Require(t)
	cfgA, cfgB := testenv.VMConfig(t, "priv-a"), testenv.VMConfig(t, "priv-b")
	a, b := testenv.StartVM(t, cfgA), testenv.StartVM(t, cfgB)
	pidA, pidB := a.Machine().Pid(), b.Machine().Pid()

	status := func(pid int) map[string]string {
		t.Helper()
		raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			t.Fatal(err)
		}
		fields := map[string]string{}
		for _, line := range strings.Split(string(raw), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok {
				fields[k] = strings.Join(strings.Fields(v), " ")
			}
		}
		return fields
	}
	stA, stB := status(pidA), status(pidB)
	uidA := strings.Fields(stA["Uid"])[0]
	for name, st := range map[string]map[string]string{"A": stA, "B": stB} {
		t.Logf("QEMU %s: Uid %s, Gid %s, Groups %q, CapEff %s, CapPrm %s, Seccomp %s, NoNewPrivs %s",
			name, st["Uid"], st["Gid"], st["Groups"], st["CapEff"], st["CapPrm"], st["Seccomp"], st["NoNewPrivs"])
		for _, id := range append(strings.Fields(st["Uid"]), strings.Fields(st["Gid"])...) {
			if id == "0" {
				t.Errorf("QEMU %s runs with uid or gid 0: Uid %s, Gid %s", name, st["Uid"], st["Gid"])
			}
		}
		for _, set := range []string{"CapEff", "CapPrm", "CapAmb"} {
			if st[set] != "0000000000000000" {
				t.Errorf("QEMU %s has capabilities: %s %s", name, set, st[set])
			}
		}
		if st["Seccomp"] != "2" || st["NoNewPrivs"] != "1" {
			t.Errorf("QEMU %s: Seccomp %s, NoNewPrivs %s; want its filter (2) and no new privileges (1)", name, st["Seccomp"], st["NoNewPrivs"])
		}
		if st["Groups"] != "" {
			t.Errorf("QEMU %s has supplementary groups %q (none under TCG)", name, st["Groups"])
		}
	}
	if uidA == strings.Fields(stB["Uid"])[0] {
		t.Errorf("both QEMUs run as uid %s", uidA)
	}
	// each QEMU has SysV IPC of its own: nothing it makes there outlives it for the uid's
	// next holder, nor is seen by another pod's (files its uid leaves are swept at lease)
	ipcNS := func(pid int) string {
		t.Helper()
		ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/ipc", pid))
		if err != nil {
			t.Fatal(err)
		}
		return ns
	}
	if own, nsA, nsB := ipcNS(os.Getpid()), ipcNS(pidA), ipcNS(pidB); nsA == own || nsB == own || nsA == nsB {
		t.Errorf("IPC namespaces: ours %s, QEMU A's %s, QEMU B's %s; want one of its own each", own, nsA, nsB)
	}

	// A process with QEMU A's credentials: it can read its own QEMU's /proc (the control:
	// the helper does run and can read what its uid owns) and nothing of B's.
	as := func(script string) (int, string) { return testenv.AsUserOf(t, pidA, script) }
	if code, out := as(fmt.Sprintf("head -c 1 /proc/%d/environ >/dev/null && kill -0 %d", pidA, pidA)); code != 0 {
		t.Fatalf("control: as QEMU A's user, reading QEMU A's environ and signalling it: exit %d: %s", code, out)
	}
	for _, target := range []struct{ what, script string }{
		{"list B's state dir", "ls " + cfgB.StateDir},
		{"open B's QMP socket", "cat " + filepath.Join(cfgB.StateDir, "qmp.sock")},
		{"read B's shared dir (its containers' rootfs)", "ls " + filepath.Join(cfgB.StateDir, "shared")},
		{"read B's log", "cat " + cfgB.LogPath},
		{"read B's QEMU memory map", fmt.Sprintf("cat /proc/%d/maps", pidB)},
		{"read B's QEMU environment", fmt.Sprintf("cat /proc/%d/environ", pidB)},
		{"signal B's QEMU", fmt.Sprintf("kill -0 %d", pidB)},
		{"list its own state dir (QEMU needs nothing there)", "ls " + cfgA.StateDir},
	} {
		if code, out := as(target.script + " >/dev/null"); code == 0 {
			t.Errorf("as QEMU A's user (uid %s), %s: allowed", uidA, target.what)
		} else {
			t.Logf("as QEMU A's user, %s: refused (%s)", target.what, strings.TrimSpace(out))
		}
	}

	// both still work: the checks took nothing from them
	for name, g := range map[string]*vmpodagent.Guest{"A": a, "B": b} {
		exit, out, _ := run(t, g, "echo-"+name, nil, "echo", "alive")
		if exit.Status != 0 || !strings.Contains(out, "alive") {
			t.Errorf("VM %s after the checks: exit %d, %q", name, exit.Status, out)
		}
	}
}
