package pod

import (
	"encoding/json"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/containerd/log"

	"github.com/vmpod/vmpod/api/vmspec"
	"github.com/vmpod/vmpod/qmp"
)

// progressLines writes a migration's report lines to an exec's output from a goroutine of
// its own, keeping only the newest line not written yet. The migration's poll loop reports
// from inside itself (vmm.MigrationOptions.Progress): a client that stops reading its
// exec's output would otherwise stall the loop, and with it the timeouts and the
// switchover. A stalled client misses lines in between; the newest one, the outcome last,
// is what it reads when it reads again.
type progressLines struct {
	out  io.Writer
	mu   sync.Mutex
	next []byte        // the newest line not handed to out yet
	wake chan struct{} // a line is waiting (capacity 1)
	stop chan struct{} // closed by Close: write what waits, then end
	done chan struct{} // closed when the writer has ended
}

func newProgressLines(out io.Writer) *progressLines {
	l := &progressLines{out: out, wake: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	go l.run()
	return l
}

// Put replaces the line waiting to be written; it never blocks.
func (l *progressLines) Put(line []byte) {
	l.mu.Lock()
	l.next = line
	l.mu.Unlock()
	select {
	case l.wake <- struct{}{}:
	default:
	}
}

func (l *progressLines) run() {
	defer close(l.done)
	for {
		select {
		case <-l.wake:
			l.writeNext()
		case <-l.stop:
			l.writeNext()
			return
		}
	}
}

func (l *progressLines) writeNext() {
	l.mu.Lock()
	line := l.next
	l.next = nil
	l.mu.Unlock()
	if line != nil {
		_, _ = l.out.Write(line)
	}
}

// Close writes the line put last, waiting at most wait for a client that does not read;
// it says whether the writer got it out. Put after Close is not written.
func (l *progressLines) Close(wait time.Duration) bool {
	close(l.stop)
	select {
	case <-l.done:
		return true
	case <-time.After(wait):
		return false
	}
}

// migrationReport is what a migrate exec prints: a progress line a while (the newest
// replacing one not written yet), then the outcome; closing it waits a while for the
// client to read that.
type migrationReport struct {
	lines *progressLines
	lg    *log.Entry
}

func newMigrationReport(lg *log.Entry, out io.Writer) *migrationReport {
	return &migrationReport{lines: newProgressLines(out), lg: lg}
}

// progress puts a line of QEMU's account.
func (r *migrationReport) progress(p vmspec.MigrationProgress) {
	b, _ := json.Marshal(p)
	r.lines.Put(append(b, '\n'))
}

// fail reports err as the migration's end and returns it as vmspec.MigrateCommand's.
func (r *migrationReport) fail(err error) error {
	r.progress(vmspec.MigrationProgress{Status: string(qmp.MigrationFailed), Error: err.Error()})
	return fmt.Errorf("%s: %w", vmspec.MigrateCommand, err)
}

func (r *migrationReport) close() {
	if !r.lines.Close(outcomeWait) {
		r.lg.Warnf("migration: the client did not read the outcome within %v", outcomeWait)
	}
}
