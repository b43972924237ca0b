package agent

import (
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// appSpec is an app container as CRI makes one: the pod's IPC and UTS namespaces to
// join, new PID, mount and cgroup namespaces, the usual mounts, no rlimits.
func appSpec() *specs.Spec {
	limit := int64(64 << 20)
	return &specs.Spec{
		Annotations: map[string]string{criContainerType: "container"},
		Root:        &specs.Root{Path: "/rootfs"},
		Process: &specs.Process{
			Args: []string{"sh"}, Cwd: "/",
			Capabilities: &specs.LinuxCapabilities{Bounding: []string{"CAP_KILL"}},
		},
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc"},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "mode=755"}},
			{Destination: "/sys/fs/cgroup", Type: "cgroup", Source: "cgroup", Options: []string{"ro"}},
			{Destination: "/etc/hosts", Type: "bind", Source: "/run/x/hosts", Options: []string{"rbind", "rprivate", "rro"}},
		},
		Linux: &specs.Linux{
			Namespaces: []specs.LinuxNamespace{{Type: specs.PIDNamespace}, {Type: specs.IPCNamespace, Path: "/proc/7/ns/ipc"},
				{Type: specs.UTSNamespace, Path: "/proc/7/ns/uts"}, {Type: specs.MountNamespace}, {Type: specs.CgroupNamespace}},
			Resources:         &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &limit}, Unified: map[string]string{"memory.oom.group": "1"}},
			RootfsPropagation: "rslave",
		},
	}
}

func TestAgentCreatesApp(t *testing.T) {
	if why := agentCreatesApp(appSpec()); why != "" {
		t.Fatalf("a CRI app container goes to runc: %s", why)
	}
	for name, edit := range map[string]func(*specs.Spec){
		"seccomp":            func(s *specs.Spec) { s.Linux.Seccomp = &specs.LinuxSeccomp{} },
		"terminal":           func(s *specs.Spec) { s.Process.Terminal = true },
		"rlimits":            func(s *specs.Spec) { s.Process.Rlimits = []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE"}} },
		"unknown capability": func(s *specs.Spec) { s.Process.Capabilities.Bounding = []string{"CAP_NOPE"} },
		"user namespace": func(s *specs.Spec) {
			s.Linux.Namespaces = append(s.Linux.Namespaces, specs.LinuxNamespace{Type: specs.UserNamespace})
		},
		"mount namespace to join": func(s *specs.Spec) { s.Linux.Namespaces[3].Path = "/proc/7/ns/mnt" },
		"no mount namespace":      func(s *specs.Spec) { s.Linux.Namespaces = s.Linux.Namespaces[:3] },
		"host name, no UTS namespace": func(s *specs.Spec) {
			s.Hostname = "x"
			s.Linux.Namespaces = append(s.Linux.Namespaces[:2:2], s.Linux.Namespaces[3:]...)
		},
		"non-namespaced sysctl": func(s *specs.Spec) { s.Linux.Sysctl = map[string]string{"kernel.panic": "1"} },
		"overlay mount": func(s *specs.Spec) {
			s.Mounts = append(s.Mounts, specs.Mount{Destination: "/x", Type: "overlay", Source: "overlay"})
		},
		"tmpcopyup": func(s *specs.Spec) { s.Mounts[1].Options = append(s.Mounts[1].Options, "tmpcopyup") },
		"idmapped mount": func(s *specs.Spec) {
			s.Mounts[3].UIDMappings = []specs.LinuxIDMapping{{HostID: 1, Size: 1}}
		},
		"shared root":       func(s *specs.Spec) { s.Linux.RootfsPropagation = "rshared" },
		"device nodes":      func(s *specs.Spec) { s.Linux.Devices = []specs.LinuxDevice{{Path: "/dev/fuse", Type: "c"}} },
		"swappiness":        func(s *specs.Spec) { s.Linux.Resources.Memory.Swappiness = new(uint64(1)) },
		"block I/O":         func(s *specs.Spec) { s.Linux.Resources.BlockIO = &specs.LinuxBlockIO{} },
		"unified path":      func(s *specs.Spec) { s.Linux.Resources.Unified = map[string]string{"../x.max": "1"} },
		"personality":       func(s *specs.Spec) { s.Linux.Personality = &specs.LinuxPersonality{Domain: specs.PerLinux32} },
		"quota, no period":  func(s *specs.Spec) { s.Linux.Resources.CPU = &specs.LinuxCPU{Quota: new(int64(1000))} },
		"realtime CPU time": func(s *specs.Spec) { s.Linux.Resources.CPU = &specs.LinuxCPU{RealtimeRuntime: new(int64(1))} },
	} {
		s := appSpec()
		edit(s)
		if why := agentCreatesApp(s); why == "" {
			t.Errorf("%s: the agent would create it", name)
		}
	}
}

func TestDeviceRules(t *testing.T) {
	major := int64(1)
	got := deviceRules([]specs.LinuxDeviceCgroup{{Allow: false, Access: "rwm"}, {Allow: true, Type: "c", Major: &major, Access: "rw"}})
	if got[0].Type != "a" || *got[0].Major != -1 || *got[0].Minor != -1 {
		t.Errorf("deny-all rule: %+v, want type a, any numbers", got[0])
	}
	if got[1].Type != "c" || *got[1].Major != 1 || *got[1].Minor != -1 {
		t.Errorf("char 1:* rule: %+v", got[1])
	}
	// runc's own rules come last, so that a deny-all before them does not hide /dev/null
	if len(got) != 2+len(runcAllowedDevices) || got[2].Type != "c" || got[2].Access != "m" || *got[2].Major != -1 {
		t.Errorf("runc's default rules not appended: %+v", got[2:])
	}
}
