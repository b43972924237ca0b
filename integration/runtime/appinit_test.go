package runtime_test

import (
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/vmpod/vmpod/integration/testenv"
	"github.com/vmpod/vmpod/runtime"
)

// appProbe prints what a container's init sees of itself and its filesystem.
const appProbe = `set -- $(cat /proc/$$/stat); echo "pid $1 session $6"
grep -E '^(Uid|Gid|Groups|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status
cat /proc/self/cgroup /proc/self/oom_score_adj /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max /sys/fs/cgroup/cpu.weight
umask; pwd; hostname; env | sort
awk '{print $5, $4, $6, $9, $10}' /proc/self/mountinfo | sed 's#^/ /[0-9]*/#/ /<share>/#' 
ls -ln /dev | awk '{print $1, $3, $4, $5, $6, $NF}'
ls /dev/pts; ls /dev/mqueue /dev/shm
echo "keys $(wc -c < /proc/keys) timer_list $(wc -c < /proc/timer_list) firmware $(ls /sys/firmware | wc -l)"
echo x > /proc/sys/kernel/domainname || echo "proc/sys read-only"
touch /probe-file && echo "root writable" || echo "root read-only"
mknod /dev/blk-probe b 7 0 && head -c 1 /dev/blk-probe 2>&1 >/dev/null | sed 's/.*: /block device: /'
mknod /dev/tun-probe c 10 200 && head -c 1 /dev/tun-probe 2>&1 >/dev/null | sed 's/.*: /tun: /'
echo hi > /dev/null && head -c 4 /dev/zero | wc -c
exit 3`

// TestAppContainerByTheAgentMatchesRunc: the agent creates an app container itself when
// it asks for nothing only runc gives (docs/design/023). The same container created both
// ways — by the agent, and by runc (an rlimit sends it there) — must see itself the same:
// credentials, capabilities, cgroup and its limits, mounts and their options, /dev, the
// masked and read-only paths, a read-only root, the device filter, the exit status; with
// a cgroup namespace of its own and without one (containerd gives none on a cgroup v1
// host, like this test bed's).
func TestAppContainerByTheAgentMatchesRunc(t *testing.T) {
	testenv.Require(t)
	cfg := testenv.VMConfig(t, "appinit")
	vm := testenv.StartVM(t, cfg)
	ctx := testenv.Context(t, 3*time.Minute)

	spec := func(runc, cgroupns bool) *specs.Spec {
		// The container's id, which its root's and cgroup's paths show, is made the same.
		s := testenv.Spec("sh", "-c", "("+appProbe+") 2>&1 | sed 's#by-[a-z-]*#<id>#g'; exit 3")
		s.Process.Rlimits = nil
		if runc {
			s.Process.Rlimits = []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Hard: 1024, Soft: 1024}}
		}
		// Root, with its capabilities: the device filter is what stops it.
		s.Process.User = specs.User{UID: 0, GID: 0, AdditionalGids: []uint32{10, 20}}
		s.Process.Capabilities.Inheritable = []string{"CAP_NET_BIND_SERVICE"}
		s.Process.Capabilities.Ambient = []string{"CAP_NET_BIND_SERVICE"}
		s.Process.Cwd = "/"
		if cgroupns {
			s.Process.Cwd = "/work/dir" // not in the image: made
		}
		oom, umask := 300, uint32(0o027)
		s.Process.OOMScoreAdj, s.Process.User.Umask = &oom, &umask
		s.Root.Readonly = true
		if cgroupns {
			s.Linux.Namespaces = append(s.Linux.Namespaces, specs.LinuxNamespace{Type: specs.CgroupNamespace})
		}
		s.Mounts = append(s.Mounts, specs.Mount{Destination: "/tmp", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "nodev", "mode=1777"}})
		limit, pids, shares := int64(96<<20), int64(64), uint64(512)
		s.Linux.Resources = &specs.LinuxResources{
			Memory: &specs.LinuxMemory{Limit: &limit},
			Pids:   &specs.LinuxPids{Limit: &pids},
			CPU:    &specs.LinuxCPU{Shares: &shares},
			// CRI's rule: deny all; runc adds its defaults (the default nodes, mknod of
			// anything), which the agent must add too.
			Devices: []specs.LinuxDeviceCgroup{{Allow: false, Access: "rwm"}},
		}
		return s
	}
	run := func(id string, runc, cgroupns bool) (int, string) {
		var out testenv.Buffer
		p, err := vm.CreateContainer(ctx, id, testenv.OverlayRootfs(t, testenv.BusyboxRootfs(t)), spec(runc, cgroupns), runtime.Stdio{Stdout: &out})
		if err != nil {
			t.Fatalf("create %s: %v", id, err)
		}
		defer func() {
			if err := vm.RemoveContainer(ctx, id, true); err != nil {
				t.Errorf("remove %s: %v", id, err)
			}
		}()
		if err := vm.Agent().StartContainer(ctx, id); err != nil {
			t.Fatalf("start %s: %v", id, err)
		}
		exit, err := testenv.WaitOutput(ctx, p)
		if err != nil {
			t.Fatalf("%s: %v", id, err)
		}
		return exit.Status, out.String()
	}
	for _, cgroupns := range []bool{true, false} {
		t.Run(fmt.Sprint("cgroupns=", cgroupns), func(t *testing.T) {
			suffix := map[bool]string{true: "", false: "-host-cgroupns"}[cgroupns]
			agentStatus, byAgent := run("by-agent"+suffix, false, cgroupns)
			runcStatus, byRunc := run("by-runc"+suffix, true, cgroupns)
			t.Logf("created by the agent (exit %d):\n%s", agentStatus, byAgent)
			if agentStatus != runcStatus || byAgent != byRunc {
				t.Errorf("the agent's container differs from runc's (exit %d); runc's:\n%s", runcStatus, byRunc)
			}
			// What both must show, so that the comparison cannot pass on two wrong views.
			want := []string{"pid 1 session 1\n", "Uid:\t0\t0\t0\t0\n", "Groups:\t10 20 \n",
				"CapAmb:\t0000000000000400\n", "NoNewPrivs:\t1\n",
				"keys 0 timer_list 0 firmware 0\n", "proc/sys read-only\n", "root read-only\n", "block device: Operation not permitted\n", "\n4\n"}
			if cgroupns {
				want = append(want, "0::/\n300\n100663296\n64\n", "0027\n/work/dir\nvmpod-test\n")
			} else {
				want = append(want, "0::/vmpod/<id>\n300\n", "0027\n/\nvmpod-test\n")
			}
			for _, w := range want {
				if !strings.Contains(byAgent, w) {
					t.Errorf("the agent's container lacks %q", w)
				}
			}
			if agentStatus != 3 {
				t.Errorf("exit status %d, want 3", agentStatus)
			}
			// and each was created the way it was meant to be
			log, _ := os.ReadFile(cfg.LogPath)
			for id, by := range map[string]string{"by-agent" + suffix: "by=agent", "by-runc" + suffix: "by=runc"} {
				if !regexp.MustCompile(`msg="container created".* container=` + id + ` .*` + by + ` `).Match(log) {
					t.Errorf("the guest's log does not say %s was created %s", id, by)
				}
			}
		})
	}
}
