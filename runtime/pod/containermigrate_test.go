package pod

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/vmpod/vmpod/api/machine"
	"github.com/vmpod/vmpod/runtime"
	"github.com/vmpod/vmpod/runtime/cri"
)

// a container of a migrating pod: its CRI name, an overlay rootfs, and binds
func migratingContainer(t *testing.T, name string, mounts ...specs.Mount) *container {
	t.Helper()
	spec := &specs.Spec{Annotations: map[string]string{cri.AnnotationContainerType: cri.ContainerTypeContainer, cri.AnnotationContainerName: name}, Mounts: mounts}
	return &container{name: name, spec: spec, root: Rootfs{Dir: t.TempDir(), Upper: t.TempDir()}}
}

func bind(src, dst string, opts ...string) specs.Mount {
	return specs.Mount{Type: "bind", Source: src, Destination: dst, Options: append([]string{"rbind"}, opts...)}
}

// What a container wrote moves with it: its rootfs's upper directory and its emptyDirs;
// what the target's kubelet writes again (read-only volumes, files) does not; a writable
// host directory that is no emptyDir cannot, and says which mount.
func TestMirroredShares(t *testing.T) {
	pods := t.TempDir()
	emptyDir := filepath.Join(pods, "uid", "volumes", "kubernetes.io~empty-dir", "cache")
	config := filepath.Join(pods, "uid", "volumes", "kubernetes.io~configmap", "cfg")
	hosts := filepath.Join(pods, "uid", "etc-hosts")
	for _, d := range []string{emptyDir, config} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(hosts, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	c := migratingContainer(t, "app", bind("/dev/shm", "/dev/shm"), bind(config, "/etc/cfg", "ro"), bind(hosts, "/etc/hosts"), bind(emptyDir, "/cache"))
	got, err := mirroredShares("g1", c)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"g1/rootfs": c.root.Upper, "g1/mounts/3": emptyDir}
	if len(got) != len(want) || got["g1/rootfs"] != want["g1/rootfs"] || got["g1/mounts/3"] != want["g1/mounts/3"] {
		t.Errorf("mirrored: %v, want %v", got, want)
	}

	hostPath := migratingContainer(t, "app", bind(t.TempDir(), "/data"))
	if _, err := mirroredShares("g1", hostPath); err == nil || !strings.Contains(err.Error(), "mounts[0] (/data)") {
		t.Errorf("a writable hostPath: %v, want refused naming mounts[0] (/data)", err)
	}
	noOverlay := migratingContainer(t, "app")
	noOverlay.root.Upper = ""
	if _, err := mirroredShares("g1", noOverlay); err == nil || !strings.Contains(err.Error(), "no overlay") {
		t.Errorf("a rootfs that is no overlay: %v", err)
	}
}

// a target pod waiting for its guest, with placeholders for the sandbox and "app"
func waitingTarget(t *testing.T) *containerPod {
	sandbox := migratingContainer(t, "")
	sandbox.spec.Annotations[cri.AnnotationContainerType] = cri.ContainerTypeSandbox
	app := migratingContainer(t, "app")
	for _, c := range []*container{sandbox, app} {
		c.placeholder = newPlaceholder(c)
	}
	size := Size{VCPUs: 1, MemoryMiB: 512}
	return &containerPod{id: "target", machine: machine.Q35, size: size, boot: size, maxSize: Size{VCPUs: 4, MemoryMiB: 8192}, awaiting: true,
		vm:         machineShape{Type: machine.Q35, VCPUs: 1, MemoryMiB: 512, MaxVCPUs: 4, MaxMemoryMiB: 8192, Template: true},
		containers: map[string]*container{"t-sandbox": sandbox, "t-app": app}}
}

func goodShape() podShape {
	return podShape{Machine: machineShape{Type: machine.Q35, VCPUs: 1, MemoryMiB: 512, MaxVCPUs: 4, MaxMemoryMiB: 8192, Template: true}, Containers: []shapedContainer{
		{Name: "", ID: "s-sandbox", Pid: 1, Mirrored: []string{"s-sandbox/rootfs"}, Places: map[string]uint64{"s-sandbox/rootfs": 1}},
		{Name: "app", ID: "s-app", Pid: 9, Mirrored: []string{"s-app/rootfs"}, Places: map[string]uint64{"s-app/rootfs": 2}},
	}}
}

