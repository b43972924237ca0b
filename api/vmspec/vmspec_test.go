package vmspec

import (
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/vmpod/vmpod/api/machine"
)

// minimal is the smallest valid annotation; the defaults fill in the rest.
const minimal = `{"version":"v1alpha1","memoryMiB":128}`

// full uses every field.
const full = `{
  "version": "v1alpha1",
  "cpu": {"sockets": 1, "cores": 2, "threads": 1, "model": "host-passthrough"},
  "memoryMiB": 2048,
  "machine": "q35",
  "firmware": {"type": "uefi", "secureBoot": true},
  "features": {"acpi": true, "smm": true, "kvmHidden": true,
    "hyperv": {"relaxed": true, "vapic": true, "spinlocks": 8191, "vpindex": true, "synic": true, "synicTimer": true, "vendorID": "vmpod"}},
  "disks": [
    {"name": "root", "volume": "rootdisk", "source": "image", "bus": "virtio", "bootOrder": 1},
    {"name": "data", "volume": "data", "source": "file"},
    {"name": "fast", "volume": "fast", "source": "block", "bus": "scsi"},
    {"name": "iso", "volume": "installer", "source": "file", "device": "cdrom", "bus": "sata", "bootOrder": 2, "readOnly": true},
    {"name": "scratch", "source": "empty", "sizeMiB": 2048}
  ],
  "interfaces": [
    {"name": "default", "podInterface": "eth0"},
    {"name": "storage", "podInterface": "net1", "model": "e1000e", "macAddress": "02:00:00:00:00:01"}
  ],
  "cloudInit": {"userData": "#cloud-config\npassword: x\n", "networkData": "version: 2\n"},
  "accessCredentials": [{"secretVolume": "keys"}, {"secretVolume": "admin-keys", "propagation": "guestAgent", "users": ["vmpod", "Administrator"]}],
  "gpus": [{"name": "gpu1", "resourceName": "nvidia.com/GA102GL_A10"}],
  "hostDevices": [{"name": "nic1", "resourceName": "intel.com/sriov_netdevice"}],
  "migration": {"role": "target"}
}`

func TestParseValid(t *testing.T) {
	vm, err := Parse([]byte(minimal))
	if err != nil {
		t.Fatalf("Parse(minimal): %v", err)
	}
	on := true
	want := &VM{Version: Version, CPU: CPU{Sockets: 1, Cores: 1, Threads: 1}, MemoryMiB: 128, Machine: machine.Q35, Firmware: Firmware{Type: FirmwareBIOS},
		Features: Features{ACPI: &on, SMM: &on}}
	if !reflect.DeepEqual(vm, want) {
		t.Errorf("Parse(minimal) = %+v, want %+v", vm, want)
	}

	vm, err = Parse([]byte(full))
	if err != nil {
		t.Fatalf("Parse(full): %v", err)
	}
	if got := vm.CPU.VCPUs(); got != 2 {
		t.Errorf("VCPUs = %d, want 2", got)
	}
	if d := vm.Disks[1]; d.Bus != BusVirtio || d.Device != DeviceDisk {
		t.Errorf("disks[1] defaults: bus %q device %q, want virtio disk", d.Bus, d.Device)
	}
	if p := vm.AccessCredentials[0].Propagation; p != PropagateNoCloud {
		t.Errorf("accessCredentials[0].propagation defaults to %q, want noCloud", p)
	}
	if vm.Interfaces[0].Model != ModelVirtio || vm.CloudInit.Bus != BusVirtio {
		t.Errorf("defaults not applied: interface model %q, cloud-init bus %q", vm.Interfaces[0].Model, vm.CloudInit.Bus)
	}

	// Encode writes the defaults explicitly and Parse reads back the same spec.
	enc, err := vm.Encode()
	if err != nil {
		t.Fatalf("Encode: %v", err)
	}
	again, err := Parse(enc)
	if err != nil {
		t.Fatalf("Parse(Encode(full)): %v\n%s", err, enc)
	}
	if !reflect.DeepEqual(vm, again) {
		t.Errorf("round trip changed the spec:\n%+v\n%+v", vm, again)
	}
}

