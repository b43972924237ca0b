package agent

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
)

// onlineResources brings online what the host hot-added. The guest has no udev: a
// hot-added vCPU appears offline, and memory blocks the kernel did not online itself
// (MEMORY_HOTPLUG_DEFAULT_ONLINE covers virtio-mem) wait in "offline".
func onlineResources() (*agentv1.OnlineResourcesResponse, error) {
	resp := &agentv1.OnlineResourcesResponse{}
	cpus, _ := filepath.Glob("/sys/devices/system/cpu/cpu[0-9]*/online")
	for _, f := range cpus {
		if readTrim(f) == "0" {
			if err := os.WriteFile(f, []byte("1"), 0); err != nil {
				return nil, fmt.Errorf("online %s: %w", filepath.Dir(f), err)
			}
			resp.CpusOnlined++
		}
	}
	blocks, _ := filepath.Glob("/sys/devices/system/memory/memory[0-9]*/state")
	for _, f := range blocks {
		if readTrim(f) == "offline" {
			if err := os.WriteFile(f, []byte("online"), 0); err != nil {
				return nil, fmt.Errorf("online %s: %w", filepath.Dir(f), err)
			}
			resp.MemoryBlocksOnlined++
		}
	}
	resp.OnlineCpus, resp.MemoryBytes = guestSize()
	return resp, nil
}

// guestSize is the number of online CPUs and the memory the kernel manages.
func guestSize() (cpus uint32, memBytes uint64) {
	cpus = uint32(countRange(readTrim("/sys/devices/system/cpu/online")))
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		var kb uint64
		for line := range strings.Lines(string(b)) {
			if _, err := fmt.Sscanf(line, "MemTotal: %d kB", &kb); err == nil {
				memBytes = kb << 10
				break
			}
		}
	}
	return cpus, memBytes
}

// countRange counts the CPUs in a sysfs list such as "0-3,5".
func countRange(list string) int {
	n := 0
	for part := range strings.SplitSeq(list, ",") {
		var lo, hi int
		if c, _ := fmt.Sscanf(part, "%d-%d", &lo, &hi); c == 2 {
			n += hi - lo + 1
		} else if c == 1 {
			n++
		}
	}
	return n
}

func readTrim(path string) string {
	b, _ := os.ReadFile(path)
	return strings.TrimSpace(string(b))
}
