package vmm

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/containerd/cgroups/v3/cgroup2"
	cgroupsv2 "github.com/containerd/cgroups/v3/cgroup2/stats"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

const cgroupRoot = "/sys/fs/cgroup"

// podCgroup is the cgroup the machine's host processes (QEMU, virtiofsd) run in: the
// pod's, so the kubelet's limits (the pod's limits plus the RuntimeClass overhead, set on
// the pod cgroup above it) hold QEMU too, and the pod's memory use includes the VM's.
type podCgroup struct {
	path    string // below the hierarchy's root, cgroupfs form
	created bool   // Start made it: the teardown removes it
	v1      cgroup1.Cgroup
	v2      *cgroup2.Manager
	dirFD   *os.File // cgroup v2: the directory, for CLONE_INTO_CGROUP
}

// cgroupfsPath turns an OCI linux.cgroupsPath into a path below the cgroup root: a
// cgroupfs path as it is; a systemd "slice:prefix:name" triple the way systemd lays it out
// (kubepods-burstable-pod1.slice:cri-containerd:abc → /kubepods.slice/
// kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-abc.scope).
// vmpod makes the directory itself instead of asking systemd for a scope over D-Bus, as
// runc would: the unit is then unknown to systemd, which leaves it alone.
func cgroupfsPath(p string) (string, error) {
	if !strings.Contains(p, ":") {
		if !filepath.IsAbs(p) || filepath.Clean(p) != p || p == "/" {
			return "", fmt.Errorf("cgroup %q: want an absolute, clean path below the root", p)
		}
		return p, nil
	}
	parts := strings.Split(p, ":")
	if len(parts) != 3 || !strings.HasSuffix(parts[0], ".slice") || parts[2] == "" || strings.ContainsAny(parts[0]+parts[1]+parts[2], "/") {
		return "", fmt.Errorf("cgroup %q: want a cgroupfs path or systemd's slice:prefix:name", p)
	}
	slice := strings.TrimSuffix(parts[0], ".slice")
	dir := "/"
	if slice != "-" {
		prefix := ""
		for _, comp := range strings.Split(slice, "-") {
			if comp == "" {
				return "", fmt.Errorf("cgroup %q: slice %q has an empty component", p, parts[0])
			}
			prefix += comp
			dir = filepath.Join(dir, prefix+".slice")
			prefix += "-"
		}
	}
	unit := parts[2]
	if parts[1] != "" {
		unit = parts[1] + "-" + unit
	}
	if !strings.HasSuffix(unit, ".slice") {
		unit += ".scope"
	}
	return filepath.Join(dir, unit), nil
}

// CheckCgroupPath reports whether p is a cgroup Config.Cgroup can name.
func CheckCgroupPath(p string) error {
	_, err := cgroupfsPath(p)
	return err
}

// MakeCgroup makes the cgroup at path (a Config.Cgroup value) unless it exists, and
// leaves it there: a machine started in it finds it made and does not remove it at its
// teardown, and what its processes charged to it — a template's RAM file in tmpfs — stays
// charged to it after they end.
func MakeCgroup(path string) error {
	c, err := openPodCgroup(path)
	if err != nil {
		return err
	}
	if c.dirFD != nil {
		_ = c.dirFD.Close()
	}
	return nil
}

