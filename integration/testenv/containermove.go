package testenv

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/vmpod/vmpod/qmp"
	"github.com/vmpod/vmpod/runtime/rootfssync"
	"github.com/vmpod/vmpod/runtime/vmm"
	"github.com/vmpod/vmpod/runtime/vmpodagent"
)

// ContainerVMMove is what MoveContainerVM did.
type ContainerVMMove struct {
	Guest *vmpodagent.Guest  // adopted at the target
	Info  qmp.MigrationInfo  // the source QEMU's account
	Last  rootfssync.Changes // the mirror's last pass, with the guest stopped
	// Switchover is how long the guest waited, stopped, for the last pass, the mount of the
	// target's rootfs and its share
	Switchover time.Duration
}

// MoveContainerVM migrates the container VM of from into a machine started from cfg and
// adopts the guest there (docs/design/211). The rootfs of the container id there is the
// overlay to, whose upper directory tree mirrors the source's: its last pass runs once
// the source's guest has stopped, then to is mounted and shared under the source's share
// name (virtiofsd reopens the guest's files by their paths in it), before the devices'
// state goes. The source's QEMU quits. Without a tree (nil) there is no container to
// carry: the machine alone moves.
func MoveContainerVM(t testing.TB, ctx context.Context, from *vmpodagent.Guest, cfg vmpodagent.Config, id string, to Overlay, tree *rootfssync.Mirror, opts vmm.MigrationOptions) ContainerVMMove {
	t.Helper()
	m, err := vmpodagent.Receive(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = m.Kill()
		AssertNoLeaks(t, cfg.StateDir)
	})
	var move ContainerVMMove
	if tree != nil {
		opts.BeforeSwitchover = func(ctx context.Context) error {
			start := time.Now()
			defer func() { move.Switchover = time.Since(start) }()
			var err error
			if move.Last, err = tree.Pass(ctx, false); err != nil {
				return err
			}
			if err := to.Mount(t); err != nil {
				return err
			}
			_, err = m.Share(to.Merged, vmpodagent.RootfsShare(id), false)
			return err
		}
	}
	move.finish(t, ctx, from, cfg, m, opts)
	return move
}

// finish migrates from into the machine m, waiting to receive it, and adopts the guest.
func (move *ContainerVMMove) finish(t testing.TB, ctx context.Context, from *vmpodagent.Guest, cfg vmpodagent.Config, m *vmm.Machine, opts vmm.MigrationOptions) {
	t.Helper()
	out, in := MigrationStream(t)
	if err := m.AcceptMigration(ctx, in, vmm.MigrationOptions{}); err != nil {
		t.Fatal(err)
	}
	arrived := make(chan error, 1)
	go func() { _, err := m.AwaitIncoming(ctx); arrived <- err }()
	var err error
	if move.Info, err = from.Machine().Migrate(ctx, out, opts); err != nil {
		t.Fatal(err)
	}
	if err := <-arrived; err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: migrated: total %v, downtime %v, %d MiB sent; the last mirror and the share took %v: %+v",
		cfg.Name, move.Info.TotalTime, move.Info.Downtime, move.Info.Transferred()>>20, move.Switchover, move.Last)
	from.Machine().Quit(ctx)
	if move.Guest, err = vmpodagent.Adopt(ctx, cfg, m, from.BootMemory()); err != nil {
		t.Fatal(err)
	}
}

// MirrorConnection is a TCP connection to a rootfssync.Receive writing into dst, as the
// mirror of a container's rootfs between two nodes; the cleanup closes it and checks
// Receive ended cleanly.
func MirrorConnection(t testing.TB, dst string) net.Conn {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	received := make(chan error, 1)
	go func() {
		conn, err := l.Accept()
		if err != nil {
			received <- err
			return
		}
		defer conn.Close()
		received <- rootfssync.Receive(context.Background(), conn, dst)
	}()
	conn, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		if err := <-received; err != nil {
			t.Errorf("the target's rootfs mirror: %v", err)
		}
	})
	return conn
}
