package vmm

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
)

// A template's RAM is copied into each restored machine's memfd by a process in the pod's
// cgroup, not by the shim: the kernel charges a shmem page to the memory cgroup of the
// process that first writes it, and QEMU, which only maps these pages, runs in the pod's.
// The process is the shim's own binary again (/proc/self/exe), turned into the copier by
// ramCopyEnv before its main runs — runc's and Docker's re-exec pattern.

// ramCopyEnv marks a process started by copyRAMAsPod.
const ramCopyEnv = "VMPOD_INTERNAL_RAM_COPY"

func init() {
	if os.Getenv(ramCopyEnv) != "" {
		os.Exit(ramCopyMain())
	}
}

// ramCopyMain is the copier: it waits for its parent's go-ahead on stdin (sent once the
// process is in the pod's cgroup; EOF aborts), copies descriptor 4 into descriptor 3 and
// writes the bytes it wrote on stdout.
func ramCopyMain() int {
	var b [1]byte
	if _, err := os.Stdin.Read(b[:]); err != nil {
		return 2
	}
	n, err := copyRAM(os.NewFile(3, "dst"), os.NewFile(4, "src"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println(n)
	return 0
}

// copyRAMAsPod is copyRAM run in the machine's cgroup (itself, without one).
func (m *Machine) copyRAMAsPod(dst, src *os.File) (int64, error) {
	if m.cgroup == nil {
		return copyRAM(dst, src)
	}
	cmd := exec.Command("/proc/self/exe")
	cmd.Dir = "/"
	cmd.Env = []string{ramCopyEnv + "=1"}
	cmd.ExtraFiles = []*os.File{dst, src}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	goAhead, err := cmd.StdinPipe()
	if err != nil {
		return 0, err
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	m.cgroup.cloneInto(cmd.SysProcAttr)
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("start the copier: %w", err)
	}
	if err := m.cgroup.add(cmd.Process.Pid); err != nil { // cgroup v1: moved, not cloned
		goAhead.Close() // EOF: it exits without copying
		_ = cmd.Wait()
		return 0, err
	}
	_, werr := io.WriteString(goAhead, "go")
	goAhead.Close()
	if err := cmd.Wait(); err != nil || werr != nil {
		return 0, fmt.Errorf("copier: %w: %s", errors.Join(err, werr), strings.TrimSpace(stderr.String()))
	}
	return strconv.ParseInt(strings.TrimSpace(stdout.String()), 10, 64)
}
