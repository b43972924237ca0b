// Package manager is the shim binary's life outside serving: `start` launches (or finds)
// the one shim process of a pod, `delete` cleans up after a shim that is gone, `-info`
// describes the runtime. Containers of one pod share a shim, grouped by CRI's sandbox id.
package manager

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	bootapi "github.com/containerd/containerd/api/runtime/bootstrap/v1"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/v2/defaults"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/containerd/v2/version"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/vmpod/vmpod/internal/mounts"
	"github.com/vmpod/vmpod/internal/sockets"
	"github.com/vmpod/vmpod/runtime/pod"
)

// RuntimeName is the runtime_type containerd configs name vmpod by.
const RuntimeName = "io.containerd.vmpod.v2"

type manager struct{}

// New is the shim manager for containerd's pkg/shim.
func New() shim.Shim { return manager{} }

func (manager) Name() string { return RuntimeName }

// Start launches the shim process serving the pod of the container being created, or
// returns the address of the one already serving it.
func (manager) Start(ctx context.Context, params *bootapi.BootstrapParams) (_ *bootapi.BootstrapResult, retErr error) {
	id := params.GetInstanceID()
	result := &bootapi.BootstrapResult{Version: 3, Protocol: "ttrpc"}

	spec, err := readBundleSpec()
	if err != nil {
		return nil, err
	}
	group := pod.ID(id, spec)

	socketDir := params.GetSocketDir()
	if socketDir == "" {
		socketDir = filepath.Join(defaults.DefaultStateDir, "s")
	}
	address, err := shim.CreateSocketAddress(ctx, socketDir, params.GetContainerdGrpcAddress(), group, false)
	if err != nil {
		return nil, err
	}
	socket, err := shim.NewSocket(address)
	if err != nil {
		if !shim.SocketEaddrinuse(err) {
			return nil, fmt.Errorf("shim socket %s: %w", address, err)
		}
		if sockets.Served(strings.TrimPrefix(address, "unix://")) {
			// The pod's shim is running: the container joins it.
			result.Address = address
			return result, nil
		}
		if err := shim.RemoveSocket(address); err != nil {
			return nil, fmt.Errorf("remove stale shim socket: %w", err)
		}
		if socket, err = shim.NewSocket(address); err != nil {
			return nil, fmt.Errorf("shim socket %s: %w", address, err)
		}
	}
	defer func() {
		if retErr != nil {
			_ = socket.Close()
			_ = shim.RemoveSocket(address)
		}
	}()
	f, err := socket.File()
	if err != nil {
		return nil, err
	}
	defer f.Close()

	cmd, err := serverCommand(ctx, id, params.GetContainerdGrpcAddress(), params.GetLogLevel() <= bootapi.LogLevel_LOG_LEVEL_DEBUG)
	if err != nil {
		return nil, err
	}
	cmd.ExtraFiles = []*os.File{f}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start shim server: %w", err)
	}
	go func() { _ = cmd.Wait() }()
	if err := shim.AdjustOOMScore(cmd.Process.Pid); err != nil {
		_ = cmd.Process.Kill()
		return nil, fmt.Errorf("shim OOM score: %w", err)
	}
	result.Address = address
	return result, nil
}

// serverCommand re-executes this binary as the long-running shim server.
func serverCommand(ctx context.Context, id, containerdAddress string, debug bool) (*exec.Cmd, error) {
	ns, err := namespaces.NamespaceRequired(ctx)
	if err != nil {
		return nil, err
	}
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cwd, err := os.Getwd()
	if err != nil {
		return nil, err
	}
	args := []string{"-namespace", ns, "-id", id, "-address", containerdAddress}
	if debug {
		args = append(args, "-debug")
	}
	cmd := exec.Command(self, args...)
	cmd.Dir = cwd
	cmd.Env = append(os.Environ(), "GOMAXPROCS=4")
	// Its own session: signals to containerd's process group must not reach the pod.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	return cmd, nil
}

// readBundleSpec reads the annotations of the bundle containerd runs `start` in.
func readBundleSpec() (*specs.Spec, error) {
	b, err := os.ReadFile("config.json")
	if err != nil {
		return nil, fmt.Errorf("bundle config.json: %w", err)
	}
	var spec specs.Spec
	if err := json.Unmarshal(b, &spec); err != nil {
		return nil, fmt.Errorf("bundle config.json: %w", err)
	}
	return &spec, nil
}

// Stop is `shim delete`: containerd runs it in the bundle of container id after its shim
// went away (or to clean up a failed start). It unmounts the rootfs and, unless the pod's
// shim still serves (it shares one address with every container of the pod), removes
// what the pod's VM left on the host and the dead shim's socket.
func (manager) Stop(ctx context.Context, id string) (shim.StopStatus, error) {
	bundle, err := os.Getwd()
	if err != nil {
		return shim.StopStatus{}, err
	}
	detached, err := mounts.UnmountTree(filepath.Join(bundle, "rootfs"))
	if err != nil {
		log.G(ctx).WithError(err).Warn("unmount rootfs")
	}
	for _, m := range detached {
		log.G(ctx).Warnf("%s was busy on the host: detached lazily", m)
	}
	address, _ := shimAddress(bundle)
	// containerd runs `shim delete` whenever a connection to a shim closes — after every
	// container's removal too, its pod's shim serving on: a pod is cleaned up only once
	// its shim's socket refuses
	if address != "" && sockets.Served(strings.TrimPrefix(address, "unix://")) {
		return stopped(), nil // the pod's shim serves on; it cleans up itself
	}
	// pod.Cleanup leaves a VM whose shim holds its owner lock: a shim that lives without
	// its socket (removed by hand) keeps its pod
	if err := pod.Cleanup(bundle); err != nil {
		log.G(ctx).WithError(err).Warn("clean up pod state")
	}
	if address != "" {
		_ = shim.RemoveSocket(address)
	}
	return stopped(), nil
}

func stopped() shim.StopStatus {
	return shim.StopStatus{ExitedAt: time.Now(), ExitStatus: 128 + int(syscall.SIGKILL)}
}

// shimAddress is the address containerd recorded for the bundle's shim.
func shimAddress(bundle string) (string, error) {
	b, err := os.ReadFile(filepath.Join(bundle, "bootstrap.json"))
	if err != nil {
		return "", err
	}
	var r struct {
		Address string `json:"address"`
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return "", err
	}
	return r.Address, nil
}

// Info describes the runtime for `containerd-shim-vmpod-v2 -info`.
func (manager) Info(ctx context.Context, optionsR io.Reader) (*types.RuntimeInfo, error) {
	if _, err := io.Copy(io.Discard, optionsR); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
		return nil, err
	}
	f, err := runtimeFeatures()
	if err != nil {
		return nil, err
	}
	any, err := typeurl.MarshalAnyToProto(f)
	if err != nil {
		return nil, fmt.Errorf("runtime features: %w", err)
	}
	return &types.RuntimeInfo{
		Name:     RuntimeName,
		Version:  &types.RuntimeVersion{Version: version.Version, Revision: version.Revision},
		Features: any,
	}, nil
}
