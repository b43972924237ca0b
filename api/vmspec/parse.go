package vmspec

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strconv"
	"strings"

	"github.com/vmpod/vmpod/api/machine"
)

// Parse decodes, defaults and validates an annotation value. It is strict: unknown fields,
// wrong JSON types, trailing data and values above MaxSize are errors, each naming the field
// path, because an annotation the shim half-understands must never start a VM.
func Parse(data []byte) (*VM, error) {
	if len(data) > MaxSize {
		return nil, fmt.Errorf("%s annotation: %d bytes is more than the %d an annotation can hold", Annotation, len(data), MaxSize)
	}
	var raw any
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	if err := dec.Decode(&raw); err != nil {
		return nil, fmt.Errorf("%s annotation is not JSON: %w", Annotation, err)
	}
	if dec.More() {
		return nil, fmt.Errorf("%s annotation: trailing data after the JSON object", Annotation)
	}
	if err := checkShape(raw, reflect.TypeFor[VM](), ""); err != nil {
		return nil, err
	}
	// The version decides how the rest is read, so it is checked before anything else.
	if m, _ := raw.(map[string]any); m["version"] != Version {
		return nil, &FieldError{Path: "version", Detail: fmt.Sprintf("must be %q, got %v", Version, describe(m["version"]))}
	}
	vm := &VM{}
	if err := json.Unmarshal(data, vm); err != nil {
		// checkShape has already matched every value against the Go types.
		return nil, fmt.Errorf("%s annotation: %w", Annotation, err)
	}
	vm.Default()
	if err := vm.Validate(); err != nil {
		return nil, err
	}
	return vm, nil
}

// Encode validates the spec and renders it as the annotation value, defaults included.
func (vm *VM) Encode() ([]byte, error) {
	c := vm.DeepCopy()
	c.Default()
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return json.Marshal(c)
}

// DeepCopy returns a copy that shares no slices or pointers with vm.
func (vm *VM) DeepCopy() *VM {
	c := *vm
	c.Disks = append([]Disk(nil), vm.Disks...)
	c.Interfaces = append([]Interface(nil), vm.Interfaces...)
	for i := range c.Interfaces {
		c.Interfaces[i].Ports = append([]Port(nil), c.Interfaces[i].Ports...)
	}
	c.GPUs = append([]HostDevice(nil), vm.GPUs...)
	c.HostDevices = append([]HostDevice(nil), vm.HostDevices...)
	if vm.CloudInit != nil {
		ci := *vm.CloudInit
		c.CloudInit = &ci
	}
	c.AccessCredentials = append([]AccessCredential(nil), vm.AccessCredentials...)
	for i := range c.AccessCredentials {
		c.AccessCredentials[i].Users = append([]string(nil), c.AccessCredentials[i].Users...)
	}
	if vm.Migration != nil {
		m := *vm.Migration
		c.Migration = &m
	}
	c.Features.ACPI = clonePtr(vm.Features.ACPI)
	c.Features.SMM = clonePtr(vm.Features.SMM)
	c.Features.HyperV = clonePtr(vm.Features.HyperV)
	return &c
}

func clonePtr[T any](p *T) *T {
	if p == nil {
		return nil
	}
	v := *p
	return &v
}

// Default fills in what an author may leave out: a 1x1x1 CPU, q35, BIOS, ACPI and SMM on,
// disks as virtio disks, virtio NICs. Version and memory have no defaults.
func (vm *VM) Default() {
	for _, n := range []*int{&vm.CPU.Sockets, &vm.CPU.Cores, &vm.CPU.Threads} {
		if *n == 0 {
			*n = 1
		}
	}
	if vm.Machine == "" {
		vm.Machine = machine.Q35
	}
	if vm.Firmware.Type == "" {
		vm.Firmware.Type = FirmwareBIOS
	}
	if vm.Features.ACPI == nil {
		on := true
		vm.Features.ACPI = &on
	}
	if vm.Features.SMM == nil {
		on := true
		vm.Features.SMM = &on
	}
	for i := range vm.Disks {
		d := &vm.Disks[i]
		if d.Device == "" {
			d.Device = DeviceDisk
		}
		if d.Bus == "" {
			d.Bus = BusVirtio
		}
	}
	for i := range vm.Interfaces {
		if vm.Interfaces[i].Model == "" {
			vm.Interfaces[i].Model = ModelVirtio
		}
		if vm.Interfaces[i].Binding == "" {
			vm.Interfaces[i].Binding = BindingBridge
		}
		for j := range vm.Interfaces[i].Ports {
			if vm.Interfaces[i].Ports[j].Protocol == "" {
				vm.Interfaces[i].Ports[j].Protocol = ProtocolTCP
			}
		}
	}
	if vm.CloudInit != nil && vm.CloudInit.Bus == "" {
		vm.CloudInit.Bus = BusVirtio
	}
	for i := range vm.AccessCredentials {
		if vm.AccessCredentials[i].Propagation == "" {
			vm.AccessCredentials[i].Propagation = PropagateNoCloud
		}
	}
}