// openPodCgroup makes (or finds) the cgroup at path, cgroup v1 or v2.
func openPodCgroup(path string) (*podCgroup, error) {
	p, err := cgroupfsPath(path)
	if err != nil {
		return nil, err
	}
	c := &podCgroup{path: p}
	switch cgroups.Mode() {
	case cgroups.Unified:
		_, statErr := os.Stat(filepath.Join(cgroupRoot, p))
		c.created = errors.Is(statErr, os.ErrNotExist)
		if c.v2, err = cgroup2.NewManager(cgroupRoot, p, &cgroup2.Resources{}); err != nil {
			return nil, fmt.Errorf("cgroup %s: %w", p, err)
		}
		if c.dirFD, err = os.Open(filepath.Join(cgroupRoot, p)); err != nil {
			_ = c.remove()
			return nil, fmt.Errorf("cgroup %s: %w", p, err)
		}
	case cgroups.Legacy, cgroups.Hybrid:
		_, statErr := os.Stat(filepath.Join(cgroupRoot, "memory", p))
		c.created = errors.Is(statErr, os.ErrNotExist)
		if c.v1, err = cgroup1.New(cgroup1.StaticPath(p), &specs.LinuxResources{}); err != nil {
			return nil, fmt.Errorf("cgroup %s: %w", p, err)
		}
		// cgroup v1 moves a process without its memory charges, and QEMU runs a moment
		// before it is moved (see cloneInto): charges come along with this set.
		_ = os.WriteFile(filepath.Join(cgroupRoot, "memory", p, "memory.move_charge_at_immigrate"), []byte("3"), 0)
	default:
		return nil, errors.New("cgroup: no cgroup hierarchy mounted at " + cgroupRoot)
	}
	return c, nil
}

// cloneInto starts a process directly in the cgroup where the kernel can (cgroup v2,
// CLONE_INTO_CGROUP); on cgroup v1 it is moved right after it started (add).
// A nil c leaves attr as it is.
func (c *podCgroup) cloneInto(attr *syscall.SysProcAttr) {
	if c != nil && c.dirFD != nil {
		attr.UseCgroupFD, attr.CgroupFD = true, int(c.dirFD.Fd())
	}
}

// add moves pid into the cgroup (a no-op for a process cloned into it).
func (c *podCgroup) add(pid int) error {
	var err error
	switch {
	case c.v1 != nil:
		err = c.v1.AddProc(uint64(pid))
	case c.v2 != nil:
		err = c.v2.AddProc(uint64(pid))
	}
	if err != nil {
		return fmt.Errorf("cgroup %s: add pid %d: %w", c.path, pid, err)
	}
	return nil
}

// remove deletes the cgroup if Start made it (its processes are gone by then).
func (c *podCgroup) remove() error {
	if c.dirFD != nil {
		_ = c.dirFD.Close()
	}
	if !c.created {
		return nil
	}
	var err error
	switch {
	case c.v1 != nil:
		err = c.v1.Delete()
	case c.v2 != nil:
		err = c.v2.Delete()
	}
	if err != nil {
		return fmt.Errorf("cgroup %s: remove: %w", c.path, err)
	}
	return nil
}

// stats are the cgroup's CPU, memory and pids figures in cgroup v2's shape (what CRI reads,
// whatever the host's version).
func (c *podCgroup) stats() (*cgroupsv2.Metrics, error) {
	if c.v2 != nil {
		return c.v2.Stat()
	}
	s, err := c.v1.Stat(cgroup1.IgnoreNotExist)
	if err != nil {
		return nil, fmt.Errorf("cgroup %s: %w", c.path, err)
	}
	m := &cgroupsv2.Metrics{}
	if u := s.GetCPU().GetUsage(); u != nil {
		m.CPU = &cgroupsv2.CPUStat{UsageUsec: u.Total / 1000, UserUsec: u.User / 1000, SystemUsec: u.Kernel / 1000}
	}
	if t := s.GetCPU().GetThrottling(); t != nil && m.CPU != nil {
		m.CPU.NrPeriods, m.CPU.NrThrottled, m.CPU.ThrottledUsec = t.Periods, t.ThrottledPeriods, t.ThrottledTime/1000
	}
	if mem := s.GetMemory(); mem != nil {
		m.Memory = &cgroupsv2.MemoryStat{Usage: mem.GetUsage().GetUsage(), UsageLimit: mem.GetUsage().GetLimit(),
			Anon: mem.RSS, File: mem.Cache, FileMapped: mem.MappedFile}
	}
	if p := s.GetPids(); p != nil {
		m.Pids = &cgroupsv2.PidsStat{Current: p.Current, Limit: p.Limit}
	}
	return m, nil
}
