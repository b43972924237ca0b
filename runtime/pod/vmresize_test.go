package pod

import (
	"context"
	"errors"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/vmpod/vmpod/api/vmspec"
	"github.com/vmpod/vmpod/runtime/qga"
)

// A VM pod's size follows the change of its compute container's limits since boot, in
// whole sockets and 2 MiB blocks, within the spec's growth room; a refusal names the
// limit and says why.
func TestVMTarget(t *testing.T) {
	vm := &vmspec.VM{CPU: vmspec.CPU{Sockets: 2, Cores: 2, Threads: 1, MaxSockets: 4}, MemoryMiB: 1024, MaxMemoryMiB: 2048}
	const gib = 1 << 30
	boot := claim{cpuMilli: 4000, memBytes: gib}
	for _, tt := range []struct {
		name       string
		boot, next claim
		want       Size
		err        func(error) bool
		says       string
	}{
		{name: "no change", boot: boot, next: boot, want: Size{4, 1024}},
		{name: "a socket and 512 MiB more", boot: boot, next: claim{6000, gib + 512<<20}, want: Size{6, 1536}},
		{name: "all the room", boot: boot, next: claim{8000, 2 * gib}, want: Size{8, 2048}},
		{name: "memory only", boot: boot, next: claim{4000, gib + 256<<20}, want: Size{4, 1280}},
		{name: "limits that are not the size", boot: claim{2500, 3 * gib}, next: claim{4500, 3*gib + 2<<20}, want: Size{6, 1026}},
		{name: "no limits, unchanged", boot: claim{}, next: claim{}, want: Size{4, 1024}},
		{name: "half a socket", boot: boot, next: claim{5000, gib}, err: errdefs.IsInvalidArgument, says: "linux.resources.cpu: 5 vCPUs are not whole sockets of 2"},
		{name: "part of a CPU", boot: boot, next: claim{6500, gib}, err: errdefs.IsInvalidArgument, says: "changes by 2500m"},
		{name: "beyond maxSockets", boot: boot, next: claim{10000, gib}, err: errdefs.IsFailedPrecondition, says: "10 vCPUs, the VM can have 8 (its cpu.maxSockets)"},
		{name: "below boot", boot: boot, next: claim{2000, gib}, err: errdefs.IsFailedPrecondition, says: "2 vCPUs, fewer than the 4"},
		{name: "CPU limit removed", boot: boot, next: claim{0, gib}, err: errdefs.IsInvalidArgument, says: "which this update removes"},
		{name: "CPU limit added", boot: claim{0, gib}, next: boot, err: errdefs.IsInvalidArgument, says: "which it did not have at boot"},
		{name: "memory in part blocks", boot: boot, next: claim{4000, gib + 1<<20}, err: errdefs.IsInvalidArgument, says: "memory.limit: the limit changes by 1048576 bytes"},
		{name: "beyond maxMemoryMiB", boot: boot, next: claim{4000, 3 * gib}, err: errdefs.IsFailedPrecondition, says: "3072 MiB, the VM can have 2048 MiB"},
		{name: "below boot memory", boot: boot, next: claim{4000, gib / 2}, err: errdefs.IsFailedPrecondition, says: "512 MiB, less than the 1024 MiB"},
	} {
		got, err := vmTarget(vm, tt.boot, tt.next)
		switch {
		case tt.err == nil && (err != nil || got != tt.want):
			t.Errorf("%s: %+v, %v; want %+v", tt.name, got, err, tt.want)
		case tt.err != nil && (err == nil || !tt.err(err) || !strings.Contains(err.Error(), tt.says)):
			t.Errorf("%s: %+v, %v; want an error saying %q", tt.name, got, err, tt.says)
		}
	}
	// without room, only an update that changes nothing passes
	fixed := &vmspec.VM{CPU: vmspec.CPU{Sockets: 1, Cores: 1, Threads: 1}, MemoryMiB: 1024}
	if got, err := vmTarget(fixed, boot, boot); err != nil || got != (Size{1, 1024}) {
		t.Errorf("a VM without room, no change: %+v, %v", got, err)
	}
	if _, err := vmTarget(fixed, boot, claim{5000, gib}); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("a VM without room, one CPU more: %v", err)
	}
}

// fakeBlocks is a guest agent's memory blocks: OnlineMovable fails for the blocks in
// refuseMovable, as for a guest that cannot online them movable.
type fakeBlocks struct {
	blocks        []qga.MemoryBlock
	refuseMovable map[uint64]bool
	disabled      bool // the agent's file commands are disabled
	// refuse is how many more times the guest refuses to online each block (in the
	// default zone), as a guest still adding it may
	refuse        map[uint64]int
	never         map[uint64]bool // blocks the guest cannot online at all
	movable, norm []uint64
}

