package annotations

import (
	"strings"
	"testing"
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
