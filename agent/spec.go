package agent

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// cgroupParent is the guest cgroup every container's cgroup lives under.
const cgroupParent = "/vmpod"

// validID is what runc accepts as a container id; exec ids follow the same rule so they
// can name files.
var validID = regexp.MustCompile(`^[\w+\-.]+$`)

func checkID(field, id string) error {
	if id == "" || id == "." || id == ".." || len(id) > 256 || !validID.MatchString(id) {
		return fmt.Errorf("%s %q: must be 1-256 of [A-Za-z0-9_+-.]: %w", field, id, errdefs.ErrInvalidArgument)
	}
	return nil
}

func invalidf(format string, args ...any) error {
	return fmt.Errorf(format+": %w", append(args, errdefs.ErrInvalidArgument)...)
}

// guestSpec parses the spec the host sent and makes it fit the guest. The host has already
// put guest paths into root.path and the mounts; what only the guest can decide is set here:
//   - the cgroup, under cgroupParent (a host cgroup path means nothing in the guest);
//   - no hooks (they name host binaries);
//   - no AppArmor profile or SELinux labels (the guest kernel has no LSM).
func guestSpec(id string, raw []byte) (*specs.Spec, error) {
	var spec specs.Spec
	if err := json.Unmarshal(raw, &spec); err != nil {
		return nil, invalidf("oci_spec: not a runtime-spec document: %v", err)
	}
	if spec.Root == nil || spec.Root.Path == "" {
		return nil, invalidf("oci_spec: root.path: missing")
	}
	if !filepath.IsAbs(spec.Root.Path) {
		return nil, invalidf("oci_spec: root.path %q: must be an absolute guest path", spec.Root.Path)
	}
	if fi, err := os.Stat(spec.Root.Path); err != nil || !fi.IsDir() {
		return nil, invalidf("oci_spec: root.path %q: not a directory in the guest", spec.Root.Path)
	}
	if spec.Process == nil {
		return nil, invalidf("oci_spec: process: missing")
	}
	if err := checkProcess("oci_spec: process", spec.Process); err != nil {
		return nil, err
	}
	if spec.Linux == nil {
		spec.Linux = &specs.Linux{}
	}
	for i, m := range spec.Mounts {
		if !filepath.IsAbs(m.Destination) {
			return nil, invalidf("oci_spec: mounts[%d].destination %q: must be absolute", i, m.Destination)
		}
	}
	if err := applyPodNetSysctls(spec.Linux); err != nil {
		return nil, err
	}
	bindSysfsForUserns(&spec)
	spec.Linux.CgroupsPath = filepath.Join(cgroupParent, id)
	spec.Hooks = nil
	spec.Linux.MountLabel = ""
	stripLSM(spec.Process)
	return &spec, nil
}

// checkProcess validates the fields runc would otherwise reject with a less helpful error.
func checkProcess(field string, p *specs.Process) error {
	if len(p.Args) == 0 && p.CommandLine == "" {
		return invalidf("%s.args: empty (the image has no command and none was given)", field)
	}
	if p.Cwd == "" || !filepath.IsAbs(p.Cwd) {
		return invalidf("%s.cwd %q: must be an absolute path", field, p.Cwd)
	}
	for i, rl := range p.Rlimits {
		if rl.Soft > rl.Hard {
			return invalidf("%s.rlimits[%d] %s: soft limit %d above hard limit %d", field, i, rl.Type, rl.Soft, rl.Hard)
		}
	}
	return nil
}

// applyPodNetSysctls: a container without a network namespace of its own shares the
// guest's, which is the pod's network. runc refuses net.* sysctls there ("not allowed in
// host network namespace"), rightly for a host; in the guest they are the pod's network
// sysctls (CRI sets some on every sandbox), so the agent applies them itself and takes
// them out of the spec.
func applyPodNetSysctls(l *specs.Linux) error {
	for _, ns := range l.Namespaces {
		if ns.Type == specs.NetworkNamespace {
			return nil
		}
	}
	for k, v := range l.Sysctl {
		if !strings.HasPrefix(k, "net.") {
			continue
		}
		if err := setSysctl(k, v); err != nil {
			return fmt.Errorf("oci_spec: linux.sysctl[%s]: %w", k, err)
		}
		delete(l.Sysctl, k)
	}
	return nil
}

// bindSysfsForUserns: in a user namespace, the kernel lets a container mount sysfs only
// in a network namespace its user namespace owns. On a host containerd makes the pod's
// netns inside the pod's user namespace; in the guest, containers share the guest's
// netns, owned by the initial user namespace, so a sysfs mount fails with EPERM. A
// read-only rbind of the guest's /sys shows what that sysfs would: the same netns.
func bindSysfsForUserns(spec *specs.Spec) {
	var userns, netns bool
	for _, ns := range spec.Linux.Namespaces {
		userns = userns || ns.Type == specs.UserNamespace
		netns = netns || ns.Type == specs.NetworkNamespace
	}
	if !userns || netns {
		return
	}
	for i, m := range spec.Mounts {
		if m.Type == "sysfs" {
			spec.Mounts[i] = specs.Mount{Destination: m.Destination, Type: "bind", Source: "/sys",
				Options: []string{"rbind", "ro", "nosuid", "nodev", "noexec"}}
		}
	}
}

func stripLSM(p *specs.Process) {
	p.ApparmorProfile = ""
	p.SelinuxLabel = ""
}

// guestProcess parses an exec'd process spec.
func guestProcess(raw []byte) (*specs.Process, error) {
	var p specs.Process
	if err := json.Unmarshal(raw, &p); err != nil {
		return nil, invalidf("process: not a runtime-spec process: %v", err)
	}
	if err := checkProcess("process", &p); err != nil {
		return nil, err
	}
	stripLSM(&p)
	return &p, nil
}
