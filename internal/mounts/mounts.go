// Package mounts reads the mount table and takes mounts down. A mount the host keeps busy
// (a process whose working directory or open file is inside it) is detached lazily
// instead of failing: it leaves the mount table at once and the kernel frees it when its
// last user lets go. Teardown must finish either way — a pod whose rootfs a stray shell
// keeps busy must not keep its VM (docs/design/016-busy-mounts.md).
package mounts

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Under lists the mount points at or below dir, parents before children (mountinfo
// order), each once.
func Under(dir string) ([]string, error) {
	_, all, err := stacked(dir)
	return distinct(all, ""), err
}

// stacked lists the mounts at or below dir in mountinfo order (a mount point appears once
// per mount stacked on it), and dir as mountinfo names it: with symlinks resolved.
func stacked(dir string) (resolved string, mounts []string, err error) {
	resolved, err = filepath.EvalSymlinks(dir)
	if errors.Is(err, os.ErrNotExist) {
		return dir, nil, nil // nothing can be mounted there
	}
	if err != nil {
		return dir, nil, err
	}
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return resolved, nil, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescape(fields[4])
		if mp == resolved || strings.HasPrefix(mp, resolved+"/") {
			mounts = append(mounts, mp)
		}
	}
	return resolved, mounts, sc.Err()
}

// Below lists the mount points strictly below dir, parents before children.
func Below(dir string) ([]string, error) {
	resolved, all, err := stacked(dir)
	return distinct(all, resolved), err
}

// distinct is mounts without repeats (stacked mounts) and without except, in order.
func distinct(mounts []string, except string) []string {
	var out []string
	for _, mp := range mounts {
		if mp != except && !slices.Contains(out, mp) {
			out = append(out, mp)
		}
	}
	return out
}

// Unmount takes down the mount at target (the topmost one, if several are stacked there)
// and reports whether it was busy and detached lazily. A target that is not a mount point
// (any more) is not an error: teardown is idempotent.
func Unmount(target string) (detached bool, err error) {
	err = unix.Unmount(target, unix.UMOUNT_NOFOLLOW)
	if errors.Is(err, unix.EBUSY) {
		detached = true
		err = unix.Unmount(target, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW)
	}
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("unmount %s: %w", target, err)
	}
	return detached, nil
}

// UnmountTree takes down dir's mount and every mount below it, deepest first, and returns
// the mount points that were busy and detached lazily. Mounts stacked on one point all
// go. It goes on past a failure and returns every error.
func UnmountTree(dir string) (detached []string, err error) {
	_, all, err := stacked(dir)
	if err != nil {
		return nil, fmt.Errorf("unmount %s: list mounts: %w", dir, err)
	}
	var errs []error
	for i := len(all) - 1; i >= 0; i-- {
		busy, err := Unmount(all[i])
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if busy {
			detached = append(detached, all[i])
		}
	}
	return detached, errors.Join(errs...)
}

// unescape undoes the kernel's octal escapes in mountinfo (\040 for a space, ...).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if c, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(c))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
