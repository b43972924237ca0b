package stream

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"strings"
	"testing"
	"time"
)

func readAll(t *testing.T, o *Output, max int) []byte {
	t.Helper()
	var got []byte
	var off uint64
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		start, data, eof, err := o.Read(ctx, off, max)
		cancel()
		if err != nil {
			t.Fatalf("read at %d: %v", off, err)
		}
		if start != off {
			t.Fatalf("read at %d returned data from %d", off, start)
		}
		got = append(got, data...)
		off += uint64(len(data))
		if eof {
			return got
		}
	}
}

func TestOutputDeliversEverythingInOrder(t *testing.T) {
	o := NewOutput(64) // smaller than the input: the pump must wait for acknowledgements
	want := bytes.Repeat([]byte("0123456789"), 1000)
	go o.Pump(bytes.NewReader(want))
	if got := readAll(t, o, 7); !bytes.Equal(got, want) {
		t.Fatalf("got %d bytes, want %d", len(got), len(want))
	}
}

// A reply lost on the way to the host is asked for again with the same offset.
func TestOutputRepeatedReadReturnsSameData(t *testing.T) {
	o := NewOutput(0)
	go o.Pump(strings.NewReader("hello world"))
	ctx := context.Background()
	_, first, _, err := o.Read(ctx, 0, 5)
	if err != nil {
		t.Fatal(err)
	}
	_, again, _, err := o.Read(ctx, 0, 5)
	if err != nil {
		t.Fatal(err)
	}
	if string(first) != "hello" || string(again) != "hello" {
		t.Fatalf("got %q then %q, want hello twice", first, again)
	}
	_, rest, _, err := o.Read(ctx, 5, 100)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(" world", string(rest)) || len(rest) == 0 {
		t.Fatalf("after acknowledging 5 bytes got %q", rest)
	}
}

func TestOutputOffsetPastEndIsAnError(t *testing.T) {
	o := NewOutput(0)
	o.CloseWithEOF()
	if _, _, _, err := o.Read(context.Background(), 10, 0); !errors.Is(err, ErrBadOffset) {
		t.Fatalf("got %v, want ErrBadOffset", err)
	}
}

func TestOutputReadHonoursContext(t *testing.T) {
	o := NewOutput(0)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, _, _, err := o.Read(ctx, 0, 0); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v, want deadline exceeded", err)
	}
}

func TestOutputEndsOnPipeClose(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	o := NewOutput(0)
	go o.Pump(r)
	_, _ = w.Write([]byte("bye"))
	_ = w.Close()
	if got := readAll(t, o, 0); string(got) != "bye" {
		t.Fatalf("got %q", got)
	}
}

func TestInputSkipsRepeatedBytes(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	in := NewInput(w, nil)
	if off, err := in.Write(0, []byte("abc")); err != nil || off != 3 {
		t.Fatalf("first write: %d, %v", off, err)
	}
	// The host did not see the reply and sends "abc" again plus "de".
	if off, err := in.Write(0, []byte("abcde")); err != nil || off != 5 {
		t.Fatalf("repeated write: %d, %v", off, err)
	}
	if _, err := in.Write(9, []byte("x")); !errors.Is(err, ErrBadOffset) {
		t.Fatalf("write past the end: %v", err)
	}
	if err := in.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := in.Write(5, []byte("f")); !errors.Is(err, ErrStdinClosed) {
		t.Fatalf("write after close: %v", err)
	}
	got, _ := io.ReadAll(r)
	if string(got) != "abcde" {
		t.Fatalf("process read %q, want abcde", got)
	}
}
