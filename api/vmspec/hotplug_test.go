package vmspec

import (
	"strings"
	"testing"
)

func TestParseHotplugDisk(t *testing.T) {
	vm := &VM{Disks: []Disk{{Name: "root", Volume: "root", Source: SourceFile}}}
	d, err := ParseHotplugDisk([]byte(`{"name": "data", "volume": "data", "source": "block", "readOnly": true}`), vm)
	if err != nil || d != (HotplugDisk{Disk: Disk{Name: "data", Volume: "data", Source: SourceBlock, Device: DeviceDisk, Bus: BusVirtio, ReadOnly: true}}) {
		t.Fatalf("ParseHotplugDisk = %+v, %v", d, err)
	}
	// a volume an attachment pod mounts: the pod by its UID
	const uid = "0b6e8a47-3f1c-4d2e-9a55-2f0d8c1e7b90"
	d, err = ParseHotplugDisk([]byte(`{"name": "data", "volume": "data", "source": "file", "attachmentPod": "`+uid+`"}`), vm)
	if err != nil || d != (HotplugDisk{Disk: Disk{Name: "data", Volume: "data", Source: SourceFile, Device: DeviceDisk, Bus: BusVirtio}, AttachmentPod: uid}) {
		t.Fatalf("ParseHotplugDisk with an attachment pod = %+v, %v", d, err)
	}
	for disk, want := range map[string]string{
		`{"name": "root", "volume": "data", "source": "file"}`:                                   `disk.name: "root" is the name of disks[0]`,
		`{"name": "data", "volume": "root", "source": "file"}`:                                   `disk.volume: volume "root" is disks[0]'s`,
		`{"name": "data", "volume": "data", "source": "image"}`:                                  "disk.source: must be file or block",
		`{"name": "data", "volume": "data", "source": "empty", "sizeMiB": 10}`:                   "disk.sizeMiB: only an empty disk has a size",
		`{"name": "data", "volume": "data", "source": "file", "bus": "sata"}`:                    "disk.bus: must be virtio",
		`{"name": "data", "volume": "data", "source": "file", "device": "cdrom"}`:                "disk.device: must be disk",
		`{"name": "data", "volume": "data", "source": "file", "bootOrder": 1}`:                   "disk.bootOrder: a hot-plugged disk does not boot",
		`{"name": "Data", "volume": "data", "source": "file"}`:                                   "disk.name: must be a DNS label",
		`{"name": "data", "volume": "../etc", "source": "file"}`:                                 "disk.volume: must be a DNS label",
		`{"name": "data", "volume": "data", "source": "file", "path": "/dev/sda"}`:               "disk.path: unknown field",
		`{"name": "data", "volume": "data", "source": "file", "readOnly": "yes"}`:                "disk.readOnly",
		`{"name": "a-name-of-21-letters1", "volume": "data", "source": "file"}`:                  "at most 20",
		`{"name": "cloudinit", "volume": "data", "source": "file"}`:                              "the cloud-init disk's",
		`{"name": "data", "volume": "data", "source": "file", "attachmentPod": "a\"||labels.x"}`: "disk.attachmentPod: must be a pod's UID",
		`{"name": "data", "volume": "data", "source": "file", "attachmentPod": 7}`:               "disk.attachmentPod: must be a string",
		`{"name": "data"} {}`: "trailing data",
		`[1]`:                 "disk: must be an object",
	} {
		if _, err := ParseHotplugDisk([]byte(disk), vm); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("ParseHotplugDisk(%s) = %v, want an error with %q", disk, err, want)
		}
	}
}
