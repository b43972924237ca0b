package vmm

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/vmpod/vmpod/internal/sockets"
)

// ownerFile, in a VM's state directory, is locked (flock) by the process that owns the
// VM for as long as it lives. The kernel drops the lock when that process dies, however
// it dies: a sweep that can take the lock has found a directory nobody will clean up.
const ownerFile = "owner"

// lockOwner marks stateDir as owned by this process until the returned file is closed.
// The lock is taken before the file gets its name, so a sweep never sees an unlocked
// owner file of a live VM.
func lockOwner(stateDir string) (*os.File, error) {
	tmp := filepath.Join(stateDir, ownerFile+".new")
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("owner lock: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("owner lock %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, filepath.Join(stateDir, ownerFile)); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("owner lock: %w", err)
	}
	return f, nil
}

// SweepOrphans cleans up (CleanupState) every VM state directory under root whose owner
// died without finishing its teardown — a shim killed while it stopped its VM, after
// containerd had already forgotten the pod, leaves one that no `shim delete` will visit.
// Directories without an owner file (being created) are left alone. It returns the
// directories it cleaned.
func SweepOrphans(root string) ([]string, error) {
	entries, err := os.ReadDir(root)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("sweep %s: %w", root, err)
	}
	var swept []string
	var errs []error
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		dir := filepath.Join(root, e.Name())
		orphan, err := CleanupOrphan(dir)
		if err != nil {
			errs = append(errs, fmt.Errorf("sweep %s: %w", dir, err))
			continue
		}
		if orphan {
			swept = append(swept, dir)
		}
	}
	return swept, errors.Join(errs...)
}

// CleanupOrphan cleans up the VM state directory dir (CleanupState) if the process that
// owned its VM is dead, holding the dead owner's lock meanwhile (a concurrent sweep skips
// the directory), and reports whether it was dead. A live owner's VM is left alone: its
// lock is the one sign that tells a dead shim from a busy one (a dial to a shim whose node
// is loaded can time out). A directory without an owner file is being created: left alone.
func CleanupOrphan(dir string) (orphan bool, err error) {
	orphan, release, err := takeOwnerLock(dir)
	if err != nil || !orphan {
		return false, err
	}
	defer release()
	return true, CleanupState(dir)
}

// takeOwnerLock takes dir's owner lock if its owner is dead (orphan: true).
func takeOwnerLock(dir string) (orphan bool, release func(), err error) {
	f, err := os.OpenFile(filepath.Join(dir, ownerFile), os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil, nil
	}
	if err != nil {
		return false, nil, fmt.Errorf("owner lock: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		_ = f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return false, nil, nil // its owner lives
		}
		return false, nil, fmt.Errorf("owner lock: %w", err)
	}
	return true, func() { _ = f.Close() }, nil
}

// ownerSocketsFile, in a VM's state directory, lists Config.OwnerSockets, one per line.
const ownerSocketsFile = "owner-sockets"

func recordOwnerSockets(stateDir string, socks []string) error {
	if len(socks) == 0 {
		return nil
	}
	return os.WriteFile(filepath.Join(stateDir, ownerSocketsFile), []byte(strings.Join(socks, "\n")+"\n"), 0o600)
}

// removeOwnerSockets removes the sockets a dead owner served for the VM in stateDir: each
// listed path that is still a socket and that nobody answers on (a new owner of the same
// pod may serve the same path by now).
func removeOwnerSockets(stateDir string) error {
	b, err := os.ReadFile(filepath.Join(stateDir, ownerSocketsFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var errs []error
	for _, path := range strings.Fields(string(b)) {
		fi, err := os.Lstat(path)
		if err != nil || fi.Mode().Type() != os.ModeSocket {
			continue // gone already, or not a socket: not ours to remove
		}
		if sockets.Served(path) {
			continue // served again, by a new shim of the pod
		}
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
