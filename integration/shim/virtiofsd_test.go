package shim_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/vmpod/vmpod/integration/testenv"
	"github.com/vmpod/vmpod/runtime/vmm"
	"github.com/vmpod/vmpod/runtime/vmuser"
)

// TestVirtiofsdIsNoUserOfTheHost: a pod's virtiofsd runs as root of a user namespace whose
// ids are a host range of its own (docs/design/025): no uid or group of the host's, while
// the guest still sees the image's owners, and what it writes, through the rootfs or a
// volume, lands on disk with the owners the guest gave it.
func TestVirtiofsdIsNoUserOfTheHost(t *testing.T) {
	testenv.RequireTestbed(t)
	vol := t.TempDir()
	if err := os.Chmod(vol, 0o777); err != nil {
		t.Fatal(err)
	}
	pod := testenv.RunPod(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: "virtiofsd-user"}})
	mounts := []testenv.Mount{{ContainerPath: "/data", HostPath: vol}}
	root := pod.Container(testenv.ContainerConfig{
		Metadata: testenv.Metadata{Name: "as-root"}, Mounts: mounts,
		Command: sh(`stat -c 'passwd %u:%g' /etc/passwd; echo x > /etc/made && chown 1000:1000 /etc/made && stat -c 'made %u:%g' /etc/made; ` +
			`echo r > /data/by-root; echo root-done; sleep 1000`),
	})
	waitLog(t, root, "root-done")
	user := pod.Container(testenv.ContainerConfig{
		Metadata: testenv.Metadata{Name: "as-1000"}, Mounts: mounts,
		Command: sh(`echo u > /data/by-1000 && echo user-done; sleep 1000`),
		Linux:   map[string]any{"security_context": map[string]any{"run_as_user": map[string]any{"value": 1000}, "run_as_group": map[string]any{"value": 1000}}},
	})
	waitLog(t, user, "user-done")
	log := waitLog(t, root, "root-done")
	for _, want := range []string{"passwd 0:0", "made 1000:1000"} {
		if !strings.Contains(log, want) {
			t.Errorf("the guest's view of its rootfs: want %q in\n%s", want, log)
		}
	}
	for name, want := range map[string]uint32{"by-root": 0, "by-1000": 1000} {
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join(vol, name), &st); err != nil {
			t.Fatal(err)
		}
		if st.Uid != want || st.Gid != want {
			t.Errorf("%s on the host's disk: owner %d:%d, want %d:%d", name, st.Uid, st.Gid, want, want)
		}
	}

	pid := vmm.VirtiofsdOf(testenv.PodStateDir(t, pod.ID))
	if pid <= 0 {
		t.Fatal("no virtiofsd recorded for the pod")
	}
	// virtiofsd and the child it serves from (its sandbox forks one)
	pids := []string{fmt.Sprint(pid)}
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid)); err == nil {
		pids = append(pids, strings.Fields(string(b))...)
	}
	first, last := uint64(vmuser.DefaultOwnersFirst), uint64(vmuser.DefaultOwnersFirst+vmuser.DefaultOwnersCount)
	for _, p := range pids {
		status, err := os.ReadFile("/proc/" + p + "/status")
		if err != nil {
			t.Fatal(err)
		}
		for l := range strings.Lines(string(status)) {
			key, ids, _ := strings.Cut(l, ":")
			switch key {
			case "Uid", "Gid":
				for _, f := range strings.Fields(ids) {
					var id uint64
					fmt.Sscan(f, &id)
					if id < first || id >= last {
						t.Errorf("virtiofsd %s: %s %s: not in the file-owner ranges %#x..%#x", p, key, strings.TrimSpace(ids), first, last)
						break
					}
				}
			case "Groups":
				if strings.TrimSpace(ids) != "" {
					t.Errorf("virtiofsd %s: supplementary groups %s", p, strings.TrimSpace(ids))
				}
			}
		}
		uidMap, err := os.ReadFile("/proc/" + p + "/uid_map")
		if err != nil {
			t.Fatal(err)
		}
		if f := strings.Fields(string(uidMap)); len(f) != 3 || f[0] != "0" || f[2] != "65536" {
			t.Errorf("virtiofsd %s: uid_map %q, want 0 <its range> 65536", p, uidMap)
		}
	}
	t.Logf("virtiofsd %v: uid_map %s", pids, strings.TrimSpace(func() string { b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/uid_map", pid)); return string(b) }()))

	// What virtiofsd's host uid may reach: its own pod's shared directory (the control),
	// not another pod's, nor another pod's state.
	other := testenv.RunPod(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: "virtiofsd-other"}})
	other.Container(testenv.ContainerConfig{Metadata: testenv.Metadata{Name: "idle"}, Command: sh("sleep 1000")})
	otherState := testenv.PodStateDir(t, other.ID)
	otherPid := vmm.VirtiofsdOf(otherState)
	if otherPid <= 0 {
		t.Fatal("no virtiofsd recorded for the second pod")
	}
	uid := statusID(t, pid, "Uid")
	if other := statusID(t, otherPid, "Uid"); other == uid {
		t.Fatalf("two pods' virtiofsd run as one uid %d", uid)
	}
	if code, out := testenv.AsUserOf(t, pid, "ls "+sourceOf(t, pid)); code != 0 {
		t.Errorf("uid %d cannot list its own pod's shared directory (the control): exit %d: %s", uid, code, out)
	}
	for _, path := range []string{sourceOf(t, otherPid), filepath.Join(otherState, "vm.log"), otherState} {
		if code, _ := testenv.AsUserOf(t, pid, "ls "+path); code == 0 {
			t.Errorf("virtiofsd's uid %d lists %s, of another pod", uid, path)
		}
	}
}

