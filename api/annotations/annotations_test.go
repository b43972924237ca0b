package annotations

import (
	"slices"
	"strings"
	"testing"

	"github.com/vmpod/vmpod/api/machine"
)

func TestParse(t *testing.T) {
	all := Known()
	cases := []struct {
		name    string
		in      map[string]string
		allowed []string
		want    Pod
		errs    []string
	}{
		{"none", map[string]string{"io.kubernetes.cri.sandbox-id": "x"}, all, Pod{}, nil},
		{"machine", map[string]string{Machine: "q35"}, all, Pod{Machine: "q35"}, nil},
		{"bad value", map[string]string{Machine: "pc"}, all, Pod{}, []string{Machine, `"pc"`}},
		{"unknown key", map[string]string{Prefix + "kernel-cmdline": "init=/bin/sh"}, all, Pod{}, []string{"vmpod.dev/kernel-cmdline: unknown"}},
		{"not allowed", map[string]string{SharedFS: "9p"}, []string{Machine}, Pod{}, []string{SharedFS, "not allowed"}},
		{"every problem reported", map[string]string{Machine: "pc", Prefix + "qemu-args": "-x"}, all, Pod{}, []string{Machine, "qemu-args"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Parse(tc.in, tc.allowed)
			if len(tc.errs) == 0 {
				if err != nil || got != tc.want {
					t.Fatalf("got %+v, %v; want %+v", got, err, tc.want)
				}
				return
			}
			if err == nil {
				t.Fatalf("no error for %v", tc.in)
			}
			for _, want := range tc.errs {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q lacks %q", err, want)
				}
			}
		})
	}
}

// FuzzParse: any annotations, whatever the node allows: no panic, and what is accepted
// is what the keys' checks accept (a VM document is api/vmspec's to judge).
func FuzzParse(f *testing.F) {
	f.Add(Machine, "q35", SharedFS, "virtio-fs", true)
	f.Add(Machine, "pc", "vmpod.dev/kernel", "/boot/vmlinuz", true)
	f.Add(SharedFS, "", VM, "{}", false)
	f.Fuzz(func(t *testing.T, k1, v1, k2, v2 string, allowAll bool) {
		allowed := []string{Machine}
		if allowAll {
			allowed = Known()
		}
		pod, err := Parse(map[string]string{k1: v1, k2: v2, "other.io/key": "anything"}, allowed)
		if err != nil {
			return
		}
		if pod.Machine != "" && pod.Machine.Check() != nil {
			t.Fatalf("accepted machine %q", pod.Machine)
		}
		if pod.SharedFS != "" && (pod.SharedFS.Check() != nil || pod.SharedFS == machine.NoSharedFS) {
			t.Fatalf("accepted shared fs %q", pod.SharedFS)
		}
		for _, k := range []string{k1, k2} {
			if strings.HasPrefix(k, Prefix) && !slices.Contains(allowed, k) {
				t.Fatalf("accepted %s, which the node does not allow", k)
			}
		}
	})
}
