package qmp

import (
	"encoding/json"
	"errors"
	"testing"
)

// FuzzDecodeReplies: a reply or event from QEMU, whatever its bytes, decodes into every
// type this package reads or is refused with a *ReplyError naming a field under its root;
// it never panics, and what is accepted passes its own validation.
func FuzzDecodeReplies(f *testing.F) {
	for _, s := range []string{
		`{"running": true, "status": "running"}`, `{"running": "yes", "status": "running"}`, `{"status": "flying"}`,
		`[{"type": "qemu64-x86_64-cpu", "vcpus-count": 1, "props": {"socket-id": 0, "core-id": 0, "thread-id": 0}}]`,
		`[{"cpu-index": 0, "thread-id": 1234, "qom-path": "/machine/unattached/device[0]"}]`,
		`{"status": "active", "ram": {"transferred": 1, "remaining": 2, "total": 3}}`,
		`[{"bus": 0, "devices": [{"bus": 0, "slot": 1, "function": 0, "qdev_id": "x"}]}]`,
		`[{"label": "serial0", "filename": "pty:/dev/pts/1"}]`, `[{"name": "type", "type": "string"}]`,
		`{"guest": false, "reason": "host-signal"}`, `{"device": "vmem0", "path": "/machine/peripheral/vmem0"}`,
		`null`, `[]`, `{}`, `[null]`, `{"status": null}`,
	} {
		f.Add([]byte(s))
	}
	targets := []func() any{
		func() any { return new(Status) },
		func() any { return new([]HotpluggableCPU) },
		func() any { return new([]VCPU) },
		func() any { return new(migrationInfoReply) },
		func() any { return new([]PCIBus) },
		func() any { return new([]ChardevInfo) },
		func() any { return new([]BlockInfo) },
		func() any { return new([]ObjectProperty) },
		func() any { return new(ShutdownEvent) },
		func() any { return new(DeviceDeletedEvent) },
		func() any { return new(MigrationEvent) },
		func() any { return new(MemoryDeviceSizeChangeEvent) },
		func() any { return new(ACPIDeviceOSTEvent) },
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, newTarget := range targets {
			v := newTarget()
			err := decodeStrict("fuzz", "return", json.RawMessage(data), v)
			if err == nil {
				if val, ok := v.(interface{ validate() *ReplyError }); ok {
					if verr := val.validate(); verr != nil {
						t.Fatalf("%T accepted but invalid: %v", v, verr)
					}
				}
				continue
			}
			var re *ReplyError
			if !errors.As(err, &re) || re.Field == "" || re.Source != "fuzz" {
				t.Fatalf("%T: error %v (%T) is not a *ReplyError naming a field", v, err, err)
			}
		}
	})
}
