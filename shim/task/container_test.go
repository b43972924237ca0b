package task

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
)

func TestLoadSpecRejectsBadBundles(t *testing.T) {
	cases := map[string]struct{ config, want string }{
		"no command": {`{"ociVersion":"1.2.0","process":{"cwd":"/"},"root":{"path":"rootfs"}}`, "process.args"},
		"no process": {`{"ociVersion":"1.2.0","root":{"path":"rootfs"}}`, "process.args"},
		"not JSON":   {`{`, "config.json"},
		"no bundle":  {"", "config.json"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			if tc.config != "" {
				if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(tc.config), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			_, err := loadSpec(dir)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error naming %q", err, tc.want)
			}
			if tc.config != "" && !errdefs.IsInvalidArgument(err) {
				t.Errorf("%v is not InvalidArgument", err)
			}
		})
	}
}

func TestStateMachineRejectsBadMoves(t *testing.T) {
	moves := []struct {
		from, to state
		ok       bool
	}{
		{stateCreated, stateRunning, true},
		{stateRunning, statePaused, true},
		{statePaused, stateRunning, true},
		{stateRunning, stateStopped, true},
		{stateStopped, stateDeleted, true},
		{stateCreated, stateDeleted, true},
		{stateRunning, stateDeleted, false}, // delete a running task: containerd must kill first
		{stateStopped, stateRunning, false},
		{stateDeleted, stateRunning, false},
		{stateCreated, statePaused, false},
	}
	for _, m := range moves {
		_, err := m.from.next(m.to, "test")
		if (err == nil) != m.ok {
			t.Errorf("%s → %s: err %v, want ok=%v", m.from, m.to, err, m.ok)
		}
		if err != nil && !errdefs.IsFailedPrecondition(err) {
			t.Errorf("%s → %s: %v is not FailedPrecondition", m.from, m.to, err)
		}
	}
}
