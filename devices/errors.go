package devices

import "fmt"

// FieldError is invalid input: which device (or "machine"), which field, and why.
type FieldError struct {
	Device  string // e.g. `virtio-blk "disk0"` or "machine"
	Field   string // the Go field name, e.g. "Path"; empty when the device as a whole is at fault
	Problem string
}

func (e *FieldError) Error() string {
	if e.Field == "" {
		return fmt.Sprintf("devices: %s: %s", e.Device, e.Problem)
	}
	return fmt.Sprintf("devices: %s: %s: %s", e.Device, e.Field, e.Problem)
}
