// Package machine holds the words for a VM's hardware that the pod annotations, the VM spec,
// the node config, the runtime and the device model all speak: the machine type, the
// accelerator and the shared filesystem. They are declared here once; every other package
// uses these types. Standard library only: the controller imports it too.
package machine

import (
	"fmt"
	"slices"
	"strings"
)

// Type is the QEMU machine type.
type Type string

const (
	// Q35 is a PCI Express machine: root ports for device hotplug, vCPU and virtio-mem
	// hotplug, VFIO, firmware boot (SeaBIOS, UEFI). ~1.1 s to a Go /init with qboot
	// under TCG.
	Q35 Type = "q35"
	// MicroVM boots fastest (~0.85 s to a Go /init under TCG) but has only virtio-mmio:
	// no PCI, no hotplug of any kind, direct kernel boot only.
	MicroVM Type = "microvm"
)

// Types lists every machine type, for error messages and enums.
var Types = []Type{MicroVM, Q35}

// Check says what is wrong with t, or nil.
func (t Type) Check() error { return oneOf(t, Types) }

// Accel is the accelerator: Auto picks KVM where /dev/kvm opens and the CPU advertises
// vmx/svm, else TCG (with a warning).
type Accel string

const (
	AccelAuto Accel = "auto"
	KVM       Accel = "kvm" // hardware virtualisation
	TCG       Accel = "tcg" // emulation, for hosts without usable KVM
)

// Accels lists every accelerator setting.
var Accels = []Accel{AccelAuto, KVM, TCG}

// Check says what is wrong with a, or nil.
func (a Accel) Check() error { return oneOf(a, Accels) }

// SharedFS is how the host's shared directory (container rootfs and volumes) reaches a
// container pod's guest (docs/design/003-shared-fs.md).
type SharedFS string

const (
	VirtioFS SharedFS = "virtio-fs"
	NineP    SharedFS = "9p"
	// NoSharedFS: the guest gets no shared directory (VM pods, which boot from disks).
	NoSharedFS SharedFS = "none"
)

// SharedFSes lists every shared filesystem setting.
var SharedFSes = []SharedFS{VirtioFS, NineP, NoSharedFS}

// Check says what is wrong with s, or nil.
func (s SharedFS) Check() error { return oneOf(s, SharedFSes) }

func oneOf[T ~string](v T, all []T) error {
	if slices.Contains(all, v) {
		return nil
	}
	names := make([]string, len(all))
	for i, a := range all {
		names[i] = string(a)
	}
	return fmt.Errorf("%q: want one of %s", v, strings.Join(names, ", "))
}
