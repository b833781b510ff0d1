// Package routine owns the goroutines of a process: a group of named
// runnables that stops them all when one fails, the ticker loop of the
// periodic ones, and a wait on several done channels.
package routine

import (
	"context"
	"fmt"
	"time"

	"golang.org/x/sync/errgroup"
)

// Group runs named runnables; the first to fail cancels the others, and
// Wait returns that error prefixed with the runnable's name.
type Group struct {
	g   *errgroup.Group
	ctx context.Context
}

// NewGroup returns a group whose context is derived from ctx.
func NewGroup(ctx context.Context) (*Group, context.Context) {
	g, gctx := errgroup.WithContext(ctx)
	return &Group{g: g, ctx: gctx}, gctx
}

// Go starts fn under name.
func (g *Group) Go(name string, fn func(ctx context.Context) error) {
	g.g.Go(func() error {
		if err := fn(g.ctx); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		return nil
	})
}

// Wait waits for every runnable.
func (g *Group) Wait() error { return g.g.Wait() }

// Every calls fn with the tick time every interval until ctx is done. It is
// the body of the periodic runnables (lease sweep, reaper, health).
func Every(ctx context.Context, interval time.Duration, fn func(now time.Time)) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			fn(now)
		}
	}
}

// WaitAll waits until every channel is closed or ctx is done.
func WaitAll(ctx context.Context, chans []chan struct{}) error {
	for _, c := range chans {
		select {
		case <-c:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}
