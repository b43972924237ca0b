package qmp

import "fmt"

// Names of the events this package decodes.
const (
	EventShutdown               = "SHUTDOWN"
	EventDeviceDeleted          = "DEVICE_DELETED"
	EventMigration              = "MIGRATION"
	EventMemoryDeviceSizeChange = "MEMORY_DEVICE_SIZE_CHANGE"
	EventACPIDeviceOST          = "ACPI_DEVICE_OST"
)

// ShutdownEvent is the data of SHUTDOWN: QEMU is about to stop the VM (and, with
// -no-reboot or after quit, to exit).
type ShutdownEvent struct {
	Guest  bool   `json:"guest"`  // the guest asked for it (ACPI poweroff, reboot with -no-reboot)
	Reason string `json:"reason"` // e.g. "guest-shutdown", "host-qmp-quit", "host-signal"
}

// DeviceDeletedEvent is the data of DEVICE_DELETED. QEMU also sends it for the
// internal children of a device (".../virtio-backend", without Device), so match
// on Device.
type DeviceDeletedEvent struct {
	Device string `json:"device,omitempty"` // qdev id; empty for devices without one
	Path   string `json:"path"`             // QOM path
}

// MigrationEvent is the data of MIGRATION, sent on each status change when the
// "events" migration capability is on.
type MigrationEvent struct {
	Status MigrationStatus `json:"status"`
}

func (e *MigrationEvent) validate() *ReplyError { return e.Status.validate("status") }

// MemoryDeviceSizeChangeEvent is the data of MEMORY_DEVICE_SIZE_CHANGE: the guest
// plugged or unplugged virtio-mem blocks.
type MemoryDeviceSizeChangeEvent struct {
	ID      string `json:"id,omitempty"`
	Size    uint64 `json:"size"` // bytes now plugged
	QOMPath string `json:"qom-path,omitempty"`
}

// ACPIDeviceOSTEvent is the data of ACPI_DEVICE_OST: the guest's _OST answer to an
// ACPI hotplug or eject request (vCPU hotplug reports here).
type ACPIDeviceOSTEvent struct {
	Info ACPIOSTInfo `json:"info"`
}

// ACPIOSTInfo is the guest's status for one ACPI slot.
type ACPIOSTInfo struct {
	Device   string `json:"device,omitempty"` // qdev id, if any
	Slot     string `json:"slot"`
	SlotType string `json:"slot-type"` // "DIMM" or "CPU"
	Source   int    `json:"source"`    // ACPI event that started it: 1 insert, 3 eject
	Status   int    `json:"status"`    // 0 success, others failures per the ACPI spec
}

// AsShutdown decodes a SHUTDOWN event.
func (e Event) AsShutdown() (ShutdownEvent, error) {
	var d ShutdownEvent
	return d, e.decodeAs(EventShutdown, &d)
}

// AsDeviceDeleted decodes a DEVICE_DELETED event.
func (e Event) AsDeviceDeleted() (DeviceDeletedEvent, error) {
	var d DeviceDeletedEvent
	return d, e.decodeAs(EventDeviceDeleted, &d)
}

// AsMigration decodes a MIGRATION event.
func (e Event) AsMigration() (MigrationEvent, error) {
	var d MigrationEvent
	return d, e.decodeAs(EventMigration, &d)
}

// AsMemoryDeviceSizeChange decodes a MEMORY_DEVICE_SIZE_CHANGE event.
func (e Event) AsMemoryDeviceSizeChange() (MemoryDeviceSizeChangeEvent, error) {
	var d MemoryDeviceSizeChangeEvent
	return d, e.decodeAs(EventMemoryDeviceSizeChange, &d)
}

// AsACPIDeviceOST decodes an ACPI_DEVICE_OST event.
func (e Event) AsACPIDeviceOST() (ACPIDeviceOSTEvent, error) {
	var d ACPIDeviceOSTEvent
	return d, e.decodeAs(EventACPIDeviceOST, &d)
}

func (e Event) decodeAs(name string, v any) error {
	if e.Name != name {
		return fmt.Errorf("qmp: event is %s, not %s", e.Name, name)
	}
	if err := e.Decode(v); err != nil {
		return fmt.Errorf("qmp: %w", err)
	}
	return nil
}

// DeviceDeletedFilter selects the DEVICE_DELETED event of the device with qdev id id
// (not those of its internal children).
func DeviceDeletedFilter(id string) Filter {
	return func(e Event) bool {
		if e.Name != EventDeviceDeleted {
			return false
		}
		d, err := e.AsDeviceDeleted()
		return err == nil && d.Device == id
	}
}

// MemoryDeviceSizeChangeFilter selects MEMORY_DEVICE_SIZE_CHANGE events of the
// memory device with qdev id id.
func MemoryDeviceSizeChangeFilter(id string) Filter {
	return func(e Event) bool {
		if e.Name != EventMemoryDeviceSizeChange {
			return false
		}
		d, err := e.AsMemoryDeviceSizeChange()
		return err == nil && d.ID == id
	}
}
