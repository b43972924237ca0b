package vmpodagent

import (
	"context"
	"fmt"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
)

// onlineWait bounds how long a growth waits for the guest to take what was added.
const onlineWait = 30 * time.Second

// GrowVCPUs gives the guest total vCPUs and returns its online CPU count (also when it
// fails part way: what came online stays): hot-plugged and onlined on q35; on a machine
// that grows offline (microvm) they are there since boot and the agent only onlines them.
// The target is absolute, so a retry after a partial failure asks for no more than before.
func (g *Guest) GrowVCPUs(ctx context.Context, total int) (int, error) {
	cfg := g.m.Config()
	if total > cfg.MaxVCPUs {
		return 0, fmt.Errorf("vm %s: %d vCPUs: max_vcpus is %d: %w", cfg.Name, total, cfg.MaxVCPUs, errdefs.ErrInvalidArgument)
	}
	if !cfg.OfflineGrowth() {
		if _, err := g.m.PlugVCPUs(ctx, total); err != nil {
			// what was plugged before the failure still comes online
			if resp, oerr := g.agent.OnlineResources(ctx, &agentv1.OnlineResourcesRequest{Cpus: uint32(total)}); oerr == nil {
				return int(resp.OnlineCpus), err
			}
			return 0, err
		}
	}
	online, err := g.awaitOnline(ctx, &agentv1.OnlineResourcesRequest{Cpus: uint32(total)},
		func(cpus uint32, _ uint64) bool { return int(cpus) >= total })
	log.G(ctx).Infof("vm %s: %d vCPUs online", cfg.Name, online.cpus)
	return int(online.cpus), err
}

// ResizeMemory sets the guest's memory to totalMiB and returns the memory the guest then
// manages: through virtio-mem on q35; on a machine that grows offline (microvm) the agent
// adds RAM the kernel booted without, in whole memory blocks, never giving any back.
func (g *Guest) ResizeMemory(ctx context.Context, totalMiB int) (uint64, error) {
	if cfg := g.m.Config(); cfg.OfflineGrowth() {
		if limit := cfg.MemoryLimitMiB(); totalMiB < cfg.MemoryMiB || totalMiB > limit {
			return 0, fmt.Errorf("vm %s: resize memory to %d MiB: want %d-%d: %w", cfg.Name, totalMiB, cfg.MemoryMiB, limit, errdefs.ErrInvalidArgument)
		}
		target := g.bootMemory + uint64(totalMiB-cfg.MemoryMiB)<<20
		online, err := g.awaitOnline(ctx, &agentv1.OnlineResourcesRequest{MemoryBytes: target},
			func(_ uint32, mem uint64) bool { return mem >= target })
		return online.mem, err
	}
	before, err := g.agent.Ping(ctx)
	if err != nil {
		return 0, err
	}
	delta, err := g.m.PlugMemory(ctx, totalMiB)
	if err != nil {
		return 0, err
	}
	target := int64(before.MemoryBytes) + delta
	if delta < 0 {
		// the guest's virtio-mem driver offlines and unplugs blocks itself; onlining
		// offline blocks now (OnlineResources) would fight it, so only look
		got, err := g.awaitSize(ctx, func(_ uint32, mem uint64) bool { return int64(mem) <= target+(64<<20) })
		return got.mem, err
	}
	// the kernel keeps a little for the page structures of what it onlines: 64 B of each
	// 4 KiB page, 1/64 of it (a large plug's would exceed a fixed slack)
	slack := max(int64(64<<20), delta/32)
	online, err := g.awaitOnline(ctx, &agentv1.OnlineResourcesRequest{}, func(_ uint32, mem uint64) bool {
		return int64(mem) >= target-slack
	})
	return online.mem, err
}

// ShrinkVCPUs takes the guest down to total vCPUs, never below those it booted with (q35:
// the hot-plugged ones are unplugged, the guest offlining each as QEMU ejects it), and
// returns how many it then has online. A machine that grows offline (microvm) keeps its
// vCPUs: NotImplemented (an idle online vCPU costs the host nothing).
func (g *Guest) ShrinkVCPUs(ctx context.Context, total int) (int, error) {
	cfg := g.m.Config()
	if cfg.OfflineGrowth() {
		return 0, fmt.Errorf("vm %s: remove vCPUs: machine %s grows by onlining and never gives vCPUs back: %w", cfg.Name, cfg.Type, errdefs.ErrNotImplemented)
	}
	plugged, err := g.m.UnplugVCPUs(ctx, total)
	if err != nil {
		return plugged, err
	}
	got, err := g.awaitSize(ctx, func(cpus uint32, _ uint64) bool { return int(cpus) <= plugged })
	log.G(ctx).Infof("vm %s: %d vCPUs online", cfg.Name, got.cpus)
	return int(got.cpus), err
}

// awaitSize waits, only looking (Ping), until done holds for the guest's CPUs and memory,
// or onlineWait passes.
func (g *Guest) awaitSize(ctx context.Context, done func(cpus uint32, mem uint64) bool) (guestSize, error) {
	return g.await(ctx, 100*time.Millisecond, func(ctx context.Context) (guestSize, error) {
		resp, err := g.agent.Ping(ctx)
		if err != nil {
			return guestSize{}, err
		}
		return guestSize{resp.OnlineCpus, resp.MemoryBytes}, nil
	}, done)
}

type guestSize struct {
	cpus uint32
	mem  uint64
}

// awaitOnline asks the agent to online what req says until done holds for the guest's
// CPUs and memory, or onlineWait passes.
func (g *Guest) awaitOnline(ctx context.Context, req *agentv1.OnlineResourcesRequest, done func(cpus uint32, mem uint64) bool) (guestSize, error) {
	return g.await(ctx, 50*time.Millisecond, func(ctx context.Context) (guestSize, error) {
		resp, err := g.agent.OnlineResources(ctx, req)
		if err != nil {
			return guestSize{}, err
		}
		return guestSize{resp.OnlineCpus, resp.MemoryBytes}, nil
	}, done)
}

// await asks the guest its size every interval until done holds for it, or onlineWait
// passes; it returns the last size it heard.
func (g *Guest) await(ctx context.Context, interval time.Duration, ask func(context.Context) (guestSize, error), done func(cpus uint32, mem uint64) bool) (guestSize, error) {
	ctx, cancel := context.WithTimeout(ctx, onlineWait)
	defer cancel()
	var last guestSize
	for {
		size, err := ask(ctx)
		if err != nil {
			return last, err
		}
		last = size
		if done(last.cpus, last.mem) {
			return last, nil
		}
		select {
		case <-ctx.Done():
			return last, fmt.Errorf("vm %s: guest has %d CPUs, %d MiB after %v: %w", g.cfg.Name, last.cpus, last.mem>>20, onlineWait, ctx.Err())
		case <-time.After(interval):
		}
	}
}
