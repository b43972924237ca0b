package agent

import (
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// switchRoot moves the initramfs contents onto a tmpfs that becomes the root. The
// initramfs root cannot be pivot_root'ed away from, and runc jails every container with
// pivot_root; --no-pivot (chroot) would let a process with CAP_SYS_CHROOT climb back out
// into the guest. It is what switch_root(8) does, but for one thing: the agent goes on
// running from its initramfs image instead of executing a copy on the new root.
//
// That is for TCG. An exec of the copy freed the pages the first agent had run from,
// with QEMU's translations of that code still cached for them (keyed by virtual address
// and physical page). virtiofsd writes file contents into guest memory behind TCG's back,
// so when the guest put a container binary's page cache on those pages, a static
// binary linked at the same address as the agent (0x400000: pause, most static Go
// programs) could run the agent's stale translations: pause died of SIGSEGV or SIGILL
// once in ~40 pods when it was the first program a fresh guest ran (docs/design/020).
// Kept mapped, the pages are never reused.
func switchRoot() error {
	const newRoot = "/.root"
	if err := os.Mkdir(newRoot, 0o755); err != nil {
		return err
	}
	if err := unix.Mount("tmpfs", newRoot, "tmpfs", 0, "mode=0755"); err != nil {
		return fmt.Errorf("mount tmpfs root: %w", err)
	}
	if err := moveTree("/", newRoot); err != nil {
		return fmt.Errorf("copy initramfs to the tmpfs root: %w", err)
	}
	if err := os.Chdir(newRoot); err != nil {
		return err
	}
	if err := unix.Mount(newRoot, "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("move tmpfs root onto /: %w", err)
	}
	if err := unix.Chroot("."); err != nil {
		return err
	}
	return os.Chdir("/")
}

// moveTree copies the regular files, directories and symlinks of the initramfs under
// src to dst and deletes each copied file (devices are skipped: devtmpfs comes later,
// and the console is already open on fds 0-2). The running agent, /init, is not copied:
// nothing executes it again.
func moveTree(src, dst string) error {
	return filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if path == dst {
			return filepath.SkipDir
		}
		target := filepath.Join(dst, path)
		info, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case d.IsDir():
			if path == src {
				return nil
			}
			return os.MkdirAll(target, info.Mode().Perm()|info.Mode()&fs.ModeSticky)
		case d.Type()&fs.ModeSymlink != 0:
			link, err := os.Readlink(path)
			if err != nil {
				return err
			}
			return os.Symlink(link, target)
		case d.Type().IsRegular():
			if path == "/init" {
				return os.Remove(path)
			}
			if err := copyFile(path, target, info.Mode()); err != nil {
				return err
			}
			return os.Remove(path)
		}
		return nil
	})
}

func copyFile(src, dst string, mode fs.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, mode.Perm())
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		_ = out.Close()
		return err
	}
	return out.Close()
}
