// Package devices is vmpod's typed model of a QEMU virtual machine: a Machine and
// the Devices plugged into it, rendered as a QEMU command line, plus the typed
// description of hot-plugging a device at run time.
//
// Every device describes itself as a Spec: the backends it needs (block nodes,
// taps, chardevs, fsdevs, memory backends) and its frontends (-device), for a
// Placement (virtio-mmio on -M microvm, a PCI bus and address on -M q35). A VM
// places cold-plugged devices, renders the argv (and the files QEMU inherits),
// and, on q35, hands out PCIe root ports to hot-plugged devices. A Hotplug is
// plain data; the runtime turns it into QMP commands (this package does not
// import qmp, and qmp does not import it).
//
// All values are validated before rendering: ids must be QEMU ids, paths
// absolute, strings free of newlines and NULs. Commas in option values are
// doubled, QEMU's escape. Errors are *FieldError naming the device and field.
package devices
