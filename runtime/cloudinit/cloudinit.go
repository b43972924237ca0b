// Package cloudinit makes a VM pod's NoCloud data source: the `cidata` ISO that
// cloud-init (and cloudbase-init on Windows) finds among the guest's disks, with
// meta-data (instance-id, local-hostname, public-keys), user-data and network-config. The
// data come inline from the VM spec or from Secret volumes, read inside their mounts.
package cloudinit

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"unicode/utf8"

	"github.com/diskfs/go-diskfs/backend/file"
	"github.com/diskfs/go-diskfs/filesystem/iso9660"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/vmpod/vmpod/api/vmspec"
)

// maxData bounds user-data and network-config read from a Secret (Kubernetes caps a
// Secret at 1 MiB).
const maxData = 1 << 20

// VolumeLabel is the label cloud-init's NoCloud looks for.
const VolumeLabel = "cidata"

// NoCloud is the data source's content.
type NoCloud struct {
	// InstanceID stays the same across reboots of one VM: cloud-init runs its
	// per-instance modules again only when it changes.
	InstanceID string
	Hostname   string
	UserData   []byte
	// NetworkData is network-config (v1 or v2); nil leaves the network to cloud-init's
	// fallback (DHCP on the first NIC), which the shim's DHCP server answers.
	NetworkData []byte
	// PublicKeys are authorized_keys lines cloud-init gives the guest's default user
	// (meta-data public-keys: a list here, a map in KubeVirt's; cloud-init reads both).
	PublicKeys []string
}

// metaData is the meta-data file: YAML, written as JSON (which YAML reads) so no value
// can break out of its key.
func (n NoCloud) metaData() []byte {
	md := map[string]any{"instance-id": n.InstanceID, "local-hostname": n.Hostname}
	if len(n.PublicKeys) > 0 {
		md["public-keys"] = n.PublicKeys
	}
	b, _ := json.Marshal(md)
	return append(b, '\n')
}

