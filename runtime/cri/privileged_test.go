package cri

import (
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

func TestPrivilegedSandboxIsToldBySysWritable(t *testing.T) {
	spec := func(kind string, sysOpts ...string) *specs.Spec {
		return &specs.Spec{
			Annotations: map[string]string{AnnotationContainerType: kind},
			Mounts: []specs.Mount{
				{Destination: "/proc", Type: "proc", Options: []string{"rw"}},
				{Destination: "/sys/", Type: "sysfs", Options: append([]string{"nosuid", "noexec", "nodev"}, sysOpts...)},
			},
		}
	}
	for name, tc := range map[string]struct {
		spec *specs.Spec
		want bool
	}{
		"privileged sandbox":             {spec(ContainerTypeSandbox, "rw"), true},
		"sandbox":                        {spec(ContainerTypeSandbox, "ro"), false},
		"privileged app container":       {spec(ContainerTypeContainer, "rw"), false},
		"no spec":                        {nil, false},
		"sandbox without /sys":           {&specs.Spec{Annotations: map[string]string{AnnotationContainerType: ContainerTypeSandbox}}, false},
		"outside CRI, /sys writable too": {&specs.Spec{Mounts: []specs.Mount{{Destination: "/sys", Options: []string{"rw"}}}}, false},
	} {
		if got := PrivilegedSandbox(tc.spec); got != tc.want {
			t.Errorf("%s: %v, want %v", name, got, tc.want)
		}
	}
}
