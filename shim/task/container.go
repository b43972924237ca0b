package task

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/protobuf"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/vmpod/vmpod/internal/cleanup"
	"github.com/vmpod/vmpod/internal/idmap"
	"github.com/vmpod/vmpod/internal/mounts"
	"github.com/vmpod/vmpod/internal/phases"
	"github.com/vmpod/vmpod/runtime/pod"
)

// container is a containerd task: its bundle, rootfs, init and execs.
type container struct {
	id     string
	bundle string
	spec   *specs.Spec
	rootfs string // host directory shared into the guest
	// mounted: the pod mounted the rootfs (pod.Rootfs.Mount), unmounted on delete; a
	// migration's target mounts it later than its create
	mounted *atomic.Bool
	init    *process

	mu          sync.Mutex
	execs       map[string]*process
	initExiting bool           // no exec may start once the init is on its way out
	runningExec sync.WaitGroup // started execs whose exit is not published yet
}

func (c *container) process(execID string) (*process, error) {
	if execID == "" {
		return c.init, nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	p, ok := c.execs[execID]
	if !ok {
		return nil, fmt.Errorf("container %s exec %s: %w", c.id, execID, errdefs.ErrNotFound)
	}
	return p, nil
}

func loadSpec(bundle string) (*specs.Spec, error) {
	b, err := os.ReadFile(filepath.Join(bundle, "config.json"))
	if err != nil {
		return nil, fmt.Errorf("bundle %s: %w", bundle, err)
	}
	var spec specs.Spec
	if err := json.Unmarshal(b, &spec); err != nil {
		return nil, fmt.Errorf("bundle %s: config.json: %w: %w", bundle, err, errdefs.ErrInvalidArgument)
	}
	if spec.Process == nil || (len(spec.Process.Args) == 0 && spec.Process.CommandLine == "") {
		return nil, fmt.Errorf("bundle %s: config.json: process.args: empty (the image has no command and none was given): %w", bundle, errdefs.ErrInvalidArgument)
	}
	return &spec, nil
}

// rootfsOf is the container's rootfs: containerd's rootfs mounts (a snapshot), to be
// mounted at bundle/rootfs as every shim mounts them, but by the pod (pod.Rootfs); without
// mounts the spec's root as it is. With idm they are mounted through that ID mapping (the
// pod's virtiofsd's, docs/design/025), a root.path too.
func rootfsOf(bundle string, mounts []*types.Mount, spec *specs.Spec, idm *idmap.Map) (pod.Rootfs, error) {
	if len(mounts) == 0 {
		if spec.Root == nil || spec.Root.Path == "" {
			return pod.Rootfs{}, fmt.Errorf("no rootfs mounts and no root.path: %w", errdefs.ErrInvalidArgument)
		}
		dir := spec.Root.Path
		if !filepath.IsAbs(dir) {
			dir = filepath.Join(bundle, dir)
		}
		if idm == nil {
			return pod.Rootfs{Dir: dir}, nil
		}
		// onto itself: the bundle keeps its root.path, seen through the mapping
		return pod.Rootfs{Dir: dir, Mount: func() error {
			if err := idmap.Bind(dir, dir, *idm, false); err != nil {
				return fmt.Errorf("root.path: %w", err)
			}
			return nil
		}}, nil
	}
	dir := filepath.Join(bundle, "rootfs")
	root := pod.Rootfs{Dir: dir, Upper: upperDir(mounts)}
	root.Mount = func() error {
		if err := os.MkdirAll(dir, 0o711); err != nil {
			return err
		}
		if idm != nil {
			if err := mountMapped(mounts, dir, *idm); err != nil {
				return fmt.Errorf("mount rootfs: %w", err)
			}
			return nil
		}
		ms := make([]mount.Mount, 0, len(mounts))
		for _, m := range mounts {
			ms = append(ms, mount.Mount{Type: m.Type, Source: m.Source, Target: m.Target, Options: m.Options})
		}
		if err := mount.All(ms, dir); err != nil {
			return fmt.Errorf("mount rootfs: %w", err)
		}
		return nil
	}
	return root, nil
}

// upperDir is the upper directory of a rootfs that is one overlay, "" for any other.
func upperDir(mounts []*types.Mount) string {
	if len(mounts) != 1 || mounts[0].Type != "overlay" || mounts[0].Target != "" {
		return ""
	}
	for _, o := range mounts[0].Options {
		if dir, ok := strings.CutPrefix(o, "upperdir="); ok {
			return dir
		}
	}
	return ""
}

// mountMapped mounts containerd's rootfs mounts at dir through idm: the overlay and bind
// mounts snapshotters give. Others name themselves and the node setting that takes them.
func mountMapped(ms []*types.Mount, dir string, idm idmap.Map) (retErr error) {
	defer func() {
		if retErr != nil {
			_, _ = mounts.UnmountTree(dir)
		}
	}()
	for i, m := range ms {
		if m.Target != "" {
			return fmt.Errorf("rootfs mount %d: target %q: only whole-rootfs mounts can be ID-mapped", i, m.Target)
		}
		var err error
		switch m.Type {
		case "overlay":
			err = idmap.Overlay(dir, m.Options, idm)
		case "bind", "rbind":
			err = idmap.Bind(m.Source, dir, idm, slices.Contains(m.Options, "ro"))
		default:
			err = fmt.Errorf("type %q: cannot be ID-mapped for virtiofsd (node config isolation.virtiofsd_user = \"root\" mounts it as it is): %w", m.Type, errdefs.ErrNotImplemented)
		}
		if err != nil {
			return fmt.Errorf("rootfs mount %d: %w", i, err)
		}
	}
	return nil
}

// unmountRootfs takes the rootfs and what is mounted below it off the host. A mount the
// host keeps busy (a shell whose working directory is inside it) is detached lazily, so
// a stray process cannot hold the pod's VM (docs/design/016-busy-mounts.md).
func unmountRootfs(ctx context.Context, rootfs string) error {
	detached, err := mounts.UnmountTree(rootfs)
	for _, m := range detached {
		log.G(ctx).Warnf("%s was busy on the host: detached lazily, the kernel frees it when its last user exits", m)
	}
	if err != nil {
		return fmt.Errorf("unmount rootfs: %w", err)
	}
	return nil
}

// create makes the container's init in the guest (the pod's VM is booted first if this is
// its first container) and announces it.
func (s *service) create(ctx context.Context, id, bundle string, rootfsMounts []*types.Mount, paths stdioPaths, configPath string) (*container, error) {
	steps := phases.New()
	ctx = phases.With(ctx, steps)
	spec, err := loadSpec(bundle)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	if _, exists := s.containers[id]; exists {
		s.mu.Unlock()
		return nil, fmt.Errorf("container %s: %w", id, errdefs.ErrAlreadyExists)
	}
	s.containers[id] = nil // reserved while it is being created
	s.mu.Unlock()

	var undo cleanup.Stack
	defer func() {
		if err := undo.Run(); err != nil {
			log.G(ctx).WithError(err).Warnf("container %s: cleanup after failed create", id)
		}
	}()
	undo.Add("forget container", func() error {
		s.mu.Lock()
		defer s.mu.Unlock()
		delete(s.containers, id)
		return nil
	})

	p, booted, err := s.podFor(ctx, id, spec, configPath)
	if err != nil {
		return nil, err
	}
	if booted {
		undo.Add("stop pod VM", func() error { return s.stopPod(context.WithoutCancel(ctx)) })
	}
	phases.Mark(ctx, "pod")

	root, err := rootfsOf(bundle, rootfsMounts, spec, p.RootfsMap())
	if err != nil {
		return nil, fmt.Errorf("container %s: %w", id, err)
	}
	// by the pod, once it creates the container: a mount it never made (a root.path the
	// user mounted) is not the shim's to unmount
	mounted := new(atomic.Bool)
	if mount := root.Mount; mount != nil {
		root.Mount = func() error {
			if err := mount(); err != nil {
				return err
			}
			mounted.Store(true)
			return nil
		}
	}
	undo.Add("unmount rootfs", func() error {
		if !mounted.Load() {
			return nil
		}
		return unmountRootfs(ctx, root.Dir)
	})
	hio, err := openIO(ctx, id, s.namespace, paths)
	if err != nil {
		return nil, fmt.Errorf("container %s: %w", id, err)
	}
	undo.Add("close stdio", func() error { hio.close(); return nil })
	phases.Mark(ctx, "rootfs+stdio")

	if err := p.WriteRecord(bundle); err != nil {
		return nil, fmt.Errorf("container %s: %w", id, err)
	}
	rt, err := p.CreateContainer(ctx, id, root, spec, hio.stdio(paths.terminal))
	if err != nil {
		return nil, err
	}
	phases.Mark(ctx, "create")
	c := &container{id: id, bundle: bundle, spec: spec, rootfs: root.Dir, mounted: mounted, execs: map[string]*process{}}
	c.init = newProcess(id, "", paths)
	c.init.io, c.init.rt, c.init.pid = hio, rt, rt.Pid()

	s.mu.Lock()
	s.containers[id] = c
	s.mu.Unlock()
	undo.Release()

	s.events.send(&eventstypes.TaskCreate{
		ContainerID: id,
		Bundle:      bundle,
		Rootfs:      rootfsMounts,
		IO:          &eventstypes.TaskIO{Stdin: paths.stdin, Stdout: paths.stdout, Stderr: paths.stderr, Terminal: paths.terminal},
		Pid:         c.init.pid,
	})
	go s.handleExit(c, c.init)
	// where the time went; `make bench` reads the pod's first container's line back
	log.G(ctx).WithField("container", id).WithField("booted", booted).WithField("phases", steps.String()).
		Infof("container created in %v", steps.Total().Round(time.Millisecond))
	return c, nil
}

// start starts the init (a created container) or an exec registered by Exec.
func (s *service) start(ctx context.Context, c *container, execID string) (uint32, error) {
	if execID == "" {
		p := c.init
		p.mu.Lock()
		defer p.mu.Unlock() // TaskStart is queued before the exit handler can queue TaskExit
		if _, err := p.state.next(stateRunning, "start"); err != nil {
			return 0, fmt.Errorf("%s: %w", p, err)
		}
		if err := s.pod.StartContainer(ctx, c.id); err != nil {
			return 0, err
		}
		if err := p.move(stateRunning, "start"); err != nil {
			return 0, err
		}
		s.events.send(&eventstypes.TaskStart{ContainerID: c.id, Pid: p.pid})
		return p.pid, nil
	}

	p, err := c.process(execID)
	if err != nil {
		return 0, err
	}
	c.mu.Lock()
	if c.initExiting {
		c.mu.Unlock()
		return 0, fmt.Errorf("%s: the container's init has exited: %w", p, errdefs.ErrFailedPrecondition)
	}
	c.runningExec.Add(1)
	c.mu.Unlock()

	p.mu.Lock()
	defer p.mu.Unlock()
	started := false
	defer func() {
		if !started {
			c.runningExec.Done()
		}
	}()
	if _, err := p.state.next(stateRunning, "start"); err != nil {
		return 0, fmt.Errorf("%s: %w", p, err)
	}
	hio, err := openIO(ctx, c.id, s.namespace, p.paths)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", p, err)
	}
	rt, err := s.pod.Exec(ctx, c.id, execID, p.execSpec, hio.stdio(p.paths.terminal))
	if err != nil {
		hio.close()
		return 0, err
	}
	p.io, p.rt, p.pid = hio, rt, rt.Pid()
	if err := p.move(stateRunning, "start"); err != nil {
		return 0, err
	}
	started = true
	s.events.send(&eventstypes.TaskExecStarted{ContainerID: c.id, ExecID: execID, Pid: p.pid})
	go s.handleExit(c, p)
	return p.pid, nil
}

