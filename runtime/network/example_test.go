package network_test

import (
	"context"
	"errors"
	"log"
	"time"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
	"github.com/vmpod/vmpod/runtime/network"
	"github.com/vmpod/vmpod/runtime/vmm"
	"github.com/vmpod/vmpod/runtime/vmpodagent"
)

// startPod is what the shim does for a new sandbox: plumb the netns CNI made, boot the VM
// with the taps, make the guest the pod. On error nothing is left behind.
func startPod(ctx context.Context, netnsPath string, cfg vmpodagent.Config) (_ *vmpodagent.Guest, _ *network.Plumbing, retErr error) {
	plan, err := network.Inspect(netnsPath)
	if err != nil {
		return nil, nil, err // names the netns and the link or route at fault
	}
	for _, s := range plan.Skipped {
		log.Printf("pod network: skipped %s", s)
	}
	plumbing, err := network.Plumb(plan)
	if err != nil {
		return nil, nil, err
	}
	defer func() {
		if retErr != nil {
			_ = plumbing.Teardown()
		}
	}()
	cfg.NICs = plumbing.NICs()
	vm, err := vmpodagent.Boot(ctx, cfg)
	if err != nil {
		return nil, nil, err
	}
	err = vm.Agent().SetupSandbox(ctx, &agentv1.SetupSandboxRequest{
		Hostname:          cfg.Name,
		HostTimeUnixNanos: time.Now().UnixNano(),
		Interfaces:        plan.GuestInterfaces(),
		Routes:            plan.GuestRoutes(),
	})
	if err != nil {
		_ = vm.Kill()
		return nil, nil, err
	}
	return vm, plumbing, nil
}

// stopPod stops the VM first (QEMU lets go of the taps), then removes the plumbing.
func stopPod(ctx context.Context, vm *vmpodagent.Guest, plumbing *network.Plumbing) error {
	return errors.Join(vm.Stop(ctx), plumbing.Teardown())
}

// Compiled, not run: it needs root, a pod netns and a guest.
func Example() {
	ctx := context.Background()
	cfg := vmpodagent.Config{Config: vmm.Config{Name: "pod-1234", StateDir: "/run/vmpod/pod-1234" /* kernel, initrd, ... */}}
	vm, plumbing, err := startPod(ctx, "/var/run/netns/cni-1234", cfg)
	if err != nil {
		log.Print(err)
		return
	}
	// ... containers ...
	if err := stopPod(ctx, vm, plumbing); err != nil {
		log.Print(err)
	}
}
