package task

import (
	"context"

	"github.com/containerd/containerd/v2/core/events"
	"github.com/containerd/containerd/v2/core/runtime"
	"github.com/containerd/containerd/v2/pkg/shutdown"
	"github.com/containerd/log"
)

// eventQueue publishes task events to containerd in the order they were sent, from one
// goroutine: containerd requires TaskStart before TaskExit, an exec's exit before its
// container's, and so on, and the senders guarantee the order they send in.
type eventQueue struct {
	events   chan any
	shutdown shutdown.Service
}

func newEventQueue(ctx context.Context, publisher events.Publisher, sd shutdown.Service) *eventQueue {
	q := &eventQueue{events: make(chan any, 128), shutdown: sd}
	go q.forward(context.WithoutCancel(ctx), publisher)
	return q
}

func (q *eventQueue) send(evt any) {
	select {
	case q.events <- evt:
	case <-q.shutdown.Done():
	}
}

func (q *eventQueue) forward(ctx context.Context, publisher events.Publisher) {
	publish := func(e any) {
		if err := publisher.Publish(ctx, runtime.GetTopic(e), e); err != nil {
			log.G(ctx).WithError(err).Error("publish event")
		}
	}
	for {
		select {
		case e := <-q.events:
			publish(e)
		case <-q.shutdown.Done():
			for {
				select {
				case e := <-q.events:
					publish(e)
				default:
					return
				}
			}
		}
	}
}