// handleExit waits for a process to exit, then publishes the exit. An init's exit is
// published once its output has been delivered (the runtime bounds that wait) and after
// every exec of the container has published its own, as containerd expects: whoever reads
// an exited container's log finds all of it. An exec's exit is published at once and its
// output closed at its end, as runc's shim does: a background child holding the exec's
// stdout keeps containerd draining it until drain_exec_sync_io_timeout, when containerd
// deletes the exec (remove cuts the output off).
func (s *service) handleExit(c *container, p *process) {
	ctx := s.ctx
	exit := p.awaitExit(ctx, s.pod.Done())
	closeAtEnd := func() {
		select {
		case <-p.rt.OutputDone():
		case <-s.pod.Done():
		}
		p.io.closeOutput()
	}
	if p.execID != "" {
		go closeAtEnd()
	} else {
		closeAtEnd()
		c.mu.Lock()
		c.initExiting = true
		c.mu.Unlock()
		c.runningExec.Wait()
	}
	p.mu.Lock()
	if p.state == stateDeleted {
		// A created container removed whose exit came later than remove waits for:
		// TaskDelete is out, an exit now would name a task containerd has forgotten.
		p.mu.Unlock()
		return
	}
	p.setExitedLocked(exit.Status, exit.ExitedAt)
	s.events.send(&eventstypes.TaskExit{
		ContainerID: c.id,
		ID:          s.taskID(c, p),
		Pid:         p.pid,
		ExitStatus:  uint32(exit.Status),
		ExitedAt:    protobuf.ToTimestamp(exit.ExitedAt),
	})
	p.mu.Unlock()
	if p.execID != "" {
		c.runningExec.Done()
	}
	log.G(ctx).Infof("%s exited with status %d", p, exit.Status)
}