// TestPrivilegedPodsVirtiofsdIsRoot: a privileged pod's virtiofsd stays root, so that host
// mounts propagated into its volumes (not ID-mapped) reach its guest (docs/design/025).
func TestPrivilegedPodsVirtiofsdIsRoot(t *testing.T) {
	testenv.RequireTestbed(t)
	pod := testenv.RunPod(t, testenv.PodConfig{
		Metadata: testenv.Metadata{Name: "virtiofsd-privileged"},
		Linux:    map[string]any{"security_context": map[string]any{"privileged": true}},
	})
	pod.Container(testenv.ContainerConfig{
		Metadata: testenv.Metadata{Name: "idle"}, Command: sh("sleep 1000"),
		Linux: map[string]any{"security_context": map[string]any{"privileged": true}},
	})
	pid := vmm.VirtiofsdOf(testenv.PodStateDir(t, pod.ID))
	if pid <= 0 {
		t.Fatal("no virtiofsd recorded for the pod")
	}
	if uid := statusID(t, pid, "Uid"); uid != 0 {
		t.Errorf("a privileged pod's virtiofsd runs as %d, want root", uid)
	}
}

// TestUsernsPodsVirtiofsdMapsThePodsIDs: a pod with a user namespace of its own has its
// files owned by its host ids already; its virtiofsd's namespace maps those onto
// themselves and only its root onto a range of its own (docs/design/025).
func TestUsernsPodsVirtiofsdMapsThePodsIDs(t *testing.T) {
	testenv.RequireTestbed(t)
	const host = 0x60000000 // the pod's host ids: a range nothing else on the test bed uses
	ids := []map[string]any{{"host_id": host, "container_id": 0, "length": 65536}}
	pod := testenv.RunPod(t, testenv.PodConfig{
		Metadata: testenv.Metadata{Name: "virtiofsd-userns"},
		Linux: map[string]any{"security_context": map[string]any{"namespace_options": map[string]any{
			"userns_options": map[string]any{"mode": 0, "uids": ids, "gids": ids}, // mode POD
		}}},
	})
	pid := vmm.VirtiofsdOf(testenv.PodStateDir(t, pod.ID))
	if pid <= 0 {
		t.Fatal("no virtiofsd recorded for the pod")
	}
	uid := statusID(t, pid, "Uid")
	if uid < vmuser.DefaultOwnersFirst || uid >= vmuser.DefaultOwnersFirst+vmuser.DefaultOwnersCount {
		t.Errorf("virtiofsd runs as %d, not a uid of the file-owner ranges", uid)
	}
	for _, file := range []string{"uid_map", "gid_map"} {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/%s", pid, file))
		if err != nil {
			t.Fatal(err)
		}
		got := strings.Join(strings.Fields(string(b)), " ")
		if want := fmt.Sprintf("0 %d 1 %d %d 65536", uid, host, host); got != want {
			t.Errorf("virtiofsd's %s: %q, want %q (its root on its range, the pod's ids onto themselves)", file, got, want)
		}
	}
}

// statusID is the real id of key (Uid, Gid) in a process's status.
func statusID(t *testing.T, pid int, key string) uint32 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for l := range strings.Lines(string(b)) {
		if ids, ok := strings.CutPrefix(l, key+":"); ok {
			var id uint32
			if _, err := fmt.Sscan(ids, &id); err != nil {
				t.Fatal(err)
			}
			return id
		}
	}
	t.Fatalf("process %d: no %s", pid, key)
	return 0
}

// sourceOf is the directory a virtiofsd serves, from its command line.
func sourceOf(t *testing.T, pid int) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, arg := range strings.Split(string(b), "\x00") {
		if dir, ok := strings.CutPrefix(arg, "source="); ok {
			return dir
		}
	}
	t.Fatalf("virtiofsd %d: no source= on its command line %q", pid, b)
	return ""
}
