// Package channel carries one byte stream at a time between the host and the guest agent
// over a virtio-serial port.
//
// A virtio-serial port has no connection boundaries: when the host side reconnects (a
// restarted shim, a dropped socket), the guest sees at most a short POLLHUP, and bytes of
// the previous connection — half a request, a late reply — can still arrive on either side.
// So every byte travels in a frame tagged with a session number the host picks at random:
//
//	host  → guest  HELLO(s)     start session s (repeated until answered)
//	guest → host   WELCOME(s)   s is now the guest's only session
//	both           DATA(s, ...) payload of session s; other sessions' frames are dropped
//
// Frame headers carry a CRC, so a reader that starts mid-frame skips to the next valid
// header. ttrpc runs unchanged on top of the net.Conn each side gets
// (docs/design/002-agent-channel.md).
package channel

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"io"
)

const (
	headerSize = 20
	// MaxPayload bounds one frame's payload; larger writes are split.
	MaxPayload = 64 << 10
	version    = 1
)

var magic = [4]byte{'V', 'M', 'P', 'D'}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

type frameType uint8

const (
	frameHello   frameType = 1
	frameWelcome frameType = 2
	frameData    frameType = 3
)

func (t frameType) String() string {
	switch t {
	case frameHello:
		return "HELLO"
	case frameWelcome:
		return "WELCOME"
	case frameData:
		return "DATA"
	}
	return fmt.Sprintf("frame(%d)", uint8(t))
}

// header layout (little endian):
//
//	0  magic "VMPD"   4  version   5  type   6  reserved (2)
//	8  session        12 payload length      16 CRC-32C of bytes 0..15
type header struct {
	typ     frameType
	session uint32
	length  uint32
}

func (h header) encode(b []byte) {
	copy(b[0:4], magic[:])
	b[4] = version
	b[5] = byte(h.typ)
	b[6], b[7] = 0, 0
	binary.LittleEndian.PutUint32(b[8:12], h.session)
	binary.LittleEndian.PutUint32(b[12:16], h.length)
	binary.LittleEndian.PutUint32(b[16:20], crc32.Checksum(b[0:16], castagnoli))
}

// decodeHeader accepts b only if it is a well-formed header of this protocol version.
func decodeHeader(b []byte) (header, bool) {
	if !bytes.Equal(b[0:4], magic[:]) || b[4] != version {
		return header{}, false
	}
	if binary.LittleEndian.Uint32(b[16:20]) != crc32.Checksum(b[0:16], castagnoli) {
		return header{}, false
	}
	h := header{
		typ:     frameType(b[5]),
		session: binary.LittleEndian.Uint32(b[8:12]),
		length:  binary.LittleEndian.Uint32(b[12:16]),
	}
	switch {
	case h.typ < frameHello || h.typ > frameData:
		return header{}, false
	case h.length > MaxPayload:
		return header{}, false
	case h.typ != frameData && h.length != 0:
		return header{}, false
	}
	return h, true
}

// appendFrame appends one encoded frame to dst.
func appendFrame(dst []byte, typ frameType, session uint32, payload []byte) []byte {
	var hdr [headerSize]byte
	header{typ: typ, session: session, length: uint32(len(payload))}.encode(hdr[:])
	dst = append(dst, hdr[:]...)
	return append(dst, payload...)
}

// frameReader reads frames, skipping bytes that do not start a valid header.
type frameReader struct {
	br *bufio.Reader
	// skipped counts bytes dropped while resynchronising (for logs and tests).
	skipped uint64
}

func newFrameReader(r io.Reader) *frameReader {
	return &frameReader{br: bufio.NewReaderSize(r, 2*MaxPayload)}
}

// next returns the next valid frame. Its payload is only valid until the next call.
// Errors are those of the underlying reader; a transient io.EOF (the guest end of a
// port with no host connected) may be retried.
func (fr *frameReader) next() (header, []byte, error) {
	for {
		b, err := fr.br.Peek(headerSize)
		if err != nil {
			return header{}, nil, err
		}
		h, ok := decodeHeader(b)
		if !ok {
			// Not a header: drop up to the next possible start of one.
			skip := 1
			if i := bytes.Index(b[1:], magic[:1]); i >= 0 {
				skip = 1 + i
			} else {
				skip = len(b)
			}
			_, _ = fr.br.Discard(skip)
			fr.skipped += uint64(skip)
			continue
		}
		if _, err := fr.br.Discard(headerSize); err != nil {
			return header{}, nil, err
		}
		payload, err := fr.readPayload(int(h.length))
		if err != nil {
			return header{}, nil, err
		}
		return h, payload, nil
	}
}

func (fr *frameReader) readPayload(n int) ([]byte, error) {
	if n == 0 {
		return nil, nil
	}
	// The buffer holds 2*MaxPayload and decodeHeader bounds n by MaxPayload, so Peek can
	// only fail with the reader's own error. A frame cut short by a disconnect leaves its
	// tail in the buffer, where the next call skips it as garbage.
	b, err := fr.br.Peek(n)
	if err != nil {
		return nil, err
	}
	_, _ = fr.br.Discard(n)
	return b, nil
}