// The source's shape is a peer's word: the target takes it only if it is this pod's
// machine and containers, and says which field does not match; a refusal leaves no
// placeholder matched.
func TestMatchPodShape(t *testing.T) {
	p := waitingTarget(t)
	if err := p.matchPodShape(goodShape()); err != nil {
		t.Fatal(err)
	}
	if a := p.containers["t-app"].arriving; a == nil || a.ID != "s-app" || p.containers["t-app"].mirrorDirs["s-app/rootfs"] != p.containers["t-app"].root.Upper {
		t.Errorf("app is to become %+v, its writes to go to %v", a, p.containers["t-app"].mirrorDirs)
	}
	for name, change := range map[string]struct {
		change func(*podShape)
		want   string
	}{
		"size":           {func(s *podShape) { s.Machine.MemoryMiB = 1024 }, "MemoryMiB:1024"},
		"machine":        {func(s *podShape) { s.Machine.Type = machine.MicroVM }, "microvm"},
		"no template":    {func(s *podShape) { s.Machine.Template = false }, "one was restored from a template and one not"},
		"a name":         {func(s *podShape) { s.Containers[1].Name = "web" }, "no container web"},
		"one less":       {func(s *podShape) { s.Containers = s.Containers[:1] }, "container app is not the guest's"},
		"the same id":    {func(s *podShape) { s.Containers[1].ID = "s-sandbox" }, "containers[1].id"},
		"an id of path":  {func(s *podShape) { s.Containers[1].ID = "../x" }, "containers[1].id"},
		"the dot":        {func(s *podShape) { s.Containers[1].ID = "." }, "containers[1].id"},
		"a place twice":  {func(s *podShape) { s.Containers[1].Places = map[string]uint64{"s-app/rootfs": 1} }, "place 1 is s-sandbox/rootfs's too"},
		"a place beyond": {func(s *podShape) { s.Containers[1].Places = map[string]uint64{"s-app/rootfs": 1 << 63} }, "is no place"},
		"shares":         {func(s *podShape) { s.Containers[1].Shares = []string{"s-app/mounts/0"} }, "containers differ"},
		"places":         {func(s *podShape) { s.Containers[1].Places = nil }, "containers[1].places"},
		"writes":         {func(s *podShape) { s.Containers[1].Mirrored = []string{"s-app/mounts/1"} }, "writes come for"},
	} {
		t.Run(name, func(t *testing.T) {
			p := waitingTarget(t)
			s := goodShape()
			change.change(&s)
			err := p.matchPodShape(s)
			if err == nil || !strings.Contains(err.Error(), change.want) {
				t.Fatalf("%v, want an error with %q", err, change.want)
			}
			for id, c := range p.containers {
				if c.arriving != nil || c.mirrorDirs != nil {
					t.Errorf("%s matched after the refusal", id)
				}
			}
		})
	}
}

// A mirror connection names its share first; its writes follow unread.
func TestMirrorName(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	go func() { _ = writeMirrorName(a, "c1/mounts/3"); _, _ = a.Write([]byte("stream")) }()
	name, err := readMirrorName(b)
	if err != nil || name != "c1/mounts/3" {
		t.Fatalf("%q, %v", name, err)
	}
	rest := make([]byte, 6)
	if _, err := b.Read(rest); err != nil || string(rest) != "stream" {
		t.Errorf("after the name: %q, %v", rest, err)
	}
}

// fakeProcess is an adopted init.
type fakeProcess struct {
	exit    runtime.Exit
	signals []syscall.Signal
}

func (f *fakeProcess) Pid() uint32                                  { return 7 }
func (f *fakeProcess) Wait(context.Context) (runtime.Exit, error)   { return f.exit, nil }
func (f *fakeProcess) OutputDone() <-chan struct{}                  { return nil }
func (f *fakeProcess) Resize(context.Context, uint32, uint32) error { return nil }
func (f *fakeProcess) CloseStdin(context.Context) error             { return nil }
func (f *fakeProcess) Remove(context.Context) error                 { return nil }
func (f *fakeProcess) Signal(_ context.Context, sig syscall.Signal, _ bool) error {
	f.signals = append(f.signals, sig)
	return nil
}

// A placeholder is its container until the guest comes: a signal ends it as it would end
// the container; then it is the adopted process, or exits with why the guest did not come.
func TestPlaceholder(t *testing.T) {
	ctx := context.Background()
	wait := func(p *placeholder) runtime.Exit {
		t.Helper()
		ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		exit, err := p.Wait(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return exit
	}
	signalled := newPlaceholder(&container{})
	_ = signalled.Signal(ctx, syscall.SIGWINCH, false)
	_ = signalled.Signal(ctx, syscall.SIGTERM, false)
	if exit := wait(signalled); exit.Status != 143 {
		t.Errorf("signalled before the guest came: %+v, want 143", exit)
	}

	failed := newPlaceholder(&container{})
	failed.resolve(nil, runtime.Exit{Status: 1, Reason: "MigrationFailed: no source"})
	failed.resolve(&fakeProcess{}, runtime.Exit{}) // only the first counts
	if exit := wait(failed); exit.Status != 1 || exit.Reason != "MigrationFailed: no source" {
		t.Errorf("the guest did not come: %+v", exit)
	}
	select {
	case <-failed.OutputDone():
	case <-time.After(5 * time.Second):
		t.Error("a failed placeholder's output is not done")
	}

	adopted := newPlaceholder(&container{})
	proc := &fakeProcess{exit: runtime.Exit{Status: 3}}
	adopted.resolve(proc, runtime.Exit{})
	_ = adopted.Signal(ctx, syscall.SIGUSR1, false)
	if exit := wait(adopted); exit.Status != 3 || len(proc.signals) != 1 || proc.signals[0] != syscall.SIGUSR1 {
		t.Errorf("adopted: %+v, the process got %v", exit, proc.signals)
	}
}

// The pod refuses what needs its guest while the guest is on its way or gone, naming why.
func TestGuestHere(t *testing.T) {
	p := waitingTarget(t)
	if err := p.guestHere("exec in x"); !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "has not arrived") {
		t.Errorf("awaiting: %v", err)
	}
	p.awaiting, p.movedTo = false, "192.0.2.9:4000"
	if err := p.guestHere("exec in x"); !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "moved to 192.0.2.9:4000") {
		t.Errorf("moved: %v", err)
	}
}
