// Package convert turns KubeVirt VirtualMachine (kubevirt.io/v1) and CDI DataVolume
// (cdi.kubevirt.io/v1beta1) manifests into vmpod's. It reads the manifests as plain YAML
// rather than KubeVirt's Go types, so vmpod does not depend on KubeVirt's API module; every
// field is either converted, reported as dropped (a warning), or refused (an error) when
// the VM would not be what the manifest asks for. See docs/design/108-kubevirt-conversion.md.
package convert

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/vmpod/vmpod/api/machine"
	vmpodv1 "github.com/vmpod/vmpod/controller/api/v1alpha1"
)

// Result is one converted object and what the conversion dropped or changed.
type Result struct {
	Object   client.Object
	Warnings []string
}

// Object converts one decoded KubeVirt or CDI object. The error lists every field that
// stops the conversion.
func Object(obj map[string]any) (*Result, error) {
	r := &report{}
	root := r.newNode("", obj)
	apiVersion, kind := root.str("apiVersion"), root.str("kind")
	group, _, _ := strings.Cut(apiVersion, "/")
	root.ignore("status")
	var out client.Object
	switch {
	case group == "kubevirt.io" && kind == "VirtualMachine":
		out = virtualMachine(root)
	case group == "kubevirt.io" && kind == "VirtualMachineInstance":
		out = virtualMachineInstance(root)
	case group == "kubevirt.io" && kind == "VirtualMachineInstanceMigration":
		out = migration(root)
	case group == "cdi.kubevirt.io" && kind == "DataVolume":
		out = dataVolume(root)
	case group == "cdi.kubevirt.io" && kind == vmpodv1.DataSourceKind:
		out = dataSource(root)
	case group == "instancetype.kubevirt.io" && (kind == vmpodv1.KindInstancetype || kind == vmpodv1.KindClusterInstancetype):
		out = instancetypeObject(root, kind)
	case group == "instancetype.kubevirt.io" && (kind == vmpodv1.KindPreference || kind == vmpodv1.KindClusterPreference):
		out = preferenceObject(root, kind)
	case isKubeVirtGroup(group):
		name, _ := nameOf(obj)
		return nil, fmt.Errorf("%s %s %s: %w: %s", apiVersion, kind, name, ErrNotConverted, notConverted(group, kind))
	default:
		return nil, fmt.Errorf("%s %s: %w", apiVersion, kind, ErrNotKubeVirt)
	}
	r.finish()
	name := out.GetName()
	if len(r.errs) > 0 {
		return nil, fmt.Errorf("%s %s cannot be converted:\n  %s", kind, name, strings.Join(r.errs, "\n  "))
	}
	return &Result{Object: out, Warnings: r.warnings}, nil
}

func objectMeta(root *node) metav1.ObjectMeta {
	m := root.required("metadata")
	if m == nil {
		return metav1.ObjectMeta{}
	}
	// set by the API server; meaningless in a new manifest
	m.ignore("creationTimestamp", "resourceVersion", "uid", "generation", "managedFields", "selfLink", "finalizers", "ownerReferences")
	return metav1.ObjectMeta{Name: m.str("name"), GenerateName: m.str("generateName"), Namespace: m.str("namespace"),
		Labels: m.stringMap("labels"), Annotations: annotations(m)}
}

// annotations reads m's annotations and leaves out KubeVirt's (kubevirt.io/ and every
// *.kubevirt.io/ prefix): they configure KubeVirt's components, which do not run here.
// Those that change the guest refuse the conversion; the rest are dropped with a warning.
func annotations(m *node) map[string]string {
	all := m.stringMap("annotations")
	for k := range all {
		prefix, _, found := strings.Cut(k, "/")
		if !found || !isKubeVirtGroup(prefix) {
			continue
		}
		delete(all, k)
		path := m.at("annotations") + "." + k
		switch {
		case prefix == "hooks.kubevirt.io":
			m.rep.errorf(path, "sidecar hooks rewrite KubeVirt's libvirt domain or cloud-init; vmpod has neither to rewrite")
		case prefix == "smbios.vm.kubevirt.io":
			m.rep.errorf(path, "SMBIOS fields are not supported: the guest would see different firmware tables")
		default:
			m.rep.warnf(path, "a KubeVirt annotation: nothing in vmpod reads it; dropped")
		}
	}
	if len(all) == 0 {
		return nil
	}
	return all
}

func virtualMachine(root *node) *vmpodv1.VirtualMachine {
	vm := &vmpodv1.VirtualMachine{TypeMeta: metav1.TypeMeta{APIVersion: vmpodv1.GroupVersion.String(), Kind: "VirtualMachine"}, ObjectMeta: objectMeta(root)}
	spec := root.required("spec")
	if spec == nil {
		return vm
	}
	running, runningSet := spec.boolean("running")
	strategy := spec.str("runStrategy")
	switch {
	case runningSet && strategy != "":
		root.rep.errorf("spec", "both running and runStrategy are set")
	case runningSet && running:
		vm.Spec.RunStrategy = vmpodv1.RunStrategyAlways
	case runningSet:
		vm.Spec.RunStrategy = vmpodv1.RunStrategyHalted
	}
	switch s := vmpodv1.RunStrategy(strategy); s {
	case "":
		if !runningSet {
			root.rep.errorf("spec", "set running or runStrategy")
		}
	case vmpodv1.RunStrategyAlways, vmpodv1.RunStrategyRerunOnFailure, vmpodv1.RunStrategyOnce, vmpodv1.RunStrategyManual, vmpodv1.RunStrategyHalted:
		vm.Spec.RunStrategy = s
	default:
		root.rep.errorf("spec.runStrategy", "%q is not supported by vmpod", strategy)
	}
	if m := spec.object("instancetype"); m != nil {
		vm.Spec.Instancetype = &vmpodv1.InstancetypeMatcher{Name: m.str("name"),
			Kind: matcherKind(m, vmpodv1.KindInstancetype, vmpodv1.KindClusterInstancetype)}
	}
	if m := spec.object("preference"); m != nil {
		vm.Spec.Preference = &vmpodv1.PreferenceMatcher{Name: m.str("name"),
			Kind: matcherKind(m, vmpodv1.KindPreference, vmpodv1.KindClusterPreference)}
	}
	for _, t := range spec.list("dataVolumeTemplates") {
		meta := t.object("metadata")
		meta.ignore("creationTimestamp")
		var name string
		var labels, dvAnnotations map[string]string
		if meta != nil {
			name, labels, dvAnnotations = meta.str("name"), meta.stringMap("labels"), annotations(meta)
		}
		var dvSpec vmpodv1.DataVolumeSpec
		if s := t.required("spec"); s != nil {
			dvSpec = dataVolumeSpec(s)
		}
		vm.Spec.DataVolumeTemplates = append(vm.Spec.DataVolumeTemplates, vmpodv1.DataVolumeTemplateSpec{
			Metadata: vmpodv1.DataVolumeTemplateMeta{Name: name, Labels: labels, Annotations: dvAnnotations},
			Spec:     dvSpec,
		})
	}
	tmpl := spec.required("template")
	if tmpl == nil {
		return vm
	}
	if m := tmpl.object("metadata"); m != nil {
		m.ignore("creationTimestamp")
		vm.Spec.Template.ObjectMeta = vmpodv1.TemplateMeta{Labels: m.stringMap("labels"), Annotations: annotations(m)}
	}
	if s := tmpl.required("spec"); s != nil {
		vm.Spec.Template.Spec = instanceSpec(s)
	}
	return vm
}