func TestParseInvalid(t *testing.T) {
	for _, tc := range []struct {
		name string
		json string
		// every listed error must be reported, and nothing else
		want []string
	}{
		{"not json", `{"version":`, []string{"is not JSON"}},
		{"trailing data", minimal + `{}`, []string{"trailing data"}},
		{"not an object", `[]`, []string{"vmpod.dev/vm: must be an object, got a list"}},
		{"no version", `{"memoryMiB":128}`, []string{`version: must be "v1alpha1", got nothing`}},
		{"future version", `{"version":"v2","memoryMiB":128}`, []string{`version: must be "v1alpha1", got "v2"`}},
		{"unknown top-level field", `{"version":"v1alpha1","memoryMiB":128,"qemuArgs":["-device","x"]}`,
			[]string{"qemuArgs: unknown field"}},
		{"host path smuggled into a disk", `{"version":"v1alpha1","memoryMiB":128,"disks":[{"name":"a","volume":"a","source":"file"},{"name":"b","volume":"b","source":"file","hostPath":"/etc/shadow"}]}`,
			[]string{"disks[1].hostPath: unknown field"}},
		{"kernel command line", `{"version":"v1alpha1","memoryMiB":128,"kernel":{"cmdline":"init=/bin/sh"}}`,
			[]string{"kernel: unknown field"}},
		{"wrong types", `{"version":"v1alpha1","memoryMiB":"128","cpu":{"cores":1.5},"disks":{}}`,
			[]string{`memoryMiB: must be an integer, got "128"`, "cpu.cores: 1.5 is not an integer in range", "disks: must be a list, got an object"}},
		{"int overflow", `{"version":"v1alpha1","memoryMiB":99999999999999999999}`,
			[]string{"memoryMiB: 99999999999999999999 is not an integer in range"}},
		{"too little memory", `{"version":"v1alpha1","memoryMiB":1}`, []string{"memoryMiB: must be between 16"}},
		{"ports on a bridge", `{"version":"v1alpha1","memoryMiB":128,"interfaces":[{"name":"a","podInterface":"eth0","ports":[{"port":80}]}]}`, []string{"interfaces[0].ports: only the masquerade binding"}},
		{"bad ports", `{"version":"v1alpha1","memoryMiB":128,"interfaces":[{"name":"a","podInterface":"eth0","binding":"masquerade","ports":[{"port":0},{"port":80,"protocol":"SCTP"},{"port":22},{"port":22}]}]}`,
			[]string{"interfaces[0].ports[0].port: must be between 1 and 65535", "interfaces[0].ports[1].protocol: must be TCP or UDP", "interfaces[0].ports[3]: TCP/22 is also ports[2]"}},
		{"the migration port forwarded", `{"version":"v1alpha1","memoryMiB":128,"interfaces":[{"name":"a","podInterface":"eth0","binding":"masquerade","ports":[{"port":49152}]}]}`,
			[]string{"interfaces[0].ports[0].port: TCP 49152 is the port a migration target receives its guest on"}},
		{"two masquerades", `{"version":"v1alpha1","memoryMiB":128,"interfaces":[{"name":"a","podInterface":"eth0","binding":"masquerade"},{"name":"b","podInterface":"net1","binding":"masquerade"}]}`,
			[]string{"interfaces[1].binding: masquerade is also the binding of interfaces[0]"}},
		{"bad binding", `{"version":"v1alpha1","memoryMiB":128,"interfaces":[{"name":"a","podInterface":"eth0","binding":"sriov"}]}`, []string{`interfaces[0].binding: must be bridge or masquerade, got "sriov"`}},
		{"bad uuid", `{"version":"v1alpha1","memoryMiB":128,"uuid":"../../etc"}`, []string{`uuid: must be a lowercase UUID`}},
		{"too many vcpus", `{"version":"v1alpha1","memoryMiB":128,"cpu":{"sockets":2,"cores":512}}`,
			[]string{"cpu: sockets*cores*threads is 1024 vCPUs"}},
		{"growth room below the boot size", `{"version":"v1alpha1","memoryMiB":128,"maxMemoryMiB":64,"cpu":{"sockets":2,"maxSockets":1}}`,
			[]string{"cpu.maxSockets: must be between sockets (2) and 512, got 1", "maxMemoryMiB: must be between memoryMiB (128) and"}},
		{"growth room too large or in part blocks", `{"version":"v1alpha1","memoryMiB":128,"maxMemoryMiB":129,"cpu":{"sockets":2,"cores":4,"maxSockets":200}}`,
			[]string{"cpu.maxSockets: maxSockets*cores*threads is 800 vCPUs", "maxMemoryMiB: the room above memoryMiB (1 MiB) must be whole 2 MiB blocks"}},
		{"access credentials", `{"version":"v1alpha1","memoryMiB":128,"disks":[{"name":"a","volume":"v1","source":"file"}],"accessCredentials":[
			{"secretVolume":"k1"},
			{"secretVolume":"k1","propagation":"guestAgent"},
			{"secretVolume":"v1","propagation":"guestAgent","users":["root","-rf","../x"]},
			{"secretVolume":"k4","propagation":"configDrive","users":["root"]},
			{"secretVolume":"/etc/ssh","propagation":"guestAgent","users":["root"]}]}`,
			[]string{"accessCredentials[0].propagation: noCloud puts the keys in cloud-init's meta-data: the VM needs cloudInit",
				`accessCredentials[1].secretVolume: "k1" is used twice in accessCredentials`,
				"accessCredentials[1].users: propagation guestAgent needs at least one user",
				`accessCredentials[2].secretVolume: volume "v1" is also a disk`,
				`accessCredentials[2].users[1]: must be a user name`, `accessCredentials[2].users[2]: must be a user name`,
				`accessCredentials[3].propagation: must be noCloud or guestAgent, got "configDrive"`,
				`accessCredentials[4].secretVolume: must be a DNS label`}},
		{"empty disks", `{"version":"v1alpha1","memoryMiB":128,"disks":[
			{"name":"a","source":"empty"},
			{"name":"b","volume":"v","source":"empty","sizeMiB":1},
			{"name":"c","source":"empty","sizeMiB":1,"device":"cdrom","bus":"sata"},
			{"name":"d","volume":"d","source":"file","sizeMiB":10}]}`,
			[]string{"disks[0].sizeMiB: must be between 1 and", `disks[1].volume: an empty disk has no volume, got "v"`,
				"disks[2].device: an empty disk is a disk, not a cdrom", "disks[3].sizeMiB: only an empty disk has a size"}},
		{"negative cpu", `{"version":"v1alpha1","memoryMiB":128,"cpu":{"threads":-1}}`,
			[]string{"cpu.threads: must be between 1 and 512, got -1"}},
		{"bad machine and firmware", `{"version":"v1alpha1","memoryMiB":128,"machine":"pc","firmware":{"type":"coreboot"}}`,
			[]string{`machine: must be q35, got "pc"`, `firmware.type: must be bios or uefi, got "coreboot"`}},
		{"secure boot needs uefi", `{"version":"v1alpha1","memoryMiB":128,"firmware":{"type":"bios","secureBoot":true}}`,
			[]string{"firmware.secureBoot: needs firmware.type uefi"}},
		{"microvm", `{"version":"v1alpha1","memoryMiB":128,"machine":"microvm"}`,
			[]string{"machine: microvm boots only a kernel, not a disk through firmware: use q35"}},
		{"path as a volume name", `{"version":"v1alpha1","memoryMiB":128,"disks":[{"name":"root","volume":"../../etc","source":"file"}]}`,
			[]string{`disks[0].volume: must be a DNS label (lower-case a-z 0-9 -, at most 63), got "../../etc"`}},
		{"disk problems", `{"version":"v1alpha1","memoryMiB":128,"disks":[
			{"name":"a","volume":"v1","source":"nfs","bootOrder":1},
			{"name":"a","volume":"v1","source":"file","device":"cdrom","bootOrder":1},
			{"name":"c","volume":"v3","source":"file","device":"floppy","bootOrder":-1}]}`,
			[]string{`disks[0].source: must be image, file, block or empty, got "nfs"`,
				`disks[1].name: "a" is used twice in disks`, `disks[1].volume: volume "v1" is already used by another disk`,
				"disks[1].bus: a cdrom needs bus sata or scsi", "disks[1].bootOrder: 1 is also the boot order of disks[0]",
				`disks[2].device: must be disk or cdrom, got "floppy"`, "disks[2].bootOrder: must not be negative"}},
		{"interface problems", `{"version":"v1alpha1","memoryMiB":128,"interfaces":[
			{"name":"a","podInterface":"eth0","macAddress":"01:00:5e:00:00:01"},
			{"name":"b","podInterface":"eth0","model":"rtl8139"},
			{"name":"c","podInterface":"eth/../1","macAddress":"zz"}]}`,
			[]string{"interfaces[0].macAddress: 01:00:5e:00:00:01 is a multicast address",
				`interfaces[1].podInterface: "eth0" is also used by interfaces[0]`, `interfaces[1].model: must be virtio, e1000 or e1000e, got "rtl8139"`,
				`interfaces[2].podInterface: must be a network interface name`, `interfaces[2].macAddress: must be a 6-byte MAC address`}},
		{"cloud-init both", `{"version":"v1alpha1","memoryMiB":128,"cloudInit":{"userData":"x","secretVolume":"ci"}}`,
			[]string{"cloudInit: has both inline data and secretVolume"}},
		{"cloud-init empty", `{"version":"v1alpha1","memoryMiB":128,"cloudInit":{}}`,
			[]string{"cloudInit: needs userData, networkData or secretVolume"}},
		{"cloud-init volume is a disk", `{"version":"v1alpha1","memoryMiB":128,"disks":[{"name":"a","volume":"ci","source":"file"}],"cloudInit":{"secretVolume":"ci"}}`,
			[]string{`cloudInit.secretVolume: volume "ci" is also a disk`}},
		{"devices", `{"version":"v1alpha1","memoryMiB":128,"gpus":[{"name":"g","resourceName":"gpu"}],
			"hostDevices":[{"name":"g","resourceName":"kubernetes.io/memory"}]}`,
			[]string{`gpus[0].resourceName: must be an extended resource name like vendor.com/device, got "gpu"`,
				`hostDevices[0].name: "g" is used twice in gpus and hostDevices`, `hostDevices[0].resourceName: "kubernetes.io/memory" is a native resource`}},
		{"feature shapes", `{"version":"v1alpha1","memoryMiB":128,"features":{"acpi":"yes","hyperv":{"synic":true,"passthrough":true}}}`,
			[]string{"features.acpi: must be true or false",
				"features.hyperv.passthrough: unknown field"}},
		{"cpu model and feature rules", `{"version":"v1alpha1","memoryMiB":128,"cpu":{"model":"qemu64,+vmx"},"firmware":{"type":"uefi","secureBoot":true},
			"features":{"smm":false,"hyperv":{"synic":true,"ipi":true,"evmcs":true,"spinlocks":100,"vendorID":"a,b"}}}`,
			[]string{`cpu.model: "qemu64,+vmx" is not a CPU model name`, "features.smm: secure boot needs SMM",
				"features.hyperv: synic needs vpindex; ipi needs vpindex; evmcs needs vapic; spinlocks 100: want 0 (off) or 4096 to 4294967295; " +
					`vendorID "a,b": want 1-12 letters or digits`}},
		{"migration role", `{"version":"v1alpha1","memoryMiB":128,"migration":{"role":"both"}}`,
			[]string{`migration.role: must be target (a source is any running VM pod), got "both"`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			vm, err := Parse([]byte(tc.json))
			if err == nil {
				t.Fatalf("Parse accepted %s as %+v", tc.json, vm)
			}
			msg := err.Error()
			lines := strings.Split(msg, "\n")
			if len(lines) != len(tc.want) {
				t.Errorf("got %d errors, want %d:\n%s", len(lines), len(tc.want), msg)
			}
			for _, w := range tc.want {
				if !strings.Contains(msg, w) {
					t.Errorf("error does not contain %q:\n%s", w, msg)
				}
			}
		})
	}
}

