// Package vmtemplate starts container pods' guests from templates (docs/design/022): the
// guest is booted once per machine shape, its state saved into a file, and every later
// machine of the same shape restores that state instead of booting — under TCG a restore
// to the agent's first reply takes a fraction of a boot.
package vmtemplate

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
	"github.com/vmpod/vmpod/devices"
	"github.com/vmpod/vmpod/internal/phases"
	"github.com/vmpod/vmpod/runtime/vmm"
	"github.com/vmpod/vmpod/runtime/vmpodagent"
)

// maxStates is how many saved states a Store keeps; making one more removes the least
// recently used (a node sees few machine shapes: the default size and what pods ask for).
const maxStates = 8

// Store keeps saved template states in Dir, one file per template key
// (vmm.Config.TemplateKey), made by the first machine that needs one.
type Store struct {
	Dir string
	// BaseMemoryMiB, when set, makes templates of its memory and of its doublings (512,
	// 1024, 2048, ... MiB), and a machine with more restores the largest that fits it
	// (with its own vCPU count); the rest, less than the template has, is plugged through
	// its virtio-mem device before the guest is handed over. Pods of every memory size
	// then share a few templates, as Kata's share one, instead of each size making and
	// keeping its own; and no guest has more plugged than it booted with (the plugged
	// memory's page structures come out of what it has). A machine whose memory above its
	// template's is not whole virtio-mem blocks, or that has no room to plug it into, gets
	// a template of its own size.
	BaseMemoryMiB int
	// Cgroup, when set, is the cgroup templates are made in (vmm.Config.Cgroup): their
	// RAM files' pages, in tmpfs, are charged to it for as long as the files are kept.
	// Unset, they are charged to the caller's.
	Cgroup string
}

// Each template is two files (vmm.SavedTemplate): key.ram, written first, and key.state,
// whose presence says the template is whole. key.lock is held while a template is made,
// removed or trimmed (never removed itself: a lock file replaced under a holder would
// lock nothing); key.failed marks a recent failure to make it, key.vm and key.tmp-* are
// the maker's machine and files while it works.
func (s *Store) statePath(key string) string  { return filepath.Join(s.Dir, key+".state") }
func (s *Store) ramPath(key string) string    { return filepath.Join(s.Dir, key+".ram") }
func (s *Store) lockPath(key string) string   { return filepath.Join(s.Dir, key+".lock") }
func (s *Store) failedPath(key string) string { return filepath.Join(s.Dir, key+".failed") }
func (s *Store) vmDir(key string) string      { return filepath.Join(s.Dir, key+".vm") }

// failBackoff is how long after a failed make a shape's pods boot without trying again.
const failBackoff = 10 * time.Minute

