package vmm

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vmpod/vmpod/internal/mounts"
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
	pids := processesNaming(stateDir) // virtiofsd, and QEMU by its state dir's fd set
	for _, record := range []string{qemuRecord, virtiofsdRecord} {
		if pid := recordedProcess(stateDir, record); pid > 0 && !slices.Contains(pids, pid) {
			pids = append(pids, pid)
		}
	}
	for _, pid := range pids {
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
			errs = append(errs, fmt.Errorf("kill %d: %w", pid, err))
		}
		waitGone(pid, 5*time.Second)
	}
	if err := giveBackRecordedVFIO(stateDir); err != nil {
		errs = append(errs, err)
	}
	if err := removeVirtiofsdAlias(stateDir); err != nil {
		errs = append(errs, err)
	}
	if _, err := mounts.UnmountTree(stateDir); err != nil {
		errs = append(errs, err)
	}
	if err := removeOwnerSockets(stateDir); err != nil {
		errs = append(errs, err)
	}
	if err := removeStateDir(stateDir); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// virtiofsdAlias names the file in the state dir that records the machine's VirtiofsdRoot
// alias of its shared directory.
const virtiofsdAlias = "virtiofsd.alias"

// removeVirtiofsdAlias takes down the alias the state dir records, if it is one.
func removeVirtiofsdAlias(stateDir string) error {
	b, err := os.ReadFile(filepath.Join(stateDir, virtiofsdAlias))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	alias := string(b)
	if filepath.Dir(alias) != VirtiofsdRoot {
		return fmt.Errorf("cleanup state: %s records %q, not a directory of %s", virtiofsdAlias, alias, VirtiofsdRoot)
	}
	if _, err := mounts.UnmountTree(alias); err != nil {
		return err
	}
	if err := os.Remove(alias); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// processesNaming lists the processes whose command line names path or a path below it.
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
		if err == nil && namesPath(string(b), s) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// waitGone waits until pid is gone or a zombie (dead: only its parent's wait is left,
// and the parent of a dead shim's child may be an init that reaps late or never).
func waitGone(pid int, d time.Duration) {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) || isZombie(pid) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func isZombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// "pid (comm) state ...": comm may hold spaces and parentheses
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	return len(f) > 0 && f[0] == "Z"
}

// namesPath reports whether a command line (NUL-separated) names path itself or a path
// below it — not a sibling that merely starts with the same characters (/run/vmpod/x is
// not named by /run/vmpod/x2/qmp.sock).
func namesPath(cmdline, path string) bool {
	for rest := cmdline; ; {
		i := strings.Index(rest, path)
		if i < 0 {
			return false
		}
		rest = rest[i+len(path):]
		if rest == "" || strings.ContainsRune("/\x00,", rune(rest[0])) {
			return true
		}
	}
}
