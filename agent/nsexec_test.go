package agent

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// fakeContainer starts a process in namespaces of its own, as runc starts a container's
// init: mount (with a tmpfs at /mnt holding a marker), pid, uts (hostname "inside"),
// ipc and cgroup, in a cgroup of its own. It needs root and a cgroup2 hierarchy.
func fakeContainer(t *testing.T) (pid int, cgroup string) {
	t.Helper()
	cgroup = testCgroup(t, "nsexec")
	cgfd, err := unix.Open(cgroup, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(cgfd)

	cmd := exec.Command("/bin/sh", "-c", `mount --make-rprivate / && mount -t tmpfs none /mnt &&
		echo in-the-container > /mnt/marker && hostname inside && echo ready && exec sleep 300`)
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags:  unix.CLONE_NEWNS | unix.CLONE_NEWPID | unix.CLONE_NEWUTS | unix.CLONE_NEWIPC | unix.CLONE_NEWCGROUP,
		UseCgroupFD: true,
		CgroupFD:    cgfd,
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Skipf("skipped: cannot start a process in namespaces of its own: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || line != "ready\n" {
		t.Fatalf("container setup: %q %v", line, err)
	}
	return cmd.Process.Pid, cgroup
}

// runInContainer starts p with nsExec and returns its exit status and output.
func runInContainer(t *testing.T, initPid int, cgroup string, p *specs.Process) (int, string, error) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	null, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()
	pid, err := nsExec{initPid: initPid, cgroup: cgroup, process: p, stdio: [3]*os.File{null, w, w}}.start()
	w.Close()
	if err != nil {
		return 0, "", err
	}
	var buf bytes.Buffer
	if _, err := io.Copy(&buf, r); err != nil {
		t.Fatal(err)
	}
	var ws unix.WaitStatus
	if _, err := unix.Wait4(pid, &ws, 0, nil); err != nil {
		t.Fatal(err)
	}
	return ws.ExitStatus(), buf.String(), nil
}

func nsInode(t *testing.T, pid int, ns string) string {
	t.Helper()
	link, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/%s", pid, ns))
	if err != nil {
		t.Fatal(err)
	}
	return link
}

func TestExecJoinsTheContainer(t *testing.T) {
	initPid, cgroup := fakeContainer(t)
	p := &specs.Process{
		Args: []string{"sh", "-c", `cat /mnt/marker; hostname; cat /proc/self/cgroup | grep '^0::'
			for ns in mnt pid uts ipc; do readlink /proc/self/ns/$ns; done; echo "pid $$ home $HOME"
			grep -E '^(Uid|Gid|Groups|NoNewPrivs|CapBnd|CapInh|CapAmb|CapEff):' /proc/self/status; umask; pwd`},
		Cwd: "/tmp",
		Env: []string{"PATH=/usr/bin:/bin"},
		User: specs.User{
			UID: 1000, GID: 1001, AdditionalGids: []uint32{5},
		},
		NoNewPrivileges: true,
		Capabilities: &specs.LinuxCapabilities{
			Bounding:    []string{"CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"},
			Permitted:   []string{"CAP_NET_BIND_SERVICE"},
			Inheritable: []string{"CAP_NET_BIND_SERVICE"},
			Ambient:     []string{"CAP_NET_BIND_SERVICE", "CAP_KILL"}, // CAP_KILL: not permitted, dropped
		},
	}
	status, out, err := runInContainer(t, initPid, cgroup, p)
	if err != nil || status != 0 {
		t.Fatalf("exec: status %d, err %v, output:\n%s", status, err, out)
	}
	t.Logf("output:\n%s", out)
	want := []string{
		"in-the-container\n", "inside\n", "0::/\n",
		nsInode(t, initPid, "mnt") + "\n", nsInode(t, initPid, "pid") + "\n",
		nsInode(t, initPid, "uts") + "\n", nsInode(t, initPid, "ipc") + "\n",
		"home /\n", // runc's when the user is not in the container's /etc/passwd
		"Uid:\t1000\t1000\t1000\t1000\n", "Gid:\t1001\t1001\t1001\t1001\n", "Groups:\t5 \n",
		"NoNewPrivs:\t1\n",
		"CapInh:\t0000000000000400\n", "CapAmb:\t0000000000000400\n", "CapEff:\t0000000000000400\n",
		"CapBnd:\t0000000000000421\n",
		"0022\n", "/tmp\n",
	}
	if home, err := passwdHome("/etc/passwd", 1000); err == nil {
		want[7] = "home " + home + "\n"
	}
	for _, w := range want {
		if !strings.Contains(out, w) {
			t.Errorf("output lacks %q", w)
		}
	}
	// The process is in the container's pid namespace: not pid 1 there, and not the
	// host pid it has here.
	if strings.Contains(out, "pid 1 ") {
		t.Errorf("the exec'd shell is its pid namespace's init")
	}
	b, err := os.ReadFile(filepath.Join(cgroup, "cgroup.procs"))
	if err != nil || len(strings.Fields(string(b))) != 1 {
		t.Errorf("cgroup.procs after the exec: %q %v, want the init alone", b, err)
	}
}

