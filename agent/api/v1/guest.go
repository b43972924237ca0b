package agentv1

// The guest side of the host⇄guest contract that is not an RPC: names and paths both the
// runtime (host) and the agent (guest) must agree on.
const (
	// PortName is the virtio-serial port the agent serves on (`virtserialport,name=...`).
	PortName = "vmpod.agent"

	// GuestSharedDir is where the agent mounts the host's shared directory (virtio-fs or
	// 9p). Container rootfs and volume paths in OCI specs sent to the agent live below it.
	GuestSharedDir = "/run/vmpod/shared"

	// GuestPodShmDir is the pod's /dev/shm: a tmpfs the agent mounts at boot, bound into
	// every container that asks for the pod's shared memory (CRI's sandbox shm).
	GuestPodShmDir = "/run/vmpod/pod-shm"

	// KernelParamShare on the guest kernel command line names the shared filesystem as
	// "<fstype>:<tag>", fstype being "virtiofs" or "9p". Absent: nothing is shared.
	KernelParamShare = "vmpod.share"
	// KernelParamDebug on the guest kernel command line turns on the agent's debug log.
	KernelParamDebug = "vmpod.debug"
	// KernelParamNoWarmup on the guest kernel command line (the node config's
	// hypervisor.kernel_params) keeps the agent from warming runc up at boot
	// (docs/design/021), which it does only when runc creates the app containers
	// (KernelParamRuncApps).
	KernelParamNoWarmup = "vmpod.nowarmup"
	// KernelParamTemplate on the guest kernel command line marks a guest booted to be
	// saved as a template (docs/design/022): the agent warms runc up after each restore —
	// when the host reseeds it (SetupSandboxRequest.entropy) — instead of at boot, where a
	// saved state would have every restore finish it.
	KernelParamTemplate = "vmpod.template"
	// KernelParamRuncApps on the guest kernel command line has runc create every app
	// container instead of the agent (docs/design/023), as before the agent could; make
	// bench measures a pod start both ways.
	KernelParamRuncApps = "vmpod.runcapps"
)