// matcherKind reads an instancetype or preference matcher's kind (KubeVirt takes it in
// any case, default the cluster kind) and what vmpod does not do with matchers.
func matcherKind(m *node, namespaced, cluster string) string {
	m.dropped("revisionName", "vmpod applies the object as it is when a pod starts (no revisions); dropped")
	m.unsupported("inferFromVolume", "inferring from a volume's labels is not supported: name it")
	m.dropped("inferFromVolumeFailurePolicy", "no inference; dropped")
	switch k := m.str("kind"); strings.ToLower(k) {
	case "", strings.ToLower(cluster):
		return cluster
	case strings.ToLower(namespaced):
		return namespaced
	default:
		m.rep.errorf(m.at("kind"), "%q is not %s or %s", k, cluster, namespaced)
		return ""
	}
}

// instancetypeObject converts an instance type: its vCPUs and memory.
func instancetypeObject(root *node, kind string) client.Object {
	meta := objectMeta(root)
	var spec vmpodv1.InstancetypeSpec
	if s := root.required("spec"); s != nil {
		if c := s.required("cpu"); c != nil {
			if v, ok := c.integer("guest"); ok && v > 0 {
				spec.CPU.Guest = uint32(v)
			}
			spec.CPU.Model = cpuModel(c)
			c.unsupported("dedicatedCPUPlacement", "dedicated CPUs are not supported yet")
			c.unsupported("isolateEmulatorThread", "dedicated CPUs are not supported yet")
			c.unsupported("numa", "guest NUMA is not supported")
			c.unsupported("realtime", "realtime vCPUs are not supported")
			if v, ok := c.integer("maxSockets"); ok && v > 0 {
				spec.CPU.MaxSockets = uint32(v)
			}
		}
		if m := s.required("memory"); m != nil {
			if q, ok := quantity(m, "guest"); ok {
				spec.Memory.Guest = q
			}
			m.unsupported("hugepages", "hugepages are not supported")
			m.dropped("overcommitPercent", "vmpod's memory request is the guest's memory; dropped")
			if m.has("maxGuest") {
				if q, ok := quantity(m, "maxGuest"); ok {
					spec.Memory.MaxGuest = &q
				}
			}
		}
		for _, k := range []string{"gpus", "hostDevices", "nodeSelector", "schedulerName", "annotations", "launchSecurity"} {
			s.unsupported(k, "not supported in vmpod's instance types: the VM would not get it")
		}
		s.dropped("ioThreadsPolicy", "IO threads are the shim's choice; dropped")
	}
	tm := metav1.TypeMeta{APIVersion: vmpodv1.GroupVersion.String(), Kind: kind}
	if kind == vmpodv1.KindClusterInstancetype {
		meta.Namespace = ""
		return &vmpodv1.VirtualMachineClusterInstancetype{TypeMeta: tm, ObjectMeta: meta, Spec: spec}
	}
	return &vmpodv1.VirtualMachineInstancetype{TypeMeta: tm, ObjectMeta: meta, Spec: spec}
}

