package qmp

import (
	"errors"
	"fmt"
)

// ErrClosed is matched (errors.Is) by every error caused by the monitor being closed:
// QEMU exited or closed the socket, the stream broke, or Close was called.
var ErrClosed = errors.New("monitor closed")

// ErrNoReply is matched by the error of a call whose context ended after the command
// had been sent to QEMU. QEMU may still carry the command out; the caller must treat
// its effect as unknown (for example, query before retrying a device_add).
var ErrNoReply = errors.New("no reply")

// ErrNotSent is matched by the error of a call whose context ended while the command
// was still queued. The command was never written to QEMU.
var ErrNotSent = errors.New("not sent")

// ErrSubscriptionOverflow ends a Subscription whose reader fell more than
// MaxQueuedEvents events behind. Events are never dropped silently and never block
// the connection, so a subscriber that stops reading is cut off instead.
var ErrSubscriptionOverflow = errors.New("event subscription overflowed")

// ErrSubscriptionClosed is returned by Subscription.Next after Close.
var ErrSubscriptionClosed = errors.New("event subscription closed")

// CommandError is QEMU's error reply to a command.
//
// QMP error replies also carry a class ("GenericError", "DeviceNotFound", ...), but
// go-qemu reduces them to their description, so only Desc is available.
type CommandError struct {
	Command string // the QMP command, e.g. "device_add"
	Desc    string // QEMU's description, e.g. "Duplicate device ID 'disk0'"
}

func (e *CommandError) Error() string { return "QEMU: " + e.Desc }

// ReplyError reports a reply or event that does not have the shape this package
// expects: a missing or ill-typed field, or an enum value it does not know.
type ReplyError struct {
	Source  string // what was decoded: "query-status reply", "SHUTDOWN event"
	Field   string // JSON path of the field, e.g. "return[0].props.socket-id"
	Problem string
}

func (e *ReplyError) Error() string {
	return fmt.Sprintf("malformed %s: field %q: %s", e.Source, e.Field, e.Problem)
}
