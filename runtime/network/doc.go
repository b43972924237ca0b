// Package network connects a pod's network namespace, as CNI left it, to the pod's VM.
//
// CNI gives the netns one Ethernet link per pod network (a veth, usually eth0; multus adds
// net1, net2, ...), with the pod's addresses and routes. For each such link this package
// creates a tap in the same netns and mirrors every frame between the two with tc: an
// ingress qdisc on both and a match-all u32 filter whose action is a mirred egress redirect
// to the other (Kata Containers' "tcfilter" model). QEMU gets the tap by file descriptor;
// the guest NIC gets the link's MAC, addresses, MTU and routes through the agent's
// SetupSandbox. The netns's own IP stack keeps its addresses (CNI CHECK looks for them) but
// no longer receives a frame: the guest answers for the pod.
//
// Use:
//
//	plan, err := network.Inspect(netnsPath)      // read-only
//	plumbing, err := network.Plumb(plan)         // taps and filters; nothing left on error
//	cfg.NICs = plumbing.NICs()                   // vmm.Start passes the taps to QEMU
//	req.Interfaces, req.Routes = plan.GuestInterfaces(), plan.GuestRoutes()
//	...
//	plumbing.Teardown()                          // after the VM stopped
//
// Design and measurements: docs/design/401-pod-network.md.
package network
