package vmm

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// A grant changes the owner of the device node itself, never of what a link points to,
// and gives it back to the owner it had.
func TestVFIOGrantGoesByHandle(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root for mknod and chown")
	}
	dir := t.TempDir()
	node, file, link := filepath.Join(dir, "7"), filepath.Join(dir, "file"), filepath.Join(dir, "link")
	if err := unix.Mknod(node, unix.S_IFCHR|0o600, int(unix.Mkdev(1, 3))); err != nil {
		t.Skipf("mknod: %v", err)
	}
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(node, link); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{file, link} {
		if fd, _, err := openDeviceNode(bad); err == nil {
			unix.Close(fd)
			t.Errorf("openDeviceNode(%s) accepted it", bad)
		}
	}
	fd, st, err := openDeviceNode(node)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Fchownat(fd, "", 4242, 4242, unix.AT_EMPTY_PATH); err != nil {
		t.Fatal(err)
	}
	unix.Close(fd)
	if err := (vfioGrant{dev: node, uid: int(st.Uid), gid: int(st.Gid)}).giveBack(); err != nil {
		t.Fatal(err)
	}
	var after unix.Stat_t
	if err := unix.Stat(node, &after); err != nil || after.Uid != st.Uid || after.Gid != st.Gid {
		t.Errorf("after the give-back: owner %d:%d, want %d:%d (%v)", after.Uid, after.Gid, st.Uid, st.Gid, err)
	}
	// a device that went away has nothing to give back
	if err := (vfioGrant{dev: filepath.Join(dir, "gone")}).giveBack(); err != nil {
		t.Errorf("give back of a missing device: %v", err)
	}
}

// The sweep gives back only /dev/vfio nodes, whatever else a record names.
func TestRecordedVFIOGrantsStayInDevVFIO(t *testing.T) {
	state := t.TempDir()
	if err := recordVFIOGrant(state, vfioGrant{dev: "/etc/passwd", uid: 1, gid: 1}); err != nil {
		t.Fatal(err)
	}
	err := giveBackRecordedVFIO(state)
	if err == nil || !strings.Contains(err.Error(), "bad line") {
		t.Fatalf("a record naming /etc/passwd: %v, want it refused", err)
	}
	if err := giveBackRecordedVFIO(t.TempDir()); err != nil {
		t.Errorf("no record: %v", err)
	}
}
