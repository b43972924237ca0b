package plugin

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"

	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/portforward"
	"k8s.io/client-go/transport/spdy"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/vmpod/vmpod/controller/internal/podexec"
)

// vncPort is where a VM pod serves its display on the pod's localhost (runtime/pod.VNCPort;
// the controller does not import the runtime).
const vncPort = 5900

// VNC forwards a local port to the VM's display (the pod's port 5900, served by the shim
// from QEMU's VNC socket) until ctx ends or the user interrupts, and says where to point
// a VNC viewer. localPort 0 picks a free port.
func VNC(ctx context.Context, rc *rest.Config, c client.Client, key types.NamespacedName, localPort int, stdio IO) error {
	pod, err := runningPod(ctx, c, key, "no display to connect to")
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt)
	defer stop()
	fw, errc, err := forward(ctx, rc, key.Namespace, pod, []string{strconv.Itoa(localPort) + ":" + strconv.Itoa(vncPort)}, io.Discard, stdio.Err)
	if err != nil {
		return fmt.Errorf("vnc: %w", err)
	}
	ports, err := fw.GetPorts()
	if err != nil || len(ports) == 0 {
		return fmt.Errorf("vnc: no local port: %v", err)
	}
	fmt.Fprintf(stdio.Out, "VNC of %s (pod %s): vnc://127.0.0.1:%d (e.g. vncviewer 127.0.0.1::%d); Ctrl-C ends it\n",
		key.Name, pod, ports[0].Local, ports[0].Local)
	if err := <-errc; err != nil && ctx.Err() == nil {
		return fmt.Errorf("vnc: %w", err)
	}
	return nil
}

// PortForward forwards local ports to the guest's ports ([LOCAL:]REMOTE, as kubectl
// port-forward takes them) until ctx ends or the user interrupts. The VM pod's port is the
// guest's behind a masquerade binding (the shim dials the guest's address from the pod's
// network namespace, docs/design/110-vm-pods.md); a bridge-bound guest owns the pod's
// address itself and is reached there.
func PortForward(ctx context.Context, rc *rest.Config, c client.Client, key types.NamespacedName, ports []string, stdio IO) error {
	if len(ports) == 0 {
		return fmt.Errorf("port-forward needs a VM and at least one [LOCAL:]REMOTE port")
	}
	for _, p := range ports {
		if err := checkPortSpec(p); err != nil {
			return err
		}
	}
	pod, err := runningPod(ctx, c, key, "no guest to forward to")
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt)
	defer stop()
	_, errc, err := forward(ctx, rc, key.Namespace, pod, ports, stdio.Out, stdio.Err)
	if err != nil {
		return fmt.Errorf("port-forward: %w", err)
	}
	if err := <-errc; err != nil && ctx.Err() == nil {
		return fmt.Errorf("port-forward: %w", err)
	}
	return nil
}

// PortForwardStdio connects stdin and stdout to one guest port until either side closes:
// what ssh's ProxyCommand needs, e.g.
//
//	ssh -o ProxyCommand='kubectl vmpod port-forward --stdio -n NS VM 22' user@VM
//
// (virtctl ssh --local-ssh does the same). It forwards through a loopback port of its own
// so that client-go's port-forward, its error stream included, does the work.
func PortForwardStdio(ctx context.Context, rc *rest.Config, c client.Client, key types.NamespacedName, port string, stdio IO) error {
	if err := checkPortSpec(port); err != nil {
		return err
	}
	if strings.Contains(port, ":") {
		return fmt.Errorf("port-forward --stdio takes the guest's port only, got %q", port)
	}
	pod, err := runningPod(ctx, c, key, "no guest to forward to")
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	fw, errc, err := forward(ctx, rc, key.Namespace, pod, []string{"0:" + port}, io.Discard, stdio.Err)
	if err != nil {
		return fmt.Errorf("port-forward: %w", err)
	}
	local, err := fw.GetPorts()
	if err != nil || len(local) == 0 {
		return fmt.Errorf("port-forward: no local port: %v", err)
	}
	conn, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(int(local[0].Local))))
	if err != nil {
		return fmt.Errorf("port-forward: %w", err)
	}
	defer conn.Close()
	go func() {
		_, _ = io.Copy(conn, stdio.In)
		_ = conn.(*net.TCPConn).CloseWrite() // the guest sees our EOF, and may still answer
	}()
	_, copyErr := io.Copy(stdio.Out, conn)
	cancel()
	if err := <-errc; err != nil && ctx.Err() == nil {
		return fmt.Errorf("port-forward: %w", err)
	}
	if copyErr != nil {
		return fmt.Errorf("port-forward: %w", copyErr)
	}
	// stdin's copy ends with the process: a ProxyCommand's stdin is ssh's pipe, which
	// does not close before ssh is done with us
	return nil
}

// checkPortSpec checks a [LOCAL:]REMOTE port pair before anything connects.
func checkPortSpec(spec string) error {
	parts := strings.Split(spec, ":")
	if len(parts) > 2 {
		return fmt.Errorf("port %q: want [LOCAL:]REMOTE", spec)
	}
	for i, p := range parts {
		n, err := strconv.ParseUint(p, 10, 16)
		if err != nil || (n == 0 && i == len(parts)-1) {
			return fmt.Errorf("port %q: %q is not a port number", spec, p)
		}
	}
	return nil
}

// forward starts a port-forward of ports to a pod's ports on 127.0.0.1 and returns once it
// listens; errc reports how it ended (after ctx ends, or on a broken connection).
func forward(ctx context.Context, rc *rest.Config, namespace, pod string, ports []string, out, errOut io.Writer) (*portforward.PortForwarder, <-chan error, error) {
	pe, err := podexec.New(rc)
	if err != nil {
		return nil, nil, err
	}
	transport, upgrader, err := spdy.RoundTripperFor(rc)
	if err != nil {
		return nil, nil, err
	}
	dialer := spdy.NewDialer(upgrader, &http.Client{Transport: transport}, http.MethodPost, pe.URL(namespace, pod, "portforward", nil))
	ready := make(chan struct{})
	fw, err := portforward.NewOnAddressesWithContext(ctx, dialer, []string{"127.0.0.1"}, ports, ready, out, errOut)
	if err != nil {
		return nil, nil, err
	}
	errc := make(chan error, 1)
	go func() { errc <- fw.ForwardPorts() }()
	select {
	case <-ready:
		return fw, errc, nil
	case err := <-errc:
		return nil, nil, err
	}
}
