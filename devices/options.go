package devices

import (
	"encoding/json"
	"strconv"
	"strings"
)

// Property is one QEMU property of a device. Value is its JSON encoding, the form
// QMP's device_add takes; on the command line it renders as QEMU's text form
// (strings as they are, booleans as on/off, numbers as digits).
//
// Property has the same shape as qmp.Prop, so qmp.Prop(p) converts it.
type Property struct {
	Name  string
	Value json.RawMessage
}

// StringProp is a string-valued property.
func StringProp(name, v string) Property {
	return Property{name, json.RawMessage(strconv.Quote(v))}
}

// UintProp is an unsigned integer property.
func UintProp(name string, v uint64) Property {
	return Property{name, json.RawMessage(strconv.FormatUint(v, 10))}
}

// IntProp is an integer property.
func IntProp(name string, v int64) Property {
	return Property{name, json.RawMessage(strconv.FormatInt(v, 10))}
}

// BoolProp is a boolean property.
func BoolProp(name string, v bool) Property {
	return Property{name, json.RawMessage(strconv.FormatBool(v))}
}

// Text is the value as QEMU's option parser wants it, before escaping.
func (p Property) Text() string {
	switch v := string(p.Value); {
	case v == "true":
		return "on"
	case v == "false":
		return "off"
	case strings.HasPrefix(v, `"`):
		var s string
		if json.Unmarshal(p.Value, &s) == nil {
			return s
		}
	}
	return string(p.Value)
}

// optionList builds a QEMU option string: "head,key=value,...". Values are
// escaped; keys and heads are this package's constants and need no escaping.
type optionList struct {
	b strings.Builder
}

func newOptions(head string) *optionList {
	o := &optionList{}
	o.b.WriteString(head)
	return o
}

// add appends key=value with commas in value doubled (QEMU's escape: a single
// comma would start the next option).
func (o *optionList) add(key, value string) *optionList {
	if o.b.Len() > 0 {
		o.b.WriteByte(',')
	}
	o.b.WriteString(key)
	o.b.WriteByte('=')
	o.b.WriteString(strings.ReplaceAll(value, ",", ",,"))
	return o
}

func (o *optionList) addBool(key string, v bool) *optionList {
	if v {
		return o.add(key, "on")
	}
	return o.add(key, "off")
}

func (o *optionList) addUint(key string, v uint64) *optionList {
	return o.add(key, strconv.FormatUint(v, 10))
}

func (o *optionList) String() string { return o.b.String() }