func TestExecFailuresNameTheirCause(t *testing.T) {
	initPid, cgroup := fakeContainer(t)
	base := specs.Process{Cwd: "/", Env: []string{"PATH=/usr/bin:/bin"}}
	for _, tc := range []struct {
		name string
		edit func(*specs.Process)
		want string
	}{
		{"not on PATH", func(p *specs.Process) { p.Args = []string{"no-such-binary"} },
			`exec: "no-such-binary": executable file not found in $PATH`},
		{"absolute", func(p *specs.Process) { p.Args = []string{"/no/such/binary"} },
			`/no/such/binary`},
		{"only in the container", func(p *specs.Process) { p.Args = []string{"/mnt/marker"} },
			`/mnt/marker`}, // it exists there, but is not executable
		{"cwd", func(p *specs.Process) { p.Args = []string{"true"}; p.Cwd = "/no/such/dir" },
			`chdir to cwd ("/no/such/dir")`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := base
			tc.edit(&p)
			_, _, err := runInContainer(t, initPid, cgroup, &p)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error containing %q", err, tc.want)
			}
		})
	}
	// A relative command is found from the process's cwd, and a "." in PATH means that
	// cwd, never the agent's own PATH.
	script := fmt.Sprintf("/proc/%d/root/mnt/run.sh", initPid)
	if err := os.WriteFile(script, []byte("#!/bin/sh\necho relative-ok\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		path string
	}{{[]string{"./run.sh"}, "/usr/bin:/bin"}, {[]string{"run.sh"}, ".:/usr/bin"}} {
		p := specs.Process{Cwd: "/mnt", Env: []string{"PATH=" + tc.path}, Args: tc.args}
		if status, out, err := runInContainer(t, initPid, cgroup, &p); err != nil || status != 0 || out != "relative-ok\n" {
			t.Errorf("%v with PATH=%s from /mnt: %d %q %v", tc.args, tc.path, status, out, err)
		}
	}
	p := base
	p.Args, p.Env = []string{"true"}, []string{"PATH=/nonexistent"}
	if _, _, err := runInContainer(t, initPid, cgroup, &p); err == nil {
		t.Error("true found with PATH=/nonexistent: the agent's own PATH was searched")
	}
	// A file found only in the container's mount namespace is looked up there.
	p = base
	p.Args = []string{"/bin/cat", "/mnt/marker"}
	if status, out, err := runInContainer(t, initPid, cgroup, &p); err != nil || status != 0 || out != "in-the-container\n" {
		t.Fatalf("cat /mnt/marker: %d %q %v", status, out, err)
	}
}

func TestRuncOnly(t *testing.T) {
	self := &container{init: &process{pid: os.Getpid()}}
	plain := func() *specs.Process {
		return &specs.Process{Args: []string{"true"}, Cwd: "/", Capabilities: &specs.LinuxCapabilities{}}
	}
	if why := runcOnly(self, plain()); why != "" {
		t.Fatalf("plain exec: %q, want none", why)
	}
	for name, tc := range map[string]struct {
		c    *container
		edit func(*specs.Process)
	}{
		"seccomp":         {c: &container{seccomp: true, init: self.init}},
		"rlimits":         {c: self, edit: func(p *specs.Process) { p.Rlimits = []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Soft: 1, Hard: 1}} }},
		"scheduler":       {c: self, edit: func(p *specs.Process) { p.Scheduler = &specs.Scheduler{Policy: specs.SchedOther} }},
		"capability":      {c: self, edit: func(p *specs.Process) { p.Capabilities = &specs.LinuxCapabilities{Bounding: []string{"CAP_NOPE"}} }},
		"no capabilities": {c: self, edit: func(p *specs.Process) { p.Capabilities = nil }},
		"no args":         {c: self, edit: func(p *specs.Process) { p.Args = nil; p.CommandLine = "true" }},
		"gone init":       {c: &container{init: &process{pid: 1 << 30}}},
	} {
		p := plain()
		if tc.edit != nil {
			tc.edit(p)
		}
		if why := runcOnly(tc.c, p); why == "" {
			t.Errorf("%s: the agent would exec it itself", name)
		}
	}
}

func TestWithHome(t *testing.T) {
	dir := t.TempDir()
	passwd := filepath.Join(dir, "passwd")
	if err := os.WriteFile(passwd, []byte("root:x:0:0:root:/root:/bin/sh\nbad line\napp:x:1000:1000::/home/app:/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if h, err := passwdHome(passwd, 1000); err != nil || h != "/home/app" {
		t.Fatalf("uid 1000: %q %v", h, err)
	}
	if _, err := passwdHome(passwd, 7); err == nil {
		t.Fatal("uid 7 found")
	}
	env := []string{"HOME=/x"}
	if got := withHome(env, 0); len(got) != 1 || got[0] != "HOME=/x" {
		t.Fatalf("kept HOME: %q", got)
	}
	if _, err := lookPath("definitely-not-a-command", []string{"PATH=/bin"}); !errors.Is(err, exec.ErrNotFound) {
		t.Fatalf("lookPath: %v", err)
	}
}

// TestConcurrentExecsLeaveTheAgentAlone: every exec joins the container, however the
// goroutines land on threads, and the agent's own view (what /proc/self shows) never moves.
func TestConcurrentExecsLeaveTheAgentAlone(t *testing.T) {
	initPid, cgroup := fakeContainer(t)
	before := nsInode(t, os.Getpid(), "mnt")
	want := nsInode(t, initPid, "mnt") + "\n"
	errs := make(chan error, 40)
	for g := 0; g < 8; g++ {
		go func() {
			for i := 0; i < 5; i++ {
				p := specs.Process{Cwd: "/", Env: []string{"PATH=/usr/bin:/bin"}, Args: []string{"readlink", "/proc/self/ns/mnt"}}
				_, out, err := runInContainer(t, initPid, cgroup, &p)
				if err == nil && out != want {
					err = fmt.Errorf("exec saw mount namespace %q, want %q", out, want)
				}
				errs <- err
			}
		}()
	}
	for i := 0; i < 40; i++ {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	if after := nsInode(t, os.Getpid(), "mnt"); after != before {
		t.Fatalf("the agent's mount namespace moved: %s, was %s", after, before)
	}
}
