package vmm

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/vmpod/vmpod/internal/idmap"
	"github.com/vmpod/vmpod/internal/mounts"
)

// sharedDir is the host directory the guest mounts by ShareTag. Container rootfs and
// volumes are bind-mounted into it while the VM runs.
//
// virtiofsd serves it from a mount namespace of its own, created when it starts; a bind
// mount made later reaches that namespace only through mount propagation. So the
// directory is made a mount point of its own, with shared propagation: virtiofsd's copy is
// then a slave of it and receives every later bind (docs/design/003-shared-fs.md).
//
// Every share gets a fresh location (a sequence number above its name): the guest caches
// directory entries, and a path reused after an unshare could resolve to the old,
// deleted directory.
type sharedDir struct {
	path string
	// idmap, if set, is the mapping shares are mounted through (virtiofsd's user
	// namespace); set before the first share
	idmap *idmap.Map
	// alias is a second place the directory is bound at (alsoAt), "" without one
	alias string

	mu     sync.Mutex
	seq    uint64
	shares map[string]string // name → host target under path
}

func newSharedDir(path string) (*sharedDir, error) {
	if err := os.Mkdir(path, 0o700); err != nil {
		return nil, err
	}
	if err := unix.Mount(path, path, "", unix.MS_BIND, ""); err != nil {
		return nil, fmt.Errorf("bind %s onto itself: %w", path, err)
	}
	// Private first: a new peer group of its own, so nothing propagates back to the host's
	// mount of the parent; then shared, so virtiofsd's slave copy gets later mounts.
	for _, flag := range []uintptr{unix.MS_PRIVATE, unix.MS_SHARED} {
		if err := unix.Mount("", path, "", flag, ""); err != nil {
			_ = unix.Unmount(path, unix.MNT_DETACH)
			return nil, fmt.Errorf("set propagation of %s: %w", path, err)
		}
	}
	return &sharedDir{path: path, shares: map[string]string{}}, nil
}

// share bind-mounts hostPath (a directory or a file, not what is mounted below it) into
// the shared directory under name and returns its path relative to the directory. name
// is a relative path chosen by the runtime; it identifies the share for unshare.
func (s *sharedDir) share(hostPath, name string, readonly bool) (string, error) {
	return s.shareAs(hostPath, name, readonly, true)
}

// shareAs is share; mapped says to mount hostPath through the directory's ID mapping, if it
// has one (not a rootfs mounted through it already).
func (s *sharedDir) shareAs(hostPath, name string, readonly, mapped bool) (string, error) {
	return s.shareAt(hostPath, name, 0, readonly, mapped)
}