func TestFieldErrorsAreTyped(t *testing.T) {
	_, err := Parse([]byte(`{"version":"v1alpha1","memoryMiB":128,"disks":[{"name":"a","volume":"A","source":"file"}]}`))
	var fe *FieldError
	if !errors.As(err, &fe) || fe.Path != "disks[0].volume" {
		t.Fatalf("errors.As(%v) = %+v, want a FieldError for disks[0].volume", err, fe)
	}
}

func TestEncodeRejectsInvalid(t *testing.T) {
	vm := &VM{Version: Version, MemoryMiB: 64, Disks: []Disk{{Name: "root", Volume: "/var/lib/images", Source: SourceFile}}}
	if _, err := vm.Encode(); err == nil || !strings.Contains(err.Error(), "disks[0].volume") {
		t.Fatalf("Encode of a path as a volume: err = %v, want a disks[0].volume error", err)
	}
	if vm.Disks[0].Bus != "" {
		t.Errorf("Encode changed its receiver (bus %q)", vm.Disks[0].Bus)
	}
}

func TestParseRejectsOversize(t *testing.T) {
	big := `{"version":"v1alpha1","memoryMiB":128,"cloudInit":{"userData":"` + strings.Repeat("x", MaxSize) + `"}}`
	if _, err := Parse([]byte(big)); err == nil || !strings.Contains(err.Error(), "more than") {
		t.Fatalf("Parse of %d bytes: err = %v, want a size error", len(big), err)
	}
}