// preferenceObject converts a preference: the defaults vmpod can apply.
func preferenceObject(root *node, kind string) client.Object {
	meta := objectMeta(root)
	var spec vmpodv1.PreferenceSpec
	if s := root.required("spec"); s != nil {
		if c := s.object("cpu"); c != nil {
			switch t := strings.TrimPrefix(strings.ToLower(c.str("preferredCPUTopology")), "prefer"); t {
			case "":
			case "sockets", "cores", "threads":
				spec.CPU = &vmpodv1.CPUPreferences{PreferredCPUTopology: vmpodv1.CPUTopology(t)}
			case "any":
				root.rep.warnf(c.at("preferredCPUTopology"), "any becomes sockets (KubeVirt's default)")
				spec.CPU = &vmpodv1.CPUPreferences{PreferredCPUTopology: vmpodv1.TopologySockets}
			default:
				root.rep.errorf(c.at("preferredCPUTopology"), "%q is not supported (sockets, cores, threads)", t)
			}
		}
		if d := s.object("devices"); d != nil {
			spec.Devices = &vmpodv1.DevicePreferences{PreferredDiskBus: vmpodv1.DiskBus(oneOf(d, "preferredDiskBus", "virtio", "sata", "scsi")),
				PreferredCdromBus:       vmpodv1.DiskBus(oneOf(d, "preferredCdromBus", "sata", "scsi")),
				PreferredInterfaceModel: oneOf(d, "preferredInterfaceModel", "virtio", "e1000", "e1000e")}
			// every vmpod VM has these: nothing to prefer
			d.ignore("preferredRng", "preferredAutoattachSerialConsole", "preferredAutoattachPodInterface")
		}
		if f := s.object("firmware"); f != nil {
			spec.Firmware = &vmpodv1.FirmwarePreferences{}
			if v, ok := f.boolean("preferredUseEfi"); ok {
				spec.Firmware.PreferredUseEFI = &v
			}
			if v, ok := f.boolean("preferredUseSecureBoot"); ok {
				spec.Firmware.PreferredUseSecureBoot = &v
			}
			f.ignore("preferredUseBios") // BIOS is the default
		}
		if m := s.object("machine"); m != nil {
			switch t := m.str("preferredMachineType"); {
			case t == "":
			case t == "q35" || strings.HasPrefix(t, "pc-q35"):
				spec.Machine = &vmpodv1.MachinePreferences{PreferredMachineType: "q35"}
			default:
				root.rep.warnf(m.at("preferredMachineType"), "machine %s is not supported; q35 is preferred instead", t)
				spec.Machine = &vmpodv1.MachinePreferences{PreferredMachineType: "q35"}
			}
		}
		if f := s.object("features"); f != nil {
			vf := features(f, preferredKey)
			spec.Features = &vmpodv1.FeaturePreferences{PreferredACPI: vf.ACPI, PreferredSMM: vf.SMM, PreferredHyperv: vf.HyperV, PreferredKVM: vf.KVM}
		}
		if v, ok := s.integer("preferredTerminationGracePeriodSeconds"); ok {
			spec.PreferredTerminationGracePeriodSeconds = &v
		}
		if r := s.object("requirements"); r != nil {
			spec.Requirements = &vmpodv1.PreferenceRequirements{}
			if c := r.object("cpu"); c != nil {
				if v, ok := c.integer("guest"); ok && v > 0 {
					spec.Requirements.CPU = &vmpodv1.CPURequirement{Guest: uint32(v)}
				}
			}
			if m := r.object("memory"); m != nil {
				if q, ok := quantity(m, "guest"); ok {
					spec.Requirements.Memory = &vmpodv1.MemoryRequirement{Guest: q}
				}
			}
		}
	}
	tm := metav1.TypeMeta{APIVersion: vmpodv1.GroupVersion.String(), Kind: kind}
	if kind == vmpodv1.KindClusterPreference {
		meta.Namespace = ""
		return &vmpodv1.VirtualMachineClusterPreference{TypeMeta: tm, ObjectMeta: meta, Spec: spec}
	}
	return &vmpodv1.VirtualMachinePreference{TypeMeta: tm, ObjectMeta: meta, Spec: spec}
}

// oneOf reads a string that must be one of values (or unset).
func oneOf(n *node, key string, values ...string) string {
	v := n.str(key)
	if v != "" && !slices.Contains(values, v) {
		n.rep.errorf(n.at(key), "%q is not supported (%s)", v, strings.Join(values, ", "))
		return ""
	}
	return v
}

// quantity reads a resource quantity (a string, or a bare number of bytes).
func quantity(n *node, key string) (resource.Quantity, bool) {
	v, ok := n.get(key)
	if !ok {
		n.rep.errorf(n.at(key), "missing")
		return resource.Quantity{}, false
	}
	str := fmt.Sprint(v)
	if f, isFloat := v.(float64); isFloat {
		str = strconv.FormatFloat(f, 'f', -1, 64) // a bare number of bytes, not 2.1e+09
	}
	q, err := resource.ParseQuantity(str)
	if err != nil {
		n.rep.errorf(n.at(key), "%v", err)
		return resource.Quantity{}, false
	}
	return q, true
}

// virtualMachineInstance converts a VMI: an instance that runs once and is gone is, in
// vmpod, a VirtualMachine with runStrategy Once (vmpod has no VMI kind of its own).
func virtualMachineInstance(root *node) *vmpodv1.VirtualMachine {
	vm := &vmpodv1.VirtualMachine{TypeMeta: metav1.TypeMeta{APIVersion: vmpodv1.GroupVersion.String(), Kind: "VirtualMachine"}, ObjectMeta: objectMeta(root)}
	vm.Spec.RunStrategy = vmpodv1.RunStrategyOnce
	vm.Spec.Template.ObjectMeta = vmpodv1.TemplateMeta{Labels: vm.Labels, Annotations: vm.Annotations}
	root.rep.warnf("kind", "a VirtualMachineInstance runs once: it becomes a VirtualMachine with runStrategy Once (its pod and status carry the VM's name)")
	if s := root.required("spec"); s != nil {
		vm.Spec.Template.Spec = instanceSpec(s)
	}
	return vm
}

func instanceSpec(s *node) vmpodv1.InstanceSpec {
	var out vmpodv1.InstanceSpec
	if d := s.required("domain"); d != nil {
		out.Domain = domain(d)
	}
	for _, v := range s.list("volumes") {
		out.Volumes = append(out.Volumes, volume(v))
	}
	for _, n := range s.list("networks") {
		out.Networks = append(out.Networks, network(n))
	}
	if p := s.object("readinessProbe"); p != nil {
		out.ReadinessProbe = probe(p)
	}
	s.dropped("livenessProbe", "liveness probes are not supported; dropped")
	if v, ok := s.integer("terminationGracePeriodSeconds"); ok {
		out.TerminationGracePeriodSeconds = &v
	}
	out.NodeSelector = s.stringMap("nodeSelector")
	if s.has("affinity") {
		out.Affinity = &corev1.Affinity{}
		s.into("affinity", out.Affinity)
	}
	s.into("tolerations", &out.Tolerations)
	out.PriorityClassName = s.str("priorityClassName")
	out.Hostname = s.str("hostname")
	out.Subdomain = s.str("subdomain")
	switch e := vmpodv1.EvictionStrategy(s.str("evictionStrategy")); e {
	case "":
	case vmpodv1.EvictionStrategyNone, vmpodv1.EvictionStrategyLiveMigrate:
		out.EvictionStrategy = &e
	default: // LiveMigrateIfPossible, External
		s.rep.warnf(s.at("evictionStrategy"), "%s is not supported: the VM is stopped on eviction like a pod (LiveMigrate moves it, None stops it)", e)
	}
	for _, c := range s.list("accessCredentials") {
		if ac, ok := accessCredential(c); ok {
			out.AccessCredentials = append(out.AccessCredentials, ac)
		}
	}
	dnsLabelNames(s, &out)
	defaultDisks(s, &out)
	return out
}

