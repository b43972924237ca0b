package agent

import (
	"path/filepath"
	"testing"

	"github.com/containerd/errdefs"
)

// FuzzGuestProcess: an exec's process as the host sends it (agent message bytes): parsed
// into something runc can run, or refused as invalid naming the field; never a panic.
// (guestSpec is not fuzzed here: it applies net.* sysctls to the machine it runs on.)
func FuzzGuestProcess(f *testing.F) {
	for _, s := range []string{
		`{"args": ["sh"], "cwd": "/"}`, `{"args": [], "cwd": "/"}`, `{"args": ["x"], "cwd": "rel"}`,
		`{"args": ["x"], "cwd": "/", "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 2, "hard": 1}]}`,
		`{"args": ["x"], "cwd": "/", "apparmorProfile": "p", "selinuxLabel": "l"}`, `null`, `[]`, `{"args": 7}`,
	} {
		f.Add([]byte(s), "exec-1")
	}
	f.Fuzz(func(t *testing.T, raw []byte, execID string) {
		if err := checkID("exec_id", execID); err != nil && !errdefs.IsInvalidArgument(err) {
			t.Fatalf("checkID(%q): %v is not InvalidArgument", execID, err)
		}
		p, err := guestProcess(raw)
		if err != nil {
			if !errdefs.IsInvalidArgument(err) {
				t.Fatalf("refusal %v is not InvalidArgument", err)
			}
			return
		}
		if len(p.Args) == 0 && p.CommandLine == "" || !filepath.IsAbs(p.Cwd) || p.ApparmorProfile != "" || p.SelinuxLabel != "" {
			t.Fatalf("accepted a process runc cannot run as is: %+v", p)
		}
		for _, rl := range p.Rlimits {
			if rl.Soft > rl.Hard {
				t.Fatalf("accepted rlimit %+v", rl)
			}
		}
	})
}
