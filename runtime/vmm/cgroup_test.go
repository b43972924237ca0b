package vmm

import "testing"

func TestCgroupfsPath(t *testing.T) {
	for in, want := range map[string]string{
		"/kubepods/burstable/pod1/abc": "/kubepods/burstable/pod1/abc",
		"/k8s.io/abc":                  "/k8s.io/abc",
		"kubepods-burstable-pod1.slice:cri-containerd:abc":          "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-abc.scope",
		"system.slice:docker:abc":                                   "/system.slice/docker-abc.scope",
		"-.slice:vmpod:abc":                                         "/vmpod-abc.scope",
		"kubepods-besteffort-pod2.slice::kubepods-besteffort.slice": "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod2.slice/kubepods-besteffort.slice",
	} {
		got, err := cgroupfsPath(in)
		if err != nil || got != want {
			t.Errorf("%q: got %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"relative/path", "/", "/a/../b", "a.slice:x", "nota:cri:abc", "a--b.slice:p:n", "a.slice:p:x/y"} {
		if got, err := cgroupfsPath(bad); err == nil {
			t.Errorf("%q: got %q, want an error", bad, got)
		}
	}
}
