package vmm

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmpod/vmpod/api/machine"
)

func TestParseQEMUVersion(t *testing.T) {
	for in, want := range map[string]qemuVersion{
		"7.2.22": {7, 2},
		"10.0.2": {10, 0},
		"QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)": {10, 0},
		"QEMU emulator version 8.1.0":                                         {8, 1},
	} {
		got, err := parseQEMUVersion(in)
		if err != nil || got != want {
			t.Errorf("parseQEMUVersion(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "QEMU emulator version", "ten.two", "10"} {
		if v, err := parseQEMUVersion(in); err == nil {
			t.Errorf("parseQEMUVersion(%q) = %v, want an error", in, v)
		}
	}
	if !(qemuVersion{8, 2}).atLeast(8, 1) || (qemuVersion{7, 2}).atLeast(8, 1) || !(qemuVersion{10, 0}).atLeast(8, 2) || (qemuVersion{8, 0}).atLeast(8, 1) {
		t.Error("atLeast compares wrong")
	}
}

// script writes an executable shell script printing out, and counting its runs in calls.
func script(t *testing.T, out string) (path, calls string) {
	t.Helper()
	dir := t.TempDir()
	path, calls = filepath.Join(dir, "bin"), filepath.Join(dir, "calls")
	body := "#!/bin/sh\necho run >> " + calls + "\ncat <<'EOF'\n" + out + "\nEOF\n"
	if err := os.WriteFile(path, []byte(body), 0o755); err != nil {
		t.Fatal(err)
	}
	return path, calls
}

func TestBinaryAnswersAreAskedOnce(t *testing.T) {
	qemu, calls := script(t, "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)\nCopyright (c) 2003-2025")
	for range 3 {
		v, err := binaryQEMUVersion(qemu)
		if err != nil || v != (qemuVersion{10, 0}) {
			t.Fatalf("binaryQEMUVersion = %v, %v", v, err)
		}
	}
	if b, _ := os.ReadFile(calls); strings.Count(string(b), "run") != 1 {
		t.Errorf("the binary ran %d times for three questions, want once", strings.Count(string(b), "run"))
	}
	rust, _ := script(t, "Usage: virtiofsd [OPTIONS]\n      --migration-mode <MIGRATION_MODE>")
	c, _ := script(t, "usage: virtiofsd [options]\n    -o source=PATH")
	if ok, err := virtiofsdMigrates(rust); !ok || err != nil {
		t.Errorf("a virtiofsd with --migration-mode: %v, %v", ok, err)
	}
	if ok, err := virtiofsdMigrates(c); ok || err != nil {
		t.Errorf("the C virtiofsd: %v, %v; want false, no error", ok, err)
	}
	if _, err := virtiofsdMigrates(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Error("a virtiofsd that is not there: want an error saying so")
	}
}

func TestInitOnAllocUnderTCGForQEMUWithPositionIndependentTranslations(t *testing.T) {
	q10, _ := script(t, "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)")
	q72, _ := script(t, "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)")
	for _, tc := range []struct {
		name string
		qemu string
		fs   machine.SharedFS
		want bool
	}{
		{"QEMU 10, virtio-fs", q10, machine.VirtioFS, true},
		{"QEMU 7.2, virtio-fs", q72, machine.VirtioFS, false},
		{"QEMU 10, no virtiofsd", q10, machine.NoSharedFS, false},
	} {
		plan, err := planFor(Config{Type: machine.Q35, Accel: machine.TCG, QEMUPath: tc.qemu, SharedFS: tc.fs})
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.Contains(plan.kernelCmdline(), "init_on_alloc=1"); got != tc.want {
			t.Errorf("%s under TCG: kernel command line %q, want init_on_alloc=1: %v", tc.name, plan.kernelCmdline(), tc.want)
		}
	}
}