// Boot starts cfg's guest from the template of its shape, and returns it as
// vmpodagent.Boot would have. The template is made first if there is none (the first pod
// of a shape pays a boot, a save and a restore); a machine that cannot be a template's
// (another machine type, disks, ...) boots, and so does one whose template another
// process is making at the moment, rather than wait. A template QEMU refuses
// (vmm.ErrTemplateRefused) is removed and the guest booted; the next machine makes a new
// one. A restore that fails for the pod's own reasons fails as a boot would.
func (s *Store) Boot(ctx context.Context, cfg vmpodagent.Config) (*vmpodagent.Guest, error) {
	logger := log.G(ctx).WithField("vm", cfg.Name)
	tcfg := templateConfig(cfg)
	var plug int
	tcfg.MemoryMiB, plug = s.templateMemory(cfg.Config)
	if err := tcfg.CheckTemplate(); err != nil {
		logger.Infof("template: none for this machine (%v); booting", err)
		return vmpodagent.Boot(ctx, cfg)
	}
	key, err := tcfg.TemplateKey()
	if err == nil {
		err = s.checkDir()
	}
	if err != nil {
		logger.WithError(err).Warn("template: booting")
		return vmpodagent.Boot(ctx, cfg)
	}
	saved, err := s.open(ctx, key, tcfg)
	if err != nil {
		logger.WithError(err).Warn("template: booting")
		return vmpodagent.Boot(ctx, cfg)
	}
	if saved == nil { // being made by another machine, or failed to be made lately
		return vmpodagent.Boot(ctx, cfg)
	}
	defer saved.State.Close()
	defer saved.RAM.Close()
	tcfg.RestoreFrom = saved
	g, err := vmpodagent.Boot(ctx, tcfg)
	if err == nil {
		now := time.Now()
		_ = os.Chtimes(saved.State.Name(), now, now) // recently used (maxStates)
		if plug == 0 {
			return g, nil
		}
		if _, err := g.ResizeMemory(ctx, plug); err != nil {
			_ = g.Kill()
			if ctx.Err() != nil {
				return nil, fmt.Errorf("vm %s: restored from template %s of %d MiB: plug the rest of its %d MiB: %w", cfg.Name, key, tcfg.MemoryMiB, plug, err)
			}
			logger.WithError(err).Warnf("template %s: restored with %d MiB, the rest of %d MiB not plugged; booting", key, tcfg.MemoryMiB, plug)
			return vmpodagent.Boot(ctx, cfg)
		}
		phases.Mark(ctx, "memory")
		logger.Debugf("template %s: restored with %d MiB, plugged to %d MiB", key, tcfg.MemoryMiB, plug)
		return g, nil
	}
	if !errors.Is(err, vmm.ErrTemplateRefused) || ctx.Err() != nil {
		return nil, err
	}
	logger.WithError(err).Warnf("template %s: refused; removing it and booting", key)
	s.remove(key, saved.State)
	return vmpodagent.Boot(ctx, cfg)
}

// Restored is the machine Boot starts for cfg when it restores a template, without the
// template: what a live migration's target of such a machine starts (vmm.Config.Template
// with Incoming) to receive its guest. false when cfg's machine is never restored.
func (s *Store) Restored(cfg vmpodagent.Config) (vmpodagent.Config, bool) {
	tcfg := templateConfig(cfg)
	tcfg.MemoryMiB, _ = s.templateMemory(cfg.Config)
	if tcfg.CheckTemplate() != nil {
		return cfg, false
	}
	return tcfg, true
}

// templateMemory is the memory of the template a machine of cfg restores, and what its
// memory is to be plugged up to after the restore (0: nothing to plug).
func (s *Store) templateMemory(cfg vmm.Config) (templateMiB, plugTo int) {
	t := s.BaseMemoryMiB
	if t <= 0 || cfg.MemoryMiB <= t {
		return cfg.MemoryMiB, 0
	}
	for t*2 <= cfg.MemoryMiB {
		t *= 2
	}
	if t == cfg.MemoryMiB || cfg.MaxMemoryMiB < cfg.MemoryMiB || (cfg.MemoryMiB-t)%devices.VirtioMemBlockMiB != 0 {
		return cfg.MemoryMiB, 0
	}
	return t, cfg.MemoryMiB
}

// templateConfig is cfg as a template machine. Its agent warms runc up (docs/design/021)
// after each restore, not at boot: a state saved while it ran would have every restore
// finish it.
func templateConfig(cfg vmpodagent.Config) vmpodagent.Config {
	cfg.Template = true
	cfg.Boot.KernelParams = append(slices.Clip(cfg.Boot.KernelParams), agentv1.KernelParamTemplate)
	return cfg
}

