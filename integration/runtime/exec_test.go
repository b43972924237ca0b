package runtime_test

import (
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/vmpod/vmpod/integration/testenv"
	"github.com/vmpod/vmpod/runtime"
)

// execProbe prints what an exec'd process is: credentials, capabilities, namespaces,
// cgroup, OOM score, umask, directory, environment, session. The cgroup namespace's id
// comes last, on a line of its own (design 019: the agent's exec gets a namespace of its
// own with the same root).
const execProbe = `set -- $(cat /proc/$$/stat); [ "$6" = "$1" ] && echo session-leader
grep -E '^(Uid|Gid|Groups|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status
cat /proc/self/cgroup /proc/self/oom_score_adj
for ns in mnt pid ipc uts net user; do readlink /proc/self/ns/$ns; done
umask; pwd; hostname; env | sort
echo "cgroupns $(readlink /proc/self/ns/cgroup)"`

// TestExecByTheAgentMatchesRunc: the agent starts an exec'd process itself when it needs
// nothing only runc gives (design 019). The same process started both ways — by the
// agent, and through `runc exec` (an rlimit sends it there) — must be the same process
// to itself, for a container that is not root, has supplementary groups, an ambient
// capability, an OOM score and a cgroup namespace.
func TestExecByTheAgentMatchesRunc(t *testing.T) {
	testenv.Require(t)
	vm := testenv.StartVM(t, testenv.VMConfig(t, "agentexec"))
	ctx := testenv.Context(t, 2*time.Minute)

	spec := testenv.Spec("sleep", "1000")
	spec.Process.User = specs.User{UID: 1000, GID: 1000, AdditionalGids: []uint32{10, 20}}
	spec.Process.Capabilities.Inheritable = []string{"CAP_NET_BIND_SERVICE"}
	spec.Process.Capabilities.Ambient = []string{"CAP_NET_BIND_SERVICE"}
	spec.Process.Cwd = "/tmp"
	oom := 500
	spec.Process.OOMScoreAdj = &oom
	spec.Linux.Namespaces = append(spec.Linux.Namespaces, specs.LinuxNamespace{Type: specs.CgroupNamespace})
	startContainer(t, vm, "subject", spec, runtime.Stdio{})

	exec := func(id string, rlimits []specs.POSIXRlimit, args ...string) (string, error) {
		p := *spec.Process
		p.Args = args
		p.Rlimits = rlimits
		var out, errOut testenv.Buffer
		proc, err := vm.Exec(ctx, "subject", id, &p, runtime.Stdio{Stdout: &out, Stderr: &errOut})
		if err != nil {
			return "", err
		}
		exit, err := testenv.WaitOutput(ctx, proc)
		if err != nil || exit.Status != 0 {
			t.Fatalf("exec %s: %v, exit %d, stderr %q", id, err, exit.Status, errOut.String())
		}
		_ = proc.Remove(ctx)
		return out.String(), nil
	}
	viaRunc := []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Soft: 1024, Hard: 1024}}
	byAgent, err := exec("agent", nil, "sh", "-c", execProbe)
	if err != nil {
		t.Fatal(err)
	}
	byRunc, err := exec("runc", viaRunc, "sh", "-c", execProbe)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("started by the agent:\n%s", byAgent)
	agentView, agentCgroupNS, _ := strings.Cut(byAgent, "cgroupns ")
	runcView, runcCgroupNS, _ := strings.Cut(byRunc, "cgroupns ")
	if agentView != runcView {
		t.Errorf("the agent's exec differs from runc's; runc's:\n%s", byRunc)
	}
	for _, want := range []string{"session-leader\n", "Uid:\t1000\t1000\t1000\t1000\n", "Groups:\t10 20 \n",
		"CapAmb:\t0000000000000400\n", "NoNewPrivs:\t1\n", "0::/\n", "500\n", "/tmp\n"} {
		if !strings.Contains(agentView, want) {
			t.Errorf("the exec'd process lacks %q", want)
		}
	}
	// Which path ran: runc joins the init's cgroup namespace, the agent makes one with the
	// same root.
	initCgroupNS, err := exec("init-ns", nil, "readlink", "/proc/1/ns/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	if runcCgroupNS != initCgroupNS || agentCgroupNS == initCgroupNS {
		t.Errorf("cgroup namespaces: init %q, runc's exec %q, agent's %q: the agent did not start its exec", initCgroupNS, runcCgroupNS, agentCgroupNS)
	}

	// A missing binary is named as runc names it, both ways.
	for id, rl := range map[string][]specs.POSIXRlimit{"missing-agent": nil, "missing-runc": viaRunc} {
		_, err := exec(id, rl, "no-such-binary")
		if err == nil || !strings.Contains(err.Error(), `exec: "no-such-binary": executable file not found in $PATH`) {
			t.Errorf("%s: %v, want runc's message", id, err)
		}
	}
}
