package pod

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

func TestHostCPUs(t *testing.T) {
	online := filepath.Join(t.TempDir(), "online")
	if err := os.WriteFile(online, []byte("0-3\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	old := hostCPUsFile
	hostCPUsFile = online
	t.Cleanup(func() { hostCPUsFile = old })

	res := func(cpus string) *specs.LinuxResources {
		return &specs.LinuxResources{CPU: &specs.LinuxCPU{Cpus: cpus}}
	}
	for _, tc := range []struct {
		r       *specs.LinuxResources
		want    string
		wantErr string
	}{
		{nil, "", ""},
		{&specs.LinuxResources{}, "", ""},
		{res(""), "", ""},
		{res("1,3"), "1,3", ""},
		{res("0-2"), "0-2", ""},
		{res("2-1"), "", `linux.resources.cpu.cpus "2-1"`},
		{res("one"), "", `linux.resources.cpu.cpus "one"`},
		{res("3-5"), "", `CPUs 4-5 are not online on this host (online: 0-3)`},
	} {
		got, err := hostCPUs(tc.r)
		switch {
		case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
			t.Errorf("hostCPUs(%+v): %v, want an error with %q", tc.r, err, tc.wantErr)
		case tc.wantErr == "" && err != nil:
			t.Errorf("hostCPUs(%+v): %v", tc.r, err)
		case tc.wantErr == "" && got.String() != tc.want:
			t.Errorf("hostCPUs(%+v) = %q, want %q", tc.r, got.String(), tc.want)
		}
	}
}

func TestGuestResourcesDropHostNumbers(t *testing.T) {
	shares := uint64(512)
	r := &specs.LinuxResources{CPU: &specs.LinuxCPU{Cpus: "2-3", Mems: "0", Shares: &shares}}
	g := guestResources(r)
	if g.CPU.Cpus != "" || g.CPU.Mems != "" || g.CPU.Shares == nil || *g.CPU.Shares != 512 {
		t.Errorf("guest CPU resources %+v: want no cpus/mems, the shares kept", g.CPU)
	}
	if r.CPU.Cpus != "2-3" || r.CPU.Mems != "0" {
		t.Errorf("the host's resources changed: %+v", r.CPU)
	}
	if plain := (&specs.LinuxResources{CPU: &specs.LinuxCPU{Shares: &shares}}); guestResources(plain) != plain {
		t.Error("resources without host numbers were copied")
	}
}