// checkShape matches decoded JSON against the Go type t before it is unmarshalled, so that
// every unknown key or wrongly typed value is reported with its field path (encoding/json
// reports neither the path of an unknown field nor list indices).
func checkShape(v any, t reflect.Type, at string) error {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if v == nil {
		return nil // null leaves the zero value, as encoding/json does
	}
	switch t.Kind() {
	case reflect.Struct:
		m, ok := v.(map[string]any)
		if !ok {
			return typeError(at, "an object", v)
		}
		fields := jsonFields(t)
		var errs []error
		for _, k := range slices.Sorted(maps.Keys(m)) {
			f, ok := fields[k]
			if !ok {
				errs = append(errs, &FieldError{Path: join(at, k), Detail: "unknown field"})
				continue
			}
			if err := checkShape(m[k], f.Type, join(at, k)); err != nil {
				errs = append(errs, err)
			}
		}
		return errors.Join(errs...)
	case reflect.Map: // keyed by string: its keys are the caller's to check
		m, ok := v.(map[string]any)
		if !ok || t.Key().Kind() != reflect.String {
			return typeError(at, "an object", v)
		}
		var errs []error
		for _, k := range slices.Sorted(maps.Keys(m)) {
			if err := checkShape(m[k], t.Elem(), fmt.Sprintf("%s[%s]", at, k)); err != nil {
				errs = append(errs, err)
			}
		}
		return errors.Join(errs...)
	case reflect.Slice:
		l, ok := v.([]any)
		if !ok {
			return typeError(at, "a list", v)
		}
		var errs []error
		for i, e := range l {
			if err := checkShape(e, t.Elem(), fmt.Sprintf("%s[%d]", at, i)); err != nil {
				errs = append(errs, err)
			}
		}
		return errors.Join(errs...)
	case reflect.String:
		if _, ok := v.(string); !ok {
			return typeError(at, "a string", v)
		}
	case reflect.Bool:
		if _, ok := v.(bool); !ok {
			return typeError(at, "true or false", v)
		}
	case reflect.Int, reflect.Int64:
		n, ok := v.(json.Number)
		if !ok {
			return typeError(at, "an integer", v)
		}
		if _, err := strconv.ParseInt(string(n), 10, t.Bits()); err != nil {
			return &FieldError{Path: at, Detail: fmt.Sprintf("%s is not an integer in range", n)}
		}
	default:
		return fmt.Errorf("vmspec: field %s has unsupported Go kind %s", at, t.Kind()) // a bug here, not in the input
	}
	return nil
}

// jsonFields maps the JSON names of t's exported fields to the fields.
func jsonFields(t reflect.Type) map[string]reflect.StructField {
	fields := map[string]reflect.StructField{}
	for i := range t.NumField() {
		f := t.Field(i)
		if f.Anonymous && f.Tag.Get("json") == "" && f.Type.Kind() == reflect.Struct {
			maps.Copy(fields, jsonFields(f.Type)) // embedded: its fields are the outer object's
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if f.IsExported() && name != "-" && name != "" {
			fields[name] = f
		}
	}
	return fields
}

func typeError(at, want string, got any) error {
	return &FieldError{Path: at, Detail: fmt.Sprintf("must be %s, got %s", want, describe(got))}
}

// describe names a decoded JSON value's type for an error message, quoting short strings.
func describe(v any) string {
	switch v := v.(type) {
	case nil:
		return "nothing"
	case string:
		if len(v) > 40 {
			return "a long string"
		}
		return strconv.Quote(v)
	case json.Number:
		return "the number " + string(v)
	case bool:
		return strconv.FormatBool(v)
	case []any:
		return "a list"
	case map[string]any:
		return "an object"
	}
	return fmt.Sprintf("%T", v)
}

func join(at, key string) string {
	if at == "" {
		return key
	}
	return at + "." + key
}
