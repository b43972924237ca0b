package vmm

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestPanicLine(t *testing.T) {
	dir := t.TempDir()
	write := func(name, s string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	boot := "[    0.155325] PCI: Fatal: No config space access function found\ntime=... level=INFO msg=serving\n"
	cases := map[string]struct{ path, want string }{
		"none":    {write("none", boot), ""},
		"missing": {filepath.Join(dir, "absent"), ""},
		"init died": {write("init", boot+"[   12.5] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000200\n[   12.6] Kernel Offset: disabled\n"),
			"Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000200"},
		"last wins, no newline": {write("two", boot+"[1] Kernel panic - not syncing: first\n[2] Kernel panic - not syncing: second"),
			"Kernel panic - not syncing: second"},
		// a panic far behind a long console is still found in the tail
		"long console": {write("long", strings.Repeat("x", 3*consoleTailBytes)+"\n[9] Kernel panic - not syncing: VFS: Unable to mount root fs\n"),
			"Kernel panic - not syncing: VFS: Unable to mount root fs"},
		"bad bytes": {write("bad", "[1] Kernel panic - not syncing: \xff\xfe oops\n"), "Kernel panic - not syncing: ? oops"},
	}
	for name, tc := range cases {
		if got := panicLine(tc.path); got != tc.want {
			t.Errorf("%s: panicLine = %q, want %q", name, got, tc.want)
		}
	}
}

func TestDescribeEnding(t *testing.T) {
	killed := exec.Command("sh", "-c", "kill -9 $$").Run()
	failed := exec.Command("sh", "-c", "exit 3").Run()
	for _, tc := range []struct {
		err              error
		shutdown, panic_ string
		want             string
	}{
		{nil, "guest-reset", "Kernel panic - not syncing: x", "GuestPanicked: Kernel panic - not syncing: x"},
		{killed, "", "", "QEMUCrashed: QEMU was killed by SIGKILL"},
		{failed, "", "", "QEMUFailed: QEMU exited with status 3"},
		{errors.New("wait: no child"), "", "", "QEMUFailed: wait: no child"},
		{nil, "guest-reset", "", "GuestReset: the guest rebooted, and a vmpod VM ends at a reboot"},
		{nil, "guest-shutdown", "", "GuestShutdown: the guest powered off"},
		{nil, "host-qmp-quit", "", "QEMUExited: QEMU shut the VM down (host-qmp-quit)"},
		{nil, "", "", "QEMUExited: QEMU exited without saying why"},
	} {
		if got := describeEnding(tc.err, tc.shutdown, tc.panic_); got != tc.want {
			t.Errorf("describeEnding(%v, %q, %q) = %q, want %q", tc.err, tc.shutdown, tc.panic_, got, tc.want)
		}
	}
}
