package plugin

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"

	"golang.org/x/term"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/remotecommand"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/vmpod/vmpod/api/vmspec"
	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
	"github.com/vmpod/vmpod/controller/internal/podexec"
)

// detachKey (Ctrl-]) ends a console session, as in telnet and virsh console.
const detachKey = 0x1d

// Console attaches the terminal to the VM's serial console: the compute container's stdin
// and TTY, which the shim wires to the guest's serial port.
func Console(ctx context.Context, rc *rest.Config, c client.Client, key types.NamespacedName, stdio IO) error {
	pod, err := runningPod(ctx, c, key, "no console to attach to")
	if err != nil {
		return err
	}
	pe, err := podexec.New(rc)
	if err != nil {
		return err
	}
	exec, err := podexec.Executor(rc, pe.URL(key.Namespace, pod, "attach",
		&corev1.PodAttachOptions{Container: vmspec.ComputeContainer, Stdin: true, Stdout: true, TTY: true}))
	if err != nil {
		return fmt.Errorf("console: %w", err)
	}

	in := stdio.In
	if f, ok := in.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		old, err := term.MakeRaw(int(f.Fd()))
		if err != nil {
			return fmt.Errorf("raw terminal: %w", err)
		}
		defer term.Restore(int(f.Fd()), old)
	}
	fmt.Fprintf(stdio.Err, "Connected to %s (pod %s). Ctrl-] detaches.\r\n", key.Name, pod)
	err = exec.StreamWithContext(ctx, remotecommand.StreamOptions{Stdin: &detachReader{r: in}, Stdout: stdio.Out, Tty: true})
	fmt.Fprint(stdio.Err, "\r\nDisconnected.\r\n")
	if err != nil && err != io.EOF {
		return fmt.Errorf("console: %w", err)
	}
	return nil
}

// detachReader passes input through until the detach key, then reports EOF.
type detachReader struct {
	r    io.Reader
	done bool
}

func (d *detachReader) Read(p []byte) (int, error) {
	if d.done {
		return 0, io.EOF
	}
	n, err := d.r.Read(p)
	if i := bytes.IndexByte(p[:n], detachKey); i >= 0 {
		d.done = true
		if i == 0 {
			return 0, io.EOF
		}
		return i, nil
	}
	return n, err
}

// runningPod is the pod of a Running VirtualMachine; for any other, an error that says why
// ("... not Running: " + what).
func runningPod(ctx context.Context, c client.Client, key types.NamespacedName, what string) (string, error) {
	vm := &vmpodv1.VirtualMachine{}
	if err := c.Get(ctx, key, vm); err != nil {
		return "", fmt.Errorf("get VirtualMachine %s: %w", key, err)
	}
	if vm.Status.PrintableStatus != vmpodv1.StatusRunning || vm.Status.PodName == "" {
		return "", fmt.Errorf("VirtualMachine %s is %s, not Running: %s", key.Name, orUnknown(vm.Status.PrintableStatus), what)
	}
	return vm.Status.PodName, nil
}

func orUnknown(s vmpodv1.PrintableStatus) vmpodv1.PrintableStatus {
	if s == "" {
		return vmpodv1.StatusUnknown
	}
	return s
}

// GuestOSInfo prints what the VM's guest agent reports of the guest (OS, hostname,
// interfaces and addresses), as `virtctl guestosinfo` does: the compute container answers
// the exec vmspec.GuestInfoCommand itself from the QEMU guest agent.
func GuestOSInfo(ctx context.Context, rc *rest.Config, c client.Client, key types.NamespacedName, stdio IO) error {
	pod, err := runningPod(ctx, c, key, "no guest agent to ask")
	if err != nil {
		return err
	}
	pe, err := podexec.New(rc)
	if err != nil {
		return err
	}
	out, err := pe.Exec(ctx, key.Namespace, pod, vmspec.ComputeContainer, []string{vmspec.GuestInfoCommand})
	if err != nil {
		return fmt.Errorf("guest info: %w", err)
	}
	var info vmspec.GuestInfo
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		return fmt.Errorf("guest info from pod %s: %w", pod, err)
	}
	b, err := json.MarshalIndent(info, "", "  ")
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(stdio.Out, "%s\n", b)
	return err
}
