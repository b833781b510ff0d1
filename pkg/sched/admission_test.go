package sched

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/kvferry/kvferry/pkg/blockpool"

	"github.com/kvferry/kvferry/internal/poll"
)

func admitAsync(a *Admission, ctx context.Context, n int) <-chan error {
	out := make(chan error, 1)
	go func() {
		done, err := a.Admit(ctx, n)
		if err == nil {
			done()
		}
		out <- err
	}()
	return out
}

// waitFor polls cond on a ticker until it holds or a deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	poll.Until(t, 30*time.Second, time.Millisecond, what, cond)
}

// A request that does not fit waits, in arrival order, and is admitted
// when blocks come back; a later small request does not overtake it.
func TestAdmissionWaitsInArrivalOrder(t *testing.T) {
	pool, _ := blockpool.New(10, 8)
	held, _ := pool.Allocate(context.Background(), 8)
	a := NewAdmission(pool, 16, nil)
	big := admitAsync(a, context.Background(), 6) // needs 6, 2 free
	waitFor(t, "the big request to queue", func() bool { return a.Waiting() == 1 })
	small := admitAsync(a, context.Background(), 1) // 2 free, but behind the big one
	waitFor(t, "the small request to queue", func() bool { return a.Waiting() == 2 })
	select {
	case err := <-small:
		t.Fatalf("the small request overtook the big one: %v", err)
	default:
	}
	if err := pool.Release(held[:4]); err != nil { // 6 free now
		t.Fatal(err)
	}
	if err := <-big; err != nil {
		t.Fatal(err)
	}
	if err := <-small; err != nil {
		t.Fatal(err)
	}
	if a.Waiting() != 0 {
		t.Fatalf("%d still waiting", a.Waiting())
	}
}

// A cancelled waiting request leaves the queue and holds nothing; the one
// behind it moves up.
func TestAdmissionCancelWhileWaiting(t *testing.T) {
	pool, _ := blockpool.New(4, 8)
	held, _ := pool.Allocate(context.Background(), 4)
	a := NewAdmission(pool, 16, nil)
	ctx, cancel := context.WithCancel(context.Background())
	first := admitAsync(a, ctx, 2)
	waitFor(t, "queue", func() bool { return a.Waiting() == 1 })
	second := admitAsync(a, context.Background(), 1)
	waitFor(t, "queue", func() bool { return a.Waiting() == 2 })
	cancel()
	if err := <-first; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled waiter: %v", err)
	}
	if c := pool.Counts(); c.Free != 0 || c.Owned != 4 {
		t.Fatalf("a cancelled waiter changed the pool: %+v", c)
	}
	_ = pool.Release(held[:1])
	if err := <-second; err != nil {
		t.Fatal(err)
	}
}

// Past MaxQueue waiters a request is refused at once; a request larger
// than the pool is refused at once whatever the queue.
func TestAdmissionBounds(t *testing.T) {
	pool, _ := blockpool.New(4, 8)
	held, _ := pool.Allocate(context.Background(), 4)
	a := NewAdmission(pool, 1, nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	w := admitAsync(a, ctx, 1)
	waitFor(t, "queue", func() bool { return a.Waiting() == 1 })
	if _, err := a.Admit(context.Background(), 1); !errors.Is(err, ErrQueueFull) {
		t.Fatalf("over the queue bound: %v", err)
	}
	if _, err := a.Admit(context.Background(), 5); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("larger than the pool: %v", err)
	}
	_ = pool.Release(held)
	if err := <-w; err != nil {
		t.Fatal(err)
	}
}
