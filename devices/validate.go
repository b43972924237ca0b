package devices

import (
	"fmt"
	"path/filepath"
	"strings"
)

// checker collects the first validation error for one device.
type checker struct {
	device string
	err    *FieldError
}

func newChecker(kind, id string) *checker {
	return &checker{device: fmt.Sprintf("%s %q", kind, id)}
}

func (c *checker) fail(field, format string, args ...any) {
	if c.err == nil {
		c.err = &FieldError{Device: c.device, Field: field, Problem: fmt.Sprintf(format, args...)}
	}
}

// Err returns the first failure, as an error interface that is nil when there was none.
func (c *checker) Err() error {
	if c.err == nil {
		return nil
	}
	return c.err
}

// id checks a QEMU identifier: a letter, then letters, digits, '-', '.' or '_'
// (QEMU's id_wellformed). QEMU rejects anything else, for every kind of id.
func (c *checker) id(field, id string) {
	if id == "" {
		c.fail(field, "is empty")
		return
	}
	if !isLetter(id[0]) {
		c.fail(field, "%q must start with a letter", id)
		return
	}
	for i := 0; i < len(id); i++ {
		b := id[i]
		if !isLetter(b) && !('0' <= b && b <= '9') && b != '-' && b != '.' && b != '_' {
			c.fail(field, "%q has %q; QEMU ids allow letters, digits, '-', '.' and '_'", id, b)
			return
		}
	}
}

// maxNodeName is QEMU's limit for block node names (32 bytes with the NUL).
const maxNodeName = 31

// nodeName checks a derived block node name, which has a length limit ids lack.
func (c *checker) nodeName(field, name string) {
	c.id(field, name)
	if len(name) > maxNodeName {
		c.fail(field, "block node name %q is longer than QEMU's %d characters", name, maxNodeName)
	}
}

func isLetter(b byte) bool { return ('a' <= b && b <= 'z') || ('A' <= b && b <= 'Z') }

// text checks a free-form value that goes into an option string or the argv.
func (c *checker) text(field, v string) {
	if i := strings.IndexAny(v, "\x00\n\r"); i >= 0 {
		c.fail(field, "%q contains a NUL or line break", v)
	}
}

// required checks text that must not be empty.
func (c *checker) required(field, v string) {
	if v == "" {
		c.fail(field, "is required")
		return
	}
	c.text(field, v)
}

// path checks an absolute host path.
func (c *checker) path(field, p string) {
	if p == "" {
		c.fail(field, "is required")
		return
	}
	c.text(field, p)
	if !filepath.IsAbs(p) {
		c.fail(field, "%q is not an absolute path", p)
	}
}

// maxLen checks a length limit in bytes.
func (c *checker) maxLen(field, v string, n int) {
	if len(v) > n {
		c.fail(field, "%q is longer than %d bytes", v, n)
	}
}

// oneOf checks an enumerated value.
func (c *checker) oneOf(field, v string, allowed ...string) {
	for _, a := range allowed {
		if v == a {
			return
		}
	}
	c.fail(field, "%q is not one of %s", v, strings.Join(allowed, ", "))
}
