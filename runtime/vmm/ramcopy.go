package vmm

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
)

// A template's RAM is copied by a process in the machine's cgroup, not by the shim: into
// each restored machine's memfd (the pod's cgroup), and at the save into the template's
// file (the template's cgroup, vmtemplate.Store.Cgroup). The kernel charges a shmem page
// to the memory cgroup of the process that first writes it, and QEMU, which only maps
// these pages, runs in the machine's.
// The process is the shim's own binary again (/proc/self/exe), turned into the copier by
// ramCopyEnv before its main runs — runc's and Docker's re-exec pattern.

// ramCopyEnv marks a process started by startRAMCopy.
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

// ramCopy is a copy of a template's RAM under way (startRAMCopy).
type ramCopy struct {
	cmd            *exec.Cmd // nil: copied in this process already
	stdout, stderr bytes.Buffer
	n              int64
	err            error
}

// startRAMCopy starts copying src into dst (copyRAM) by a process in the machine's cgroup;
// a machine without a cgroup of its own runs in the caller's, and copies right here.
func (m *Machine) startRAMCopy(dst, src *os.File) (*ramCopy, error) {
	c := &ramCopy{}
	if m.cgroup == nil {
		c.n, c.err = copyRAM(dst, src)
		return c, nil
	}
	cmd := exec.Command("/proc/self/exe")
	cmd.Dir = "/"
	cmd.Env = []string{ramCopyEnv + "=1"}
	cmd.ExtraFiles = []*os.File{dst, src}
	cmd.Stdout, cmd.Stderr = &c.stdout, &c.stderr
	goAhead, err := cmd.StdinPipe()
	if err != nil {
		return nil, fmt.Errorf("the RAM copier's stdin: %w", err)
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	m.cgroup.cloneInto(cmd.SysProcAttr)
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start the RAM copier: %w", err)
	}
	c.cmd = cmd
	if err := m.cgroup.add(cmd.Process.Pid); err != nil { // cgroup v1: moved, not cloned
		goAhead.Close() // EOF: it exits without copying
		_ = cmd.Wait()
		return nil, fmt.Errorf("the RAM copier: %w", err)
	}
	_, err = io.WriteString(goAhead, "go")
	goAhead.Close()
	if err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return nil, fmt.Errorf("the RAM copier's go-ahead: %w", err)
	}
	return c, nil
}

// wait waits for the copy and returns the bytes written.
func (c *ramCopy) wait() (int64, error) {
	if c.cmd == nil {
		return c.n, c.err
	}
	if err := c.cmd.Wait(); err != nil {
		return 0, fmt.Errorf("the RAM copier: %w: %s", err, strings.TrimSpace(c.stderr.String()))
	}
	n, err := strconv.ParseInt(strings.TrimSpace(c.stdout.String()), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("the RAM copier's count %q: %w", c.stdout.String(), err)
	}
	return n, nil
}

// kill ends a copy still under way (a machine that failed to start).
func (c *ramCopy) kill() {
	if c.cmd != nil && c.cmd.Process != nil {
		_ = c.cmd.Process.Kill()
	}
}