func (f *fakeBlocks) MemoryBlocks(context.Context) ([]qga.MemoryBlock, error) { return f.blocks, nil }

func (f *fakeBlocks) OnlineMovable(_ context.Context, i uint64) error {
	if f.disabled {
		return &qga.Error{Command: "guest-file-open", Class: "CommandNotFound", Desc: "Command guest-file-open has been disabled"}
	}
	if f.refuseMovable[i] {
		return errors.New("guest agent guest-file-close: failed to close handle: Invalid argument")
	}
	f.movable = append(f.movable, i)
	f.set(i)
	return nil
}

func (f *fakeBlocks) OnlineMemoryBlocks(_ context.Context, is []uint64) (map[uint64]string, error) {
	f.norm = append(f.norm, is...)
	failed := map[uint64]string{}
	for _, i := range is {
		if f.never[i] {
			failed[i] = "operation-not-supported"
			continue
		}
		if f.refuse[i] > 0 {
			f.refuse[i]--
			failed[i] = "operation-failed (errno 16)"
			continue
		}
		f.set(i)
	}
	return failed, nil
}

func (f *fakeBlocks) set(i uint64) {
	for n := range f.blocks {
		if f.blocks[n].PhysIndex == i {
			f.blocks[n].Online = true
		}
	}
}

// Only blocks a growth added are onlined: movable, a block the guest refuses so in the
// default zone, and every block so once the agent's file commands turn out disabled; each
// is asked once.
func TestBlockOnliner(t *testing.T) {
	f := &fakeBlocks{blocks: []qga.MemoryBlock{{PhysIndex: 0, Online: true}, {PhysIndex: 7, Online: false}}, refuseMovable: map[uint64]bool{34: true}}
	on := &blockOnliner{agent: f, lg: log.L, known: map[uint64]bool{0: true, 7: true}, failed: map[uint64]string{}, movable: true}
	ctx := context.Background()
	if on.onlineNew(ctx) {
		t.Error("nothing new, yet it onlined something")
	}
	f.blocks = append(f.blocks, qga.MemoryBlock{PhysIndex: 32}, qga.MemoryBlock{PhysIndex: 33})
	if !on.onlineNew(ctx) || !slices.Equal(f.movable, []uint64{32, 33}) || len(f.norm) != 0 {
		t.Fatalf("movable %v, default zone %v; want 32 and 33 movable", f.movable, f.norm)
	}
	f.blocks = append(f.blocks, qga.MemoryBlock{PhysIndex: 34}, qga.MemoryBlock{PhysIndex: 35})
	if !on.onlineNew(ctx) || !slices.Equal(f.norm, []uint64{34}) || !slices.Equal(f.movable, []uint64{32, 33, 35}) {
		t.Fatalf("default zone %v, movable %v; want 34 (refused movable) in the default zone, 35 movable", f.norm, f.movable)
	}
	f.disabled = true
	f.blocks = append(f.blocks, qga.MemoryBlock{PhysIndex: 36}, qga.MemoryBlock{PhysIndex: 37})
	if !on.onlineNew(ctx) || !slices.Equal(f.norm, []uint64{34, 36, 37}) || on.movable {
		t.Fatalf("default zone %v; want 36 and 37 there once file access is disabled", f.norm)
	}
	f.blocks[len(f.blocks)-1].Online = false // the guest took it offline again: its choice
	if on.onlineNew(ctx) {
		t.Error("a block asked for once was asked again")
	}
	if f.blocks[1].Online {
		t.Error("block 7, offline before the growth, was onlined")
	}
	if got := on.failedBlocks(); len(got) != 0 {
		t.Errorf("failed blocks %v; want none", got)
	}
}

