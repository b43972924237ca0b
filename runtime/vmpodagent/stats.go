package vmpodagent

import (
	"context"

	cgroupsv2 "github.com/containerd/cgroups/v3/cgroup2/stats"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
)

// ContainerStats reads the container's cgroup in the guest, in the type containerd's CRI
// reads (cgroup v2 Metrics, whatever the host's own cgroup version).
func (a *Client) ContainerStats(ctx context.Context, id string) (*cgroupsv2.Metrics, error) {
	var st *agentv1.ContainerStatsResponse
	err := a.call(ctx, "stats "+id, func(ctx context.Context) (err error) {
		st, err = a.client().ContainerStats(ctx, &agentv1.ContainerRequest{ContainerId: id})
		return err
	})
	if err != nil {
		return nil, err
	}
	return metrics(st), nil
}

func metrics(st *agentv1.ContainerStatsResponse) *cgroupsv2.Metrics {
	m := &cgroupsv2.Metrics{
		Pids: &cgroupsv2.PidsStat{Current: st.GetPids().GetCurrent(), Limit: st.GetPids().GetLimit()},
		CPU: &cgroupsv2.CPUStat{
			UsageUsec:     st.GetCpu().GetUsageUsec(),
			UserUsec:      st.GetCpu().GetUserUsec(),
			SystemUsec:    st.GetCpu().GetSystemUsec(),
			NrPeriods:     st.GetCpu().GetNrPeriods(),
			NrThrottled:   st.GetCpu().GetNrThrottled(),
			ThrottledUsec: st.GetCpu().GetThrottledUsec(),
		},
		MemoryEvents: &cgroupsv2.MemoryEvents{Oom: st.GetMemory().GetOom(), OomKill: st.GetMemory().GetOomKill()},
		Io:           &cgroupsv2.IOStat{},
	}
	mem := st.GetMemory()
	s := mem.GetStat()
	m.Memory = &cgroupsv2.MemoryStat{
		Usage:                 mem.GetUsage(),
		UsageLimit:            mem.GetLimit(),
		SwapUsage:             mem.GetSwapUsage(),
		SwapLimit:             mem.GetSwapLimit(),
		Anon:                  s["anon"],
		File:                  s["file"],
		KernelStack:           s["kernel_stack"],
		Slab:                  s["slab"],
		Sock:                  s["sock"],
		Shmem:                 s["shmem"],
		FileMapped:            s["file_mapped"],
		FileDirty:             s["file_dirty"],
		FileWriteback:         s["file_writeback"],
		AnonThp:               s["anon_thp"],
		InactiveAnon:          s["inactive_anon"],
		ActiveAnon:            s["active_anon"],
		InactiveFile:          s["inactive_file"],
		ActiveFile:            s["active_file"],
		Unevictable:           s["unevictable"],
		SlabReclaimable:       s["slab_reclaimable"],
		SlabUnreclaimable:     s["slab_unreclaimable"],
		Pgfault:               s["pgfault"],
		Pgmajfault:            s["pgmajfault"],
		WorkingsetRefault:     s["workingset_refault"],
		WorkingsetActivate:    s["workingset_activate"],
		WorkingsetNodereclaim: s["workingset_nodereclaim"],
	}
	for _, e := range st.GetIo() {
		m.Io.Usage = append(m.Io.Usage, &cgroupsv2.IOEntry{
			Major: e.Major, Minor: e.Minor, Rbytes: e.Rbytes, Wbytes: e.Wbytes, Rios: e.Rios, Wios: e.Wios,
		})
	}
	return m
}
