package agent

import (
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
)

const (
	cpuSysfs       = "/sys/devices/system/cpu"
	memorySysfs    = "/sys/devices/system/memory"
	firmwareMemmap = "/sys/firmware/memmap"
)

// onlineResources brings online what the host added or booted offline. The guest has no
// udev: a hot-added vCPU appears offline, and memory blocks the kernel did not online
// itself (MEMORY_HOTPLUG_DEFAULT_ONLINE covers virtio-mem and probes) wait in "offline".
// A microvm pod boots with vCPUs kept offline (maxcpus=) and RAM the kernel was told to
// leave alone (mem=): req says how much of it to take.
func onlineResources(req *agentv1.OnlineResourcesRequest) (*agentv1.OnlineResourcesResponse, error) {
	// One at a time: a call the host gave up on may still be probing when its retry comes.
	onlineMu.Lock()
	defer onlineMu.Unlock()
	resp := &agentv1.OnlineResourcesResponse{}
	n, err := onlineCPUs(int(req.GetCpus()))
	if err != nil {
		return nil, err
	}
	resp.CpusOnlined = uint32(n)
	blocks, _ := filepath.Glob(memorySysfs + "/memory[0-9]*/state")
	for _, f := range blocks {
		onlined, err := setOnline(f, "offline", "online")
		if err != nil {
			return nil, err
		}
		if onlined {
			resp.MemoryBlocksOnlined++
		}
	}
	if want := req.GetMemoryBytes(); want > 0 {
		n, err := probeMemory(want)
		resp.MemoryBlocksOnlined += uint32(n)
		if err != nil {
			return nil, err
		}
	}
	resp.OnlineCpus, resp.MemoryBytes = guestSize()
	return resp, nil
}

var onlineMu sync.Mutex

// onlineCPUs onlines offline CPUs, lowest first, until want are online, and returns how
// many it onlined. A CPU the kernel refuses for now ends the pass: the host polls again,
// and the online CPUs stay the lowest ones.
func onlineCPUs(want int) (int, error) {
	files, _ := filepath.Glob(cpuSysfs + "/cpu[0-9]*/online")
	slices.SortFunc(files, func(a, b string) int { return cpuNumber(a) - cpuNumber(b) })
	online := countRange(readTrim(cpuSysfs + "/online"))
	n := 0
	for _, f := range files {
		if online >= want {
			break
		}
		onlined, err := setOnline(f, "0", "1")
		if err != nil {
			return n, err
		}
		if onlined {
			n++
			online++
		} else if readTrim(f) == "0" {
			break
		}
	}
	return n, nil
}

// cpuNumber is N of .../cpuN/online.
func cpuNumber(onlineFile string) int {
	n, _ := strconv.Atoi(strings.TrimPrefix(filepath.Base(filepath.Dir(onlineFile)), "cpu"))
	return n
}

// probeMemory adds RAM the firmware's map has and the kernel does not, a memory block at
// a time in address order, until MemTotal reaches want; it returns the blocks it added.
// x86 has no other way to hand a guest memory without a memory device: the kernel boots
// with mem= below the machine's RAM and memory/probe adds the rest on request.
func probeMemory(want uint64) (int, error) {
	_, total := guestSize()
	if total >= want {
		return 0, nil
	}
	blockSize, err := strconv.ParseUint(readTrim(memorySysfs+"/block_size_bytes"), 16, 64)
	if err != nil || blockSize == 0 {
		return 0, fmt.Errorf("memory: block_size_bytes: %q", readTrim(memorySysfs+"/block_size_bytes"))
	}
	ram, err := firmwareRAM()
	if err != nil {
		return 0, err
	}
	present := func(block uint64) bool {
		_, err := os.Stat(fmt.Sprintf("%s/memory%d", memorySysfs, block))
		return err == nil
	}
	added := 0
	for _, addr := range missingBlocks(ram, blockSize, present) {
		if total >= want {
			return added, nil
		}
		if err := os.WriteFile(memorySysfs+"/probe", []byte(fmt.Sprintf("0x%x", addr)), 0); err != nil && !present(addr/blockSize) {
			return added, fmt.Errorf("memory: probe 0x%x: %w", addr, err)
		}
		added++
		state := fmt.Sprintf("%s/memory%d/state", memorySysfs, addr/blockSize)
		if _, err := setOnline(state, "offline", "online"); err != nil {
			return added, err
		}
		_, total = guestSize()
	}
	if total < want {
		return added, fmt.Errorf("memory: MemTotal %d MiB, %d MiB wanted: the firmware's map has no more RAM to add", total>>20, want>>20)
	}
	return added, nil
}

// memRange is an inclusive physical address range.
type memRange struct{ start, end uint64 }

// firmwareRAM is the RAM in the firmware's memory map as it was before mem= trimmed it.
func firmwareRAM() ([]memRange, error) {
	entries, err := os.ReadDir(firmwareMemmap)
	if err != nil {
		return nil, fmt.Errorf("memory: the firmware's map: %w", err)
	}
	var ram []memRange
	for _, e := range entries {
		dir := filepath.Join(firmwareMemmap, e.Name())
		if readTrim(dir+"/type") != "System RAM" {
			continue
		}
		start, err1 := strconv.ParseUint(readTrim(dir+"/start"), 0, 64)
		end, err2 := strconv.ParseUint(readTrim(dir+"/end"), 0, 64)
		if err := errors.Join(err1, err2); err != nil || end < start {
			return nil, fmt.Errorf("memory: firmware map entry %s: %q-%q", e.Name(), readTrim(dir+"/start"), readTrim(dir+"/end"))
		}
		ram = append(ram, memRange{start, end})
	}
	return ram, nil
}

// missingBlocks are the addresses, ascending, of the whole blockSize-aligned blocks that
// lie inside ram and are not present. A block the kernel booted with only in part is
// present: its rest cannot be probed.
func missingBlocks(ram []memRange, blockSize uint64, present func(block uint64) bool) []uint64 {
	var addrs []uint64
	for _, r := range ram {
		first := (r.start + blockSize - 1) / blockSize * blockSize
		if first < r.start { // rounding up wrapped: no whole block above start
			continue
		}
		for a := first; ; a += blockSize {
			last := a + blockSize - 1
			if last < a || last > r.end {
				break
			}
			if !present(a / blockSize) {
				addrs = append(addrs, a)
			}
			if last == math.MaxUint64 {
				break
			}
		}
	}
	slices.Sort(addrs)
	return slices.Compact(addrs)
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
	cpus = uint32(countRange(readTrim(cpuSysfs + "/online")))
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
