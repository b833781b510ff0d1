package routine

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kvferry/kvferry/internal/leakcheck"
)

func TestMain(m *testing.M) { leakcheck.VerifyTestMain(m) }

// The first runnable to fail stops the others and names itself.
func TestGroupStopsAllOnFirstFailure(t *testing.T) {
	g, _ := NewGroup(context.Background())
	stopped := make(chan struct{})
	g.Go("waiter", func(ctx context.Context) error {
		<-ctx.Done()
		close(stopped)
		return nil
	})
	g.Go("failer", func(context.Context) error { return errors.New("boom") })
	err := g.Wait()
	if err == nil || !strings.HasPrefix(err.Error(), "failer: boom") {
		t.Fatalf("Wait: %v", err)
	}
	<-stopped
}

// Every ticks until its context ends, then returns.
func TestEveryStopsWithItsContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	var n atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		Every(ctx, time.Millisecond, func(time.Time) {
			if n.Add(1) == 3 {
				cancel()
			}
		})
	}()
	<-done
	if n.Load() < 3 {
		t.Fatalf("%d ticks", n.Load())
	}
}

func TestWaitAll(t *testing.T) {
	a, b := make(chan struct{}), make(chan struct{})
	close(a)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := WaitAll(ctx, []chan struct{}{a, b}); !errors.Is(err, context.Canceled) {
		t.Fatalf("b open, ctx done: %v", err)
	}
	close(b)
	if err := WaitAll(context.Background(), []chan struct{}{a, b}); err != nil {
		t.Fatal(err)
	}
}
