package rootfs

import (
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

func TestParseOptions(t *testing.T) {
	o, err := parseOptions([]string{"rbind", "ro", "nosuid", "rw", "rprivate", "rnoexec", "mode=755", "size=65536k", "newinstance"})
	if err != nil {
		t.Fatal(err)
	}
	if o.flags != unix.MS_BIND|unix.MS_REC|unix.MS_NOSUID {
		t.Errorf("flags %#x: the later rw must clear ro", o.flags)
	}
	if o.cleared != unix.MS_RDONLY {
		t.Errorf("cleared %#x, want MS_RDONLY (a bind then remounts)", o.cleared)
	}
	if len(o.propagation) != 1 || o.propagation[0] != unix.MS_PRIVATE|unix.MS_REC {
		t.Errorf("propagation %v", o.propagation)
	}
	if o.attrSet != unix.MOUNT_ATTR_NOEXEC || o.attrClr != 0 {
		t.Errorf("recursive attributes set %#x clear %#x", o.attrSet, o.attrClr)
	}
	if got := len(o.data); got != 3 {
		t.Errorf("data %v: want the three filesystem options", o.data)
	}
	for _, opt := range []string{"tmpcopyup", "idmap", "ridmap=0:1:1", "remount", "rnoatime"} {
		if _, err := parseOptions([]string{opt}); err == nil {
			t.Errorf("%s: accepted", opt)
		}
	}
}

func TestUnsupported(t *testing.T) {
	spec := func() *specs.Spec {
		return &specs.Spec{
			Mounts: []specs.Mount{
				{Destination: "/proc", Type: "proc", Source: "proc"},
				{Destination: "/data", Type: "bind", Source: "/x", Options: []string{"rbind", "rro"}},
			},
			Linux: &specs.Linux{RootfsPropagation: "rprivate"},
		}
	}
	if why := Unsupported(spec()); why != "" {
		t.Fatalf("a plain spec: %s", why)
	}
	for name, edit := range map[string]func(*specs.Spec){
		"overlay":           func(s *specs.Spec) { s.Mounts[0].Type = "overlay" },
		"recursive on proc": func(s *specs.Spec) { s.Mounts[0].Options = []string{"rro"} },
		"shared root":       func(s *specs.Spec) { s.Linux.RootfsPropagation = "shared" },
		"devices":           func(s *specs.Spec) { s.Linux.Devices = []specs.LinuxDevice{{Path: "/dev/x"}} },
		"ID-mapped":         func(s *specs.Spec) { s.Mounts[1].GIDMappings = []specs.LinuxIDMapping{{Size: 1}} },
		"tmpcopyup on tmpfs": func(s *specs.Spec) {
			s.Mounts[0] = specs.Mount{Destination: "/t", Type: "tmpfs", Options: []string{"tmpcopyup"}}
		},
	} {
		s := spec()
		edit(s)
		if why := Unsupported(s); why == "" {
			t.Errorf("%s: supported", name)
		}
	}
}
