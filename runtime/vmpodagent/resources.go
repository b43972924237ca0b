package vmpodagent

import (
	"context"
	"fmt"
	"time"

	"github.com/containerd/log"
)

// onlineWait bounds how long a hotplug waits for the guest to take what was added.
const onlineWait = 30 * time.Second

// AddVCPUs hot-plugs n vCPUs into the machine and has the agent bring them online. It
// returns the guest's online CPU count.
func (g *Guest) AddVCPUs(ctx context.Context, n int) (int, error) {
	want, err := g.m.PlugVCPUs(ctx, n)
	if err != nil {
		return 0, err
	}
	online, err := g.awaitOnline(ctx, func(cpus uint32, _ uint64) bool { return int(cpus) >= want })
	log.G(ctx).Infof("vm %s: %d vCPUs online", g.cfg.Name, online.cpus)
	return int(online.cpus), err
}

// ResizeMemory sets the guest's memory to totalMiB (virtio-mem) and returns the memory the
// guest then manages.
func (g *Guest) ResizeMemory(ctx context.Context, totalMiB int) (uint64, error) {
	before, err := g.agent.Ping(ctx)
	if err != nil {
		return 0, err
	}
	delta, err := g.m.PlugMemory(ctx, totalMiB)
	if err != nil {
		return 0, err
	}
	target := int64(before.MemoryBytes) + delta
	online, err := g.awaitOnline(ctx, func(_ uint32, mem uint64) bool {
		if delta >= 0 {
			return int64(mem) >= target-(64<<20) // the kernel keeps a little for its memmap
		}
		return int64(mem) <= target+(64<<20)
	})
	return online.mem, err
}

type guestSize struct {
	cpus uint32
	mem  uint64
}

// awaitOnline asks the agent to online what was added until done holds for the guest's
// CPUs and memory, or onlineWait passes.
func (g *Guest) awaitOnline(ctx context.Context, done func(cpus uint32, mem uint64) bool) (guestSize, error) {
	ctx, cancel := context.WithTimeout(ctx, onlineWait)
	defer cancel()
	var last guestSize
	for {
		resp, err := g.agent.OnlineResources(ctx)
		if err != nil {
			return last, err
		}
		last = guestSize{resp.OnlineCpus, resp.MemoryBytes}
		if done(last.cpus, last.mem) {
			return last, nil
		}
		select {
		case <-ctx.Done():
			return last, fmt.Errorf("vm %s: guest has %d CPUs, %d MiB after %v: %w", g.cfg.Name, last.cpus, last.mem>>20, onlineWait, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}
