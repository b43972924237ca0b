package qmp

import "context"

// PCIBus is one entry of query-pci: a root bus and what sits on it.
type PCIBus struct {
	Bus     int         `json:"bus"`
	Devices []PCIDevice `json:"devices"`
}

// PCIDevice is a PCI function as query-pci reports it.
type PCIDevice struct {
	Bus       int            `json:"bus"`
	Slot      int            `json:"slot"`
	Function  int            `json:"function"`
	QDevID    string         `json:"qdev_id"` // "" for devices without an id
	ClassInfo PCIClass       `json:"class_info"`
	ID        PCIDeviceID    `json:"id"`
	Bridge    *PCIBridgeInfo `json:"pci_bridge,omitempty"`
}

// PCIClass is a device's PCI class.
type PCIClass struct {
	Class int    `json:"class"`
	Desc  string `json:"desc,omitempty"`
}

// PCIDeviceID is a device's vendor and device id.
type PCIDeviceID struct {
	Vendor int `json:"vendor"`
	Device int `json:"device"`
}

// PCIBridgeInfo is what sits behind a bridge or root port.
type PCIBridgeInfo struct {
	Bus     PCIBridgeBus `json:"bus"`
	Devices []PCIDevice  `json:"devices,omitempty"`
}

// PCIBridgeBus numbers the buses behind a bridge.
type PCIBridgeBus struct {
	Number      int `json:"number"`
	Secondary   int `json:"secondary"`
	Subordinate int `json:"subordinate"`
}

// QueryPCI lists the PCI buses and devices (query-pci).
func (m *Monitor) QueryPCI(ctx context.Context) ([]PCIBus, error) {
	var buses []PCIBus
	err := m.run(ctx, "query-pci", "", nil, &buses)
	return buses, err
}

// FlattenPCI lists every device of buses, depth first, including those behind
// bridges and root ports.
func FlattenPCI(buses []PCIBus) []PCIDevice {
	var out []PCIDevice
	var walk func([]PCIDevice)
	walk = func(devs []PCIDevice) {
		for _, d := range devs {
			out = append(out, d)
			if d.Bridge != nil {
				walk(d.Bridge.Devices)
			}
		}
	}
	for _, b := range buses {
		walk(b.Devices)
	}
	return out
}

// ChardevInfo is one entry of query-chardev.
type ChardevInfo struct {
	Label        string `json:"label"`
	Filename     string `json:"filename"` // backend description, e.g. "unix:/run/x.sock,server=on"
	FrontendOpen bool   `json:"frontend-open"`
}

// QueryChardev lists the character devices (query-chardev).
func (m *Monitor) QueryChardev(ctx context.Context) ([]ChardevInfo, error) {
	var cs []ChardevInfo
	err := m.run(ctx, "query-chardev", "", nil, &cs)
	return cs, err
}
