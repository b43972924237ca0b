package vmm

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"
)

// What the QEMU and virtiofsd a node names can do is asked of the binaries themselves
// (--version, --help), once per binary and question: the answers are cached by the file's
// identity, which an upgrade changes.

var binaryAnswers sync.Map // answerKey → string

type answerKey struct{ path, identity, question string }

// askBinary runs path with args and returns what it printed.
func askBinary(path string, args ...string) (string, error) {
	id, err := fileIdentity(path)
	if err != nil {
		return "", err
	}
	key := answerKey{path: path, identity: id, question: strings.Join(args, " ")}
	if v, ok := binaryAnswers.Load(key); ok {
		return v.(string), nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("%s %s: %w: %s", path, key.question, err, strings.TrimSpace(string(out)))
	}
	binaryAnswers.Store(key, string(out))
	return string(out), nil
}

// qemuVersion is a QEMU release, major.minor.
type qemuVersion struct{ major, minor int }

func (v qemuVersion) String() string {
	if v == (qemuVersion{}) {
		return "(version unknown)"
	}
	return fmt.Sprintf("%d.%d", v.major, v.minor)
}

func (v qemuVersion) atLeast(major, minor int) bool {
	return v.major > major || v.major == major && v.minor >= minor
}

// parseQEMUVersion reads "10.0.2" (QMP's greeting, as qmp.Monitor.Version gives it) or
// QEMU's --version line ("QEMU emulator version 10.0.2 (Debian ...)").
func parseQEMUVersion(s string) (qemuVersion, error) {
	if _, rest, ok := strings.Cut(s, "version "); ok {
		s = rest
	}
	fields := strings.Fields(s)
	if len(fields) == 0 {
		return qemuVersion{}, fmt.Errorf("QEMU version %q: no version", s)
	}
	parts := strings.Split(fields[0], ".")
	if len(parts) < 2 {
		return qemuVersion{}, fmt.Errorf("QEMU version %q: want major.minor", s)
	}
	major, err1 := strconv.Atoi(parts[0])
	minor, err2 := strconv.Atoi(parts[1])
	if err1 != nil || err2 != nil {
		return qemuVersion{}, fmt.Errorf("QEMU version %q: want major.minor", s)
	}
	return qemuVersion{major, minor}, nil
}

// binaryQEMUVersion is the version of the QEMU at path.
func binaryQEMUVersion(path string) (qemuVersion, error) {
	out, err := askBinary(path, "--version")
	if err != nil {
		return qemuVersion{}, err
	}
	first, _, _ := strings.Cut(out, "\n")
	return parseQEMUVersion(first)
}

// virtiofsdMigrates says whether the virtiofsd at path can hand its state to a migration:
// the Rust virtiofsd's --migration-mode (Debian trixie's 1.13 has it). QEMU 7.2's C
// virtiofsd cannot.
func virtiofsdMigrates(path string) (bool, error) {
	help, err := askBinary(path, "--help")
	if err != nil {
		return false, err
	}
	return strings.Contains(help, "--migration-mode"), nil
}
