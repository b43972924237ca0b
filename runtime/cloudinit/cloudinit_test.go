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
	n := NoCloud{InstanceID: "3f0c-uuid", Hostname: "web-0", UserData: []byte("#cloud-config\nhostname: web-0\n"), NetworkData: []byte("version: 2\n"),
		PublicKeys: []string{testKey}}
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
	for name, want := range map[string]string{"/meta-data": `{"instance-id":"3f0c-uuid","local-hostname":"web-0","public-keys":["` + testKey + `"]}`, "/user-data": "hostname: web-0", "/network-config": "version: 2"} {
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

const testKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHh5cJ9jN0U2FZ4fD3mY8V1c2x2bq0E3Xb9x3XJfFq5G ops@example"

func TestPublicKeys(t *testing.T) {
	vol := t.TempDir()
	data := filepath.Join(vol, "..2026_12_03")
	os.Mkdir(data, 0o755)
	os.Symlink("..2026_12_03", filepath.Join(vol, "..data"))
	secret := func(key, content string) {
		t.Helper()
		os.Remove(filepath.Join(vol, key))
		if err := os.WriteFile(filepath.Join(data, key), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink("..data/"+key, filepath.Join(vol, key)); err != nil {
			t.Fatal(err)
		}
	}
	withOptions := `no-port-forwarding,command="echo hi" ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTY= ci`
	secret("alice", "# the ops key\n\n"+testKey+"\n")
	secret("bob", withOptions)
	spec := &specs.Spec{Mounts: []specs.Mount{{Destination: vmspec.VolumeMountPath("keys"), Source: vol, Type: "bind"}}}
	keys, err := PublicKeys("keys", spec)
	if err != nil || len(keys) != 2 || keys[0] != testKey || keys[1] != withOptions {
		t.Fatalf("PublicKeys = %q, %v; want both keys in file order", keys, err)
	}

	for _, bad := range []struct{ content, want string }{
		{"not a key\n", "bob line 1: not an SSH public key"},
		{testKey + "\nssh-rsa %%%notbase64\n", "bob line 2: not an SSH public key"},
		{"ssh-ed25519 AAAA\x1b[2J x", "bob line 1: holds a control character"},
		{"ssh-ed25519 " + strings.Repeat("A", maxKeyLine), "bob line 1: longer than"},
	} {
		secret("bob", bad.content)
		if _, err := PublicKeys("keys", spec); err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("%q: got %v, want %q", bad.content, err, bad.want)
		}
	}
	os.Remove(filepath.Join(vol, "bob"))
	secret("alice", "# nothing but a comment\n")
	if _, err := PublicKeys("keys", spec); err == nil || !strings.Contains(err.Error(), "holds no SSH public key") {
		t.Errorf("empty Secret: got %v", err)
	}
	os.Remove(filepath.Join(vol, "alice"))
	os.Symlink("/etc/ssh/ssh_host_ed25519_key.pub", filepath.Join(vol, "alice"))
	if _, err := PublicKeys("keys", spec); err == nil {
		t.Error("a key linking out of the volume was read")
	}
	if _, err := PublicKeys("other", spec); err == nil || !strings.Contains(err.Error(), "no volume mounted at /vmpod/volumes/other") {
		t.Errorf("missing volume: got %v", err)
	}
}
