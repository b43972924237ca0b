package qmp

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
)

// DeviceOptions are the arguments of device_add.
type DeviceOptions struct {
	Driver string // e.g. "virtio-blk-pci"
	ID     string // qdev id, later used by DeviceDel
	Bus    string // e.g. a pcie-root-port id; empty lets QEMU choose
	Props  []Prop // the driver's own properties
}

// Prop is one device property. Value is its JSON encoding; StringProp, IntProp and
// BoolProp build the common cases.
type Prop struct {
	Name  string
	Value json.RawMessage
}

// StringProp is a string-valued property.
func StringProp(name, value string) Prop {
	return Prop{Name: name, Value: json.RawMessage(strconv.Quote(value))}
}

// IntProp is an integer-valued property.
func IntProp(name string, value int64) Prop {
	return Prop{Name: name, Value: json.RawMessage(strconv.FormatInt(value, 10))}
}

// BoolProp is a boolean property.
func BoolProp(name string, value bool) Prop {
	return Prop{Name: name, Value: json.RawMessage(strconv.FormatBool(value))}
}

// MarshalJSON renders device_add's flat argument object: driver, id and bus next to
// the driver's properties.
func (d DeviceOptions) MarshalJSON() ([]byte, error) {
	args := map[string]json.RawMessage{
		"driver": json.RawMessage(strconv.Quote(d.Driver)),
		"id":     json.RawMessage(strconv.Quote(d.ID)),
	}
	if d.Bus != "" {
		args["bus"] = json.RawMessage(strconv.Quote(d.Bus))
	}
	for _, p := range d.Props {
		if _, dup := args[p.Name]; dup {
			return nil, fmt.Errorf("device %s: property %q given twice", d.ID, p.Name)
		}
		if !json.Valid(p.Value) {
			return nil, fmt.Errorf("device %s: property %q: invalid JSON value %q", d.ID, p.Name, p.Value)
		}
		args[p.Name] = p.Value
	}
	return json.Marshal(args)
}

// DeviceAdd plugs a device (device_add).
func (m *Monitor) DeviceAdd(ctx context.Context, d DeviceOptions) error {
	return m.run(ctx, "device_add", d.ID, d, nil)
}

// DeviceDel unplugs a device and waits, within ctx, until QEMU reports it gone
// (DEVICE_DELETED). On q35 that needs the guest's cooperation: QEMU asks the guest
// to eject the device (ACPI or PCIe hotplug) and only deletes it once the guest
// lets go, so ctx must allow for a busy guest. A guest that never answers leaves the
// device in place and DeviceDel returns ctx's error; repeating device_del is
// harmless.
func (m *Monitor) DeviceDel(ctx context.Context, id string) error {
	sub := m.Subscribe(DeviceDeletedFilter(id))
	defer sub.Close()
	if err := m.RequestDeviceDel(ctx, id); err != nil {
		return err
	}
	if _, err := sub.Next(ctx); err != nil {
		return commandFailed("device_del", id, fmt.Errorf("waiting for DEVICE_DELETED: %w", err))
	}
	return nil
}

// RequestDeviceDel asks QEMU to unplug a device (device_del) and returns without waiting,
// for a device whose removal the caller tells by other means: a vCPU's slot in
// query-hotpluggable-cpus (measured: QEMU 7.2 under TCG removes an ejected vCPU without
// sending DEVICE_DELETED).
func (m *Monitor) RequestDeviceDel(ctx context.Context, id string) error {
	return m.run(ctx, "device_del", id, idArgs{id}, nil)
}

// ObjectProperty is one entry of qom-list.
type ObjectProperty struct {
	Name string `json:"name"`
	Type string `json:"type"` // "child<virtio-blk-pci>", "link<...>", "uint64", ...
}

// QOMList lists the properties (and children) of the QOM object at path (qom-list).
func (m *Monitor) QOMList(ctx context.Context, path string) ([]ObjectProperty, error) {
	var props []ObjectProperty
	err := m.run(ctx, "qom-list", path, struct {
		Path string `json:"path"`
	}{path}, &props)
	return props, err
}

type qomProperty struct {
	Path     string `json:"path"`
	Property string `json:"property"`
	Value    any    `json:"value,omitempty"`
}

// QOMGet reads a QOM property (qom-get) into a T, e.g.
// QOMGet[uint64](ctx, m, "/machine/peripheral/mem0", "size").
func QOMGet[T any](ctx context.Context, m *Monitor, path, property string) (T, error) {
	var v T
	err := m.run(ctx, "qom-get", path+" "+property, qomProperty{Path: path, Property: property}, &v)
	return v, err
}

// QOMSet writes a QOM property (qom-set), e.g. a virtio-mem device's
// "requested-size".
func QOMSet[T any](ctx context.Context, m *Monitor, path, property string, value T) error {
	return m.run(ctx, "qom-set", path+" "+property, qomProperty{Path: path, Property: property, Value: value}, nil)
}

// PeripheralPath is the QOM path of the device with qdev id id.
func PeripheralPath(id string) string { return "/machine/peripheral/" + id }
