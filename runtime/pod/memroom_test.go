package pod

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
)

// The room a migration needs is the guest's RAM not yet resident plus QEMU's growth; the
// tightest limited cgroup from QEMU's up gives the room, and a cgroup tree with no limit
// has room for anything.
func TestMigrationMemoryRoom(t *testing.T) {
	root := t.TempDir()
	proc, cg := filepath.Join(root, "proc"), filepath.Join(root, "cgroup")
	write := func(path, content string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(filepath.Join(proc, "42", "status"), "Name:\tqemu\nRssAnon:\t  92204 kB\nRssShmem:\t  102400 kB\n")
	write(filepath.Join(proc, "42", "cgroup"), "0::/kubepods/burstable/pod1/sandbox\n")
	const mib = 1 << 20
	// the pod: 384 MiB, 270 in use of which 20 reclaimable; burstable: 2 GiB, 1 GiB in use; kubepods: no limit;
	// the sandbox's cgroup has no memory.max of its own here
	write(filepath.Join(cg, "kubepods/burstable/pod1/memory.max"), "402653184\n")
	write(filepath.Join(cg, "kubepods/burstable/pod1/memory.current"), "283115520\n")
	write(filepath.Join(cg, "kubepods/burstable/pod1/memory.stat"), "anon 1\nfile 30000000\ninactive_file 20971520\nactive_file 1\n") // 20 MiB reclaimable
	write(filepath.Join(cg, "kubepods/burstable/memory.stat"), "inactive_file 0\n")
	write(filepath.Join(cg, "kubepods/burstable/memory.max"), "2147483648\n")
	write(filepath.Join(cg, "kubepods/burstable/memory.current"), "1073741824\n")
	write(filepath.Join(cg, "kubepods/memory.max"), "max\n")
	if err := os.MkdirAll(filepath.Join(cg, "kubepods/burstable/pod1/sandbox"), 0o755); err != nil {
		t.Fatal(err)
	}

	r, err := readMemoryRoom(proc, cg, 42, 512*mib)
	if err != nil {
		t.Fatal(err)
	}
	if r.resident != 100*mib || r.room != 134*mib || r.cgroup != "/kubepods/burstable/pod1" {
		t.Fatalf("room %+v: want 100 MiB resident, 134 MiB of room in /kubepods/burstable/pod1", r)
	}
	// 412 MiB to read + 48 of growth, 134 of room: refused, naming the numbers
	err = r.check()
	if !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "all 512 MiB") || !strings.Contains(err.Error(), "give its containers 326 MiB more") {
		t.Errorf("check: %v", err)
	}
	// a guest mostly resident fits
	if err := (memoryRoom{guest: 200 * mib, resident: 120 * mib, room: 134 * mib}).check(); err != nil {
		t.Errorf("80 MiB to read, 134 of room: %v", err)
	}
	// no limit anywhere
	write(filepath.Join(cg, "kubepods/burstable/pod1/memory.max"), "max\n")
	write(filepath.Join(cg, "kubepods/burstable/memory.max"), "max\n")
	if r, err := readMemoryRoom(proc, cg, 42, 512*mib); err != nil || r.room >= 0 || r.check() != nil {
		t.Errorf("no limits: %+v, %v", r, err)
	}
	// cgroup v1 (a hybrid host: the v2 line names the root): its memory hierarchy's files,
	// its page counter's maximum no limit
	write(filepath.Join(proc, "46", "status"), "RssShmem:\t0 kB\n")
	write(filepath.Join(proc, "46", "cgroup"), "9:name=systemd:/\n4:memory:/n1/kubepods/pod2/sandbox\n3:cpu,cpuacct:/n1/kubepods/pod2/sandbox\n0::/\n")
	write(filepath.Join(cg, "memory/n1/kubepods/pod2/sandbox/memory.limit_in_bytes"), "9223372036854771712\n")
	write(filepath.Join(cg, "memory/n1/kubepods/pod2/sandbox/memory.usage_in_bytes"), "1000\n")
	write(filepath.Join(cg, "memory/n1/kubepods/pod2/memory.limit_in_bytes"), "536870912\n")
	write(filepath.Join(cg, "memory/n1/kubepods/pod2/memory.usage_in_bytes"), "219152384\n")
	write(filepath.Join(cg, "memory/n1/kubepods/pod2/memory.stat"), "inactive_file 1\ntotal_inactive_file 9437184\n") // 9 MiB
	write(filepath.Join(cg, "memory/n1/kubepods/pod2/sandbox/memory.stat"), "")
	write(filepath.Join(cg, "memory/memory.limit_in_bytes"), "9223372036854771712\n")
	write(filepath.Join(cg, "memory/memory.usage_in_bytes"), "1\n")
	if r, err := readMemoryRoom(proc, cg, 46, 512*mib); err != nil || r.room != 312*mib || r.cgroup != "/n1/kubepods/pod2" {
		t.Errorf("cgroup v1: %+v, %v; want 312 MiB of room in /n1/kubepods/pod2", r, err)
	}
	// a cgroup this host does not see (another cgroup namespace): an error, not "no limit"
	write(filepath.Join(proc, "47", "status"), "RssShmem:\t0 kB\n")
	write(filepath.Join(proc, "47", "cgroup"), "0::/elsewhere/pod3\n")
	if _, err := readMemoryRoom(proc, cg, 47, mib); err == nil || !strings.Contains(err.Error(), "no such file") {
		t.Errorf("a cgroup not under the root: %v", err)
	}
	// what is not a cgroup process, or a status without the line
	write(filepath.Join(proc, "43", "status"), "Name:\tqemu\n")
	write(filepath.Join(proc, "43", "cgroup"), "0::/x\n")
	write(filepath.Join(proc, "44", "status"), "RssShmem:\t1 kB\n")
	write(filepath.Join(proc, "44", "cgroup"), "1:cpu:/x\n")
	for pid, want := range map[int]string{43: "no RssShmem: line", 44: "names no memory cgroup", 45: "no such file"} {
		if _, err := readMemoryRoom(proc, cg, pid, mib); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("pid %d: %v, want %q", pid, err, want)
		}
	}
}