// taskID is the process's id in events: the container id for an init, else the exec id.
func (s *service) taskID(c *container, p *process) string {
	if p.execID == "" {
		return c.id
	}
	return p.execID
}

// remove deletes a process: an exec (not running) is forgotten; a container (not
// running) is removed from the guest, its rootfs unmounted, and the pod's VM stopped when
// it was the last one.
func (s *service) remove(ctx context.Context, c *container, execID string) (*process, error) {
	p, err := c.process(execID)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	wasCreated := p.state == stateCreated
	if _, err := p.state.next(stateDeleted, "delete"); err != nil {
		p.mu.Unlock()
		return nil, fmt.Errorf("%s: %w", p, err)
	}
	p.mu.Unlock()
	if execID == "" {
		s.mu.Lock()
		s.removing++
		s.mu.Unlock()
		defer func() {
			s.mu.Lock()
			s.removing--
			s.mu.Unlock()
		}()
	}

	if execID != "" {
		if p.rt != nil {
			if err := p.rt.Remove(ctx); err != nil && !errdefs.IsNotFound(err) && !s.podGone() {
				return nil, err
			}
		}
		c.mu.Lock()
		delete(c.execs, execID)
		c.mu.Unlock()
		p.mu.Lock()
		p.state = stateDeleted
		p.mu.Unlock()
	} else {
		// NotFound: an earlier Delete removed it from the guest and failed on the host
		// side; this one finishes that, or the shim would hold the pod for good.
		if err := s.pod.RemoveContainer(ctx, c.id, true); err != nil && !errdefs.IsNotFound(err) {
			return nil, err
		}
		if wasCreated {
			// Removing a created init ends it, and its exit handler publishes TaskExit;
			// containerd must see that before TaskDelete, never after.
			p.awaitExited(ctx, createdExitWait)
		}
		if c.mounted.Load() {
			if err := unmountRootfs(ctx, c.rootfs); err != nil {
				return nil, fmt.Errorf("container %s: %w", c.id, err)
			}
		}
		s.mu.Lock()
		delete(s.containers, c.id)
		s.mu.Unlock()
		// Deleted and announced under the lock the exit handler publishes under: a
		// TaskExit is queued before this TaskDelete or not at all.
		p.mu.Lock()
		p.state = stateDeleted
		s.events.send(&eventstypes.TaskDelete{
			ContainerID: c.id,
			Pid:         p.pid,
			ExitStatus:  p.exitStatus,
			ExitedAt:    protobuf.ToTimestamp(p.exitedAt),
		})
		p.mu.Unlock()
	}
	if p.io != nil {
		p.io.close()
	}
	if execID == "" && s.podEmpty() {
		if err := s.stopPod(ctx); err != nil {
			log.G(ctx).WithError(err).Warn("stop pod VM")
		}
	}
	return p, nil
}
