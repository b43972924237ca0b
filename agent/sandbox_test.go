package agent

import (
	"crypto/rand"
	"os"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
)

// addEntropy credits bytes to the kernel's pool and reseeds it; it runs against the
// host's kernel here (the guest's is the same code), which needs CAP_SYS_ADMIN.
func TestAddEntropy(t *testing.T) {
	if err := addEntropy(make([]byte, maxEntropy+1)); !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "at most 512") {
		t.Errorf("too much entropy: %v, want an invalid argument naming the limit", err)
	}
	if os.Geteuid() != 0 {
		t.Skip("RNDADDENTROPY and RNDRESEEDCRNG need root")
	}
	// bytes from the kernel itself: what is credited back is random
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	if err := addEntropy(b); err != nil {
		t.Fatalf("add entropy: %v", err)
	}
}

func TestIsMountPoint(t *testing.T) {
	if ok, err := isMountPoint("/proc"); err != nil || !ok {
		t.Errorf("/proc: %v, %v; want a mount point", ok, err)
	}
	dir := t.TempDir()
	if ok, err := isMountPoint(dir); err != nil || ok {
		t.Errorf("%s: %v, %v; want a plain directory", dir, ok, err)
	}
	if ok, err := isMountPoint(dir + "/missing"); err != nil || ok {
		t.Errorf("missing: %v, %v; want false, no error", ok, err)
	}
}
