package machine

import (
	"strings"
	"testing"
)

func TestCheck(t *testing.T) {
	for _, ok := range []interface{ Check() error }{Q35, MicroVM, AccelAuto, KVM, TCG, VirtioFS, NineP, NoSharedFS} {
		if err := ok.Check(); err != nil {
			t.Errorf("%v: %v", ok, err)
		}
	}
	for _, c := range []struct {
		v    interface{ Check() error }
		want string
	}{
		{Type("pc-i440fx"), `"pc-i440fx": want one of microvm, q35`},
		{Accel("hvf"), `"hvf": want one of auto, kvm, tcg`},
		{SharedFS("nfs"), `"nfs": want one of virtio-fs, 9p, none`},
		{Type(""), `"": want one of`},
	} {
		err := c.v.Check()
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v: got %v, want %q", c.v, err, c.want)
		}
	}
}