// A block the guest refuses to online is asked again, every blockRetryEvery, without
// making the resize look again at once, until the guest takes it; until then the resize
// is not done. One the guest cannot online at all is asked once. Blocks done with are
// recorded for later resizes.
func TestBlockOnlinerAsksAgain(t *testing.T) {
	f := &fakeBlocks{blocks: []qga.MemoryBlock{{PhysIndex: 0, Online: true}, {PhysIndex: 32}, {PhysIndex: 33}, {PhysIndex: 34}},
		refuse: map[uint64]int{33: 2}, never: map[uint64]bool{34: true}, disabled: true}
	settled := map[uint64]bool{}
	on := &blockOnliner{agent: f, lg: log.L, known: map[uint64]bool{0: true}, settled: settled, failed: map[uint64]string{}, movable: true}
	ctx := context.Background()
	if !on.onlineNew(ctx) || !slices.Equal(on.failedBlocks(), []uint64{33}) {
		t.Fatalf("first look: failed %v; want [33] (34 refused for good)", on.failedBlocks())
	}
	on.lastRetry = time.Now() // a retry was just asked for
	if on.onlineNew(ctx) || !slices.Equal(f.norm, []uint64{32, 33, 34}) {
		t.Fatalf("a look within a second of the last retry: asked %v; want nothing asked again", f.norm)
	}
	on.lastRetry = time.Time{} // a second later
	if on.onlineNew(ctx) {
		t.Error("a retry alone made the resize look again at once")
	}
	if !slices.Equal(on.failedBlocks(), []uint64{33}) || !slices.Equal(f.norm, []uint64{32, 33, 34, 33}) {
		t.Fatalf("second retry: failed %v, asked %v; want 33 refused again, 34 not asked again", on.failedBlocks(), f.norm)
	}
	on.lastRetry = time.Time{}
	on.onlineNew(ctx)
	if len(on.failedBlocks()) != 0 || !f.blocks[2].Online {
		t.Fatalf("third retry: failed %v, block 33 online %v; want it taken", on.failedBlocks(), f.blocks[2].Online)
	}
	on.lastRetry = time.Time{}
	on.onlineNew(ctx)
	if !slices.Equal(f.norm, []uint64{32, 33, 34, 33, 33}) {
		t.Errorf("asked %v after every block was done with; want nothing asked again", f.norm)
	}
	if want := map[uint64]bool{32: true, 33: true, 34: true}; !maps.Equal(settled, want) {
		t.Errorf("blocks recorded as done with: %v, want %v", settled, want)
	}
	var none *blockOnliner
	if none.failedBlocks() != nil {
		t.Error("a nil onliner has failed blocks")
	}
}

// fakeVCPUs is a guest agent's vCPUs: the guest refuses to bring a CPU up the first
// refusals times it is asked, as a guest still adding the CPU does.
type fakeVCPUs struct {
	vcpus    []qga.VCPU
	refusals int
	asked    int
	disabled bool // the agent's guest-set-vcpus is disabled
}

func (f *fakeVCPUs) VCPUs(context.Context) ([]qga.VCPU, error) { return slices.Clone(f.vcpus), nil }

func (f *fakeVCPUs) OnlineVCPUs(_ context.Context, ids []int) (int, error) {
	f.asked++
	if f.disabled {
		return 0, &qga.Error{Command: "guest-set-vcpus", Class: "CommandNotFound", Desc: "Command guest-set-vcpus has been disabled"}
	}
	if f.asked <= f.refusals {
		return 0, &qga.Error{Command: "guest-set-vcpus", Class: "GenericError", Desc: "pwrite(\"/sys/devices/system/cpu/cpu1/online\"): Device or resource busy"}
	}
	for i := range f.vcpus {
		if slices.Contains(ids, f.vcpus[i].LogicalID) {
			f.vcpus[i].Online = true
		}
	}
	return len(ids), nil
}

// Hot-plugged vCPUs come online even when the guest refuses at first; a CPU offline
// below them is the guest's; a guest that never brings them up fails the onlining once
// its time is up, saying which; an agent without the command fails it at once.
func TestOnlineVCPUs(t *testing.T) {
	within := func(d time.Duration) context.Context {
		ctx, cancel := context.WithTimeout(context.Background(), d)
		t.Cleanup(cancel)
		return ctx
	}
	f := &fakeVCPUs{vcpus: []qga.VCPU{{LogicalID: 0, Online: true}, {LogicalID: 1}, {LogicalID: 2}}, refusals: 3}
	online, err := onlineVCPUs(within(time.Minute), f, 2, 3)
	if err != nil || online != 2 || !f.vcpus[2].Online || f.vcpus[1].Online {
		t.Fatalf("online %d, %v, %+v; want vCPU 2 onlined after 3 refusals, vCPU 1 left offline", online, err, f.vcpus)
	}
	f = &fakeVCPUs{vcpus: []qga.VCPU{{LogicalID: 0, Online: true}, {LogicalID: 1}}, refusals: 1 << 30}
	if online, err := onlineVCPUs(within(500*time.Millisecond), f, 1, 2); err == nil || !strings.Contains(err.Error(), "vCPUs [1] offline") || !strings.Contains(err.Error(), "busy") || online != 1 {
		t.Errorf("a guest that never brings vCPU 1 up: online %d, %v; want an error naming it and the guest's reason", online, err)
	}
	f = &fakeVCPUs{vcpus: []qga.VCPU{{LogicalID: 0, Online: true}, {LogicalID: 1}}, disabled: true}
	if _, err := onlineVCPUs(within(time.Minute), f, 1, 2); !qga.IsCommandNotFound(err) || f.asked != 1 {
		t.Errorf("an agent without guest-set-vcpus: %v after %d asks, want its error at the first", err, f.asked)
	}
}