// accessCredential converts an SSH public key credential; a password is refused, and
// configDrive propagation too (vmpod's cloud-init data source is NoCloud).
func accessCredential(c *node) (vmpodv1.AccessCredential, bool) {
	var out vmpodv1.AccessCredential
	if c.oneKey("access credential", "sshPublicKey") == "" {
		return out, false
	}
	k := c.object("sshPublicKey")
	if src := k.required("source"); src != nil {
		if sec := src.required("secret"); sec != nil {
			out.SSHPublicKey.Source.Secret.SecretName = sec.str("secretName")
		}
	}
	m := k.required("propagationMethod")
	if m == nil {
		return out, false
	}
	switch m.oneKey("propagation method", "noCloud", "qemuGuestAgent") {
	case "noCloud":
		m.object("noCloud")
		out.SSHPublicKey.PropagationMethod.NoCloud = &vmpodv1.NoCloudSSHPublicKeyAccessCredentialPropagation{}
	case "qemuGuestAgent":
		out.SSHPublicKey.PropagationMethod.QemuGuestAgent = &vmpodv1.QemuGuestAgentSSHPublicKeyAccessCredentialPropagation{
			Users: m.object("qemuGuestAgent").strings("users")}
	default:
		return out, false
	}
	return out, true
}

// defaultDisks adds a virtio disk for every volume no disk names, as KubeVirt's defaulting
// does: a manifest may list a volume (a cloud-init disk, typically) and leave its disk out.
func defaultDisks(s *node, spec *vmpodv1.InstanceSpec) {
	for _, v := range spec.Volumes {
		if !slices.ContainsFunc(spec.Domain.Devices.Disks, func(d vmpodv1.Disk) bool { return d.Name == v.Name }) {
			spec.Domain.Devices.Disks = append(spec.Domain.Devices.Disks, vmpodv1.Disk{Name: v.Name, Disk: &vmpodv1.DiskTarget{}})
		}
	}
}

// dnsLabelNames renames disks and volumes, interfaces and networks whose names are not DNS
// labels (vmpod's names become device and file names; KubeVirt allows vpc_net_0), the
// same way on both sides of each pair, and warns.
func dnsLabelNames(s *node, spec *vmpodv1.InstanceSpec) {
	renamed := map[string]string{} // "kind/old" -> new
	rename := func(kind, path string, name *string) {
		if *name == "" || len(validation.IsDNS1123Label(*name)) == 0 {
			return
		}
		key := kind + "/" + *name
		if to, ok := renamed[key]; ok {
			*name = to
			return
		}
		to := dnsLabel(*name)
		if to == "" {
			s.rep.errorf(path, "name %q cannot be made a DNS label", *name)
			return
		}
		s.rep.warnf(path, "name %q becomes %q (vmpod's names are DNS labels)", *name, to)
		renamed[key] = to
		*name = to
	}
	d := &spec.Domain.Devices
	for i := range d.Disks {
		rename("disk", fmt.Sprintf("%s.domain.devices.disks[%d].name", s.path, i), &d.Disks[i].Name)
	}
	for i := range spec.Volumes {
		rename("disk", fmt.Sprintf("%s.volumes[%d].name", s.path, i), &spec.Volumes[i].Name)
	}
	for i := range d.Interfaces {
		rename("net", fmt.Sprintf("%s.domain.devices.interfaces[%d].name", s.path, i), &d.Interfaces[i].Name)
	}
	for i := range spec.Networks {
		rename("net", fmt.Sprintf("%s.networks[%d].name", s.path, i), &spec.Networks[i].Name)
	}
}

// dnsLabel lower-cases name, turns what a DNS label cannot hold into '-', trims '-' from
// both ends and cuts it to 63 characters.
func dnsLabel(name string) string {
	b := []byte(strings.ToLower(name))
	for i, c := range b {
		if (c < 'a' || c > 'z') && (c < '0' || c > '9') {
			b[i] = '-'
		}
	}
	out := strings.Trim(string(b), "-")
	if len(out) > validation.DNS1123LabelMaxLength {
		out = strings.TrimRight(out[:validation.DNS1123LabelMaxLength], "-")
	}
	return out
}

func domain(d *node) vmpodv1.DomainSpec {
	var out vmpodv1.DomainSpec
	if c := d.object("cpu"); c != nil {
		out.CPU = &vmpodv1.CPU{}
		for key, dst := range map[string]*uint32{"cores": &out.CPU.Cores, "sockets": &out.CPU.Sockets, "threads": &out.CPU.Threads, "maxSockets": &out.CPU.MaxSockets} {
			if v, ok := c.integer(key); ok && v > 0 {
				*dst = uint32(v)
			}
		}
		out.CPU.Model = cpuModel(c)
	}
	if f := d.object("features"); f != nil {
		out.Features = features(f, featureKey)
	}
	if m := d.object("memory"); m != nil {
		if g := m.str("guest"); g != "" {
			q, err := resource.ParseQuantity(g)
			if err != nil {
				d.rep.errorf(m.at("guest"), "%v", err)
			} else {
				out.Memory = &vmpodv1.Memory{Guest: &q}
			}
		}
		if m.has("maxGuest") {
			if q, ok := quantity(m, "maxGuest"); ok {
				if out.Memory == nil {
					out.Memory = &vmpodv1.Memory{}
				}
				out.Memory.MaxGuest = &q
			}
		}
		m.dropped("hugepages", "hugepages are not supported; dropped")
	}
	if r := d.object("resources"); r != nil {
		out.Resources.Requests = resourceList(r, "requests")
		out.Resources.Limits = resourceList(r, "limits")
		r.dropped("overcommitGuestOverhead", "vmpod's overhead is the RuntimeClass's; dropped")
	}
	if m := d.object("machine"); m != nil {
		switch t := m.str("type"); {
		case t == "":
		case t == "q35" || strings.HasPrefix(t, "pc-q35"):
			out.Machine = &vmpodv1.Machine{Type: "q35"}
			if t != "q35" {
				d.rep.warnf(m.at("type"), "%s becomes q35 (the node's QEMU version)", t)
			}
		default:
			d.rep.warnf(m.at("type"), "machine %s is not supported; the VM gets q35", t)
			out.Machine = &vmpodv1.Machine{Type: "q35"}
		}
	}
	if f := d.object("firmware"); f != nil {
		if b := f.object("bootloader"); b != nil {
			out.Firmware = &vmpodv1.Firmware{Bootloader: &vmpodv1.Bootloader{}}
			switch b.oneKey("bootloader", "bios", "efi") {
			case "bios":
				bios := b.object("bios")
				bios.dropped("useSerial", "the console is always the serial port in vmpod")
				out.Firmware.Bootloader.BIOS = &vmpodv1.BIOS{}
			case "efi":
				efi := b.object("efi")
				out.Firmware.Bootloader.EFI = &vmpodv1.EFI{}
				if v, ok := efi.boolean("secureBoot"); ok {
					out.Firmware.Bootloader.EFI.SecureBoot = &v
				}
				efi.dropped("persistent", "persistent EFI variables are not supported; dropped")
			}
		}
		f.unsupported("kernelBoot", "booting a kernel and initrd from a container image is not supported: without them the VM would have nothing to boot; boot from a disk")
		f.dropped("uuid", "the firmware UUID is not configurable; dropped")
		f.dropped("serial", "the firmware serial is not configurable; dropped")
	}
	if dev := d.object("devices"); dev != nil {
		out.Devices = devices(dev)
	}
	return out
}

