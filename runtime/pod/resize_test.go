package pod

import (
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/runtime/nodeconfig"
)

func TestClaimOf(t *testing.T) {
	prev := claim{cpuMilli: 500, memBytes: 256 << 20}
	cases := []struct {
		name string
		r    *specs.LinuxResources
		want claim
	}{
		{"nil keeps everything", nil, prev},
		{"sections left out keep theirs", &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: i64(1 << 30)}},
			claim{cpuMilli: 500, memBytes: 1 << 30}},
		{"quota/period rounds up to a thousandth", &specs.LinuxResources{CPU: &specs.LinuxCPU{Quota: i64(150001), Period: u64(100000)}},
			claim{cpuMilli: 1501, memBytes: 256 << 20}},
		{"quota -1 is no CPU limit", &specs.LinuxResources{CPU: &specs.LinuxCPU{Quota: i64(-1), Period: u64(100000)}},
			claim{cpuMilli: 0, memBytes: 256 << 20}},
		{"shares alone leave the CPU claim", &specs.LinuxResources{CPU: &specs.LinuxCPU{Shares: u64(1024)}}, prev},
		{"memory -1 is no limit", &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: i64(-1)}},
			claim{cpuMilli: 500, memBytes: 0}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := claimOf(tc.r, prev); got != tc.want {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestSizeForClaims(t *testing.T) {
	s := nodeconfig.Default().Sizing // defaults 1 vCPU, 512 MiB, +64 MiB overhead
	cases := []struct {
		name   string
		claims []claim
		want   Size
	}{
		{"nothing claimed: the defaults", nil, Size{1, 512}},
		{"unlimited containers claim nothing", []claim{{}, {}}, Size{1, 512}},
		{"sums, whole vCPUs, memory plus overhead", []claim{{cpuMilli: 1500, memBytes: 600 << 20}, {cpuMilli: 700, memBytes: 1 << 20}},
			Size{3, 601 + 64}},
		{"beyond the node's maximum is not clamped (grow refuses it)", []claim{{cpuMilli: 9000, memBytes: 16 << 30}},
			Size{9, 16384 + 64}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := sizeForClaims(tc.claims, s); got != tc.want {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestHeadroom(t *testing.T) {
	s := nodeconfig.Default().Sizing // max 4 vCPUs, 8192 MiB
	boot := Size{VCPUs: 1, MemoryMiB: 577}
	// microvm: vCPUs and whole 128 MiB memory blocks booted offline
	if got, want := headroom(machine.MicroVM, boot, s), (Size{VCPUs: 4, MemoryMiB: 577 + 7552}); got != want {
		t.Errorf("microvm: got %+v, want %+v", got, want)
	}
	if got := headroom(machine.MicroVM, Size{VCPUs: 4, MemoryMiB: 8100}, s); got != (Size{VCPUs: 4, MemoryMiB: 8100}) {
		t.Errorf("microvm less than a block below the maximum: got %+v, want no growth", got)
	}
	off := s
	off.MicrovmGrowth = false
	if got := headroom(machine.MicroVM, boot, off); got != boot {
		t.Errorf("microvm with sizing.microvm_growth off: got %+v, want the boot size %+v", got, boot)
	}
	// q35: the virtio-mem region above the boot memory is a whole number of 2 MiB blocks
	if got, want := headroom(machine.Q35, boot, s), (Size{VCPUs: 4, MemoryMiB: 577 + 7614}); got != want {
		t.Errorf("q35: got %+v, want %+v", got, want)
	}
	big := Size{VCPUs: 6, MemoryMiB: 9000} // booted above the maximums (an older config)
	if got := headroom(machine.Q35, big, s); got != big {
		t.Errorf("q35 above the maximums: got %+v, want %+v", got, big)
	}
}

// A pod restored from templates has the memory above the default in whole virtio-mem
// blocks, within the node's maximum; at or below the default it is as sized.
func TestTemplateSize(t *testing.T) {
	s := nodeconfig.Default().Sizing // default 512 MiB, max 8192
	for _, tc := range []struct{ mem, want int }{
		{512, 512}, {577, 578}, {1088, 1088}, {8191, 8192}, {8192, 8192},
	} {
		if got := templateSize(Size{VCPUs: 2, MemoryMiB: tc.mem}, s); got != (Size{VCPUs: 2, MemoryMiB: tc.want}) {
			t.Errorf("%d MiB: got %+v, want %d MiB", tc.mem, got, tc.want)
		}
	}
	odd := s
	odd.MaxMemoryMiB = 8191
	if got := templateSize(Size{VCPUs: 1, MemoryMiB: 8191}, odd); got.MemoryMiB != 8191 {
		t.Errorf("8191 MiB under a maximum of 8191: got %+v, want the maximum, not past it", got)
	}
}

func TestResizeTarget(t *testing.T) {
	maxSize := Size{VCPUs: 4, MemoryMiB: 8192}
	cases := []struct {
		name                     string
		cur, before, after, want Size
		err                      string
	}{
		{"fits: nothing to do", Size{2, 1024}, Size{1, 600}, Size{2, 1000}, Size{2, 1024}, ""},
		{"grows what outgrew the VM", Size{1, 512}, Size{1, 192}, Size{2, 1088}, Size{2, 1088}, ""},
		{"a growth target never shrinks (shrinkTarget does, after)", Size{4, 4096}, Size{4, 4096}, Size{1, 512}, Size{4, 4096}, ""},
		{"refuses more CPU than the headroom", Size{1, 512}, Size{1, 512}, Size{5, 512}, Size{}, "resources.cpu"},
		{"refuses more memory than the headroom", Size{1, 512}, Size{1, 512}, Size{1, 9000}, Size{}, "resources.memory.limit"},
		// booted capped at the maximum (the pod asked for 16 GiB): lowering to 12 GiB is fine
		{"capped pod may lower its limits", Size{4, 8192}, Size{4, 16448}, Size{4, 12352}, Size{4, 8192}, ""},
		{"capped pod may not raise them", Size{4, 8192}, Size{4, 12352}, Size{4, 16448}, Size{}, "resources.memory.limit"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := resizeTarget(tc.cur, tc.before, tc.after, maxSize)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("got %+v, %v; want an error naming %s", got, err, tc.err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}

func TestShrinkTarget(t *testing.T) {
	boot := Size{VCPUs: 1, MemoryMiB: 512}
	for _, tc := range []struct {
		name             string
		cur, after, want Size
	}{
		{"gives back what the limits no longer need", Size{4, 4096}, Size{2, 1100}, Size{2, 1100}},
		{"memory in whole blocks above boot", Size{4, 4096}, Size{4, 1101}, Size{4, 1102}},
		{"never below boot", Size{4, 4096}, Size{1, 300}, Size{1, 512}},
		{"nothing to give back", Size{2, 1024}, Size{2, 1024}, Size{2, 1024}},
		{"more needed than the VM has: not a shrink", Size{2, 1024}, Size{3, 2048}, Size{2, 1024}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := shrinkTarget(tc.cur, tc.after, boot, 2); got != tc.want {
				t.Errorf("shrinkTarget(%+v, %+v) = %+v, want %+v", tc.cur, tc.after, got, tc.want)
			}
		})
	}
}