// WriteISO writes the data source as an ISO 9660 image (Rock Ridge and Joliet names, as
// genisoimage -rock -joliet writes them) at path. workDir is scratch space for the build.
func (n NoCloud) WriteISO(path, workDir string) (retErr error) {
	if n.InstanceID == "" {
		return errors.New("cloud-init: no instance-id")
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
	if err != nil {
		return fmt.Errorf("cloud-init ISO: %w", err)
	}
	defer func() {
		if err := f.Close(); err != nil && retErr == nil {
			retErr = err
		}
		if retErr != nil {
			_ = os.Remove(path)
		}
	}()
	ws, err := os.MkdirTemp(workDir, ".cidata-")
	if err != nil {
		return fmt.Errorf("cloud-init ISO: %w", err)
	}
	defer os.RemoveAll(ws)
	iso, err := iso9660.Create(file.New(f, false), 0, 0, 2048, ws)
	if err != nil {
		return fmt.Errorf("cloud-init ISO: %w", err)
	}
	files := map[string][]byte{"meta-data": n.metaData(), "user-data": n.UserData}
	if n.NetworkData != nil {
		files["network-config"] = n.NetworkData
	}
	for name, data := range files {
		w, err := iso.OpenFile("/"+name, os.O_CREATE|os.O_RDWR)
		if err != nil {
			return fmt.Errorf("cloud-init ISO: %s: %w", name, err)
		}
		if _, err := w.Write(data); err != nil {
			return fmt.Errorf("cloud-init ISO: %s: %w", name, err)
		}
		if err := w.Close(); err != nil {
			return fmt.Errorf("cloud-init ISO: %s: %w", name, err)
		}
	}
	if err := iso.Finalize(iso9660.FinalizeOptions{RockRidge: true, Joliet: true, VolumeIdentifier: VolumeLabel}); err != nil {
		return fmt.Errorf("cloud-init ISO: %w", err)
	}
	return nil
}

// Data is the user-data and network-config of ci: inline, or the files of its Secret
// volume (userdata, networkdata), opened inside the volume's mount in the compute
// container's spec. Errors name the field.
func Data(ci *vmspec.CloudInit, spec *specs.Spec) (userData, networkData []byte, err error) {
	if ci.SecretVolume == "" {
		userData = []byte(ci.UserData)
		if ci.NetworkData != "" {
			networkData = []byte(ci.NetworkData)
		}
		return userData, networkData, nil
	}
	root, err := openVolume(ci.SecretVolume, spec)
	if err != nil {
		return nil, nil, fmt.Errorf("cloudInit.secretVolume %s: %w", ci.SecretVolume, err)
	}
	defer root.Close()
	if userData, err = readLimited(root, vmspec.CloudInitUserDataKey); err != nil {
		return nil, nil, fmt.Errorf("cloudInit.secretVolume %s: %w", ci.SecretVolume, err)
	}
	networkData, err = readLimited(root, vmspec.CloudInitNetworkDataKey)
	if errors.Is(err, os.ErrNotExist) {
		return userData, nil, nil // network data is optional
	}
	if err != nil {
		return nil, nil, fmt.Errorf("cloudInit.secretVolume %s: %w", ci.SecretVolume, err)
	}
	return userData, networkData, nil
}

// openVolume opens the mount of a filesystem volume in the compute container's spec as a
// root nothing read through it can leave.
func openVolume(volume string, spec *specs.Spec) (*os.Root, error) {
	dest := vmspec.VolumeMountPath(volume)
	var src string
	for _, m := range spec.Mounts {
		if filepath.Clean(m.Destination) == dest {
			src = m.Source
		}
	}
	if src == "" {
		return nil, fmt.Errorf("the compute container has no volume mounted at %s", dest)
	}
	return os.OpenRoot(src)
}

// maxKeyLine bounds one authorized_keys line (an RSA-16384 key with options fits).
const maxKeyLine = 16 << 10

// PublicKeys reads the SSH public keys of an access credential's Secret volume: every file
// of the volume (a Secret's keys; its ..data bookkeeping skipped), each line an
// authorized_keys entry; blank lines and comments are skipped. A line that is no public key
// is an error naming the file and line: keys go into a guest's authorized_keys.
func PublicKeys(volume string, spec *specs.Spec) ([]string, error) {
	root, err := openVolume(volume, spec)
	if err != nil {
		return nil, err
	}
	defer root.Close()
	dir, err := root.Open(".")
	if err != nil {
		return nil, err
	}
	names, err := dir.Readdirnames(-1)
	_ = dir.Close()
	if err != nil {
		return nil, err
	}
	slices.Sort(names)
	var keys []string
	for _, name := range names {
		if strings.HasPrefix(name, ".") {
			continue // ..data, ..<timestamp>: the Secret volume's own layout
		}
		b, err := readLimited(root, name)
		if err != nil {
			return nil, err
		}
		for i, line := range strings.Split(string(b), "\n") {
			line = strings.TrimSpace(line)
			if line == "" || strings.HasPrefix(line, "#") {
				continue
			}
			if err := checkPublicKey(line); err != nil {
				return nil, fmt.Errorf("%s line %d: %w", name, i+1, err)
			}
			keys = append(keys, line)
		}
	}
	if len(keys) == 0 {
		return nil, ErrNoPublicKey
	}
	return keys, nil
}

// ErrNoPublicKey is a Secret volume without a single SSH public key.
var ErrNoPublicKey = errors.New("holds no SSH public key")

// checkPublicKey accepts an authorized_keys line: optional options, a key type and its
// base64 blob, an optional comment; printable text only.
func checkPublicKey(line string) error {
	if len(line) > maxKeyLine {
		return fmt.Errorf("longer than %d bytes", maxKeyLine)
	}
	for _, r := range line {
		if r < ' ' && r != '\t' || r == 0x7f || r == utf8.RuneError {
			return errors.New("holds a control character or invalid UTF-8")
		}
	}
	f := strings.Fields(line)
	for i := 0; i+1 < len(f); i++ {
		if !keyType.MatchString(f[i]) {
			continue
		}
		if _, err := base64.StdEncoding.DecodeString(f[i+1]); err == nil {
			return nil
		}
	}
	return errors.New("not an SSH public key (type and base64 key, e.g. ssh-ed25519 AAAA...)")
}

// IsKeyType says whether a word of an authorized_keys line is an OpenSSH key type.
func IsKeyType(word string) bool { return keyType.MatchString(word) }

// keyType is an OpenSSH public key type: ssh-rsa, ssh-ed25519, ecdsa-sha2-nistp256,
// sk-ssh-ed25519@openssh.com, their -cert-v01 forms.
var keyType = regexp.MustCompile(`^(ssh|ecdsa|sk)-[a-z0-9@.-]+$`)

// readLimited reads name in root, at most maxData bytes. A Secret volume's keys are
// symlinks into a ..data directory inside the volume, which os.Root follows as long as
// they stay inside.
func readLimited(root *os.Root, name string) ([]byte, error) {
	f, err := root.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", name)
	}
	b, err := io.ReadAll(io.LimitReader(f, maxData+1))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if len(b) > maxData {
		return nil, fmt.Errorf("%s is larger than %d bytes", name, maxData)
	}
	return b, nil
}