// cpuModel carries a CPU model over: host-model is vmpod's default too, host-passthrough
// and named models boot where the node's admin allows them.
func cpuModel(c *node) string {
	model := c.str("model")
	switch {
	case model == "" || model == machine.CPUHostModel:
		return ""
	case machine.CheckCPUModel(model) != nil:
		c.rep.errorf(c.at("model"), "%v", machine.CheckCPUModel(model))
		return ""
	case model != machine.CPUHostPassthrough:
		c.rep.warnf(c.at("model"), "%s boots only on nodes whose vmpod config lists it (hypervisor.cpu_models)", model)
	}
	return model
}

// features converts domain.features: those vmpod's machine has (ACPI, SMM, Hyper-V
// enlightenments, a hidden KVM signature); the rest are what QEMU does anyway or dropped.
// A preference's features have the same shape under keys named preferredAcpi and so on:
// key gives a feature's key.
func features(f *node, key func(string) string) *vmpodv1.Features {
	out := &vmpodv1.Features{ACPI: featureState(f, key("acpi")), SMM: featureState(f, key("smm"))}
	if a := f.object(key("apic")); a != nil {
		if on, set := a.boolean("enabled"); set && !on {
			a.rep.errorf(a.at("enabled"), "a guest without an APIC is not supported")
		}
		a.dropped("endOfInterrupt", "paravirtual EOI is on wherever KVM offers it; dropped")
	}
	if k := f.object(key("kvm")); k != nil {
		hidden, _ := k.boolean("hidden")
		out.KVM = &vmpodv1.FeatureKVM{Hidden: hidden}
	}
	if h := f.object(key("hyperv")); h != nil {
		hv := &vmpodv1.FeatureHyperv{
			Relaxed: featureState(h, "relaxed"), VAPIC: featureState(h, "vapic"), VPIndex: featureState(h, "vpindex"),
			Runtime: featureState(h, "runtime"), SyNIC: featureState(h, "synic"), Reset: featureState(h, "reset"),
			Frequencies: featureState(h, "frequencies"), Reenlightenment: featureState(h, "reenlightenment"),
			IPI: featureState(h, "ipi"), EVMCS: featureState(h, "evmcs"),
		}
		if sl := h.object("spinlocks"); sl != nil {
			hv.Spinlocks = &vmpodv1.FeatureSpinlocks{Enabled: enabled(sl)}
			if n, ok := sl.integer("spinlocks"); ok {
				if n < 4096 || n > math.MaxUint32 {
					sl.rep.errorf(sl.at("spinlocks"), "%d: want 4096 or more", n)
				}
				hv.Spinlocks.Retries = ptr.To(uint32(n))
			}
		}
		if t := h.object("synictimer"); t != nil {
			hv.SyNICTimer = &vmpodv1.SyNICTimer{Enabled: enabled(t), Direct: featureState(t, "direct")}
		}
		if v := h.object("vendorid"); v != nil {
			hv.VendorID = &vmpodv1.FeatureVendorID{Enabled: enabled(v), VendorID: v.str("vendorid")}
		}
		if t := h.object("tlbflush"); t != nil {
			hv.TLBFlush = &vmpodv1.FeatureState{Enabled: enabled(t)}
			t.dropped("direct", "not supported by vmpod's QEMU; dropped")
			t.dropped("extended", "not supported by vmpod's QEMU; dropped")
		}
		out.HyperV = hv
	}
	f.dropped(key("hypervPassthrough"), "every enlightenment KVM has is not supported: list them under hyperv; dropped")
	f.dropped(key("pvspinlock"), "paravirtual spinlocks are on wherever KVM offers them; dropped")
	return out
}

// featureKey is a VM's feature key; preferredKey a preference's (acpi: preferredAcpi).
func featureKey(k string) string { return k }

func preferredKey(k string) string { return "preferred" + strings.ToUpper(k[:1]) + k[1:] }

// featureState reads a KubeVirt feature state ({} or {enabled: bool}) at key, nil if unset.
func featureState(n *node, key string) *vmpodv1.FeatureState {
	o := n.object(key)
	if o == nil {
		return nil
	}
	return &vmpodv1.FeatureState{Enabled: enabled(o)}
}

func enabled(o *node) *bool {
	if v, ok := o.boolean("enabled"); ok {
		return &v
	}
	return nil
}

func resourceList(r *node, key string) corev1.ResourceList {
	m := r.object(key)
	if m == nil {
		return nil
	}
	out := corev1.ResourceList{}
	for name := range m.m {
		var s string
		switch v, _ := m.get(name); x := v.(type) {
		case string:
			s = x
		case float64, int64:
			s = fmt.Sprint(x)
		}
		q, err := resource.ParseQuantity(s)
		if err != nil {
			r.rep.errorf(m.at(name), "%v", err)
			continue
		}
		out[corev1.ResourceName(name)] = q
	}
	return out
}

