package cloudinit

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/vmpod/vmpod/api/vmspec"
)

// The ISO is read back with isoinfo (genisoimage's reader) when the host has it, which
// is what proves Rock Ridge names and the volume label; the guest-side proof is the VM
// pod integration test, where cloud-init reads it.
func TestWriteISO(t *testing.T) {
	dir := t.TempDir()
	iso := filepath.Join(dir, "cidata.iso")
	n := NoCloud{InstanceID: "3f0c-uuid", Hostname: "web-0", UserData: []byte("#cloud-config\nhostname: web-0\n"), NetworkData: []byte("version: 2\n")}
	if err := n.WriteISO(iso, dir); err != nil {
		t.Fatal(err)
	}
	if err := n.WriteISO(iso, dir); err == nil {
		t.Fatal("overwrote an existing file")
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("scratch left behind: %v", entries)
	}
	isoinfo, err := exec.LookPath("isoinfo")
	if err != nil {
		t.Skip("isoinfo (genisoimage) not installed: the ISO's content is checked by the VM pod integration test")
	}
	out, err := exec.Command(isoinfo, "-d", "-i", iso).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "Volume id: cidata") || !strings.Contains(string(out), "Rock Ridge signatures") {
		t.Fatalf("isoinfo -d: %v\n%s", err, out)
	}
	for name, want := range map[string]string{"/meta-data": `{"instance-id":"3f0c-uuid","local-hostname":"web-0"}`, "/user-data": "hostname: web-0", "/network-config": "version: 2"} {
		out, err := exec.Command(isoinfo, "-R", "-i", iso, "-x", name).CombinedOutput()
		if err != nil || !strings.Contains(string(out), want) {
			t.Errorf("%s: %v: %q, want %q", name, err, out, want)
		}
	}
}

func TestDataFromSecret(t *testing.T) {
	vol := t.TempDir()
	// a Secret volume: keys are symlinks into ..data
	os.MkdirAll(filepath.Join(vol, "..2026_12_02", ""), 0o755)
	os.WriteFile(filepath.Join(vol, "..2026_12_02", "userdata"), []byte("#cloud-config\n"), 0o644)
	os.Symlink("..2026_12_02", filepath.Join(vol, "..data"))
	os.Symlink("..data/userdata", filepath.Join(vol, "userdata"))
	spec := &specs.Spec{Mounts: []specs.Mount{{Destination: vmspec.VolumeMountPath("ci"), Source: vol, Type: "bind"}}}
	ud, nd, err := Data(&vmspec.CloudInit{SecretVolume: "ci"}, spec)
	if err != nil || string(ud) != "#cloud-config\n" || nd != nil {
		t.Fatalf("got %q %q %v", ud, nd, err)
	}

	os.Remove(filepath.Join(vol, "userdata"))
	os.Symlink("/etc/passwd", filepath.Join(vol, "userdata"))
	if _, _, err := Data(&vmspec.CloudInit{SecretVolume: "ci"}, spec); err == nil || !strings.Contains(err.Error(), "cloudInit.secretVolume ci") {
		t.Fatalf("a key linking out of the volume: got %v", err)
	}
	if _, _, err := Data(&vmspec.CloudInit{SecretVolume: "other"}, spec); err == nil || !strings.Contains(err.Error(), "no volume mounted at /vmpod/volumes/other") {
		t.Fatalf("missing volume: got %v", err)
	}
	big := filepath.Join(vol, "..2026_12_02", "networkdata")
	os.WriteFile(big, make([]byte, maxData+1), 0o644)
	os.Symlink("..data/networkdata", filepath.Join(vol, "networkdata"))
	os.Remove(filepath.Join(vol, "userdata"))
	os.Symlink("..data/userdata", filepath.Join(vol, "userdata"))
	if _, _, err := Data(&vmspec.CloudInit{SecretVolume: "ci"}, spec); err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Fatalf("oversized network data: got %v", err)
	}
}
