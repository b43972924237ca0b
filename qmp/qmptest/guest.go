package qmptest

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"testing"
	"time"
)

// GuestReadyMarker is what the test guest's /init prints on the console once it
// runs, i.e. once the kernel (and its ACPI hotplug handling) is up.
const GuestReadyMarker = "VMPOD-TEST-GUEST-READY"

// initSource is the test guest's /init: it announces itself and then idles.
// Hotplug acknowledgement (ACPI eject, CPU _OST, virtio-mem plugging) is done by
// the kernel, so /init needs to do nothing else. PID 1 must never exit.
const initSource = `package main

import (
	"fmt"
	"os"
	"time"
)

func main() {
	fmt.Fprintln(os.Stdout, "` + GuestReadyMarker + `")
	for {
		time.Sleep(time.Hour)
	}
}
`

// GuestKernel returns the vmpod guest kernel (a PVH vmlinux): $VMPOD_KERNEL,
// or the newest $HOME/.cache/vmpod/kernel/*/vmlinux that hack/guest-kernel.sh
// built. It skips t when there is none.
func GuestKernel(t testing.TB) string {
	t.Helper()
	if k := os.Getenv("VMPOD_KERNEL"); k != "" {
		if _, err := os.Stat(k); err != nil {
			t.Fatalf("VMPOD_KERNEL: %v", err)
		}
		return k
	}
	home, _ := os.UserHomeDir()
	matches, _ := filepath.Glob(filepath.Join(home, ".cache/vmpod/kernel/*/vmlinux"))
	if len(matches) == 0 {
		t.Skip("needs a guest kernel for the guest to acknowledge hotplug: run hack/guest-kernel.sh or set VMPOD_KERNEL")
	}
	sort.Slice(matches, func(i, j int) bool { return modTime(matches[i]).After(modTime(matches[j])) })
	return matches[0]
}

func modTime(path string) time.Time {
	fi, err := os.Stat(path)
	if err != nil {
		return time.Time{}
	}
	return fi.ModTime()
}

// BuildInitramfs builds a newc cpio archive holding a static Go /init (see
// GuestReadyMarker) and /dev/console, in a directory removed after the test.
func BuildInitramfs(t testing.TB) string {
	t.Helper()
	dir := TempDir(t)
	src := filepath.Join(dir, "src")
	if err := os.MkdirAll(src, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, content := range map[string]string{
		"go.mod":  "module vmpodtestinit\n\ngo 1.22\n",
		"main.go": initSource,
	} {
		if err := os.WriteFile(filepath.Join(src, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	bin := filepath.Join(dir, "init")
	cmd := exec.Command(goTool(), "build", "-trimpath", "-ldflags=-s -w", "-o", bin, ".")
	cmd.Dir = src
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64", "GOFLAGS=-buildvcs=false", "GOWORK=off")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building the test guest's /init: %v\n%s", err, out)
	}
	initBin, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	var cpio bytes.Buffer
	w := cpioWriter{w: &cpio}
	w.dir("dev")
	w.charDevice("dev/console", 5, 1)
	w.file("init", 0o755, initBin)
	w.trailer()
	out := filepath.Join(dir, "initramfs.cpio")
	if err := os.WriteFile(out, cpio.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return out
}

func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return filepath.Join(runtime.GOROOT(), "bin", "go")
}

// WaitConsole waits until the file at path (a serial console log) contains want.
func WaitConsole(t testing.TB, path, want string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		b, _ := os.ReadFile(path)
		if strings.Contains(string(b), want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("console %s has no %q after %v; it says:\n%s", path, want, timeout, b)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// cpioWriter writes the "newc" cpio format the kernel unpacks as initramfs.
type cpioWriter struct {
	w   *bytes.Buffer
	ino int
}

func (c *cpioWriter) dir(name string) { c.entry(name, 0o040755, 0, 0, nil) }

func (c *cpioWriter) charDevice(name string, major, minor int) {
	c.entry(name, 0o020600, major, minor, nil)
}

func (c *cpioWriter) file(name string, perm int, data []byte) {
	c.entry(name, 0o100000|perm, 0, 0, data)
}

func (c *cpioWriter) trailer() { c.entry("TRAILER!!!", 0, 0, 0, nil) }

func (c *cpioWriter) entry(name string, mode, rmajor, rminor int, data []byte) {
	c.ino++
	nlink := 1
	if mode&0o040000 != 0 {
		nlink = 2
	}
	// magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
	// rdevmajor, rdevminor, namesize (with NUL), check
	fmt.Fprintf(c.w, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rmajor, rminor, len(name)+1, 0)
	c.w.WriteString(name)
	c.w.WriteByte(0)
	c.pad()
	c.w.Write(data)
	c.pad()
}

func (c *cpioWriter) pad() {
	for c.w.Len()%4 != 0 {
		c.w.WriteByte(0)
	}
}
