package plugin

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"strconv"

	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/portforward"
	"k8s.io/client-go/transport/spdy"
	"sigs.k8s.io/controller-runtime/pkg/client"
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
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return fmt.Errorf("API client: %w", err)
	}
	url := cs.CoreV1().RESTClient().Post().Resource("pods").Namespace(key.Namespace).Name(pod).SubResource("portforward").URL()
	transport, upgrader, err := spdy.RoundTripperFor(rc)
	if err != nil {
		return fmt.Errorf("vnc: %w", err)
	}
	dialer := spdy.NewDialer(upgrader, &http.Client{Transport: transport}, http.MethodPost, url)
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt)
	defer stop()
	ready := make(chan struct{})
	fw, err := portforward.NewOnAddressesWithContext(ctx, dialer, []string{"127.0.0.1"},
		[]string{strconv.Itoa(localPort) + ":" + strconv.Itoa(vncPort)}, ready, nil, stdio.Err)
	if err != nil {
		return fmt.Errorf("vnc: %w", err)
	}
	errc := make(chan error, 1)
	go func() { errc <- fw.ForwardPorts() }()
	select {
	case <-ready:
	case err := <-errc:
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
