package runtime

import "testing"

func TestResolveAccel(t *testing.T) {
	vmx := map[string]bool{"vmx": true}
	none := map[string]bool{}
	cases := []struct {
		name    string
		want    Accel
		host    hostCPU
		got     Accel
		wantErr bool
	}{
		{"auto on a KVM host", AccelAuto, hostCPU{kvmOpens: true, flags: vmx}, AccelKVM, false},
		{"auto with /dev/kvm but no vmx/svm (PVM)", AccelAuto, hostCPU{kvmOpens: true, flags: none}, AccelTCG, false},
		{"auto without /dev/kvm", AccelAuto, hostCPU{flags: vmx}, AccelTCG, false},
		{"tcg forced on a KVM host", AccelTCG, hostCPU{kvmOpens: true, flags: vmx}, AccelTCG, false},
		{"kvm forced without /dev/kvm", AccelKVM, hostCPU{}, "", true},
		{"kvm forced with /dev/kvm", AccelKVM, hostCPU{kvmOpens: true}, AccelKVM, false},
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
