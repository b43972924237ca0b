package agent

import (
	"slices"
	"testing"
)

func TestMissingBlocks(t *testing.T) {
	const mib = 1 << 20
	const bs = 128 * mib
	// microvm with 4 GiB of RAM booted with mem=600M: RAM below 3 GiB and from 4 GiB on,
	// blocks 0-4 present (block 4 only in part).
	ram := []memRange{{0, 0x9fbff}, {0x100000, 3<<30 - 1}, {4 << 30, 5<<30 - 1}}
	present := func(b uint64) bool { return b <= 4 }
	got := missingBlocks(ram, bs, present)
	var want []uint64
	for a := uint64(5 * bs); a < 3<<30; a += bs {
		want = append(want, a)
	}
	for a := uint64(4 << 30); a < 5<<30; a += bs {
		want = append(want, a)
	}
	if !slices.Equal(got, want) {
		t.Errorf("missing blocks\n got %x\nwant %x", got, want)
	}
	// a range shorter than a block, or ending inside one, gives nothing of it
	if got := missingBlocks([]memRange{{bs, bs + 64*mib}, {2 * bs, 3*bs - 2}}, bs, func(uint64) bool { return false }); len(got) != 0 {
		t.Errorf("partial blocks: %x, want none", got)
	}
	// overlapping ranges give each block once
	if got := missingBlocks([]memRange{{0, 2*bs - 1}, {bs, 2*bs - 1}}, bs, func(uint64) bool { return false }); !slices.Equal(got, []uint64{0, bs}) {
		t.Errorf("overlapping ranges: %x, want [0 %x]", got, bs)
	}
	// the top of the address space does not wrap
	if got := missingBlocks([]memRange{{^uint64(0) - bs + 1, ^uint64(0)}}, bs, func(uint64) bool { return false }); !slices.Equal(got, []uint64{^uint64(0) - bs + 1}) {
		t.Errorf("top block: %x", got)
	}
}
