// Package dialgroup runs at most one dial per endpoint at a time, for the
// shm and ucx writers.
package dialgroup

import (
	"context"
	"sync"
)

// Group runs at most one dial per endpoint at a time. A caller for an
// endpoint being dialled waits for that dial (or its own context); a
// caller for another endpoint never waits: one dead peer, whose dial runs
// until its timeout, holds up only the writes to it.
type Group[T any] struct {
	mu    sync.Mutex
	calls map[string]*dialCall[T]
}

type dialCall[T any] struct {
	done chan struct{}
	val  T
	err  error
}

// Do dials endpoint with dial unless a dial of it is in flight, in which
// case it waits for that one. dialed reports whether this caller dialled
// (and so owns val); a waiter gets only the error, and looks the link up
// again when there is none.
func (g *Group[T]) Do(ctx context.Context, endpoint string, dial func() (T, error)) (val T, dialed bool, err error) {
	g.mu.Lock()
	if c, ok := g.calls[endpoint]; ok {
		g.mu.Unlock()
		select {
		case <-c.done:
			return val, false, c.err
		case <-ctx.Done():
			return val, false, ctx.Err()
		}
	}
	if g.calls == nil {
		g.calls = map[string]*dialCall[T]{}
	}
	c := &dialCall[T]{done: make(chan struct{})}
	g.calls[endpoint] = c
	g.mu.Unlock()

	c.val, c.err = dial()
	g.mu.Lock()
	delete(g.calls, endpoint)
	g.mu.Unlock()
	close(c.done)
	return c.val, true, c.err
}

// InFlight is the number of dials running now.
func (g *Group[T]) InFlight() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.calls)
}
