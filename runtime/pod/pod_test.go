package pod

import (
	"slices"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
	"github.com/vmpod/vmpod/runtime/cri"
	"github.com/vmpod/vmpod/runtime/nodeconfig"
)

func i64(v int64) *int64   { return &v }
func u64(v uint64) *uint64 { return &v }

func TestSizeFor(t *testing.T) {
	s := nodeconfig.Default().Sizing // 1-4 vCPUs, 512-8192 MiB, +64 MiB overhead
	cases := []struct {
		name string
		spec *specs.Spec
		want Size
		err  string
	}{
		{"no limits", &specs.Spec{}, Size{1, 512}, ""},
		{"CRI pod limits", &specs.Spec{Annotations: map[string]string{
			cri.AnnotationSandboxID: "p", cri.AnnotationSandboxCPUQuota: "250000", cri.AnnotationSandboxCPUPer: "100000",
			cri.AnnotationSandboxMemory: "1073741824"}}, Size{3, 1024 + 64}, ""},
		{"clamped to the node's maximum", &specs.Spec{Annotations: map[string]string{
			cri.AnnotationSandboxID: "p", cri.AnnotationSandboxCPUQuota: "6400000", cri.AnnotationSandboxCPUPer: "100000",
			cri.AnnotationSandboxMemory: "68719476736"}}, Size{4, 8192}, ""},
		{"small pods get the default", &specs.Spec{Annotations: map[string]string{
			cri.AnnotationSandboxID: "p", cri.AnnotationSandboxMemory: "67108864"}}, Size{1, 512}, ""},
		{"ctr run: the container's own limits", &specs.Spec{Linux: &specs.Linux{Resources: &specs.LinuxResources{
			CPU:    &specs.LinuxCPU{Quota: i64(200000), Period: u64(100000)},
			Memory: &specs.LinuxMemory{Limit: i64(768 << 20)}}}}, Size{2, 768 + 64}, ""},
		{"bad annotation", &specs.Spec{Annotations: map[string]string{cri.AnnotationSandboxMemory: "lots"}}, Size{}, cri.AnnotationSandboxMemory},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := sizeFor(tc.spec, s)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("got %v, want error naming %q", err, tc.err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}

func TestGuestSpec(t *testing.T) {
	spec := &specs.Spec{
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc"},
			{Destination: "/etc/hosts", Type: "bind", Source: "/var/lib/cri/hosts", Options: []string{"rbind", "ro"}},
			{Destination: "/data", Source: "/var/lib/kubelet/pods/x/volumes/empty", Options: []string{"rbind", "rw"}},
			{Destination: "/dev/shm", Type: "bind", Source: "/run/cri/sandboxes/p/shm", Options: []string{"rbind"}},
		},
		Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{
			{Type: specs.NetworkNamespace, Path: "/var/run/netns/cni-1"},
			{Type: specs.IPCNamespace, Path: "/proc/42/ns/ipc"},
			{Type: specs.PIDNamespace},
			{Type: specs.MountNamespace},
		}},
	}
	type shared struct {
		host, name string
		ro         bool
	}
	var got []shared
	share := func(host, name string, ro bool) (string, error) {
		got = append(got, shared{host, name, ro})
		return "/guest/" + name, nil
	}
	g, names, err := guestSpec("c1", spec, map[uint32]uint32{42: 7}, share, noSubmounts)
	if err != nil {
		t.Fatal(err)
	}
	for _, ns := range g.Linux.Namespaces {
		if ns.Type == specs.NetworkNamespace {
			t.Error("network namespace kept: the VM is the pod's network")
		}
	}
	if len(g.Linux.Namespaces) != 3 || g.Linux.Namespaces[0].Path != "/proc/7/ns/ipc" {
		t.Errorf("namespaces: %+v; want the IPC namespace of host pid 42 as guest pid 7's", g.Linux.Namespaces)
	}
	if g.Mounts[1].Source != "/guest/c1/mounts/1" || !got[0].ro || got[0].host != "/var/lib/cri/hosts" {
		t.Errorf("hosts mount: %+v, shares %+v", g.Mounts[1], got)
	}
	if g.Mounts[2].Source != "/guest/c1/mounts/2" || got[1].ro {
		t.Errorf("rw volume: %+v, shares %+v", g.Mounts[2], got)
	}
	if g.Mounts[3].Source != agentv1.GuestPodShmDir {
		t.Errorf("/dev/shm: %+v", g.Mounts[3])
	}
	if len(names) != 2 {
		t.Errorf("share names %v", names)
	}
	if spec.Mounts[1].Source != "/var/lib/cri/hosts" || len(spec.Linux.Namespaces) != 4 {
		t.Error("the host spec was modified")
	}
}

func TestGuestSpecRefusesForeignNamespaces(t *testing.T) {
	for _, path := range []string{"/proc/99/ns/ipc", "/proc/7/ns/ipc", "/var/run/netns/x", "/proc/self/ns/pid"} {
		spec := &specs.Spec{Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: specs.IPCNamespace, Path: path}}}}
		_, _, err := guestSpec("c", spec, map[uint32]uint32{42: 7}, nil, noSubmounts)
		if err == nil || !strings.Contains(err.Error(), "linux.namespaces[0].path") {
			t.Errorf("%s: got %v, want an error naming linux.namespaces[0].path", path, err)
		}
	}
}

func noSubmounts(string) ([]string, error) { return nil, nil }

// A read-only bind with a host mount below it: the submount becomes its own share and
// guest bind, writable under "ro" (non-recursive), read-only under "rro".
func TestGuestSpecRebuildsSubmounts(t *testing.T) {
	host := t.TempDir() // a directory, so submounts are looked for
	for _, tc := range []struct {
		opt    string
		wantRO bool
	}{{"ro", false}, {"rro", true}} {
		spec := &specs.Spec{Mounts: []specs.Mount{{Destination: "/mnt", Type: "bind", Source: host, Options: []string{"rbind", tc.opt}}}}
		shared := map[string]bool{}
		share := func(h, name string, ro bool) (string, error) { shared[h] = ro; return "/guest/" + name, nil }
		subs := func(string) ([]string, error) { return []string{host + "/tmpfs"}, nil }
		g, names, err := guestSpec("c", spec, nil, share, subs)
		if err != nil {
			t.Fatal(err)
		}
		if len(g.Mounts) != 2 || len(names) != 2 {
			t.Fatalf("%s: mounts %+v", tc.opt, g.Mounts)
		}
		sub := g.Mounts[1]
		if sub.Destination != "/mnt/tmpfs" || sub.Source != "/guest/c/mounts/0.0" {
			t.Errorf("%s: submount %+v", tc.opt, sub)
		}
		if got := slices.Contains(sub.Options, "ro"); got != tc.wantRO || shared[host+"/tmpfs"] != tc.wantRO {
			t.Errorf("%s: submount read-only %v (shared ro %v), want %v", tc.opt, got, shared[host+"/tmpfs"], tc.wantRO)
		}
	}
}
