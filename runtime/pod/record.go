package pod

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/containerd/log"

	"github.com/vmpod/vmpod/runtime/vmm"
)

// recordFile, in a container's bundle, says which pod VM the container ran in, so that
// containerd's `shim delete` (run after a shim died) can find what to clean up.
const recordFile = "vmpod-pod.json"

// record is what a bundle remembers of its pod.
type record struct {
	PodID    string `json:"pod_id"`
	StateDir string `json:"state_dir"`
}

// writeRecord writes a pod's record into a container's bundle.
func writeRecord(bundle, podID, stateDir string) error {
	b, err := json.Marshal(record{PodID: podID, StateDir: stateDir})
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(bundle, recordFile), b, 0o600); err != nil {
		return fmt.Errorf("pod record: %w", err)
	}
	return nil
}

// readRecord reads a bundle's pod record; a bundle without one returns os.ErrNotExist.
func readRecord(bundle string) (record, error) {
	var r record
	b, err := os.ReadFile(filepath.Join(bundle, recordFile))
	if err != nil {
		return r, err
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return r, fmt.Errorf("pod record %s: %w", bundle, err)
	}
	return r, nil
}

// Cleanup removes what the pod a bundle's container ran in left on the host after its
// shim died (QEMU, helpers, mounts, the state directory): containerd's `shim delete`. A
// bundle without a record has nothing to clean. A pod whose shim lives — it holds its
// VM's owner lock — is left alone: containerd runs `shim delete` after each container's
// removal too, and only the lock proves the shim gone.
func Cleanup(bundle string) error {
	rec, err := readRecord(bundle)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if _, err := vmm.CleanupOrphan(rec.StateDir); err != nil {
		return fmt.Errorf("pod %s: %w", rec.PodID, err)
	}
	sweepOrphans(context.Background(), filepath.Dir(rec.StateDir))
	return nil
}

// sweepOrphans finishes what dead shims left under the node's state root (vmm.SweepOrphans):
// each pod start and each `shim delete` looks, so a leftover lasts until the next one.
func sweepOrphans(ctx context.Context, root string) {
	swept, err := vmm.SweepOrphans(root)
	for _, dir := range swept {
		log.G(ctx).Warnf("cleaned up %s, left behind by a shim that died", dir)
	}
	if err != nil {
		log.G(ctx).WithError(err).Warn("sweeping what dead shims left")
	}
}
