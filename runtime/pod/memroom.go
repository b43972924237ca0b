package pod

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
)

// migrationMemoryMargin is what a migrating QEMU may grow by beyond the guest's RAM it
// reads: its stream buffers, the dirty bitmaps, TCG's code cache filling up.
const migrationMemoryMargin = 48 << 20

// memoryRoom is what a migration needs of the source QEMU's memory cgroup, and how much
// room the tightest of it and its ancestors has (room < 0: no limit). QEMU reads every
// page of the guest's RAM to send it, and the guest's RAM is a shared memory file (for
// virtio-fs): a page the guest never touched is allocated when read, and charged to
// QEMU's cgroup. A container pod's guest is larger than its memory limit (it boots at
// the node's default size and keeps resident only what it touches), so without this
// check the kubelet's limit killed QEMU half-way through its first migration in the
// test cluster (docs/design/212). The guest's balloon hints its free pages to the
// migration, which then neither reads nor sends them (docs/design/213), but the hints
// race the stream and a guest may not take them: the check keeps the worst case.
type memoryRoom struct {
	guest, resident, room int64
	cgroup                string // the tightest cgroup's path
}

// readMemoryRoom reads, for the QEMU of pid whose guest has guestBytes of RAM, what it
// holds of it (its resident shared memory) and its cgroups' room, under procRoot and
// cgroupRoot: cgroup v2, or v1's memory hierarchy (this project's CI machines).
func readMemoryRoom(procRoot, cgroupRoot string, pid int, guestBytes int64) (memoryRoom, error) {
	r := memoryRoom{guest: guestBytes, room: -1}
	status, err := os.ReadFile(filepath.Join(procRoot, strconv.Itoa(pid), "status"))
	if err != nil {
		return r, fmt.Errorf("QEMU's memory: %w", err)
	}
	kib, err := statusField(status, "RssShmem:")
	if err != nil {
		return r, fmt.Errorf("QEMU's memory: %s/%d/status: %w", procRoot, pid, err)
	}
	r.resident = kib << 10
	cg, err := os.ReadFile(filepath.Join(procRoot, strconv.Itoa(pid), "cgroup"))
	if err != nil {
		return r, fmt.Errorf("QEMU's cgroup: %w", err)
	}
	h, err := memoryHierarchy(string(cg))
	if err != nil {
		return r, fmt.Errorf("QEMU's cgroup: %w", err)
	}
	if _, err := os.Stat(filepath.Join(cgroupRoot, h.mount, h.path)); err != nil {
		return r, fmt.Errorf("QEMU's cgroup: %w", err) // not this host's view: no limit would be found
	}
	for dir := h.path; ; dir = filepath.Dir(dir) {
		max, err := os.ReadFile(filepath.Join(cgroupRoot, h.mount, dir, h.limit))
		if os.IsNotExist(err) { // the root, or no memory controller at this level
			if dir == "/" {
				break
			}
			continue
		}
		if err != nil {
			return r, fmt.Errorf("cgroup %s: %w", dir, err)
		}
		if limit := strings.TrimSpace(string(max)); !h.unlimited(limit) {
			cur, err := os.ReadFile(filepath.Join(cgroupRoot, h.mount, dir, h.usage))
			if err != nil {
				return r, fmt.Errorf("cgroup %s: %w", dir, err)
			}
			l, err1 := strconv.ParseInt(limit, 10, 64)
			c, err2 := strconv.ParseInt(strings.TrimSpace(string(cur)), 10, 64)
			if err1 != nil || err2 != nil {
				return r, fmt.Errorf("cgroup %s: %s %q, %s %q: not numbers", dir, h.limit, limit, h.usage, strings.TrimSpace(string(cur)))
			}
			// the page cache the kernel reclaims before it kills (the kubelet's working
			// set leaves it out too)
			stat, err := os.ReadFile(filepath.Join(cgroupRoot, h.mount, dir, "memory.stat"))
			if err != nil {
				return r, fmt.Errorf("cgroup %s: %w", dir, err)
			}
			if inactive, err := statField(stat, h.inactiveFile); err == nil {
				c -= inactive
			}
			if room := max0(l - c); r.room < 0 || room < r.room {
				r.room, r.cgroup = room, dir
			}
		}
		if dir == "/" {
			break
		}
	}
	return r, nil
}

func max0(n int64) int64 { return max(n, 0) }

// hierarchy is where a process's memory cgroup is: the path within the hierarchy, the
// hierarchy's mount under the cgroup root, and its files for the limit and the usage.
type hierarchy struct{ path, mount, limit, usage, inactiveFile string }

// unlimited says whether a limit file's value is no limit: v2's "max", v1's page counter
// maximum (rounded to pages: 9223372036854771712 with 4 KiB pages).
func (h hierarchy) unlimited(v string) bool {
	if v == "max" {
		return true
	}
	n, err := strconv.ParseInt(v, 10, 64)
	return err == nil && n >= 1<<62
}

// memoryHierarchy reads a /proc/<pid>/cgroup: v1's memory controller line when there is
// one (a hybrid host has both), else the v2 line.
func memoryHierarchy(cg string) (hierarchy, error) {
	var v2 string
	for _, line := range strings.Split(strings.TrimSpace(cg), "\n") {
		f := strings.SplitN(line, ":", 3)
		if len(f) != 3 || !strings.HasPrefix(f[2], "/") {
			return hierarchy{}, fmt.Errorf("line %q is no cgroup", line)
		}
		if f[0] == "0" && f[1] == "" {
			v2 = f[2]
		} else if slices.Contains(strings.Split(f[1], ","), "memory") {
			return hierarchy{path: filepath.Clean(f[2]), mount: "memory", limit: "memory.limit_in_bytes", usage: "memory.usage_in_bytes", inactiveFile: "total_inactive_file"}, nil
		}
	}
	if v2 == "" {
		return hierarchy{}, fmt.Errorf("%q names no memory cgroup", cg)
	}
	return hierarchy{path: filepath.Clean(v2), limit: "memory.max", usage: "memory.current", inactiveFile: "inactive_file"}, nil
}

// statusField is the number of kB a /proc/<pid>/status line gives.
func statusField(status []byte, name string) (int64, error) {
	sc := bufio.NewScanner(bytes.NewReader(status))
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), name)
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) != 2 || f[1] != "kB" {
			return 0, fmt.Errorf("%s %q", name, rest)
		}
		return strconv.ParseInt(f[0], 10, 64)
	}
	return 0, fmt.Errorf("no %s line", name)
}

// statField is a memory.stat line's value.
func statField(stat []byte, name string) (int64, error) {
	for _, line := range strings.Split(string(stat), "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			return strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		}
	}
	return 0, fmt.Errorf("no %s", name)
}

// check refuses a migration the cgroup cannot hold, naming what it would need.
func (r memoryRoom) check() error {
	need := max0(r.guest-r.resident) + migrationMemoryMargin
	if r.room < 0 || need <= r.room {
		return nil
	}
	return fmt.Errorf("the migration may read all %d MiB of the guest's RAM, %d MiB of it not in memory yet, and the pod's memory cgroup (%s) has room for %d MiB more of the %d MiB it needs with QEMU's own growth: "+
		"the pod's memory limit (its containers' limits and the RuntimeClass overhead) must hold the guest's RAM and QEMU (give its containers %d MiB more): %w",
		r.guest>>20, max0(r.guest-r.resident)>>20, r.cgroup, r.room>>20, need>>20, (need-r.room+(1<<20)-1)>>20, errdefs.ErrFailedPrecondition)
}