// checkDir makes the store's directory if need be and refuses one anybody but this
// process's user could reach: what it holds becomes every restored guest's memory.
func (s *Store) checkDir() error {
	if err := os.MkdirAll(s.Dir, 0o700); err != nil {
		return fmt.Errorf("template dir: %w", err)
	}
	var st unix.Stat_t
	if err := unix.Lstat(s.Dir, &st); err != nil {
		return fmt.Errorf("template dir: %w", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR || st.Uid != uint32(os.Geteuid()) || st.Mode&0o077 != 0 {
		return fmt.Errorf("template dir %s: must be a directory of uid %d that no one else may enter (mode %#o, uid %d)", s.Dir, os.Geteuid(), st.Mode&0o7777, st.Uid)
	}
	return nil
}

// lock takes key's lock, waiting for it or not; ok is false when it would have waited.
func (s *Store) lock(key string, wait bool) (unlock func(), ok bool, err error) {
	f, err := os.OpenFile(s.lockPath(key), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, false, fmt.Errorf("template %s: lock: %w", key, err)
	}
	how := unix.LOCK_EX
	if !wait {
		how |= unix.LOCK_NB
	}
	if err := unix.Flock(int(f.Fd()), how); errors.Is(err, unix.EWOULDBLOCK) {
		f.Close()
		return nil, false, nil
	} else if err != nil {
		f.Close()
		return nil, false, fmt.Errorf("template %s: lock: %w", key, err)
	}
	return func() { f.Close() }, true, nil
}

// open opens the saved template of key, making it first if there is none. It returns
// nil and no error when another process is making it, or making it failed lately.
func (s *Store) open(ctx context.Context, key string, cfg vmpodagent.Config) (*vmm.SavedTemplate, error) {
	if saved := s.openSaved(key); saved != nil {
		return saved, nil
	}
	unlock, ok, err := s.lock(key, false)
	if err != nil || !ok {
		return nil, err
	}
	defer unlock()
	if saved := s.openSaved(key); saved != nil { // made while this process looked
		return saved, nil
	}
	if st, err := os.Stat(s.failedPath(key)); err == nil && time.Since(st.ModTime()) < failBackoff {
		log.G(ctx).Debugf("template %s: making it failed %v ago; booting", key, time.Since(st.ModTime()).Round(time.Second))
		return nil, nil
	}
	s.clean(key)
	if err := s.make(ctx, key, cfg); err != nil {
		s.clean(key)
		if ctx.Err() == nil { // not a pod given up on
			if f, ferr := os.Create(s.failedPath(key)); ferr == nil {
				f.Close()
			}
		}
		return nil, err
	}
	_ = os.Remove(s.failedPath(key))
	s.trim(key)
	if saved := s.openSaved(key); saved != nil {
		return saved, nil
	}
	return nil, fmt.Errorf("template %s: made, then gone", key)
}

// openSaved opens key's files if the template is whole, or returns nil.
func (s *Store) openSaved(key string) *vmm.SavedTemplate {
	state, err := os.Open(s.statePath(key))
	if err != nil {
		return nil
	}
	ram, err := os.Open(s.ramPath(key))
	if err != nil { // being removed, or a half left by a crash: clean removes it
		state.Close()
		return nil
	}
	return &vmm.SavedTemplate{State: state, RAM: ram}
}

// clean removes what a dead maker or a half-done removal left of key, the lock held: its
// machine (processes, mounts, state dir), its temporary files, a state without RAM or RAM
// without a state.
func (s *Store) clean(key string) {
	_ = vmm.CleanupState(s.vmDir(key))
	tmps, _ := filepath.Glob(filepath.Join(s.Dir, key+".tmp-*"))
	for _, p := range tmps {
		_ = os.Remove(p)
	}
	_, stateErr := os.Stat(s.statePath(key))
	_, ramErr := os.Stat(s.ramPath(key))
	if (stateErr == nil) != (ramErr == nil) {
		_ = os.Remove(s.statePath(key))
		_ = os.Remove(s.ramPath(key))
	}
}

// make boots a template machine of cfg's shape and saves its state as key's.
func (s *Store) make(ctx context.Context, key string, cfg vmpodagent.Config) (retErr error) {
	started := time.Now()
	cfg.Name = "template-" + key[:12]
	cfg.StateDir = s.vmDir(key)
	cfg.LogPath = filepath.Join(s.Dir, key+".log")
	cfg.NICs, cfg.Cgroup, cfg.OwnerSockets = nil, s.Cgroup, nil
	if s.Cgroup != "" {
		if err := vmm.MakeCgroup(s.Cgroup); err != nil {
			return fmt.Errorf("template %s: %w", key, err)
		}
	}
	g, err := vmpodagent.Boot(ctx, cfg)
	if err != nil {
		return fmt.Errorf("template %s: boot: %w", key, err)
	}
	defer func() {
		if err := g.Kill(); err != nil && retErr == nil {
			retErr = fmt.Errorf("template %s: stop the template machine: %w", key, err)
		}
	}()
	var to vmm.SavedTemplate
	for _, f := range []**os.File{&to.State, &to.RAM} {
		if *f, err = os.CreateTemp(s.Dir, key+".tmp-*"); err != nil {
			return fmt.Errorf("template %s: %w", key, err)
		}
		defer func() {
			(*f).Close()
			os.Remove((*f).Name()) // renamed away unless this failed
		}()
	}
	if _, err := g.SaveState(ctx, to); err != nil {
		return fmt.Errorf("template %s: save: %w", key, err)
	}
	// the RAM first: a state file says the template is whole
	for _, f := range []struct {
		file *os.File
		path string
	}{{to.RAM, s.ramPath(key)}, {to.State, s.statePath(key)}} {
		if err := f.file.Sync(); err != nil {
			return fmt.Errorf("template %s: save: %w", key, err)
		}
		if err := os.Rename(f.file.Name(), f.path); err != nil {
			return fmt.Errorf("template %s: save: %w", key, err)
		}
	}
	var stateBytes, ramBytes int64
	if st, err := os.Stat(s.statePath(key)); err == nil {
		stateBytes = st.Size()
	}
	if st, err := os.Stat(s.ramPath(key)); err == nil {
		ramBytes = st.Sys().(*syscall.Stat_t).Blocks * 512 // what the guest wrote
	}
	log.G(ctx).Infof("template %s: made in %v (device state %d KiB, RAM %d MiB)", key,
		time.Since(started).Round(time.Millisecond), stateBytes>>10, ramBytes>>20)
	return nil
}

// remove removes a template QEMU refused, under its lock, unless it was replaced
// meanwhile (its state file is another). A lock another process holds is a maker's, which
// runs only once the state is gone: nothing to remove then.
func (s *Store) remove(key string, state *os.File) {
	opened, err := state.Stat()
	if err != nil {
		return
	}
	unlock, ok, err := s.lock(key, false)
	if err != nil || !ok {
		return
	}
	defer unlock()
	if now, err := os.Stat(s.statePath(key)); err == nil && os.SameFile(opened, now) {
		_ = os.Remove(s.statePath(key))
		_ = os.Remove(s.ramPath(key))
	}
}

// trim removes the least recently used templates beyond maxStates, never keep's, and what
// other keys' dead makers left; a key whose lock another process holds is left alone.
func (s *Store) trim(keep string) {
	locks, _ := filepath.Glob(filepath.Join(s.Dir, "*.lock"))
	type used struct {
		key string
		at  time.Time
	}
	var whole []used
	for _, l := range locks {
		key := strings.TrimSuffix(filepath.Base(l), ".lock")
		if key == keep {
			continue
		}
		if st, err := os.Stat(s.statePath(key)); err == nil {
			whole = append(whole, used{key, st.ModTime()})
			continue
		}
		if unlock, ok, _ := s.lock(key, false); ok { // no template: what is left goes
			s.clean(key)
			_ = os.Remove(filepath.Join(s.Dir, key+".log"))
			if st, err := os.Stat(s.failedPath(key)); err == nil && time.Since(st.ModTime()) > failBackoff {
				_ = os.Remove(s.failedPath(key))
			}
			unlock()
		}
	}
	slices.SortFunc(whole, func(a, b used) int { return a.at.Compare(b.at) })
	for _, u := range whole[:max(0, len(whole)+1-maxStates)] {
		unlock, ok, _ := s.lock(u.key, false)
		if !ok {
			continue
		}
		for _, p := range []string{s.statePath(u.key), s.ramPath(u.key), filepath.Join(s.Dir, u.key+".log"), s.failedPath(u.key)} {
			_ = os.Remove(p)
		}
		s.clean(u.key)
		unlock()
	}
}
