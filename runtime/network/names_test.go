package network

import "testing"

func TestTapName(t *testing.T) {
	cases := []struct {
		i    int
		link string
		want string
	}{
		{0, "eth0", "tap0_eth0"},
		{1, "net1", "tap1_net1"},
		{3, "macvlan-storage", "tap3_macvlan-st"}, // cut to 15 bytes
		{12, "eth0", "tap12_eth0"},
	}
	for _, c := range cases {
		if got := tapName(c.i, c.link); got != c.want {
			t.Errorf("tapName(%d, %q) = %q, want %q", c.i, c.link, got, c.want)
		}
	}
}

// Cutting must not make two interfaces' taps collide: the index comes before the cut.
func TestTapNamesStayDistinctWhenCut(t *testing.T) {
	long := "abcdefghijklmno" // 15 bytes, the longest link name
	seen := map[string]int{}
	for i := range 100 {
		name := tapName(i, long)
		if len(name) > maxLinkName {
			t.Fatalf("tapName(%d) = %q: %d bytes, over IFNAMSIZ-1", i, name, len(name))
		}
		if j, dup := seen[name]; dup {
			t.Fatalf("tapName(%d) = tapName(%d) = %q", i, j, name)
		}
		seen[name] = i
	}
}
