// Package rootfs builds a container's view of the filesystem: the spec's mounts inside
// its root, the device nodes a /dev of its own needs, the pivot into the root, and the
// read-only and masked paths. It runs in the process that becomes the container's init,
// in a mount namespace of its own (docs/design/023), and does what `runc init` does there.
package rootfs

import (
	"fmt"
	"slices"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// options is a spec mount's options, split as mount(2) and mount_setattr(2) take them.
type options struct {
	flags       uintptr // MS_* for mount(2)
	cleared     uintptr // MS_* flags an option clears ("rw", "suid", ...)
	propagation []uintptr
	attrSet     uint64 // MOUNT_ATTR_* applied to the whole tree (the "r" options)
	attrClr     uint64
	data        []string // filesystem options
}

// flagOptions are runc's mount flags: set (clear false) or cleared (clear true).
var flagOptions = map[string]struct {
	clear bool
	flag  uintptr
}{
	"acl":           {false, unix.MS_POSIXACL},
	"async":         {true, unix.MS_SYNCHRONOUS},
	"atime":         {true, unix.MS_NOATIME},
	"bind":          {false, unix.MS_BIND},
	"defaults":      {false, 0},
	"dev":           {true, unix.MS_NODEV},
	"diratime":      {true, unix.MS_NODIRATIME},
	"dirsync":       {false, unix.MS_DIRSYNC},
	"exec":          {true, unix.MS_NOEXEC},
	"iversion":      {false, unix.MS_I_VERSION},
	"lazytime":      {false, unix.MS_LAZYTIME},
	"loud":          {true, unix.MS_SILENT},
	"mand":          {false, unix.MS_MANDLOCK},
	"noacl":         {true, unix.MS_POSIXACL},
	"noatime":       {false, unix.MS_NOATIME},
	"nodev":         {false, unix.MS_NODEV},
	"nodiratime":    {false, unix.MS_NODIRATIME},
	"noexec":        {false, unix.MS_NOEXEC},
	"noiversion":    {true, unix.MS_I_VERSION},
	"nolazytime":    {true, unix.MS_LAZYTIME},
	"nomand":        {true, unix.MS_MANDLOCK},
	"norelatime":    {true, unix.MS_RELATIME},
	"nostrictatime": {true, unix.MS_STRICTATIME},
	"nosuid":        {false, unix.MS_NOSUID},
	"nosymfollow":   {false, unix.MS_NOSYMFOLLOW},
	"rbind":         {false, unix.MS_BIND | unix.MS_REC},
	"relatime":      {false, unix.MS_RELATIME},
	"ro":            {false, unix.MS_RDONLY},
	"rw":            {true, unix.MS_RDONLY},
	"silent":        {false, unix.MS_SILENT},
	"strictatime":   {false, unix.MS_STRICTATIME},
	"suid":          {true, unix.MS_NOSUID},
	"sync":          {false, unix.MS_SYNCHRONOUS},
}

var propagationOptions = map[string]uintptr{
	"private":     unix.MS_PRIVATE,
	"rprivate":    unix.MS_PRIVATE | unix.MS_REC,
	"shared":      unix.MS_SHARED,
	"rshared":     unix.MS_SHARED | unix.MS_REC,
	"slave":       unix.MS_SLAVE,
	"rslave":      unix.MS_SLAVE | unix.MS_REC,
	"unbindable":  unix.MS_UNBINDABLE,
	"runbindable": unix.MS_UNBINDABLE | unix.MS_REC,
}

// recursiveOptions are the options runc applies to a whole bind tree with
// mount_setattr(2): set (clear false) or cleared.
var recursiveOptions = map[string]struct {
	clear bool
	attr  uint64
}{
	"rro":          {false, unix.MOUNT_ATTR_RDONLY},
	"rrw":          {true, unix.MOUNT_ATTR_RDONLY},
	"rnosuid":      {false, unix.MOUNT_ATTR_NOSUID},
	"rsuid":        {true, unix.MOUNT_ATTR_NOSUID},
	"rnodev":       {false, unix.MOUNT_ATTR_NODEV},
	"rdev":         {true, unix.MOUNT_ATTR_NODEV},
	"rnoexec":      {false, unix.MOUNT_ATTR_NOEXEC},
	"rexec":        {true, unix.MOUNT_ATTR_NOEXEC},
	"rnosymfollow": {false, unix.MOUNT_ATTR_NOSYMFOLLOW},
	"rsymfollow":   {true, unix.MOUNT_ATTR_NOSYMFOLLOW},
}

// runcOnlyOptions are runc extensions this package does not do.
var runcOnlyOptions = []string{"tmpcopyup", "idmap", "ridmap", "remount"}

func parseOptions(opts []string) (options, error) {
	var o options
	for _, opt := range opts {
		if f, ok := flagOptions[opt]; ok {
			if f.clear {
				o.flags &^= f.flag
				o.cleared |= f.flag
			} else {
				o.flags |= f.flag
				o.cleared &^= f.flag
			}
			continue
		}
		if p, ok := propagationOptions[opt]; ok {
			o.propagation = append(o.propagation, p)
			continue
		}
		if r, ok := recursiveOptions[opt]; ok {
			if r.clear {
				o.attrClr |= r.attr
				o.attrSet &^= r.attr
			} else {
				o.attrSet |= r.attr
				o.attrClr &^= r.attr
			}
			continue
		}
		for _, x := range runcOnlyOptions {
			if opt == x || strings.HasPrefix(opt, x+"=") {
				return o, fmt.Errorf("option %q", opt)
			}
		}
		if strings.HasPrefix(opt, "r") && strings.HasSuffix(opt, "atime") {
			return o, fmt.Errorf("option %q", opt) // recursive atime modes: runc's only
		}
		o.data = append(o.data, opt)
	}
	return o, nil
}

// fsTypes are the filesystems a spec mount may name here besides a bind.
var fsTypes = []string{"proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2"}

func isBind(m specs.Mount) bool {
	if m.Type == "bind" {
		return true
	}
	for _, o := range m.Options {
		if o == "bind" || o == "rbind" {
			return true
		}
	}
	return false
}

// Unsupported says why Prepare would not build spec's mounts as runc would ("" when it
// would): a mount type or option it does not know, a shared root propagation, device
// nodes to create beyond the default ones.
func Unsupported(spec *specs.Spec) string {
	for i, m := range spec.Mounts {
		if !isBind(m) && !slices.Contains(fsTypes, m.Type) {
			return fmt.Sprintf("mounts[%d] (%s): type %q", i, m.Destination, m.Type)
		}
		if len(m.UIDMappings) > 0 || len(m.GIDMappings) > 0 {
			return fmt.Sprintf("mounts[%d] (%s): an ID-mapped mount", i, m.Destination)
		}
		o, err := parseOptions(m.Options)
		if err != nil {
			return fmt.Sprintf("mounts[%d] (%s): %v", i, m.Destination, err)
		}
		if !isBind(m) && o.attrSet|o.attrClr != 0 {
			return fmt.Sprintf("mounts[%d] (%s): recursive options on a %s mount", i, m.Destination, m.Type)
		}
	}
	if _, err := rootPropagation(spec.Linux.RootfsPropagation); err != nil {
		return err.Error()
	}
	if len(spec.Linux.Devices) > 0 {
		return "linux.devices"
	}
	return ""
}

// rootPropagation is the propagation of the container's mounts towards the guest's:
// runc's default is rslave; a shared root would need the root's parent mount made
// private first, which runc does and this package does not.
func rootPropagation(p string) (uintptr, error) {
	switch p {
	case "", "rslave":
		return unix.MS_SLAVE | unix.MS_REC, nil
	case "slave":
		return unix.MS_SLAVE, nil
	case "private":
		return unix.MS_PRIVATE, nil
	case "rprivate":
		return unix.MS_PRIVATE | unix.MS_REC, nil
	}
	return 0, fmt.Errorf("linux.rootfsPropagation %q", p)
}
