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
}

// Each template is two files (vmm.SavedTemplate): key.ram, written first, and key.state,
// whose presence says the template is whole. key.lock is held while it is made.
func (s *Store) statePath(key string) string { return filepath.Join(s.Dir, key+".state") }
func (s *Store) ramPath(key string) string   { return filepath.Join(s.Dir, key+".ram") }
func (s *Store) lockPath(key string) string  { return filepath.Join(s.Dir, key+".lock") }

// Boot starts cfg's guest from the template of its shape, and returns it as
// vmpodagent.Boot would have. The template's state is made first if there is none (the
// first pod of a shape pays a boot, a save and a restore); a machine that cannot be a
// template's (another machine type, disks, ...) boots, and so does one whose template
// another process is making at the moment, rather than wait. A saved state QEMU refuses
// is removed and the guest booted; the next machine makes a new one.
func (s *Store) Boot(ctx context.Context, cfg vmpodagent.Config) (*vmpodagent.Guest, error) {
	logger := log.G(ctx).WithField("vm", cfg.Name)
	tcfg := templateConfig(cfg)
	if err := tcfg.CheckTemplate(); err != nil {
		logger.Infof("template: none for this machine (%v); booting", err)
		return vmpodagent.Boot(ctx, cfg)
	}
	key, err := tcfg.TemplateKey()
	if err != nil {
		logger.WithError(err).Warn("template: booting")
		return vmpodagent.Boot(ctx, cfg)
	}
	saved, err := s.open(ctx, key, tcfg)
	if err != nil {
		logger.WithError(err).Warn("template: booting")
		return vmpodagent.Boot(ctx, cfg)
	}
	if saved == nil { // being made by another machine
		return vmpodagent.Boot(ctx, cfg)
	}
	defer saved.State.Close()
	defer saved.RAM.Close()
	tcfg.RestoreFrom = saved
	g, err := vmpodagent.Boot(ctx, tcfg)
	if err == nil {
		now := time.Now()
		_ = os.Chtimes(saved.State.Name(), now, now) // recently used (maxStates)
		return g, nil
	}
	if ctx.Err() != nil {
		return nil, err
	}
	logger.WithError(err).Warnf("template %s: restore failed; removing it and booting", key)
	s.remove(key, saved.State)
	return vmpodagent.Boot(ctx, cfg)
}

// templateConfig is cfg as a template machine. Its agent warms runc up (docs/design/021)
// after each restore, not at boot: a state saved while it ran would have every restore
// finish it.
func templateConfig(cfg vmpodagent.Config) vmpodagent.Config {
	cfg.Template = true
	cfg.Boot.KernelParams = append(slices.Clip(cfg.Boot.KernelParams), agentv1.KernelParamTemplate)
	return cfg
}

// open opens the saved template of key, making it first if there is none. It returns
// nil and no error when another process is making it.
func (s *Store) open(ctx context.Context, key string, cfg vmpodagent.Config) (*vmm.SavedTemplate, error) {
	if saved, err := s.openSaved(key); saved != nil || err != nil {
		return saved, err
	}
	if err := os.MkdirAll(s.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("template dir: %w", err)
	}
	lock, err := os.OpenFile(s.lockPath(key), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("template lock: %w", err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); errors.Is(err, unix.EWOULDBLOCK) {
		return nil, nil
	} else if err != nil {
		return nil, fmt.Errorf("template lock: %w", err)
	}
	// made while this process waited for the lock
	if saved, err := s.openSaved(key); saved != nil || err != nil {
		return saved, err
	}
	if err := s.make(ctx, key, cfg); err != nil {
		return nil, err
	}
	s.trim(key)
	saved, err := s.openSaved(key)
	if saved == nil && err == nil {
		err = errors.New("made, then gone")
	}
	return saved, err
}

// openSaved opens key's files, or returns nil and no error if there is no whole template.
func (s *Store) openSaved(key string) (*vmm.SavedTemplate, error) {
	state, err := os.Open(s.statePath(key))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	} else if err != nil {
		return nil, fmt.Errorf("template %s: %w", key, err)
	}
	ram, err := os.Open(s.ramPath(key))
	if err != nil {
		state.Close()
		return nil, fmt.Errorf("template %s: %w", key, err)
	}
	return &vmm.SavedTemplate{State: state, RAM: ram}, nil
}

// make boots a template machine of cfg's shape and saves its state as key's.
func (s *Store) make(ctx context.Context, key string, cfg vmpodagent.Config) (retErr error) {
	started := time.Now()
	cfg.Name = "template-" + key[:12]
	cfg.StateDir = filepath.Join(s.Dir, key+".vm")
	cfg.LogPath = filepath.Join(s.Dir, key+".log")
	cfg.NICs, cfg.Cgroup, cfg.OwnerSockets = nil, "", nil
	// a template left by a dead maker: nothing runs in it (the lock was free)
	if err := os.RemoveAll(cfg.StateDir); err != nil {
		return fmt.Errorf("template %s: %w", key, err)
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

// remove removes a template QEMU refused, unless it was replaced meanwhile (its state
// file is another).
func (s *Store) remove(key string, state *os.File) {
	opened, err := state.Stat()
	if err != nil {
		return
	}
	if now, err := os.Stat(s.statePath(key)); err == nil && os.SameFile(opened, now) {
		_ = os.Remove(s.statePath(key))
		_ = os.Remove(s.ramPath(key))
	}
}

// trim removes the least recently used saved states beyond maxStates, never keep's.
func (s *Store) trim(keep string) {
	paths, _ := filepath.Glob(filepath.Join(s.Dir, "*.state"))
	if len(paths) <= maxStates {
		return
	}
	type used struct {
		path string
		at   time.Time
	}
	var states []used
	for _, p := range paths {
		if st, err := os.Stat(p); err == nil && p != s.statePath(keep) {
			states = append(states, used{p, st.ModTime()})
		}
	}
	slices.SortFunc(states, func(a, b used) int { return a.at.Compare(b.at) })
	for _, u := range states[:max(0, len(paths)-maxStates)] {
		base := strings.TrimSuffix(u.path, ".state")
		for _, p := range []string{u.path, base + ".ram", base + ".log", base + ".lock"} {
			_ = os.Remove(p)
		}
	}
}