func TestPaths(t *testing.T) {
	if got := VolumeMountPath("rootdisk"); got != "/vmpod/volumes/rootdisk" {
		t.Errorf("VolumeMountPath = %q", got)
	}
	if got := BlockDevicePath("fast"); got != "/vmpod/devices/fast" {
		t.Errorf("BlockDevicePath = %q", got)
	}
}

// FuzzParse: Parse never panics, and whatever it accepts is valid, encodes, and parses back
// to the same spec (so the controller's Encode and the shim's Parse agree).
func FuzzParse(f *testing.F) {
	for _, s := range []string{minimal, full, `{}`, `null`, `{"version":"v1alpha1","memoryMiB":128,"disks":[{"name":"a"}]}`,
		`{"version":"v1alpha1","memoryMiB":128,"cpu":{"sockets":512}}`, `{"version":"v1alpha1","memoryMiB":16,"machine":"microvm"}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		vm, err := Parse(data)
		if err != nil {
			return
		}
		if err := vm.Validate(); err != nil {
			t.Fatalf("Parse returned a spec that does not validate: %v", err)
		}
		enc, err := vm.Encode()
		if err != nil {
			t.Fatalf("Encode of a parsed spec: %v", err)
		}
		again, err := Parse(enc)
		if err != nil {
			t.Fatalf("Parse(Encode(vm)): %v\n%s", err, enc)
		}
		if !reflect.DeepEqual(normalize(vm), normalize(again)) {
			t.Fatalf("round trip changed the spec:\n%+v\n%+v", vm, again)
		}
	})
}

// normalize makes empty and nil lists compare equal (JSON cannot tell them apart).
func normalize(vm *VM) string {
	b, _ := json.Marshal(vm)
	return string(b)
}