// shareAt is shareAs at sequence number seq, 0 for the next one: a migrated guest's
// share sits where the source had it (the guest and virtiofsd's state know it by path).
func (s *sharedDir) shareAt(hostPath, name string, seq uint64, readonly, mapped bool) (string, error) {
	if name == "" || filepath.IsAbs(name) || !filepath.IsLocal(name) {
		return "", fmt.Errorf("share name %q: must be a relative path inside the shared directory", name)
	}
	fi, err := os.Stat(hostPath)
	if err != nil {
		return "", fmt.Errorf("share %s: %w", hostPath, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, exists := s.shares[name]; exists {
		return "", fmt.Errorf("share %q: already shared", name)
	}
	if seq == 0 {
		s.seq++
		seq = s.seq
	} else {
		s.seq = max(s.seq, seq) // the shares made later take numbers of their own
	}
	rel := filepath.Join(strconv.FormatUint(seq, 10), name)
	target := filepath.Join(s.path, rel)
	if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
		return "", err
	}
	if fi.IsDir() {
		err = os.Mkdir(target, 0o755)
	} else {
		var f *os.File
		if f, err = os.OpenFile(target, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644); err == nil {
			err = f.Close()
		}
	}
	if err != nil {
		return "", fmt.Errorf("share %q: mount point: %w", name, err)
	}
	// Not recursive: a recursive bind would hold copies of the host's submounts at the
	// source's own dentries, and the host could not remove those directories while the VM
	// runs (EBUSY). Submounts the guest needs are shared one by one (runtime/pod).
	if mapped && s.idmap != nil {
		if err := idmap.Bind(hostPath, target, *s.idmap, readonly); err != nil {
			_ = os.Remove(target)
			return "", fmt.Errorf("share %s as %q: %w (isolation.virtiofsd_user = \"root\" shares it as it is)", hostPath, name, err)
		}
		s.shares[name] = target
		return rel, nil
	}
	if err := unix.Mount(hostPath, target, "", unix.MS_BIND, ""); err != nil {
		_ = os.Remove(target)
		return "", fmt.Errorf("share %s as %q: %w", hostPath, name, err)
	}
	if readonly {
		if err := unix.Mount("", target, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
			_ = unix.Unmount(target, unix.MNT_DETACH)
			_ = os.Remove(target)
			return "", fmt.Errorf("share %q read-only: %w", name, err)
		}
	}
	s.shares[name] = target
	return rel, nil
}

// place is the sequence number share name sits at, false for a name not shared.
func (s *sharedDir) place(name string) (uint64, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	target, ok := s.shares[name]
	if !ok {
		return 0, false
	}
	rel, err := filepath.Rel(s.path, target)
	if err != nil {
		return 0, false
	}
	first, _, _ := strings.Cut(rel, "/")
	seq, err := strconv.ParseUint(first, 10, 64)
	return seq, err == nil
}

// unshare undoes share. Unknown names are not an error: removal is idempotent.
func (s *sharedDir) unshare(name string) error {
	s.mu.Lock()
	target, ok := s.shares[name]
	delete(s.shares, name)
	s.mu.Unlock()
	if !ok {
		return nil
	}
	if err := unmount(target); err != nil {
		return fmt.Errorf("unshare %q: %w", name, err)
	}
	if err := os.Remove(target); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("unshare %q: %w", name, err)
	}
	// Parents the share created go too once empty (Remove fails on a non-empty one).
	for dir := filepath.Dir(target); dir != s.path && strings.HasPrefix(dir, s.path+"/"); dir = filepath.Dir(dir) {
		if os.Remove(dir) != nil {
			break
		}
	}
	return nil
}

// alsoAt binds the directory at path too, before anything is shared: a bind of a shared
// mount is its peer, so every later share reaches it, and any mount namespace copied from
// it (virtiofsd's).
func (s *sharedDir) alsoAt(path string) error {
	if err := unix.Mount(s.path, path, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind the shared directory at %s: %w", path, err)
	}
	s.alias = path
	return nil
}

// close unshares everything and unmounts the directory itself.
func (s *sharedDir) close() error {
	s.mu.Lock()
	names := make([]string, 0, len(s.shares))
	for name := range s.shares {
		names = append(names, name)
	}
	s.mu.Unlock()
	var errs []error
	for _, name := range names {
		errs = append(errs, s.unshare(name))
	}
	if s.alias != "" {
		if err := unmount(s.alias); err != nil {
			errs = append(errs, err)
		} else if err := os.Remove(s.alias); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	errs = append(errs, unmount(s.path))
	return errors.Join(errs...)
}

// unmount takes down target; one the host keeps busy is detached lazily.
func unmount(target string) error {
	_, err := mounts.Unmount(target)
	return err
}

// MountPointsBelow lists the mount points strictly below dir, parents before children.
func MountPointsBelow(dir string) ([]string, error) { return mounts.Below(dir) }

// removeStateDir deletes dir, but never through a mount: if anything is still mounted
// below it, deleting would reach into a container's rootfs or a volume on the host.
func removeStateDir(dir string) error {
	left, err := mounts.Under(dir)
	if err != nil {
		return fmt.Errorf("remove %s: list mounts: %w", dir, err)
	}
	if len(left) > 0 {
		return fmt.Errorf("remove %s: still mounted below it: %s (left in place)", dir, strings.Join(left, ", "))
	}
	return os.RemoveAll(dir)
}
