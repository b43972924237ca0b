// Package qmp is vmpod's QEMU Machine Protocol client: one Monitor per QEMU process,
// built on github.com/digitalocean/go-qemu/qmp.
//
// go-qemu's SocketMonitor has no timeouts, loses QMP error classes and deadlocks
// command replies when its event channel is not drained. Monitor wraps it so that:
//
//   - one owner goroutine sends commands, one at a time, from a request queue; every
//     call takes a context, and a caller whose context ends gets control back at
//     once while the owner keeps the connection in step (a late reply is read and
//     dropped, a queued command that nobody waits for any more is never sent);
//   - a second goroutine always drains events and hands them to Subscriptions, each
//     with its own queue, so a slow subscriber never stalls a command reply;
//   - when QEMU goes away every pending call, queued call and subscription fails
//     with an error that matches ErrClosed.
//
// Typed methods cover what vmpod uses (run state, block and device hotplug, fd
// passing, tap netdevs, vCPU hotplug, QOM properties, memory backends, migration).
// Replies are decoded strictly: a missing or ill-typed field, or an enum value this
// package does not know, is a *ReplyError naming the field. Execute runs anything
// else with the same guarantees.
//
// Event waits must subscribe before sending the command that causes the event:
//
//	sub := m.Subscribe(qmp.DeviceDeletedFilter("disk1"))
//	defer sub.Close()
//	// ... device_del ...
//	ev, err := sub.Next(ctx)
//
// DeviceDel does exactly this.
package qmp
