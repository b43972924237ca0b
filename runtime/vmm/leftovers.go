package vmm

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// CleanupState removes what a VM whose owner died left behind under stateDir: QEMU or
// virtiofsd processes still naming it on their command line (a parent-death signal
// normally got them already), mounts below it, and the directory. For the shim's
// `delete` action, which runs after the shim that started the VM is gone.
func CleanupState(stateDir string) error {
	if !filepath.IsAbs(stateDir) || stateDir == "/" {
		return fmt.Errorf("cleanup state: %q is not a VM state directory", stateDir)
	}
	if _, err := os.Lstat(stateDir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	var errs []error
	for _, pid := range processesNaming(stateDir) {
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
			errs = append(errs, fmt.Errorf("kill %d: %w", pid, err))
		}
		waitGone(pid, 5*time.Second)
	}
	mounts, err := mountsUnder(stateDir)
	if err != nil {
		errs = append(errs, err)
	}
	// deepest first
	for i := len(mounts) - 1; i >= 0; i-- {
		if err := unmount(mounts[i]); err != nil {
			errs = append(errs, err)
		}
	}
	if err := removeStateDir(stateDir); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func processesNaming(s string) []int {
	var pids []int
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	self := os.Getpid()
	for _, d := range dirs {
		pid, err := strconv.Atoi(filepath.Base(d))
		if err != nil || pid == self {
			continue
		}
		b, err := os.ReadFile(filepath.Join(d, "cmdline"))
		if err == nil && strings.Contains(string(b), s) {
			pids = append(pids, pid)
		}
	}
	return pids
}

func waitGone(pid int, d time.Duration) {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}
