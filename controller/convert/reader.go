package convert

import (
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
)

// node reads one object of a decoded manifest and remembers which keys were read, so that
// whatever the conversion did not use is reported instead of silently lost.
type node struct {
	path string
	m    map[string]any
	used map[string]bool
	rep  *report
}

// report collects what a conversion could not carry over.
type report struct {
	errs     []string // make the conversion fail: the VM would not be what was asked for
	warnings []string // dropped or changed, but the VM still works
	nodes    []*node
}

func (r *report) newNode(path string, m map[string]any) *node {
	n := &node{path: path, m: m, used: map[string]bool{}, rep: r}
	r.nodes = append(r.nodes, n)
	return n
}

func (r *report) errorf(path, format string, args ...any) {
	r.errs = append(r.errs, path+": "+fmt.Sprintf(format, args...))
}

func (r *report) warnf(path, format string, args ...any) {
	r.warnings = append(r.warnings, path+": "+fmt.Sprintf(format, args...))
}

// finish reports every key nobody read as dropped.
func (r *report) finish() {
	for _, n := range r.nodes {
		for _, k := range slices.Sorted(maps.Keys(n.m)) {
			if !n.used[k] {
				r.warnf(n.at(k), "not supported by vmpod; dropped")
			}
		}
	}
}

func (n *node) at(key string) string {
	if n.path == "" {
		return key
	}
	return n.path + "." + key
}

func (n *node) has(key string) bool {
	if n == nil {
		return false
	}
	_, ok := n.m[key]
	return ok
}

func (n *node) get(key string) (any, bool) {
	if n == nil {
		return nil, false
	}
	v, ok := n.m[key]
	if ok {
		n.used[key] = true
	}
	return v, ok && v != nil
}

func (n *node) str(key string) string {
	v, ok := n.get(key)
	if !ok {
		return ""
	}
	s, isStr := v.(string)
	if !isStr {
		n.rep.errorf(n.at(key), "must be a string, got %T", v)
	}
	return s
}

func (n *node) boolean(key string) (value, set bool) {
	v, ok := n.get(key)
	if !ok {
		return false, false
	}
	b, isBool := v.(bool)
	if !isBool {
		n.rep.errorf(n.at(key), "must be true or false, got %T", v)
	}
	return b, isBool
}

// integer reads a JSON number that must be a whole number.
func (n *node) integer(key string) (int64, bool) {
	v, ok := n.get(key)
	if !ok {
		return 0, false
	}
	switch x := v.(type) {
	case int64:
		return x, true
	case float64:
		if x == float64(int64(x)) {
			return int64(x), true
		}
	case json.Number:
		if i, err := x.Int64(); err == nil {
			return i, true
		}
	}
	n.rep.errorf(n.at(key), "must be an integer, got %v", v)
	return 0, false
}

func (n *node) object(key string) *node {
	v, ok := n.get(key)
	if !ok {
		return nil
	}
	m, isMap := v.(map[string]any)
	if !isMap {
		n.rep.errorf(n.at(key), "must be an object, got %T", v)
		return nil
	}
	return n.rep.newNode(n.at(key), m)
}

// required is object for a key that must be there; its absence is an error.
func (n *node) required(key string) *node {
	if !n.has(key) {
		n.rep.errorf(n.at(key), "missing")
		return nil
	}
	return n.object(key)
}

func (n *node) list(key string) []*node {
	v, ok := n.get(key)
	if !ok {
		return nil
	}
	l, isList := v.([]any)
	if !isList {
		n.rep.errorf(n.at(key), "must be a list, got %T", v)
		return nil
	}
	var out []*node
	for i, e := range l {
		m, isMap := e.(map[string]any)
		if !isMap {
			n.rep.errorf(fmt.Sprintf("%s[%d]", n.at(key), i), "must be an object, got %T", e)
			continue
		}
		out = append(out, n.rep.newNode(fmt.Sprintf("%s[%d]", n.at(key), i), m))
	}
	return out
}

func (n *node) strings(key string) []string {
	v, ok := n.get(key)
	if !ok {
		return nil
	}
	l, isList := v.([]any)
	if !isList {
		n.rep.errorf(n.at(key), "must be a list of strings, got %T", v)
		return nil
	}
	var out []string
	for i, e := range l {
		s, isStr := e.(string)
		if !isStr {
			n.rep.errorf(fmt.Sprintf("%s[%d]", n.at(key), i), "must be a string, got %T", e)
			continue
		}
		out = append(out, s)
	}
	return out
}

func (n *node) stringMap(key string) map[string]string {
	o := n.object(key)
	if o == nil {
		return nil
	}
	out := map[string]string{}
	for k := range o.m {
		out[k] = o.str(k)
	}
	return out
}

// into decodes a whole subtree into a Go value (a Kubernetes core type the two APIs share).
func (n *node) into(key string, out any) bool {
	v, ok := n.get(key)
	if !ok {
		return false
	}
	b, err := json.Marshal(v)
	if err == nil {
		dec := json.NewDecoder(strings.NewReader(string(b)))
		dec.DisallowUnknownFields()
		err = dec.Decode(out)
	}
	if err != nil {
		n.rep.errorf(n.at(key), "%v", err)
		return false
	}
	return true
}

// ignore marks keys read without a word: server-set metadata, status.
func (n *node) ignore(keys ...string) {
	if n == nil {
		return
	}
	for _, k := range keys {
		n.used[k] = true
	}
}

// unsupported fails the conversion if key is set: vmpod cannot give the VM that.
func (n *node) unsupported(key, why string) {
	if n.has(key) {
		n.used[key] = true
		n.rep.errorf(n.at(key), "%s", why)
	}
}

// dropped warns if key is set: the VM works without it.
func (n *node) dropped(key, why string) {
	if n.has(key) {
		n.used[key] = true
		n.rep.warnf(n.at(key), "%s", why)
	}
}

// oneKey returns the single key set among choices (nil objects count), or "" after
// reporting none or several.
func (n *node) oneKey(what string, choices ...string) string {
	var set []string
	for _, c := range choices {
		if n.has(c) {
			set = append(set, c)
		}
	}
	if len(set) == 1 {
		return set[0]
	}
	var others []string
	for k := range n.m {
		if !slices.Contains(choices, k) && k != "name" {
			others = append(others, k)
		}
	}
	slices.Sort(others)
	switch {
	case len(set) == 0 && len(others) > 0:
		n.rep.errorf(n.path, "%s %s is not supported by vmpod (supported: %s)", what, strings.Join(others, ", "), strings.Join(choices, ", "))
	case len(set) == 0:
		n.rep.errorf(n.path, "no %s (want one of %s)", what, strings.Join(choices, ", "))
	default:
		n.rep.errorf(n.path, "more than one %s: %s", what, strings.Join(set, ", "))
	}
	for _, k := range others {
		n.used[k] = true // reported above
	}
	return ""
}
