package pod

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
)

var nsPath = regexp.MustCompile(`^/proc/([0-9]+)/ns/[a-z_]+$`)

// guestSpec is spec as the guest must see it. Host paths become shares, and what only
// made sense on the host goes:
//   - the network namespace: the VM is the pod's network, every container shares it;
//   - a bind of /dev/shm (CRI's pod shm): the guest's pod-wide tmpfs instead;
//   - other bind sources: shared into the guest (read-only when the mount is), and
//     share names are returned so RemoveContainer can take them back;
//   - namespace paths must be /proc/<pid>/ns/* of a process of this pod: tasks report
//     guest pids to containerd, which builds these paths from them, so they are guest
//     paths already — anything else (a host path) is refused.
//
// share is called for each host path to share; it returns the guest path.
func guestSpec(id string, spec *specs.Spec, podPids []uint32, share func(hostPath, name string, readonly bool) (string, error)) (*specs.Spec, []string, error) {
	g, err := deepCopy(spec)
	if err != nil {
		return nil, nil, err
	}
	if g.Linux != nil {
		kept := g.Linux.Namespaces[:0]
		for i, ns := range g.Linux.Namespaces {
			if ns.Type == specs.NetworkNamespace {
				continue
			}
			if ns.Path != "" {
				m := nsPath.FindStringSubmatch(ns.Path)
				if m == nil {
					return nil, nil, fmt.Errorf("linux.namespaces[%d].path %q: not /proc/<pid>/ns/<type>", i, ns.Path)
				}
				pid, _ := strconv.ParseUint(m[1], 10, 32)
				if !slices.Contains(podPids, uint32(pid)) {
					return nil, nil, fmt.Errorf("linux.namespaces[%d].path %q: pid %d is not a process of this pod", i, ns.Path, pid)
				}
			}
			kept = append(kept, ns)
		}
		g.Linux.Namespaces = kept
	}
	var shares []string
	for i := range g.Mounts {
		m := &g.Mounts[i]
		if !isBind(*m) {
			continue
		}
		switch {
		case m.Destination == "/dev/shm":
			m.Source = agentv1.GuestPodShmDir
		case filepath.Dir(m.Source) == "/dev":
			// A device node or /dev/shm-like path: the guest has its own /dev.
		default:
			name := fmt.Sprintf("%s/mounts/%d", id, i)
			guest, err := share(m.Source, name, slices.Contains(m.Options, "ro"))
			if err != nil {
				return nil, shares, fmt.Errorf("mounts[%d] (%s): %w", i, m.Destination, err)
			}
			shares = append(shares, name)
			m.Source = guest
		}
	}
	return g, shares, nil
}

func isBind(m specs.Mount) bool {
	return m.Type == "bind" || slices.Contains(m.Options, "bind") || slices.Contains(m.Options, "rbind")
}

func deepCopy(spec *specs.Spec) (*specs.Spec, error) {
	b, err := json.Marshal(spec)
	if err != nil {
		return nil, fmt.Errorf("copy spec: %w", err)
	}
	var out specs.Spec
	if err := json.Unmarshal(b, &out); err != nil {
		return nil, fmt.Errorf("copy spec: %w", err)
	}
	return &out, nil
}
