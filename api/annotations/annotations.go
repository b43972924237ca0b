// Package annotations is the vmpod.dev/* pod annotation contract between pod authors (and
// the vmpod controller) and the node. It is deliberately small and imports nothing of
// vmpod but its vocabulary (api/machine): the shim and the controller both use it.
//
// Security rule: an annotation chooses within what the node admin allows. None names a
// host path, a binary, a QEMU argument or a kernel command line; unknown keys under
// vmpod.dev/ are rejected, never ignored.
package annotations

import (
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"

	"github.com/vmpod/vmpod/api/machine"
)

// Prefix is the namespace of vmpod's annotations.
const Prefix = "vmpod.dev/"

// Keys a pod may carry.
const (
	// Machine picks the QEMU machine: "microvm" (fastest boot) or "q35" (PCI hotplug).
	Machine = Prefix + "machine"
	// SharedFS picks how container filesystems reach the guest: "virtio-fs" or "9p".
	SharedFS = Prefix + "shared-fs"
	// VM makes the pod a VM pod; its value is a vmspec JSON document (api/vmspec).
	VM = Prefix + "vm"
	// MigrationTarget makes a container pod the target of a live migration: its VM waits
	// for the guest of the pod it names (the source pod's UID, for the record) instead of
	// booting, and its containers are the source's once it has come (docs/design/212).
	MigrationTarget = Prefix + "migration-target"
)

var known = map[string]func(string) error{
	Machine: func(v string) error { return machine.Type(v).Check() },
	SharedFS: func(v string) error {
		if machine.SharedFS(v) == machine.NoSharedFS {
			return fmt.Errorf("%q: a container pod needs a shared filesystem (virtio-fs or 9p)", v)
		}
		return machine.SharedFS(v).Check()
	},
	VM: func(string) error { return nil }, // validated by api/vmspec
	MigrationTarget: func(v string) error {
		if v == "" || len(v) > 128 || strings.IndexFunc(v, func(r rune) bool { return r <= ' ' || r > '~' }) >= 0 {
			return fmt.Errorf("%q: want the source pod's UID (1-128 printable ASCII characters, no spaces)", v)
		}
		return nil
	},
}

// Pod is what a pod's vmpod.dev/* annotations asked for ("" = not asked).
type Pod struct {
	Machine  machine.Type
	SharedFS machine.SharedFS
	VM       string
	// MigrationTarget is the source pod a migration target's guest comes from
	MigrationTarget string
}

// Parse validates the vmpod.dev/* annotations of a pod against the keys the node allows
// and returns them; other annotations are ignored. Every problem is reported, each naming
// its key.
func Parse(annotations map[string]string, allowed []string) (Pod, error) {
	var errs []error
	var pod Pod
	keys := make([]string, 0, len(annotations))
	for k := range annotations {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, key := range keys {
		if !strings.HasPrefix(key, Prefix) {
			continue
		}
		value := annotations[key]
		check, ok := known[key]
		switch {
		case !ok:
			errs = append(errs, fmt.Errorf("annotation %s: unknown (known: %s)", key, strings.Join(Known(), ", ")))
			continue
		case !slices.Contains(allowed, key):
			errs = append(errs, fmt.Errorf("annotation %s: not allowed on this node (vmpod config annotations.allowed)", key))
			continue
		}
		if err := check(value); err != nil {
			errs = append(errs, fmt.Errorf("annotation %s: %w", key, err))
			continue
		}
		switch key {
		case Machine:
			pod.Machine = machine.Type(value)
		case SharedFS:
			pod.SharedFS = machine.SharedFS(value)
		case VM:
			pod.VM = value
		case MigrationTarget:
			pod.MigrationTarget = value
		}
	}
	return pod, errors.Join(errs...)
}

// Known lists every key vmpod understands.
func Known() []string {
	keys := make([]string, 0, len(known))
	for k := range known {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
