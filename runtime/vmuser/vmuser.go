// Package vmuser leases host user IDs to VMs: each VM's QEMU runs as a user of its own, so
// that a guest escaping through a device model owns one unprivileged process and nothing of
// another pod (docs/design/014).
//
// A lease is an exclusive flock on <Dir>/<uid>, held by the shim alone, and a uid is
// leased only while no process runs as it: a QEMU that outlived its shim (or a process it
// left) keeps its uid from the next VM. QEMU must not hold the lock itself: a flock belongs
// to the open file, and a compromised QEMU could unlock it for everyone and have its uid
// leased to a second VM while it runs. Lock files are kept, never removed: removing one
// another leaser has opened would let two VMs take the same uid.
package vmuser

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// The node's default pool: the top 64 Ki uids of systemd's unassigned range
// 0x70000000-0x7FFDFFFF (systemd.io/UIDS-GIDS), below the sign bit some tools trip on.
const (
	DefaultDir   = "/run/vmpod/users"
	DefaultFirst = 0x7FFD0000
	DefaultCount = 0x10000
)

// The node's default pool of file-owner ranges (virtiofsd's user namespaces, docs/design/025):
// ranges of 64 Ki from the bottom of the same unassigned range up to the QEMU pool, 4093
// of them.
const (
	OwnerRange         = 0x10000
	DefaultOwnersFirst = 0x70000000
	DefaultOwnersCount = DefaultFirst - DefaultOwnersFirst
)

// DefaultSweep are the host's usual world-writable directories, where a VM's uid can leave
// files behind it (docs/design/014): temporary files, POSIX shared memory and message
// queues opened by path, lock files.
var DefaultSweep = []string{"/tmp", "/var/tmp", "/dev/shm", "/dev/mqueue", "/run/lock"}

// Default is the node's default pool.
func Default() Pool {
	return Pool{Dir: DefaultDir, First: DefaultFirst, Count: DefaultCount, Sweep: DefaultSweep}
}

// Pool is a range of host uids reserved for VMs. The gid of each lease is its uid: a
// group of its own, that no file on the host belongs to.
type Pool struct {
	// Dir holds the lock files, one per uid ever leased.
	Dir string
	// First is the pool's first uid; Count how many it has.
	First, Count uint32
	// Stride is how many uids one lease takes (0 means 1), a multiple of which Count is:
	// a range of 64 Ki is a user namespace's ids (virtiofsd's, docs/design/025). A lease
	// is then named by its first uid, and none of its uids may be in use.
	Stride uint32
	// Sweep are directories swept of a uid's files before it is leased again, so that a
	// VM never finds what an earlier VM of the same uid left (files in /tmp, POSIX shared
	// memory in /dev/shm). QEMU's SysV IPC needs no sweep: it gets an IPC namespace of
	// its own (runtime/vmm). A uid whose sweep fails is passed over.
	Sweep []string
}

// Validate names what is wrong with the range.
func (p Pool) Validate() error {
	switch {
	case p.Dir == "" || !filepath.IsAbs(p.Dir):
		return fmt.Errorf("vm users: lock directory %q is not an absolute path", p.Dir)
	case p.First == 0 || p.Count == 0:
		return fmt.Errorf("vm users: first uid %d and count %d must both be positive (uid 0 is root)", p.First, p.Count)
	case uint64(p.First)+uint64(p.Count) > 1<<32-1:
		return fmt.Errorf("vm users: %d uids from %d run past the last valid uid %d", p.Count, p.First, uint32(1<<32-2))
	case p.Contains(65534) || p.Contains(65535):
		return fmt.Errorf("vm users: uids %d..%d include nobody (65534) or the 16-bit -1 (65535)", p.First, p.Last())
	case p.Count%p.stride() != 0:
		return fmt.Errorf("vm users: %d uids are not a whole number of leases of %d", p.Count, p.stride())
	case p.stride() > 1 && len(p.Sweep) > 0:
		return fmt.Errorf("vm users: a sweep removes one uid's files, not a range's (stride %d)", p.stride())
	}
	return nil
}

func (p Pool) stride() uint32 { return max(p.Stride, 1) }

// Last is the pool's last uid.
func (p Pool) Last() uint32 { return p.First + p.Count - 1 }

// Contains says whether uid is one of the pool's; a nil pool has none.
func (p *Pool) Contains(uid uint32) bool {
	return p != nil && uid >= p.First && uid-p.First < p.Count
}

// ErrExhausted is returned when every uid of the pool is leased.
var ErrExhausted = errors.New("every uid of the pool is in use")

// Lease is one uid, or the pool's Stride uids from UID on, held until Release.
type Lease struct {
	UID  uint32
	lock *os.File
}

// GID is the lease's group: its uid.
func (l *Lease) GID() uint32 { return l.UID }

// Release gives the uid back; it is leased again only once no process runs as it.
func (l *Lease) Release() error { return l.lock.Close() }

