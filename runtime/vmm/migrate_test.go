package vmm

import (
	"context"
	"errors"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/devices"
	"github.com/vmpod/vmpod/qmp"
	"github.com/vmpod/vmpod/qmp/qmptest"
)

// What cannot move is refused before QEMU is asked anything (the machines here have no
// monitor: a call to QEMU would panic), with an error naming why.
func TestMigrationRefusals(t *testing.T) {
	ctx := context.Background()
	cVirtiofsd, _ := script(t, "usage: virtiofsd [options]\n    -o source=PATH")
	cases := []struct {
		name string
		cfg  Config
		call func(*Machine) error
		want func(error) bool
	}{
		{"virtio-fs source", Config{Name: "a", SharedFS: machine.VirtioFS},
			func(m *Machine) error { _, err := m.Migrate(ctx, os.Stdin, MigrationOptions{}); return err }, errdefs.IsNotImplemented},
		{"virtio-fs target", Config{Name: "a", SharedFS: machine.VirtioFS, Incoming: true},
			func(m *Machine) error { return m.AcceptMigration(ctx, os.Stdin, MigrationOptions{}) }, errdefs.IsNotImplemented},
		{"virtio-fs source, QEMU 10 with the C virtiofsd", Config{Name: "a", SharedFS: machine.VirtioFS, VirtiofsdPath: cVirtiofsd},
			func(m *Machine) error {
				m.version = qemuVersion{10, 0}
				_, err := m.Migrate(ctx, os.Stdin, MigrationOptions{})
				return err
			}, errdefs.IsNotImplemented},
		{"VFIO source", Config{Name: "a", HostDevices: []devices.PCIAddress{{Bus: 1}}},
			func(m *Machine) error { _, err := m.Migrate(ctx, os.Stdin, MigrationOptions{}); return err }, errdefs.IsFailedPrecondition},
		{"target not started incoming", Config{Name: "a"},
			func(m *Machine) error { return m.AcceptMigration(ctx, os.Stdin, MigrationOptions{}) }, errdefs.IsFailedPrecondition},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call(&Machine{cfg: tc.cfg})
			if !tc.want(err) {
				t.Fatalf("got %v", err)
			}
			t.Log(err)
		})
	}
}

// A post-copy whose every page went and that QEMU never completes (its target closed the
// return path too early, design 209) ends in ErrPostCopyUnconfirmed, without a cancel —
// but only once nothing more was sent for postCopyUnconfirmedAfter: pages still going,
// or left, keep it waiting.
func TestPostCopyThatNeverEndsIsUnconfirmed(t *testing.T) {
	defer func(d time.Duration) { postCopyUnconfirmedAfter = d }(postCopyUnconfirmedAfter)
	postCopyUnconfirmedAfter = 500 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	srv := qmptest.NewServer(t)
	mon, err := qmp.Dial(ctx, srv.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer mon.Close()
	m := &Machine{cfg: Config{Name: "unconfirmed"}, mon: mon, exited: make(chan struct{})}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()

	var flatSince atomic.Int64 // when the fake began to say: every page sent, nothing more (ns)
	var cancelled atomic.Bool
	go func() {
		start := time.Now()
		for c := range srv.Commands() {
			switch c.Execute {
			case "query-migrate":
				ram := map[string]any{"transferred": uint64(time.Since(start).Milliseconds()) << 20, "remaining": 0, "total": 512 << 20,
					"duplicate": 0, "dirty-sync-count": 1, "dirty-pages-rate": 0, "mbps": 100.0}
				switch since := time.Since(start); {
				case since < 400*time.Millisecond: // pages left
					ram["remaining"] = 64 << 20
				case since < 1200*time.Millisecond: // none left, and still sending (the last ones in flight)
				default:
					flatSince.CompareAndSwap(0, time.Now().UnixNano())
					ram["transferred"] = 1200 << 20
				}
				srv.Reply(c, map[string]any{"status": "postcopy-active", "ram": ram})
			case "migrate_cancel":
				cancelled.Store(true)
				srv.Reply(c, map[string]any{})
			default: // capabilities, getfd, migrate
				srv.Reply(c, map[string]any{})
			}
		}
	}()
	_, err = m.Migrate(ctx, w, MigrationOptions{})
	ended := time.Now()
	if !errors.Is(err, ErrPostCopyUnconfirmed) || errors.Is(err, ErrPostCopyBroken) {
		t.Fatalf("Migrate: %v, want ErrPostCopyUnconfirmed (and not broken: the target may have it all)", err)
	}
	if flat := time.Unix(0, flatSince.Load()); flatSince.Load() == 0 || ended.Sub(flat) < postCopyUnconfirmedAfter {
		t.Errorf("Migrate gave up %v after the last page went, want %v or more: pages left or in flight are no reason", ended.Sub(flat), postCopyUnconfirmedAfter)
	}
	if cancelled.Load() {
		t.Error("a migration past its switch to post-copy was cancelled")
	}
}
