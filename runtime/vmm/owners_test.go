package vmm

import (
	"slices"
	"syscall"
	"testing"
)

func TestPodIDRangesAreChecked(t *testing.T) {
	for name, tc := range map[string]struct {
		rs   []IDRange
		want bool
		ok   bool
	}{
		"none":             {nil, false, true},
		"kubelet's":        {[]IDRange{{First: 65536, Count: 65536}}, true, true},
		"two apart":        {[]IDRange{{First: 65536, Count: 10}, {First: 200000, Count: 10}}, true, true},
		"missing":          {nil, true, false},
		"host root":        {[]IDRange{{First: 0, Count: 65536}}, true, false},
		"empty":            {[]IDRange{{First: 65536, Count: 0}}, true, false},
		"overlap":          {[]IDRange{{First: 65536, Count: 100}, {First: 65600, Count: 10}}, true, false},
		"past the last id": {[]IDRange{{First: 1<<32 - 10, Count: 20}}, true, false},
		"too many lines":   {make([]IDRange, maxIDRanges+1), true, false},
	} {
		if err := checkIDRanges(tc.rs, tc.want); (err == nil) != tc.ok {
			t.Errorf("%s: %v, want ok=%v", name, err, tc.ok)
		}
	}
}

func TestOwnIDsMapRootToTheRangeAndThePodOntoItself(t *testing.T) {
	got := ownIDs(0x70000000, []IDRange{{First: 65536, Count: 65536}})
	want := []syscall.SysProcIDMap{
		{ContainerID: 0, HostID: 0x70000000, Size: 1},
		{ContainerID: 65536, HostID: 65536, Size: 65536},
	}
	if !slices.Equal(got, want) {
		t.Errorf("ownIDs = %v, want %v", got, want)
	}
}
