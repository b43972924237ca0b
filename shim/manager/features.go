package manager

import (
	_ "embed"
	"encoding/json"
	"fmt"

	_ "github.com/containerd/containerd/v2/core/runtime" // registers features.Features with typeurl
	"github.com/opencontainers/runtime-spec/specs-go/features"
)

// runcFeatures is `runc features` of the guest's runc (hack/runtime-features.sh).
//
//go:embed runc-features.json
var runcFeatures []byte

// runtimeFeatures is what containerd's runtime introspection learns about vmpod: the guest
// runc's features, less what the VM takes away. containerd's CRI derives handler features
// from it (recursive read-only mounts, user namespaces).
func runtimeFeatures() (*features.Features, error) {
	var f features.Features
	if err := json.Unmarshal(runcFeatures, &f); err != nil {
		return nil, fmt.Errorf("embedded runc features: %w", err)
	}
	// Hooks name host binaries, which the guest does not have: the agent drops them.
	f.Hooks = nil
	if l := f.Linux; l != nil {
		no, yes := false, true
		// The guest mounts cgroup v2 only, with cgroupfs paths the agent chooses.
		l.Cgroup = &features.Cgroup{V1: &no, V2: &yes, Systemd: &no, SystemdUser: &no}
		// The guest kernel has no LSM: the agent drops AppArmor profiles and SELinux labels.
		l.Apparmor = &features.Apparmor{Enabled: &no}
		l.Selinux = &features.Selinux{Enabled: &no}
		l.IntelRdt = &features.IntelRdt{Enabled: &no}
	}
	return &f, nil
}
