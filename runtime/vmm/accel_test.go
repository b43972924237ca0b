package vmm

import (
	"testing"

	"github.com/vmpod/vmpod/api/machine"
)

func TestResolveAccel(t *testing.T) {
	vmx := map[string]bool{"vmx": true}
	none := map[string]bool{}
	cases := []struct {
		name    string
		want    machine.Accel
		host    hostCPU
		got     machine.Accel
		wantErr bool
	}{
		{"auto on a KVM host", machine.AccelAuto, hostCPU{kvmOpens: true, flags: vmx}, machine.KVM, false},
		{"auto with /dev/kvm but no vmx/svm (PVM)", machine.AccelAuto, hostCPU{kvmOpens: true, flags: none}, machine.TCG, false},
		{"auto without /dev/kvm", machine.AccelAuto, hostCPU{flags: vmx}, machine.TCG, false},
		{"tcg forced on a KVM host", machine.TCG, hostCPU{kvmOpens: true, flags: vmx}, machine.TCG, false},
		{"kvm forced without /dev/kvm", machine.KVM, hostCPU{}, "", true},
		{"kvm forced with /dev/kvm", machine.KVM, hostCPU{kvmOpens: true}, machine.KVM, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := resolveAccel(tc.want, tc.host)
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error %v", err, tc.wantErr)
			}
			if c.accel != tc.got {
				t.Fatalf("got %q, want %q (%s)", c.accel, tc.got, c.reason)
			}
		})
	}
}

func TestTSCKHz(t *testing.T) {
	if k, err := (hostCPU{mhz: 2100.0}).tscKHz(); err != nil || k != 2100000 {
		t.Fatalf("got %d, %v", k, err)
	}
	if _, err := (hostCPU{}).tscKHz(); err == nil {
		t.Fatal("no error without cpu MHz")
	}
}