func devices(dev *node) vmpodv1.Devices {
	var out vmpodv1.Devices
	for _, d := range dev.list("disks") {
		out.Disks = append(out.Disks, disk(d))
	}
	for _, i := range dev.list("interfaces") {
		out.Interfaces = append(out.Interfaces, iface(i))
	}
	for _, g := range dev.list("gpus") {
		out.GPUs = append(out.GPUs, vmpodv1.GPU{Name: g.str("name"), DeviceName: g.str("deviceName")})
		g.unsupported("virtualGPUOptions", "vGPU options are not supported")
		g.unsupported("claimName", "DRA claims are not supported yet: use a device plugin resource (deviceName)")
	}
	for _, h := range dev.list("hostDevices") {
		out.HostDevices = append(out.HostDevices, vmpodv1.HostDevice{Name: h.str("name"), DeviceName: h.str("deviceName")})
		h.unsupported("claimName", "DRA claims are not supported yet: use a device plugin resource (deviceName)")
	}
	if v, ok := dev.boolean("autoattachPodInterface"); ok {
		out.AutoattachPodInterface = &v
	}
	// on in vmpod: the serial console is the compute container's log and stdin
	dev.ignore("autoattachSerialConsole")
	// every vmpod VM has a virtio-rng fed by QEMU's getrandom source (runtime/vmm)
	if r := dev.object("rng"); r != nil && len(r.m) > 0 {
		dev.rep.warnf(dev.at("rng"), "the guest always gets a virtio-rng; its settings are dropped")
	}
	for _, k := range []string{"autoattachGraphicsDevice", "autoattachMemBalloon", "watchdog", "tpm", "sound", "inputs", "blockMultiQueue", "networkInterfaceMultiqueue", "useVirtioTransitional"} {
		dev.dropped(k, "not supported by vmpod; dropped")
	}
	return out
}

func disk(d *node) vmpodv1.Disk {
	out := vmpodv1.Disk{Name: d.str("name")}
	if v, ok := d.integer("bootOrder"); ok {
		out.BootOrder = ptr.To(int32(v))
	}
	bus := func(t *node) vmpodv1.DiskBus {
		b := t.str("bus")
		switch b {
		case "", "virtio", "sata", "scsi":
		default:
			t.rep.errorf(t.at("bus"), "bus %s is not supported (virtio, sata, scsi)", b)
		}
		return vmpodv1.DiskBus(b)
	}
	switch {
	case d.has("disk"):
		t := d.object("disk")
		out.Disk = &vmpodv1.DiskTarget{}
		if t != nil {
			out.Disk.Bus = bus(t)
			out.Disk.ReadOnly, _ = t.boolean("readonly")
			t.dropped("pciAddress", "PCI addresses are assigned by the shim; dropped")
		}
	case d.has("cdrom"):
		t := d.object("cdrom")
		out.CDRom = &vmpodv1.CDRomTarget{}
		if t != nil {
			out.CDRom.Bus = bus(t)
			t.ignore("readonly") // always read-only
			t.dropped("tray", "the tray is always closed; dropped")
		}
	}
	d.unsupported("lun", "LUN passthrough is not supported")
	for _, k := range []string{"serial", "cache", "io", "dedicatedIOThread", "blockSize", "shareable", "errorPolicy", "tag"} {
		d.dropped(k, "not supported by vmpod; dropped")
	}
	return out
}

func iface(i *node) vmpodv1.Interface {
	out := vmpodv1.Interface{Name: i.str("name"), Model: i.str("model"), MACAddress: i.str("macAddress")}
	if i.has("bridge") {
		out.Bridge = &vmpodv1.InterfaceBridge{}
	}
	if i.has("masquerade") {
		out.Masquerade = &vmpodv1.InterfaceMasquerade{}
	}
	i.ignore("bridge", "masquerade") // both are empty objects: present is all they say
	for _, p := range i.list("ports") {
		port, _ := p.integer("port")
		out.Ports = append(out.Ports, vmpodv1.Port{Name: p.str("name"), Protocol: p.str("protocol"), Port: int32(port)})
	}
	switch out.Model {
	case "", "virtio", "e1000", "e1000e":
	default:
		i.rep.errorf(i.at("model"), "model %s is not supported (virtio, e1000, e1000e)", out.Model)
	}
	i.unsupported("sriov", "SR-IOV interfaces are not supported: pass the VF as a hostDevice")
	i.unsupported("slirp", "slirp is not supported")
	i.unsupported("macvtap", "macvtap is not supported")
	i.unsupported("binding", "network binding plugins are not supported")
	i.dropped("pciAddress", "PCI addresses are assigned by the shim; dropped")
	i.dropped("bootOrder", "network boot is not supported; dropped")
	return out
}

func volume(v *node) vmpodv1.Volume {
	out := vmpodv1.Volume{Name: v.str("name")}
	switch v.oneKey("volume source", "containerDisk", "dataVolume", "persistentVolumeClaim", "cloudInitNoCloud", "emptyDisk") {
	case "emptyDisk":
		e := v.object("emptyDisk")
		out.EmptyDisk = &vmpodv1.EmptyDiskSource{}
		if c, ok := quantity(e, "capacity"); ok {
			out.EmptyDisk.Capacity = c
		}
	case "containerDisk":
		c := v.object("containerDisk")
		out.ContainerDisk = &vmpodv1.ContainerDiskSource{Image: c.str("image"),
			ImagePullPolicy: corev1.PullPolicy(c.str("imagePullPolicy")), ImagePullSecret: c.str("imagePullSecret")}
		if p := c.str("path"); p != "" && !strings.HasPrefix(strings.TrimPrefix(p, "/"), "disk/") {
			v.rep.errorf(c.at("path"), "vmpod reads a containerDisk's disk from /disk, not %s", p)
		}
	case "dataVolume":
		d := v.object("dataVolume")
		out.DataVolume = &vmpodv1.DataVolumeVolumeSource{Name: d.str("name")}
		out.DataVolume.Hotpluggable, _ = d.boolean("hotpluggable")
	case "persistentVolumeClaim":
		p := v.object("persistentVolumeClaim")
		out.PersistentVolumeClaim = &vmpodv1.PersistentVolumeClaimVolumeSource{PersistentVolumeClaimVolumeSource: corev1.PersistentVolumeClaimVolumeSource{ClaimName: p.str("claimName")}}
		out.PersistentVolumeClaim.ReadOnly, _ = p.boolean("readOnly")
		out.PersistentVolumeClaim.Hotpluggable, _ = p.boolean("hotpluggable")
	case "cloudInitNoCloud":
		c := v.object("cloudInitNoCloud")
		out.CloudInitNoCloud = &vmpodv1.CloudInitNoCloudSource{
			UserData: c.str("userData"), UserDataBase64: c.str("userDataBase64"),
			NetworkData: c.str("networkData"), NetworkDataBase64: c.str("networkDataBase64"),
		}
		if s := c.object("secretRef"); s != nil {
			out.CloudInitNoCloud.SecretRef = &vmpodv1.LocalObjectReference{Name: s.str("name")}
		}
		if ci := out.CloudInitNoCloud; ci.UserData == "" && ci.UserDataBase64 == "" && ci.SecretRef == nil {
			// KubeVirt takes network data alone (or an empty userData); vmpod wants user
			// data, and an empty cloud-config is what cloud-init made of none
			ci.UserData = "#cloud-config\n"
			if c.has("userData") {
				v.rep.warnf(c.at("userData"), "empty: becomes an empty #cloud-config")
			}
		}
		if s := c.object("networkDataSecretRef"); s != nil {
			out.CloudInitNoCloud.NetworkDataSecretRef = &vmpodv1.LocalObjectReference{Name: s.str("name")}
		}
	}
	return out
}

