package pidproxy

import (
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// standsFor names the test's proxies; the test binary run with it is the proxy.
const standsFor = "pidproxy-test-container"

func TestMain(m *testing.M) {
	if len(os.Args) == 2 && os.Args[1] == standsFor {
		Main()
		return
	}
	os.Exit(m.Run())
}

func start(t *testing.T) *Proxy {
	t.Helper()
	p, err := Start(os.Args[0], standsFor, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Stop)
	return p
}

func next(t *testing.T, p *Proxy) (syscall.Signal, bool) {
	t.Helper()
	select {
	case s, ok := <-p.Signals():
		return s, ok
	case <-time.After(10 * time.Second):
		t.Fatal("no signal relayed in 10s")
		return 0, false
	}
}

func TestSignalsAreRelayedAndSIGKILLEndsIt(t *testing.T) {
	p := start(t)
	cmdline, err := os.ReadFile("/proc/" + itoa(p.Pid()) + "/cmdline")
	if err != nil || !strings.Contains(string(cmdline), standsFor) {
		t.Fatalf("proxy command line %q (%v) does not name what it stands for", cmdline, err)
	}
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGUSR1, syscall.SIGHUP} {
		if err := syscall.Kill(p.Pid(), sig); err != nil {
			t.Fatal(err)
		}
		if s, _ := next(t, p); s != sig {
			t.Fatalf("relayed %v, want %v", s, sig)
		}
	}
	if err := syscall.Kill(p.Pid(), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if _, ok := next(t, p); ok {
		t.Fatal("signals still open after SIGKILL")
	}
	if !p.Killed() {
		t.Error("Killed() = false after an outside SIGKILL")
	}
}

func TestStopIsNotAKill(t *testing.T) {
	p := start(t)
	p.Stop()
	p.Stop() // idempotent
	if p.Killed() {
		t.Error("Killed() = true after Stop")
	}
	if err := syscall.Kill(p.Pid(), 0); err == nil {
		t.Error("the proxy still exists after Stop")
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

// A proxy nobody relays for (a container whose creation failed) still stops, however many
// signals it was sent.
func TestStopWithUnreadSignals(t *testing.T) {
	p := start(t)
	// More distinct signals than the relay buffers, one at a time so none coalesce.
	for _, sig := range []syscall.Signal{syscall.SIGHUP, syscall.SIGINT, syscall.SIGQUIT, syscall.SIGUSR1,
		syscall.SIGUSR2, syscall.SIGALRM, syscall.SIGTERM, syscall.SIGSTKFLT, syscall.SIGCONT, syscall.SIGTSTP,
		syscall.SIGTTIN, syscall.SIGTTOU, syscall.SIGXCPU, syscall.SIGXFSZ, syscall.SIGVTALRM, syscall.SIGPROF,
		syscall.SIGWINCH, syscall.SIGIO, syscall.SIGPWR} {
		if err := syscall.Kill(p.Pid(), sig); err != nil {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	stopped := make(chan struct{})
	go func() { p.Stop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		t.Fatal("Stop hung with unread signals")
	}
	if !p.Exited() {
		t.Error("Exited() = false after Stop")
	}
}
