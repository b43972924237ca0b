package agent

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
)

// onlineResources brings online what the host hot-added. The guest has no udev: a
// hot-added vCPU appears offline, and memory blocks the kernel did not online itself
// (MEMORY_HOTPLUG_DEFAULT_ONLINE covers virtio-mem) wait in "offline".
func onlineResources() (*agentv1.OnlineResourcesResponse, error) {
	resp := &agentv1.OnlineResourcesResponse{}
	cpus, _ := filepath.Glob("/sys/devices/system/cpu/cpu[0-9]*/online")
	for _, f := range cpus {
		onlined, err := setOnline(f, "0", "1")
		if err != nil {
			return nil, err
		}
		if onlined {
			resp.CpusOnlined++
		}
	}
	blocks, _ := filepath.Glob("/sys/devices/system/memory/memory[0-9]*/state")
	for _, f := range blocks {
		onlined, err := setOnline(f, "offline", "online")
		if err != nil {
			return nil, err
		}
		if onlined {
			resp.MemoryBlocksOnlined++
		}
	}
	resp.OnlineCpus, resp.MemoryBytes = guestSize()
	return resp, nil
}

// setOnline writes on to the sysfs file f if it reads off. The kernel may be onlining the
// same CPU or memory block at that moment (x86 onlines hot-added CPUs itself, and
// MEMORY_HOTPLUG_DEFAULT_ONLINE the blocks virtio-mem adds): EINVAL and EBUSY are such
// races (measured: EINVAL on a block virtio-mem was adding), left to the caller's next poll.
func setOnline(f, off, on string) (bool, error) {
	if readTrim(f) != off {
		return false, nil
	}
	err := os.WriteFile(f, []byte(on), 0)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, unix.EINVAL), errors.Is(err, unix.EBUSY):
		slog.Info("online: the kernel refused for now", "file", f, "state", readTrim(f), "err", err)
		return false, nil
	default:
		return false, fmt.Errorf("online %s: %w", filepath.Dir(f), err)
	}
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
