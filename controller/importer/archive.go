package importer

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path"
	"strings"
)

// extractArchive unpacks a (decompressed) tar archive into dest. Every write goes through
// an os.Root, so no entry (../x, an absolute path, a symlink pointing out) can reach
// outside dest. Device nodes and FIFOs are skipped: a data volume has no use for them.
func extractArchive(ctx context.Context, archive, dest string) error {
	f, err := os.Open(archive)
	if err != nil {
		return transient("WriteFailed", "open %s: %w", archive, err)
	}
	defer f.Close()
	root, err := os.OpenRoot(dest)
	if err != nil {
		return transient("WriteFailed", "open %s: %w", dest, err)
	}
	defer root.Close()

	tr := tar.NewReader(f)
	files := 0
	for {
		if err := ctx.Err(); err != nil {
			return transient("Canceled", "extract: %w", err)
		}
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return permanent("InvalidArchive", "read tar: %w", err)
		}
		name := path.Clean(strings.TrimPrefix(h.Name, "/"))
		if name == "." {
			continue
		}
		mode := os.FileMode(h.Mode).Perm()
		switch h.Typeflag {
		case tar.TypeDir:
			err = root.MkdirAll(name, mode|0o700)
		case tar.TypeReg:
			err = extractFile(root, name, mode, tr)
			files++
		case tar.TypeSymlink:
			err = root.Symlink(h.Linkname, name)
		case tar.TypeLink:
			err = root.Link(path.Clean(strings.TrimPrefix(h.Linkname, "/")), name)
		default:
			slog.Warn("skipping archive entry", "name", h.Name, "type", h.Typeflag)
			continue
		}
		if err != nil {
			// os.Root refuses paths that escape dest: the archive is hostile or broken
			return permanent("InvalidArchive", "entry %q: %w", h.Name, err)
		}
	}
	slog.Info("extracted archive", "files", files, "dest", dest)
	return syncPath(dest)
}

func extractFile(root *os.Root, name string, mode os.FileMode, r io.Reader) error {
	if dir := path.Dir(name); dir != "." {
		if err := root.MkdirAll(dir, 0o755); err != nil {
			return err
		}
	}
	f, err := root.OpenFile(name, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, r); err != nil {
		f.Close()
		return fmt.Errorf("write: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("sync: %w", err)
	}
	return f.Close()
}
