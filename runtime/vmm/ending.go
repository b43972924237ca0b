package vmm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmpod/vmpod/qmp"
)

// followShutdowns records the reason of the last SHUTDOWN QEMU announces (the guest
// powered off, rebooted under -no-reboot, or QEMU was told to quit), for Ending.
func (m *Machine) followShutdowns(mon *qmp.Monitor) {
	sub := mon.Subscribe(qmp.EventNamed(qmp.EventShutdown))
	m.followed = make(chan struct{})
	go func() {
		defer close(m.followed)
		defer sub.Close()
		for {
			ev, err := sub.Next(context.Background())
			if err != nil {
				return // the monitor closed: QEMU is gone or being torn down
			}
			if d, err := ev.AsShutdown(); err == nil {
				m.endMu.Lock()
				m.shutdownReason = d.Reason
				m.endMu.Unlock()
			}
		}
	}()
}

// Ending says why QEMU exited, once Done is closed, as "Reason: message" — the form a
// termination message takes: the guest kernel's panic line when it printed one, how QEMU
// failed, or what QEMU said the guest did.
func (m *Machine) Ending() string {
	<-m.exited
	if m.followed != nil {
		// events QEMU sent before its monitor closed are still on their way
		select {
		case <-m.followed:
		case <-time.After(time.Second):
		}
	}
	m.endMu.Lock()
	shutdown := m.shutdownReason
	m.endMu.Unlock()
	return describeEnding(m.exitErr, shutdown, panicLine(m.cfg.LogPath))
}

// QEMUExit is the exit status and "Reason: message" for QEMU exiting with exitErr (not
// nil): killed by a signal (QEMUCrashed, 128+signal) or failing with a status of its own
// (QEMUFailed). VM pods and container pods word it alike.
func QEMUExit(exitErr error) (status int, reason string) {
	var ee *exec.ExitError
	if errors.As(exitErr, &ee) && ee.ProcessState != nil {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return 128 + int(ws.Signal()), fmt.Sprintf("QEMUCrashed: QEMU was killed by %s", unix.SignalName(ws.Signal()))
		}
		return ee.ExitCode(), fmt.Sprintf("QEMUFailed: QEMU exited with status %d", ee.ExitCode())
	}
	return 255, "QEMUFailed: " + exitErr.Error()
}

func describeEnding(exitErr error, shutdown, panicked string) string {
	switch {
	case panicked != "":
		return "GuestPanicked: " + panicked
	case exitErr != nil:
		_, reason := QEMUExit(exitErr)
		return reason
	}
	switch shutdown {
	case "guest-reset":
		return "GuestReset: the guest rebooted, and a vmpod VM ends at a reboot"
	case "guest-shutdown":
		return "GuestShutdown: the guest powered off"
	case "guest-panic":
		return "GuestPanicked: the guest kernel panicked"
	case "":
		return "QEMUExited: QEMU exited without saying why"
	default:
		return fmt.Sprintf("QEMUExited: QEMU shut the VM down (%s)", shutdown)
	}
}

// consoleTailBytes bounds how much of the console log panicLine reads: a panic is the
// last thing a kernel prints.
const consoleTailBytes = 64 << 10

// panicMark starts the line Linux prints when it panics.
const panicMark = "Kernel panic - not syncing: "

// panicLine is the guest kernel's last panic line in the console log at path, without
// its timestamp, or "".
func panicLine(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	if fi, err := f.Stat(); err == nil && fi.Size() > consoleTailBytes {
		if _, err := f.Seek(-consoleTailBytes, io.SeekEnd); err != nil {
			return ""
		}
	}
	b, err := io.ReadAll(io.LimitReader(f, consoleTailBytes))
	if err != nil {
		return ""
	}
	i := strings.LastIndex(string(b), panicMark)
	if i < 0 {
		return ""
	}
	line, _, _ := strings.Cut(string(b[i:]), "\n")
	return strings.TrimSpace(strings.ToValidUTF8(line, "?"))
}