func network(n *node) vmpodv1.Network {
	out := vmpodv1.Network{Name: n.str("name")}
	switch n.oneKey("network", "pod", "multus") {
	case "pod":
		p := n.object("pod")
		out.Pod = &vmpodv1.PodNetwork{}
		p.dropped("vmNetworkCIDR", "only masquerade uses it; dropped")
		p.dropped("vmIPv6NetworkCIDR", "only masquerade uses it; dropped")
	case "multus":
		m := n.object("multus")
		out.Multus = &vmpodv1.MultusNetwork{NetworkName: m.str("networkName")}
		out.Multus.Default, _ = m.boolean("default")
	}
	return out
}

func probe(p *node) *vmpodv1.Probe {
	out := &vmpodv1.Probe{}
	switch p.oneKey("probe handler", "guestAgentPing", "tcpSocket", "httpGet") {
	case "guestAgentPing":
		p.object("guestAgentPing")
		out.GuestAgentPing = &vmpodv1.GuestAgentPing{}
	case "tcpSocket":
		out.TCPSocket = &corev1.TCPSocketAction{}
		p.into("tcpSocket", out.TCPSocket)
	case "httpGet":
		out.HTTPGet = &corev1.HTTPGetAction{}
		p.into("httpGet", out.HTTPGet)
	default:
		return nil
	}
	for key, dst := range map[string]*int32{"initialDelaySeconds": &out.InitialDelaySeconds, "timeoutSeconds": &out.TimeoutSeconds,
		"periodSeconds": &out.PeriodSeconds, "successThreshold": &out.SuccessThreshold, "failureThreshold": &out.FailureThreshold} {
		if v, ok := p.integer(key); ok {
			*dst = int32(v)
		}
	}
	return out
}

func dataVolume(root *node) *vmpodv1.DataVolume {
	dv := &vmpodv1.DataVolume{TypeMeta: metav1.TypeMeta{APIVersion: vmpodv1.GroupVersion.String(), Kind: "DataVolume"}, ObjectMeta: objectMeta(root)}
	if s := root.required("spec"); s != nil {
		dv.Spec = dataVolumeSpec(s)
	}
	return dv
}

// migration converts a VirtualMachineInstanceMigration into a VirtualMachineMigration of
// the VM of the same name: a VM's instance has its VM's name in KubeVirt, and vmpod
// migrates VirtualMachines (a standalone VMI converts to one too). KubeVirt's cluster
// defaults are vmpod's (64 MiB/s, auto-converge, 800 s per GiB, 150 s without progress).
func migration(root *node) *vmpodv1.VirtualMachineMigration {
	m := &vmpodv1.VirtualMachineMigration{TypeMeta: metav1.TypeMeta{APIVersion: vmpodv1.GroupVersion.String(), Kind: "VirtualMachineMigration"}, ObjectMeta: objectMeta(root)}
	s := root.required("spec")
	if s == nil {
		return m
	}
	if m.Spec.VMName = s.str("vmiName"); m.Spec.VMName == "" {
		root.rep.errorf(s.at("vmiName"), "missing: the migration must name the VM instance to move")
	}
	s.unsupported("addedNodeSelector", "vmpod chooses the target node itself (another node that runs vmpod)")
	s.unsupported("sendTo", "migrations to another cluster are not supported")
	s.unsupported("receive", "migrations from another cluster are not supported")
	return m
}

// dataSource converts a CDI DataSource: the PVC it names.
func dataSource(root *node) *vmpodv1.DataSource {
	ds := &vmpodv1.DataSource{TypeMeta: metav1.TypeMeta{APIVersion: vmpodv1.GroupVersion.String(), Kind: vmpodv1.DataSourceKind}, ObjectMeta: objectMeta(root)}
	spec := root.required("spec")
	src := spec.required("source")
	if src == nil {
		return ds
	}
	switch src.oneKey("DataSource source", "pvc") {
	case "pvc":
		if p := src.object("pvc"); p != nil {
			ds.Spec.Source.PVC = vmpodv1.DataSourcePVC{Name: p.str("name"), Namespace: p.str("namespace")}
		}
	}
	return ds
}

