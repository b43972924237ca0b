// Package agent is vmpod-agent, PID 1 of a container pod's VM: it mounts the basics, reaps
// every process, and serves the agent API (agent/api/v1) over ttrpc on a session-framed
// virtio-serial port, running the pod's containers with runc.
package agent

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"time"

	runc "github.com/containerd/go-runc"
	"github.com/containerd/ttrpc"

	agentv1 "github.com/vmpod/vmpod/agent/api/v1"
	"github.com/vmpod/vmpod/agent/channel"
	"github.com/vmpod/vmpod/agent/reaper"
)

// Guest paths the agent owns.
const (
	runcBinary = "/bin/runc"
	runcRoot   = "/run/runc"
	bundleRoot = "/run/vmpod/bundles"
	cgroupRoot = "/sys/fs/cgroup"
)

// Main runs the agent as the guest's init. It never returns: on a fatal error it logs
// why to the console (the VM's log on the host) and powers the VM off.
func Main() {
	if len(os.Args) > 2 && os.Args[1] == idleExecArg {
		execIdle(os.Args[2:]) // the agent's own trampoline (warmup.go), never returns
	}
	if len(os.Args) == 2 && os.Args[1] == containerInitArg {
		containerInit() // a container's init (appinit.go), never returns
	}
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "vmpod-agent is the guest's init (PID 1); it does not run on a host")
		os.Exit(2)
	}
	if err := run(); err != nil {
		slog.Error("agent failed", "error", err)
	}
	poweroff()
}

func run() error {
	booted := time.Now()
	if err := switchRoot(); err != nil {
		return fmt.Errorf("switch root: %w", err)
	}
	if err := mountEarly(); err != nil {
		return err
	}
	params := kernelParams()
	level := slog.LevelInfo
	if _, ok := params[agentv1.KernelParamDebug]; ok {
		level = slog.LevelDebug
	}
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})).With("agent", Version))

	// PID 1 reaps everything; runc and os/exec go through the reaper too.
	rp := reaper.New()
	runc.Monitor = rp

	if share, ok := params[agentv1.KernelParamShare]; ok {
		if err := mountShare(share); err != nil {
			return err
		}
	}
	if err := os.MkdirAll(runcRoot, 0o700); err != nil {
		return err
	}
	if err := os.MkdirAll(bundleRoot, 0o711); err != nil { // see containers.create
		return err
	}
	oom, err := newOOMWatcher()
	if err != nil {
		return fmt.Errorf("OOM watcher: %w", err)
	}
	svc := &service{
		containers: &containers{
			reaper:     rp,
			runcBinary: runcBinary,
			runcRoot:   runcRoot,
			bundleRoot: bundleRoot,
			cgroupRoot: cgroupRoot,
			oom:        oom,
			byID:       map[string]*container{},
		},
		oom:      oom,
		booted:   booted,
		poweroff: poweroff,
	}
	_, runcApps := params[agentv1.KernelParamRuncApps]
	svc.containers.runcApps = runcApps
	// Only runc's app containers gain from the warm-up; the agent's own need no runc.
	_, noWarmup := params[agentv1.KernelParamNoWarmup]
	noWarmup = noWarmup || !runcApps
	_, template := params[agentv1.KernelParamTemplate]
	svc.warmAfterRestore = template && !noWarmup

	port, err := openPort(agentv1.PortName)
	if err != nil {
		return err
	}
	server, err := ttrpc.NewServer(ttrpc.WithUnaryServerInterceptor(mapErrors))
	if err != nil {
		return err
	}
	agentv1.RegisterAgentService(server, svc)
	if !noWarmup && !template {
		go warmRunc(context.Background(), svc.containers)
	}
	slog.Info("serving", "port", port.String(), "setup", time.Since(booted).Round(time.Millisecond))
	listener := channel.Listen(port, func(format string, args ...any) { slog.Info(fmt.Sprintf(format, args...)) })
	return server.Serve(context.Background(), listener)
}
