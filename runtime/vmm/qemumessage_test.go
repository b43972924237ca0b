package vmm

import (
	"os"
	"path/filepath"
	"testing"
)

// A QEMU that died says why in its log, among virtiofsd's and the guest's lines: its last
// own line is what an error explaining its death carries.
func TestQEMUMessage(t *testing.T) {
	path := filepath.Join(t.TempDir(), "vm.log")
	if got := qemuMessage(path); got != "" {
		t.Errorf("no log: %q", got)
	}
	log := "qemu-system-x86_64: warning: an early warning\n" +
		"[2026-12-07T20:06:53Z WARN  virtiofsd::passthrough] Overwrote (via rename) ...\n" +
		"qemu-system-x86_64: system/physmem.c:871: tlb_reset_dirty_range_all: Assertion `block == qemu_get_ram_block(end - 1)' failed.\n" +
		"[2026-12-07T20:06:54Z INFO  virtiofsd] Client disconnected, shutting down\n"
	if err := os.WriteFile(path, []byte(log), 0o600); err != nil {
		t.Fatal(err)
	}
	if got, want := qemuMessage(path), ": qemu-system-x86_64: system/physmem.c:871: tlb_reset_dirty_range_all: Assertion `block == qemu_get_ram_block(end - 1)' failed."; got != want {
		t.Errorf("qemuMessage = %q, want %q", got, want)
	}
}