// Lease takes the lowest free uid of the pool and records owner (for whoever looks at the
// lock files: which VM has which uid).
func (p Pool) Lease(owner string) (*Lease, error) {
	if err := p.Validate(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(p.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("vm users: %w", err)
	}
	var sweepErrs []error
	for i := uint32(0); i < p.Count; i += p.stride() {
		uid := p.First + i
		f, err := os.OpenFile(filepath.Join(p.Dir, strconv.FormatUint(uint64(uid), 10)), os.O_RDWR|os.O_CREATE|unix.O_NOFOLLOW, 0o600)
		if err != nil {
			return nil, fmt.Errorf("vm users: lock uid %d: %w", uid, err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			f.Close()
			if errors.Is(err, unix.EWOULDBLOCK) {
				continue
			}
			return nil, fmt.Errorf("vm users: lock uid %d: %w", uid, err)
		}
		if running, err := processesRunningAs(uid, p.stride()); err != nil || running {
			f.Close()
			if err != nil {
				return nil, fmt.Errorf("vm users: uid %d: %w", uid, err)
			}
			continue
		}
		if err := sweep(uid, p.Sweep); err != nil {
			// not this uid: what is left of its earlier holder would reach the next VM
			f.Close()
			sweepErrs = append(sweepErrs, fmt.Errorf("uid %d: remove what its earlier holder left: %w", uid, err))
			continue
		}
		// the record is informative: a failed write leaves the lease good
		if err := f.Truncate(0); err == nil {
			_, _ = f.WriteAt([]byte(owner+"\n"), 0)
		}
		return &Lease{UID: uid, lock: f}, nil
	}
	return nil, fmt.Errorf("vm users: %d uids from %d: %w", p.Count, p.First, errors.Join(append([]error{ErrExhausted}, sweepErrs...)...))
}

// processesRunningAs reports whether any process has one of the n uids from uid on as its
// real, effective, saved or filesystem uid. A process that exits while it is read does not
// count.
func processesRunningAs(uid, n uint32) (bool, error) {
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return false, err
	}
	inRange := func(f string) bool {
		v, err := strconv.ParseUint(f, 10, 32)
		return err == nil && uint32(v) >= uid && uint32(v)-uid < n
	}
	for _, e := range procs {
		if e.Name()[0] < '0' || e.Name()[0] > '9' {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "status"))
		if err != nil {
			continue
		}
		for l := range strings.Lines(string(b)) {
			if ids, ok := strings.CutPrefix(l, "Uid:"); ok {
				if slices.ContainsFunc(strings.Fields(ids), inRange) {
					return true, nil
				}
				break
			}
		}
	}
	return false, nil
}

// Held lists the uids whose lease some process still holds and whose record is owner
// (a leak check: after a VM's teardown, none may be left).
func (p Pool) Held(owner string) ([]uint32, error) {
	entries, err := os.ReadDir(p.Dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var held []uint32
	for _, e := range entries {
		uid, err := strconv.ParseUint(e.Name(), 10, 32)
		if err != nil || !p.Contains(uint32(uid)) {
			continue
		}
		f, err := os.OpenFile(filepath.Join(p.Dir, e.Name()), os.O_RDONLY|unix.O_NOFOLLOW, 0)
		if err != nil {
			continue
		}
		record := make([]byte, 4096)
		n, _ := f.ReadAt(record, 0)
		if rec := strings.TrimSuffix(string(record[:n]), "\n"); owner == "" || rec == owner {
			if err := unix.Flock(int(f.Fd()), unix.LOCK_SH|unix.LOCK_NB); errors.Is(err, unix.EWOULDBLOCK) {
				held = append(held, uint32(uid))
			}
		}
		f.Close()
	}
	return held, nil
}

// sweepDepth bounds how deep the sweep follows world-writable directories into each other.
const sweepDepth = 8

// sweep removes uid's files and directories from dirs. A uid creates files only where it
// may write: in a world-writable directory or in one of its own (its group owns nothing),
// so the walk enters only world-writable directories, on the same filesystem, and removes
// whatever uid owns there, whole. Every step goes through a directory's descriptor
// (os.Root), never a path looked up again: another uid may rename a world-writable
// directory it owns, or put a symbolic link in its place, while the walk is in it.
func sweep(uid uint32, dirs []string) error {
	var errs []error
	for _, dir := range dirs {
		root, err := os.OpenRoot(dir)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if st, err := root.Stat("."); err != nil {
			errs = append(errs, err)
		} else {
			errs = append(errs, sweepRoot(uid, root, dir, st.Sys().(*syscall.Stat_t).Dev, 0))
		}
		root.Close()
	}
	return errors.Join(errs...)
}

// sweepRoot sweeps the directory dir (at path, for messages) of uid's entries.
func sweepRoot(uid uint32, dir *os.Root, path string, dev uint64, depth int) error {
	f, err := dir.Open(".")
	if err != nil {
		return nil // gone meanwhile: nothing left of uid's in it
	}
	names, err := f.Readdirnames(-1)
	f.Close()
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	var errs []error
	for _, name := range names {
		info, err := dir.Lstat(name)
		if err != nil {
			continue // gone meanwhile
		}
		switch {
		case info.Sys().(*syscall.Stat_t).Uid == uid:
			if err := dir.RemoveAll(name); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, fmt.Errorf("%s: %w", filepath.Join(path, name), err))
			}
		case info.IsDir() && depth < sweepDepth:
			sub, err := dir.OpenRoot(name)
			if err != nil {
				continue // gone, or made a link out of the directory meanwhile
			}
			// decided on what was opened, not on what the name pointed at before
			if st, err := sub.Stat("."); err == nil && st.Mode().Perm()&0o002 != 0 && st.Sys().(*syscall.Stat_t).Dev == dev {
				errs = append(errs, sweepRoot(uid, sub, filepath.Join(path, name), dev, depth+1))
			}
			sub.Close()
		}
	}
	return errors.Join(errs...)
}
