package network

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Bad netns paths fail before anything is read or made, naming the path and what it is.
// None of these needs root.
func TestInspectRejectsWhatIsNotAPodNetns(t *testing.T) {
	file := filepath.Join(t.TempDir(), "netns")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		path string
		want string
	}{
		{"/run/netns/no-such-pod", "no such file or directory"},
		{file, "not a namespace file"},
		{t.TempDir(), "not a namespace file"},
		{"/proc/self/ns/mnt", "is a mount namespace, not a network namespace"},
		{"/proc/self/ns/net", "is the shim's own network namespace"},
	}
	for _, c := range cases {
		_, err := Inspect(c.path)
		if err == nil || !strings.Contains(err.Error(), "network: netns "+c.path+": ") || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Inspect(%s): %v, want an error naming the path and saying %q", c.path, err, c.want)
		}
	}
}

func TestPlumbRejectsAnEmptyPlan(t *testing.T) {
	for _, plan := range []*Plan{nil, {Netns: "/run/netns/x"}} {
		if _, err := Plumb(plan); err == nil || !strings.Contains(err.Error(), "no interfaces") {
			t.Errorf("Plumb(%+v): %v, want an error about the empty plan", plan, err)
		}
	}
}

func TestPlumbRejectsABadNetns(t *testing.T) {
	plan := &Plan{Netns: "/proc/self/ns/net", Interfaces: []Interface{{Name: "eth0", Index: 2, Tap: "tap0_eth0"}}}
	if _, err := Plumb(plan); err == nil || !strings.Contains(err.Error(), "shim's own network namespace") {
		t.Fatalf("Plumb into the shim's netns: %v, want a refusal", err)
	}
}
