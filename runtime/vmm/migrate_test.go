package vmm

import (
	"context"
	"os"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/devices"
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
