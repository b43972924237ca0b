package qmp

import (
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
)

// decodeStrict decodes raw into v, which points to a reply or event type of this
// package. Beyond encoding/json it enforces the rule these types follow: a struct
// field whose json tag has no omitempty is required. Ill-typed fields, missing
// fields and values rejected by a validate method become a *ReplyError that names
// the field by its JSON path, rooted at root ("return" or "data").
func decodeStrict(source, root string, raw json.RawMessage, v any) error {
	if len(raw) == 0 {
		return &ReplyError{Source: source, Field: root, Problem: "missing"}
	}
	if err := checkRequired(reflect.TypeOf(v).Elem(), raw, root); err != nil {
		err.Source = source
		return err
	}
	if err := json.Unmarshal(raw, v); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			field := root
			if te.Field != "" {
				field = root + "." + te.Field
			}
			return &ReplyError{Source: source, Field: field, Problem: fmt.Sprintf("JSON %s where %s was expected", te.Value, te.Type)}
		}
		return &ReplyError{Source: source, Field: root, Problem: err.Error()}
	}
	if val, ok := v.(interface{ validate() *ReplyError }); ok {
		if err := val.validate(); err != nil {
			err.Source = source
			err.Field = joinField(root, err.Field)
			return err
		}
	}
	return nil
}

// checkRequired walks the JSON value raw alongside type t and reports the first
// required struct field that is absent or null.
func checkRequired(t reflect.Type, raw json.RawMessage, path string) *ReplyError {
	switch t.Kind() {
	case reflect.Pointer:
		return checkRequired(t.Elem(), raw, path)
	case reflect.Slice:
		if t.Elem().Kind() == reflect.Uint8 { // []byte and json.RawMessage
			return nil
		}
		var elems []json.RawMessage
		if json.Unmarshal(raw, &elems) != nil {
			return nil // not an array: json.Unmarshal reports the type error
		}
		for i, e := range elems {
			if err := checkRequired(t.Elem(), e, fmt.Sprintf("%s[%d]", path, i)); err != nil {
				return err
			}
		}
	case reflect.Struct:
		var fields map[string]json.RawMessage
		if json.Unmarshal(raw, &fields) != nil {
			return nil
		}
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			name, optional := jsonName(f)
			if name == "" {
				continue
			}
			val, ok := fields[name]
			present := ok && string(val) != "null"
			if !present {
				if optional {
					continue
				}
				return &ReplyError{Field: path + "." + name, Problem: "missing"}
			}
			if err := checkRequired(f.Type, val, path+"."+name); err != nil {
				return err
			}
		}
	}
	return nil
}

// jsonName returns the JSON key of a struct field ("" if it is not encoded) and
// whether the field is optional (omitempty or omitzero).
func jsonName(f reflect.StructField) (name string, optional bool) {
	if !f.IsExported() {
		return "", false
	}
	tag := f.Tag.Get("json")
	if tag == "-" {
		return "", false
	}
	name, opts, _ := strings.Cut(tag, ",")
	if name == "" {
		name = f.Name
	}
	for _, o := range strings.Split(opts, ",") {
		if o == "omitempty" || o == "omitzero" {
			optional = true
		}
	}
	return name, optional
}

func joinField(root, field string) string {
	if field == "" {
		return root
	}
	return root + "." + field
}