func dataVolumeSpec(s *node) vmpodv1.DataVolumeSpec {
	var out vmpodv1.DataVolumeSpec
	which := ""
	switch hasSource, hasRef := s.has("source"), s.has("sourceRef"); {
	case hasSource && hasRef:
		s.rep.errorf(s.path, "more than one data source: source, sourceRef")
		s.ignore("source", "sourceRef")
	case hasSource:
		which = "source"
	case hasRef:
		which = "sourceRef"
	default:
		s.rep.errorf(s.at("source"), "missing (or sourceRef)")
	}
	switch which {
	case "source":
		out.Source = dataVolumeSource(s.object("source"))
	case "sourceRef":
		ref := s.object("sourceRef")
		if ref == nil {
			break
		}
		out.SourceRef = &vmpodv1.DataVolumeSourceRef{Kind: ref.str("kind"), Name: ref.str("name"), Namespace: ref.str("namespace")}
		if out.SourceRef.Kind != vmpodv1.DataSourceKind {
			ref.rep.errorf(ref.at("kind"), "%q is not supported (DataSource)", out.SourceRef.Kind)
		}
	}
	switch ct := s.str("contentType"); ct {
	case "", "kubevirt":
	case "archive":
		out.ContentType = vmpodv1.ContentTypeArchive
	default:
		s.rep.errorf(s.at("contentType"), "%q is not supported (kubevirt, archive)", ct)
	}
	var storage *node
	switch {
	case s.has("storage") && s.has("pvc"):
		s.rep.errorf(s.path, "both storage and pvc are set")
	case s.has("storage"):
		storage = s.object("storage")
	case s.has("pvc"):
		storage = s.object("pvc")
	default:
		s.rep.errorf(s.at("storage"), "missing")
	}
	if storage != nil {
		for _, m := range storage.strings("accessModes") {
			out.Storage.AccessModes = append(out.Storage.AccessModes, corev1.PersistentVolumeAccessMode(m))
		}
		if vm := storage.str("volumeMode"); vm != "" {
			out.Storage.VolumeMode = ptr.To(corev1.PersistentVolumeMode(vm))
		}
		if sc := storage.str("storageClassName"); sc != "" {
			out.Storage.StorageClassName = &sc
		}
		if r := storage.object("resources"); r != nil {
			out.Storage.Resources.Requests = resourceList(r, "requests")
			out.Storage.Resources.Limits = resourceList(r, "limits")
		}
		if out.Storage.Resources.Requests.Storage().IsZero() {
			s.rep.errorf(storage.at("resources.requests.storage"), "vmpod needs the size (CDI can infer it; vmpod does not)")
		}
	}
	s.dropped("preallocation", "preallocation is not supported; disks are sparse")
	s.dropped("priorityClassName", "importer Jobs have no priority class; dropped")
	s.unsupported("checkpoints", "multi-stage (warm) imports are not supported")
	s.unsupported("finalCheckpoint", "multi-stage (warm) imports are not supported")
	return out
}

func dataVolumeSource(src *node) vmpodv1.DataVolumeSource {
	var out vmpodv1.DataVolumeSource
	switch src.oneKey("DataVolume source", "http", "s3", "registry", "upload", "pvc", "blank") {
	case "http":
		h := src.object("http")
		out.HTTP = &vmpodv1.HTTPSource{URL: h.str("url"), SecretRef: h.str("secretRef"), CertConfigMap: h.str("certConfigMap"),
			ExtraHeaders: h.strings("extraHeaders"), SecretExtraHeaders: h.strings("secretExtraHeaders"), Checksum: h.str("checksum")}
	case "s3":
		h := src.object("s3")
		out.S3 = &vmpodv1.S3Source{URL: h.str("url"), SecretRef: h.str("secretRef"), CertConfigMap: h.str("certConfigMap"),
			Region: h.str("region"), Checksum: h.str("checksum")}
	case "registry":
		r := src.object("registry")
		out.Registry = &vmpodv1.RegistrySource{URL: r.str("url"), SecretRef: r.str("secretRef"), CertConfigMap: r.str("certConfigMap")}
		r.unsupported("imageStream", "OpenShift image streams are not supported")
		if pm := r.str("pullMethod"); pm == "node" {
			src.rep.warnf(r.at("pullMethod"), "vmpod's importer pulls the image itself (pullMethod pod)")
		}
		r.dropped("platform", "the image's platform is not selectable; dropped")
	case "pvc":
		p := src.object("pvc")
		out.PVC = &vmpodv1.PVCSource{Namespace: p.str("namespace"), Name: p.str("name")}
	case "upload":
		src.object("upload")
		out.Upload = &vmpodv1.UploadSource{}
	case "blank":
		src.object("blank")
		out.Blank = &vmpodv1.BlankSource{}
	}
	return out
}

// ErrNotKubeVirt is wrapped by Object's error for objects that are not KubeVirt's or
// CDI's at all (a Secret next to a VM, say): Stream passes them through.
var ErrNotKubeVirt = errors.New("not a KubeVirt or CDI object")

// ErrNotConverted is wrapped by Object's error for a KubeVirt or CDI kind vmpod has no
// equivalent of: passing it through would leave the user applying an object nothing
// serves (or KubeVirt's, if it is installed too), thinking it was converted.
var ErrNotConverted = errors.New("not converted")

// isKubeVirtGroup is KubeVirt's API groups: kubevirt.io and its subgroups
// (cdi., instancetype., migrations., snapshot., pool., export., clone., ...).
func isKubeVirtGroup(group string) bool {
	return group == "kubevirt.io" || strings.HasSuffix(group, ".kubevirt.io")
}

// notConverted says why a KubeVirt kind has no vmpod equivalent, and what to do instead.
func notConverted(group, kind string) string {
	switch {
	case kind == "VirtualMachineInstancePreset":
		return "presets (deprecated in KubeVirt) are not supported: use an instance type and a preference"
	case strings.HasPrefix(group, "migrations."):
		return "migration policies are not supported: a VirtualMachineMigration carries the same knobs itself (bandwidthMiB, autoConverge, completionTimeoutPerGiB, progressTimeoutSeconds, allowPostCopy)"
	case kind == "VirtualMachineInstanceReplicaSet" || strings.HasPrefix(group, "pool."):
		return "VM replica sets and pools are not supported: write a VirtualMachine per replica"
	case strings.HasPrefix(group, "snapshot.") || strings.HasPrefix(group, "export.") || strings.HasPrefix(group, "clone."):
		return "snapshots, exports and clones of VMs are not supported; clone a disk with a DataVolume whose source is its PVC"
	case group == "kubevirt.io" && kind == "KubeVirt", group == "cdi.kubevirt.io" && (kind == "CDI" || kind == "CDIConfig"):
		return "an installation's configuration: vmpod is configured on its nodes (/etc/vmpod/config.toml) and by its controller's flags"
	case kind == "DataImportCron":
		return "import crons are not supported: import with a DataVolume (and name its PVC in a DataSource)"
	}
	return "vmpod has no equivalent"
}

// nameOf is an object's metadata.name, for messages about objects not converted.
func nameOf(obj map[string]any) (string, bool) {
	meta, _ := obj["metadata"].(map[string]any)
	name, ok := meta["name"].(string)
	return name, ok
}
