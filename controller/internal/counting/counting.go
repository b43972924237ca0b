// Package counting counts the bytes read through a reader, for progress reports that run
// beside the copy (the count is safe to read from another goroutine).
package counting

import (
	"io"
	"sync/atomic"
)

// Reader reads from R and counts the bytes.
type Reader struct {
	R io.Reader
	n atomic.Int64
}

func (c *Reader) Read(p []byte) (int, error) {
	n, err := c.R.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// N is the number of bytes read so far.
func (c *Reader) N() int64 { return c.n.Load() }
