package importer

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"sync"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
)

// Reporter tells the world how the import goes.
type Reporter interface {
	// Progress reports the share done ("42.00%", or "N/A") and what is happening. It may
	// drop reports that come faster than it wants to send them.
	Progress(ctx context.Context, progress, message string)
	// Ready says the importer waits for the user (an upload) and why.
	Ready(ctx context.Context, message string)
	// Succeeded is called once the data is complete and synced.
	Succeeded(ctx context.Context) error
	// Failed reports a failure; a permanent one is final.
	Failed(ctx context.Context, reason, message string, permanent bool) error
}

// PVCReporter writes the import's state as annotations on the PVC being filled (the
// importer's ServiceAccount may get and patch that PVC and nothing else).
type PVCReporter struct {
	Client    kubernetes.Interface
	Namespace string
	Name      string
	// Interval is the least time between two progress patches.
	Interval time.Duration

	mu   sync.Mutex
	last time.Time
}

// Progress patches the progress annotations, at most once per Interval.
func (r *PVCReporter) Progress(ctx context.Context, progress, message string) {
	r.mu.Lock()
	if time.Since(r.last) < r.Interval {
		r.mu.Unlock()
		return
	}
	r.last = time.Now()
	r.mu.Unlock()
	slog.Info("progress", "progress", progress, "message", message)
	if err := r.patch(ctx, "Running", progress, "", message); err != nil {
		// progress is advisory: the import goes on
		slog.Warn("could not report progress on the PVC", "err", err)
	}
}

// Ready marks the PVC as waiting for an upload; it is never throttled.
func (r *PVCReporter) Ready(ctx context.Context, message string) {
	slog.Info("ready", "message", message)
	if err := r.patch(ctx, string(vmpodv1.PhaseUploadReady), "N/A", "", message); err != nil {
		slog.Warn("could not report readiness on the PVC", "err", err)
	}
}

// Succeeded marks the PVC complete.
func (r *PVCReporter) Succeeded(ctx context.Context) error {
	return r.patch(ctx, string(vmpodv1.PhaseSucceeded), "100.00%", "", "the import completed")
}

// Failed marks the PVC failed (permanent) or records the attempt's failure (the Job retries).
func (r *PVCReporter) Failed(ctx context.Context, reason, message string, permanent bool) error {
	phase := "Running"
	if permanent {
		phase = string(vmpodv1.PhaseFailed)
	} else {
		message = "attempt failed, retrying: " + message
	}
	return r.patch(ctx, phase, "", reason, message)
}

func (r *PVCReporter) patch(ctx context.Context, phase, progress, reason, message string) error {
	ann := map[string]any{vmpodv1.ImportPhaseAnnotation: phase, vmpodv1.ImportMessageAnnotation: truncate(message, 1024)}
	if progress != "" {
		ann[vmpodv1.ImportProgressAnnotation] = progress
	}
	if reason != "" {
		ann[vmpodv1.ImportReasonAnnotation] = reason
	} else {
		ann[vmpodv1.ImportReasonAnnotation] = nil // a merge patch null deletes an old attempt's reason
	}
	body, err := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": ann}})
	if err != nil {
		return fmt.Errorf("marshal PVC patch: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	_, err = r.Client.CoreV1().PersistentVolumeClaims(r.Namespace).Patch(ctx, r.Name, types.MergePatchType, body, metav1.PatchOptions{})
	if err != nil {
		return fmt.Errorf("patch PVC %s/%s: %w", r.Namespace, r.Name, err)
	}
	return nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n-3] + "..."
}

// LogReporter only logs: for running the importer by hand, without a PVC to annotate.
type LogReporter struct{}

func (LogReporter) Progress(_ context.Context, progress, message string) {
	slog.Info("progress", "progress", progress, "message", message)
}
func (LogReporter) Ready(_ context.Context, message string) {
	slog.Info("ready", "message", message)
}
func (LogReporter) Succeeded(context.Context) error { return nil }
func (LogReporter) Failed(context.Context, string, string, bool) error {
	return nil
}
