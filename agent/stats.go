package agent

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
)

// cgroupStats reads a cgroup v2 directory. Files a kernel or a controller does not
// provide are left at zero; a missing directory is an error.
func cgroupStats(dir string) (*agentv1.ContainerStatsResponse, error) {
	if _, err := os.Stat(dir); err != nil {
		return nil, fmt.Errorf("cgroup %s: %w", dir, err)
	}
	cpu := keyed(dir, "cpu.stat")
	mem := keyed(dir, "memory.stat")
	events := keyed(dir, "memory.events")
	resp := &agentv1.ContainerStatsResponse{
		Cpu: &agentv1.CPUStats{
			UsageUsec:     cpu["usage_usec"],
			UserUsec:      cpu["user_usec"],
			SystemUsec:    cpu["system_usec"],
			NrPeriods:     cpu["nr_periods"],
			NrThrottled:   cpu["nr_throttled"],
			ThrottledUsec: cpu["throttled_usec"],
		},
		Memory: &agentv1.MemoryStats{
			Usage:     single(dir, "memory.current"),
			Limit:     single(dir, "memory.max"),
			SwapUsage: single(dir, "memory.swap.current"),
			SwapLimit: single(dir, "memory.swap.max"),
			Stat:      mem,
			Oom:       events["oom"],
			OomKill:   events["oom_kill"],
		},
		Pids: &agentv1.PidsStats{
			Current: single(dir, "pids.current"),
			Limit:   single(dir, "pids.max"),
		},
		Io: ioStats(dir),
	}
	return resp, nil
}

// single reads a one-value file; "max" (unlimited) and anything unreadable are 0.
func single(dir, name string) uint64 {
	b, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		return 0
	}
	v, _ := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	return v
}

// keyed reads a "key value" per line file (cpu.stat, memory.stat, memory.events).
func keyed(dir, name string) map[string]uint64 {
	out := map[string]uint64{}
	f, err := os.Open(filepath.Join(dir, name))
	if err != nil {
		return out
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), " ")
		if !ok {
			continue
		}
		if n, err := strconv.ParseUint(v, 10, 64); err == nil {
			out[k] = n
		}
	}
	return out
}

// ioStats parses io.stat: "MAJ:MIN rbytes=1 wbytes=2 rios=3 wios=4 ...".
func ioStats(dir string) []*agentv1.IOStats {
	b, err := os.ReadFile(filepath.Join(dir, "io.stat"))
	if err != nil {
		return nil // no io controller
	}
	var out []*agentv1.IOStats
	for line := range strings.Lines(string(b)) {
		fields := strings.Fields(line)
		if len(fields) < 2 {
			continue
		}
		var s agentv1.IOStats
		if _, err := fmt.Sscanf(fields[0], "%d:%d", &s.Major, &s.Minor); err != nil {
			continue
		}
		for _, kv := range fields[1:] {
			k, v, _ := strings.Cut(kv, "=")
			n, _ := strconv.ParseUint(v, 10, 64)
			switch k {
			case "rbytes":
				s.Rbytes = n
			case "wbytes":
				s.Wbytes = n
			case "rios":
				s.Rios = n
			case "wios":
				s.Wios = n
			}
		}
		out = append(out, &s)
	}
	return out
}

// cgroupPids lists the processes in a cgroup directory (none once it is gone).
func cgroupPids(dir string) ([]uint32, error) {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var pids []uint32
	for f := range strings.FieldsSeq(string(b)) {
		if pid, err := strconv.ParseUint(f, 10, 32); err == nil {
			pids = append(pids, uint32(pid))
		}
	}
	return pids, nil
}
