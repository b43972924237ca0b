package manager

import (
	"slices"
	"testing"
)

// What containerd's CRI derives handler features from, and what the VM takes away.
func TestRuntimeFeatures(t *testing.T) {
	f, err := runtimeFeatures()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(f.MountOptions, "rro") {
		t.Error("no rro: CRI would turn recursive read-only mounts off")
	}
	if !slices.Contains(f.Linux.Namespaces, "user") || f.Linux.MountExtensions == nil || f.Linux.MountExtensions.IDMap == nil ||
		f.Linux.MountExtensions.IDMap.Enabled == nil || !*f.Linux.MountExtensions.IDMap.Enabled {
		t.Error("user namespaces with idmap not reported: CRI would turn user namespaces off")
	}
	if len(f.Hooks) != 0 {
		t.Errorf("hooks %v reported, but the agent drops them", f.Hooks)
	}
	if *f.Linux.Cgroup.V1 || !*f.Linux.Cgroup.V2 || *f.Linux.Cgroup.Systemd {
		t.Errorf("cgroup %+v, want v2 only without systemd", f.Linux.Cgroup)
	}
	if *f.Linux.Apparmor.Enabled || *f.Linux.Selinux.Enabled {
		t.Error("an LSM reported, but the guest kernel has none")
	}
}
