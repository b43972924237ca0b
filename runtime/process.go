// Package runtime is what every layer of vmpod's runtime says about a process in a pod:
// the stdio the host attaches to it and how it ended. The layers themselves are its
// subpackages: vmm (the machine: QEMU and what it holds on the host), vmpodagent and qga
// (guest layers: the vmpod agent of container pods, the QEMU guest agent of VM pods), and
// pod (one pod interface over them, the only one the shim calls).
package runtime

import (
	"io"
	"time"
)

// Stdio is what the host attaches to a process. Nil streams are not attached (the
// process gets /dev/null). With Terminal, output arrives on Stdout only.
type Stdio struct {
	Stdin          io.Reader
	Stdout, Stderr io.Writer
	Terminal       bool
	Width, Height  uint32
}

// Exit is how a process ended.
type Exit struct {
	// Status is the exit code, or 128+signal.
	Status   int
	ExitedAt time.Time
	// Reason says why, where the status alone does not (a VM that crashed or panicked).
	Reason string
}
