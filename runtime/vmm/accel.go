package vmm

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/vmpod/vmpod/api/machine"
)

// accelChoice is what Accel resolved to on this host, and why.
type accelChoice struct {
	accel  machine.Accel // kvm or tcg
	reason string
}

// hostCPU is what accel resolution reads from the host; a variable so tests can stand in
// for hosts they do not run on.
type hostCPU struct {
	kvmOpens bool
	flags    map[string]bool
	mhz      float64
}

func readHostCPU() hostCPU {
	h := hostCPU{flags: map[string]bool{}}
	if f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err == nil {
		h.kvmOpens = true
		_ = f.Close()
	}
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return h
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		key, value, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		switch strings.TrimSpace(key) {
		case "flags":
			if len(h.flags) == 0 {
				for fl := range strings.FieldsSeq(value) {
					h.flags[fl] = true
				}
			}
		case "cpu MHz":
			if h.mhz == 0 {
				h.mhz, _ = strconv.ParseFloat(strings.TrimSpace(value), 64)
			}
		}
		if len(h.flags) > 0 && h.mhz > 0 {
			break
		}
	}
	return h
}

// ResolveAccel is the accelerator a VM configured with want gets on this host (auto
// becomes kvm or tcg), as Start decides it.
func ResolveAccel(want machine.Accel) (machine.Accel, error) {
	c, err := resolveAccel(want, readHostCPU())
	return c.accel, err
}

// resolveAccel turns auto into kvm or tcg. /dev/kvm alone is not enough: some hosts
// expose it without hardware virtualisation (PVM here), and a stock guest hangs there.
func resolveAccel(want machine.Accel, h hostCPU) (accelChoice, error) {
	hw := h.flags["vmx"] || h.flags["svm"]
	switch want {
	case machine.TCG:
		return accelChoice{machine.TCG, "configured"}, nil
	case machine.KVM:
		if !h.kvmOpens {
			return accelChoice{}, errors.New("accel: kvm configured but /dev/kvm does not open")
		}
		return accelChoice{machine.KVM, "configured"}, nil
	}
	switch {
	case h.kvmOpens && hw:
		return accelChoice{machine.KVM, "/dev/kvm opens and the CPU has vmx/svm"}, nil
	case h.kvmOpens:
		return accelChoice{machine.TCG, "/dev/kvm opens but the CPU advertises neither vmx nor svm: using TCG emulation (slow)"}, nil
	default:
		return accelChoice{machine.TCG, "/dev/kvm does not open: using TCG emulation (slow)"}, nil
	}
}

// tscKHz is the host TSC frequency for tsc_early_khz=. Under TCG the guest reads the
// host's TSC, and microvm has no HPET or PIT to calibrate it against: without the hint
// the guest kernel hangs at boot about half the time (reference/guest-vm REPORT).
// "cpu MHz" is the TSC rate on hosts with constant_tsc, which is every host TCG runs on
// in practice.
func (h hostCPU) tscKHz() (int, error) {
	if h.mhz <= 0 {
		return 0, fmt.Errorf("host TSC frequency: no \"cpu MHz\" in /proc/cpuinfo")
	}
	return int(h.mhz * 1000), nil
}
