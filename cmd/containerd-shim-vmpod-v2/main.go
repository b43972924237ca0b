// containerd-shim-vmpod-v2 is the containerd shim that runs each pod as a QEMU VM.
package main

import (
	"context"

	"github.com/containerd/containerd/v2/pkg/shim"

	"github.com/vmpod/vmpod/shim/manager"
	_ "github.com/vmpod/vmpod/shim/task" // registers the task service
)

func main() {
	// No reaper: the shim's only children are QEMU and virtiofsd, waited for by os/exec.
	shim.RunShim(context.Background(), manager.New(), func(c *shim.Config) { c.NoReaper, c.NoSubreaper = true, true })
}
