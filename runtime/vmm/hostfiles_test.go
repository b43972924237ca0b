package vmm

import (
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/vmpod/vmpod/api/machine"
)

// QEMU opens nothing by path (docs/design/014): with its descriptors opened, a machine's
// argv names host paths only in fd sets' descriptions, every socket is an inherited
// descriptor, the kernel and initrd are /proc/self/fd paths of files QEMU inherits, and
// the console log and OVMF's images are fd sets.
func TestQEMUGetsDescriptorsNotPaths(t *testing.T) {
	dir := t.TempDir()
	kernel, initrd, code := filepath.Join(dir, "vmlinux"), filepath.Join(dir, "initrd"), filepath.Join(dir, "code.fd")
	for _, f := range []string{kernel, initrd, code} {
		if err := os.WriteFile(f, []byte(f), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	virtiofsd := func(state string) {
		l, err := net.Listen("unix", filepath.Join(state, "virtiofsd.sock"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
	}
	for _, tc := range []struct {
		name string
		cfg  Config
	}{
		{"container pod", Config{Type: machine.MicroVM, Boot: Boot{Kernel: kernel, Initrd: initrd}, SharedFS: machine.VirtioFS,
			Console: ConsoleLog, Ports: []string{"vmpod.agent"}}},
		{"VM pod", Config{Type: machine.Q35, Boot: Boot{Firmware: Firmware{Type: FirmwareUEFI, Code: code}}, SharedFS: machine.NoSharedFS,
			Console: ConsoleSocket, Ports: []string{"org.qemu.guest_agent.0"}, VNC: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			state := filepath.Join(t.TempDir(), "vm")
			if err := os.Mkdir(state, 0o700); err != nil {
				t.Fatal(err)
			}
			c := tc.cfg
			c.Name, c.StateDir, c.VCPUs, c.MaxVCPUs, c.MemoryMiB = "g", state, 1, 1, 512
			c.LogPath = filepath.Join(state, "vm.log")
			b := bootPlan{cfg: c, accel: accelChoice{accel: machine.TCG}, paths: newPaths(state)}
			if c.Boot.Firmware.Type == FirmwareUEFI {
				if err := os.WriteFile(b.paths.uefiVars, nil, 0o600); err != nil {
					t.Fatal(err)
				}
			} else {
				virtiofsd(state)
			}
			log, err := os.OpenFile(c.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
			if err != nil {
				t.Fatal(err)
			}
			defer log.Close()
			files, err := openHostFiles(b, log)
			if err != nil {
				t.Fatal(err)
			}
			defer files.close(log)
			vm, err := b.hardware(files, nil)
			if err != nil {
				t.Fatal(err)
			}
			args, inherited := vm.Render()
			fdOf := func(f *os.File) string {
				for i, g := range inherited {
					if g == f {
						return strconv.Itoa(3 + i)
					}
				}
				t.Fatalf("%s is not inherited", f.Name())
				return ""
			}
			joined := strings.Join(args, " ")
			for i, a := range args {
				// fd sets' descriptions name where a file came from; QEMU opens no path
				if (strings.Contains(a, state) || strings.Contains(a, dir)) && args[i-1] != "-add-fd" {
					t.Errorf("argv names a host path for QEMU to open: %q", a)
				}
			}
			want := []string{"socket,id=qmp,fd=" + fdOf(files.qmp) + ",server=on,wait=off", "opaque=" + b.paths.qmpSock}
			for i, p := range files.ports {
				want = append(want, "socket,id=port"+strconv.Itoa(i)+"-sock,fd="+fdOf(p)+",server=on,wait=off")
			}
			if c.Type == machine.MicroVM {
				want = append(want, "-kernel /proc/self/fd/3", "-initrd /proc/self/fd/4", "socket,id=share-sock,fd="+fdOf(files.virtiofsd),
					"file,id=console,path=/dev/fdset/900,append=on", "fd="+fdOf(log)+",set=900")
				if files.inherit[0].Name() != kernel || files.inherit[1].Name() != initrd {
					t.Errorf("inherited %s and %s as fds 3 and 4, want the kernel and initrd", files.inherit[0].Name(), files.inherit[1].Name())
				}
			} else {
				want = append(want, "socket,id=console,fd="+fdOf(files.console)+",server=on,wait=off", "-vnc none",
					"filename=/dev/fdset/901,read-only=on", "filename=/dev/fdset/902")
			}
			for _, w := range want {
				if !strings.Contains(joined, w) {
					t.Errorf("argv lacks %q:\n%s", w, joined)
				}
			}
			if files.qmp == nil || files.qmp.Name() == "" {
				t.Fatal("no QMP listener")
			}
			if conn, err := net.Dial("unix", b.paths.qmpSock); err != nil {
				t.Errorf("the shim's QMP socket does not listen: %v", err)
			} else {
				conn.Close()
			}
		})
	}
}

func TestKVMGroup(t *testing.T) {
	dev := filepath.Join(t.TempDir(), "kvm")
	if err := os.WriteFile(dev, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		mode    os.FileMode
		group   bool
		wantErr string
	}{
		{0o666, false, ""},
		{0o660, true, ""},
		{0o600, false, "opens for its owner"},
		{0o640, false, "opens for its owner"},
	} {
		if err := os.Chmod(dev, tc.mode); err != nil {
			t.Fatal(err)
		}
		// a group of its own, not root's: root's group is refused (below)
		if err := os.Chown(dev, 0, 36); err != nil {
			t.Fatal(err)
		}
		gid, err := kvmGroup(dev)
		switch {
		case tc.wantErr != "":
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), "qemu_user") {
				t.Errorf("mode %o: %v, want an error naming %q and the way out", tc.mode, err, tc.wantErr)
			}
		case err != nil:
			t.Errorf("mode %o: %v", tc.mode, err)
		case tc.group != (gid >= 0):
			t.Errorf("mode %o: group %d", tc.mode, gid)
		}
	}
	if err := os.Chmod(dev, 0o660); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(dev, 0, 0); err != nil {
		t.Fatal(err)
	}
	if gid, err := kvmGroup(dev); err == nil {
		t.Errorf("0660 root:root gives QEMU group %d; root's group must be refused", gid)
	}
}
