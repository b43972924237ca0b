package agent

import (
	"context"
	"log/slog"
	"path/filepath"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
)

// oomHistory bounds the OOM events kept for hosts that poll late.
const oomHistory = 256

// oomWatcher turns increments of a container cgroup's memory.events oom_kill counter into
// numbered events. cgroup v2 raises inotify IN_MODIFY on memory.events when it changes.
type oomWatcher struct {
	fd int

	mu      sync.Mutex
	byWD    map[int32]*oomWatch
	byID    map[string]*oomWatch
	seq     uint64
	events  []*agentv1.OOMEvent
	changed chan struct{}
}

type oomWatch struct {
	id    string
	wd    int32
	dir   string
	kills uint64
}

func newOOMWatcher() (*oomWatcher, error) {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC)
	if err != nil {
		return nil, err
	}
	w := &oomWatcher{
		fd:      fd,
		byWD:    map[int32]*oomWatch{},
		byID:    map[string]*oomWatch{},
		changed: make(chan struct{}),
	}
	go w.loop()
	return w, nil
}

func (w *oomWatcher) watch(id, cgroupDir string) {
	wd, err := unix.InotifyAddWatch(w.fd, filepath.Join(cgroupDir, "memory.events"), unix.IN_MODIFY)
	if err != nil {
		slog.Warn("no OOM events for container", "container", id, "error", err)
		return
	}
	ow := &oomWatch{id: id, wd: int32(wd), dir: cgroupDir, kills: keyed(cgroupDir, "memory.events")["oom_kill"]}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.byWD[ow.wd] = ow
	w.byID[id] = ow
}

func (w *oomWatcher) unwatch(id string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	ow, ok := w.byID[id]
	if !ok {
		return
	}
	delete(w.byID, id)
	delete(w.byWD, ow.wd)
	_, _ = unix.InotifyRmWatch(w.fd, uint32(ow.wd))
}

func (w *oomWatcher) loop() {
	buf := make([]byte, 64*(unix.SizeofInotifyEvent+unix.NAME_MAX+1))
	for {
		n, err := unix.Read(w.fd, buf)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			slog.Error("OOM watcher stopped", "error", err)
			return
		}
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			w.check(ev.Wd)
			off += unix.SizeofInotifyEvent + int(ev.Len)
		}
	}
}

func (w *oomWatcher) check(wd int32) {
	w.mu.Lock()
	defer w.mu.Unlock()
	ow, ok := w.byWD[wd]
	if !ok {
		return
	}
	kills := keyed(ow.dir, "memory.events")["oom_kill"]
	if kills <= ow.kills {
		return
	}
	ow.kills = kills
	w.seq++
	slog.Info("OOM kill", "container", ow.id, "seq", w.seq)
	w.events = append(w.events, &agentv1.OOMEvent{Seq: w.seq, ContainerId: ow.id, AtUnixNanos: time.Now().UnixNano()})
	if len(w.events) > oomHistory {
		w.events = w.events[len(w.events)-oomHistory:]
	}
	close(w.changed)
	w.changed = make(chan struct{})
}

// wait returns the first event numbered above after, waiting for one.
func (w *oomWatcher) wait(ctx context.Context, after uint64) (*agentv1.OOMEvent, error) {
	for {
		w.mu.Lock()
		for _, ev := range w.events {
			if ev.Seq > after {
				w.mu.Unlock()
				return ev, nil
			}
		}
		ch := w.changed
		w.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}
