package machine

import (
	"errors"
	"fmt"
	"regexp"
)

// CPU models a VM may ask for besides a named QEMU model (e.g. "Skylake-Client-IBRS").
const (
	// CPUHostModel is KubeVirt's default and vmpod's, what "" means too: the host's CPU as
	// it is under KVM (QEMU's "host"; vmpod does not compute a named model close to the
	// host as libvirt's host-model does), an emulated baseline under TCG.
	CPUHostModel = "host-model"
	// CPUHostPassthrough is the host's CPU as it is (QEMU's "host"): under KVM the same as
	// the default; refused where there is no KVM, rather than given another CPU.
	CPUHostPassthrough = "host-passthrough"
)

// CheckNamedCPUModel says what is wrong with a name a node admin lists as a model VM pods
// may ask for: a QEMU model name, not one of the host-* choices or QEMU's "host".
func CheckNamedCPUModel(model string) error {
	switch model {
	case "", CPUHostModel, CPUHostPassthrough, "host":
		return fmt.Errorf("%q: list QEMU CPU model names only (the host's CPU needs no entry)", model)
	}
	return CheckCPUModel(model)
}

// cpuModelName is a QEMU CPU model's name: the value of -cpu before its flags, so it may
// hold no ',' (which would start a flag) and nothing a shell or a log would mangle.
var cpuModelName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// CheckCPUModel says what is wrong with a CPU model name, or nil. "" is the default.
func CheckCPUModel(model string) error {
	if model == "" || cpuModelName.MatchString(model) {
		return nil
	}
	return fmt.Errorf("%q is not a CPU model name (1-64 of [A-Za-z0-9._-], starting with a letter or digit)", model)
}

// HyperV is the set of Hyper-V enlightenments a guest gets: paravirtual interfaces of KVM
// that Windows uses where it finds them (without them a Windows guest spins on locks,
// takes timer interrupts the slow way and trips its own watchdog when a vCPU is
// preempted). They are KubeVirt's enlightenments (its synictimer and vendorid are
// synicTimer and vendorID in vmpod's JSON); each becomes QEMU's hv-* CPU property.
type HyperV struct {
	Relaxed bool `json:"relaxed,omitempty"` // no watchdog timeouts while the host preempts a vCPU
	VAPIC   bool `json:"vapic,omitempty"`   // interrupt controller access without exits
	// Spinlocks is how often the guest retries a spinlock before it tells the hypervisor;
	// 0 leaves it off, otherwise at least MinSpinlocks.
	Spinlocks        int    `json:"spinlocks,omitempty"`
	VPIndex          bool   `json:"vpindex,omitempty"` // virtual processor numbers
	Runtime          bool   `json:"runtime,omitempty"` // per-vCPU run time
	SynIC            bool   `json:"synic,omitempty"`   // synthetic interrupt controller
	SynICTimer       bool   `json:"synicTimer,omitempty"`
	SynICTimerDirect bool   `json:"synicTimerDirect,omitempty"` // timer expiry as a plain interrupt
	Reset            bool   `json:"reset,omitempty"`            // reset through a Hyper-V MSR
	VendorID         string `json:"vendorID,omitempty"`         // the hypervisor vendor the guest sees
	Frequencies      bool   `json:"frequencies,omitempty"`      // TSC and APIC frequencies by MSR
	Reenlightenment  bool   `json:"reenlightenment,omitempty"`  // notice of TSC changes (migration)
	TLBFlush         bool   `json:"tlbflush,omitempty"`         // TLB shootdown by hypercall
	IPI              bool   `json:"ipi,omitempty"`              // IPIs by hypercall
	EVMCS            bool   `json:"evmcs,omitempty"`            // enlightened VMCS, for nested Hyper-V (Intel)
}

// MinSpinlocks is the least retry count of the spinlock enlightenment: KubeVirt's (QEMU
// itself takes 4095).
const MinSpinlocks = 4096

// vendorID is what QEMU's hv-vendor-id takes: up to 12 characters, and vmpod keeps to
// letters and digits so the value cannot carry a ',' into -cpu.
var vendorID = regexp.MustCompile(`^[A-Za-z0-9]{1,12}$`)

// Check reports what QEMU would refuse, each naming the enlightenment: a feature whose
// prerequisite is off (QEMU's own dependency rules under KVM), or a value out of range.
func (h HyperV) Check() error {
	var errs []error
	needs := func(on bool, name string, prereq bool, prereqName string) {
		if on && !prereq {
			errs = append(errs, fmt.Errorf("%s needs %s", name, prereqName))
		}
	}
	needs(h.SynIC, "synic", h.VPIndex, "vpindex")
	needs(h.SynICTimer, "synicTimer", h.SynIC, "synic")
	needs(h.SynICTimerDirect, "synicTimerDirect", h.SynICTimer, "synicTimer")
	needs(h.TLBFlush, "tlbflush", h.VPIndex, "vpindex")
	needs(h.IPI, "ipi", h.VPIndex, "vpindex")
	needs(h.EVMCS, "evmcs", h.VAPIC, "vapic")
	if h.Spinlocks != 0 && (h.Spinlocks < MinSpinlocks || h.Spinlocks > 0xffffffff) {
		errs = append(errs, fmt.Errorf("spinlocks %d: want 0 (off) or %d to %d", h.Spinlocks, MinSpinlocks, uint32(0xffffffff)))
	}
	if h.VendorID != "" && !vendorID.MatchString(h.VendorID) {
		errs = append(errs, fmt.Errorf("vendorID %q: want 1-12 letters or digits", h.VendorID))
	}
	return errors.Join(errs...)
}
