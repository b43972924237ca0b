package pod

import (
	"encoding/json"
	"fmt"
	"os"
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
//
//   - the network namespace: the VM is the pod's network, every container shares it;
//
//   - host CPU and NUMA node numbers (cpu.cpus, cpu.mems): the VM's vCPUs are pinned to
//     those CPUs instead (cpuset.go);
//
//   - a bind of /dev/shm (CRI's pod shm): the guest's pod-wide tmpfs instead;
//
//   - other bind sources: shared into the guest (read-only when the mount is), and
//     share names are returned so RemoveContainer can take them back;
//
//   - namespace paths must be /proc/<pid>/ns/* of a container of this pod: containerd
//     builds them from the host pids tasks report (their pid proxies), nsOwners maps
//     those to the containers' guest pids, and the path is rewritten to the guest's —
//     anything else (a host path) is refused, but for the user namespace containerd pins
//     on the host for a pod with ID mappings: the guest makes its own from the same
//     mappings;
//
//   - a host mount below a bind source becomes a share and a bind of its own: the guest
//     sees a shared directory as one filesystem, so without this a read-only bind could
//     not leave a submount writable (non-recursive "ro"), and "rro" would not reach it.
//
// share is called for each host path to share; it returns the guest path. submounts lists
// the mount points below a host directory.
func guestSpec(id string, spec *specs.Spec, nsOwners map[uint32]uint32, share shareFunc, submounts func(string) ([]string, error)) (*specs.Spec, []string, error) {
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
				if m == nil && ns.Type == specs.UserNamespace && len(g.Linux.UIDMappings) > 0 {
					// containerd pins the pod's user namespace on the host; the guest gets a
					// new one with the same mappings.
					ns.Path = ""
					kept = append(kept, ns)
					continue
				}
				if m == nil {
					return nil, nil, fmt.Errorf("linux.namespaces[%d].path %q: not /proc/<pid>/ns/<type>", i, ns.Path)
				}
				pid, _ := strconv.ParseUint(m[1], 10, 32)
				guestPid, ok := nsOwners[uint32(pid)]
				if !ok {
					return nil, nil, fmt.Errorf("linux.namespaces[%d].path %q: pid %d is not a container of this pod", i, ns.Path, pid)
				}
				ns.Path = fmt.Sprintf("/proc/%d/ns/%s", guestPid, filepath.Base(ns.Path))
			}
			kept = append(kept, ns)
		}
		g.Linux.Namespaces = kept
		g.Linux.Resources = guestResources(g.Linux.Resources)
	}
	var shares []string
	mounts := make([]specs.Mount, 0, len(g.Mounts))
	for i, m := range g.Mounts {
		if !isBind(m) {
			mounts = append(mounts, m)
			continue
		}
		switch {
		case m.Destination == "/dev/shm":
			m.Source = agentv1.GuestPodShmDir
			mounts = append(mounts, m)
		case filepath.Dir(m.Source) == "/dev":
			// A device node: the guest has its own /dev.
			mounts = append(mounts, m)
		default:
			added, names, err := shareBind(id, i, m, share, submounts)
			shares = append(shares, names...)
			if err != nil {
				return nil, shares, fmt.Errorf("mounts[%d] (%s): %w", i, m.Destination, err)
			}
			mounts = append(mounts, added...)
		}
	}
	g.Mounts = mounts
	return g, shares, nil
}

type shareFunc func(hostPath, name string, readonly bool) (string, error)

// shareBind shares one bind mount's source, and each host mount below it, and returns the
// guest mounts that rebuild the tree: the bind itself, then a bind per submount.
func shareBind(id string, i int, m specs.Mount, share shareFunc, submounts func(string) ([]string, error)) ([]specs.Mount, []string, error) {
	recursiveRO := slices.Contains(m.Options, "rro")
	host := filepath.Clean(m.Source)
	name := fmt.Sprintf("%s/mounts/%d", id, i)
	guest, err := share(host, name, recursiveRO || slices.Contains(m.Options, "ro"))
	if err != nil {
		return nil, nil, err
	}
	names := []string{name}
	m.Source = guest
	out := []specs.Mount{m}
	if fi, err := os.Stat(host); err == nil && !fi.IsDir() {
		return out, names, nil
	}
	subs, err := submounts(host)
	if err != nil {
		return nil, names, err
	}
	for j, sub := range subs {
		subName := fmt.Sprintf("%s.%d", name, j)
		subGuest, err := share(sub, subName, recursiveRO)
		if err != nil {
			return nil, names, fmt.Errorf("submount %s: %w", sub, err)
		}
		names = append(names, subName)
		opts := []string{"rbind"}
		if recursiveRO {
			opts = append(opts, "ro")
		}
		rel, _ := filepath.Rel(host, sub)
		out = append(out, specs.Mount{Destination: filepath.Join(m.Destination, rel), Type: "bind", Source: subGuest, Options: opts})
	}
	return out, names, nil
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
