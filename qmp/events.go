package qmp

import (
	"context"
	"encoding/json"
	"slices"
	"sync"
	"time"

	goqemu "github.com/digitalocean/go-qemu/qmp"
)

// MaxQueuedEvents is how many undelivered events one Subscription holds before it is
// ended with ErrSubscriptionOverflow. QEMU sends few events (a handful per hotplug
// or migration), so a backlog this long means the subscriber has stopped reading.
const MaxQueuedEvents = 1024

// Event is one asynchronous QMP event.
type Event struct {
	Name string          // e.g. "DEVICE_DELETED"
	Data json.RawMessage // the event's "data" member; null when it has none
	Time time.Time       // QEMU's timestamp
}

// Decode decodes the event's data into v with the strictness of reply decoding:
// a missing or ill-typed field is a *ReplyError naming it.
func (e Event) Decode(v any) error {
	return decodeStrict(e.Name+" event", "data", e.Data, v)
}

// Filter selects the events a Subscription receives. It runs on the event
// goroutine, so it must be quick and must not call the Monitor.
type Filter func(Event) bool

// EventNamed selects events by name.
func EventNamed(names ...string) Filter {
	return func(e Event) bool { return slices.Contains(names, e.Name) }
}

// Subscription is a queue of the events that matched its Filter, from the moment
// Subscribe returned until Close or the end of the monitor.
type Subscription struct {
	m      *Monitor
	filter Filter
	wake   chan struct{} // capacity 1: "queue or err changed"

	mu    sync.Mutex
	queue []Event
	err   error // set once; reported by Next after the queue is drained
}

// Subscribe starts queueing the events that match filter (nil matches all).
// Subscribe before sending the command that triggers the awaited event: events are
// not kept for subscriptions that do not exist yet.
func (m *Monitor) Subscribe(filter Filter) *Subscription {
	if filter == nil {
		filter = func(Event) bool { return true }
	}
	s := &Subscription{m: m, filter: filter, wake: make(chan struct{}, 1)}
	m.subsMu.Lock()
	defer m.subsMu.Unlock()
	if m.subs == nil { // the monitor is closed
		s.err = m.closedErr()
		return s
	}
	m.subs[s] = struct{}{}
	return s
}

// Next returns the oldest queued event, waiting for one until ctx ends. Once the
// queue is empty it reports why the subscription ended: an error matching ErrClosed,
// ErrSubscriptionOverflow or ErrSubscriptionClosed. Events queued before the
// monitor closed are still delivered first.
func (s *Subscription) Next(ctx context.Context) (Event, error) {
	for {
		s.mu.Lock()
		if len(s.queue) > 0 {
			e := s.queue[0]
			s.queue[0] = Event{}
			s.queue = s.queue[1:]
			s.mu.Unlock()
			return e, nil
		}
		err := s.err
		s.mu.Unlock()
		if err != nil {
			return Event{}, err
		}
		select {
		case <-s.wake:
		case <-ctx.Done():
			return Event{}, ctx.Err()
		}
	}
}

// Close stops the subscription and discards its queue. It is safe to call more than
// once and concurrently with Next.
func (s *Subscription) Close() {
	s.m.subsMu.Lock()
	delete(s.m.subs, s)
	s.m.subsMu.Unlock()
	s.end(ErrSubscriptionClosed, true)
}

// end records why the subscription stopped (the first reason wins) and wakes Next.
func (s *Subscription) end(err error, discard bool) {
	s.mu.Lock()
	if s.err == nil {
		s.err = err
	}
	if discard {
		s.queue = nil
	}
	s.mu.Unlock()
	s.signal()
}

func (s *Subscription) signal() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// deliver queues e; it reports false when the queue is full and the subscription
// has been ended. Called with m.subsMu held.
func (s *Subscription) deliver(e Event) bool {
	s.mu.Lock()
	if s.err != nil {
		s.mu.Unlock()
		return true
	}
	if len(s.queue) >= MaxQueuedEvents {
		s.mu.Unlock()
		s.end(ErrSubscriptionOverflow, false)
		return false
	}
	s.queue = append(s.queue, e)
	s.mu.Unlock()
	s.signal()
	return true
}

// drainEvents is the event goroutine. go-qemu's reader blocks on its unbuffered
// event channel, and command replies come through the same reader, so this loop
// must never stop receiving: dispatch only appends to subscriber queues.
func (m *Monitor) drainEvents(events <-chan goqemu.Event) {
	defer m.wg.Done()
	for ge := range events {
		m.dispatch(convertEvent(ge))
	}
	m.shutdown(errConnectionClosed)
}

func (m *Monitor) dispatch(e Event) {
	m.subsMu.Lock()
	defer m.subsMu.Unlock()
	for s := range m.subs {
		if s.filter(e) && !s.deliver(e) {
			delete(m.subs, s)
		}
	}
}

// endSubscriptions ends every subscription with err once the monitor is closed.
func (m *Monitor) endSubscriptions(err error) {
	m.subsMu.Lock()
	subs := m.subs
	m.subs = nil
	m.subsMu.Unlock()
	for s := range subs {
		s.end(err, false)
	}
}

// convertEvent turns go-qemu's event (data already decoded into a map) back into
// JSON, so that typed decoding works the same for replies and events. Integers in
// event data pass through float64 on the way and are exact up to 2^53.
func convertEvent(ge goqemu.Event) Event {
	data, err := json.Marshal(ge.Data)
	if err != nil { // cannot happen for data that came from JSON
		data = nil
	}
	return Event{
		Name: ge.Event,
		Data: data,
		Time: time.Unix(ge.Timestamp.Seconds, ge.Timestamp.Microseconds*1000),
	}
}
