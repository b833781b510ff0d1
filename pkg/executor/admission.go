package executor

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// ErrQueueFull is Admit's answer when MaxQueue requests already wait.
var ErrQueueFull = errors.New("executor: the admission queue is full")

// ErrTooLarge is Admit's answer for a request needing more blocks than the
// pool holds: no amount of waiting admits it.
var ErrTooLarge = errors.New("executor: the request needs more blocks than the pool holds")

// Blocks is what admission needs of a block pool.
type Blocks interface {
	Capacity() int
	// Available is FREE plus evictable blocks.
	Available() int
	// Freed is closed when a block next becomes allocatable.
	Freed() <-chan struct{}
}

// Admission is a server's waiting queue in front of block allocation: a
// request that cannot get its blocks waits, in arrival order, until they
// are available, its context ends, or — with MaxQueue requests already
// waiting — is refused at once. A waiting request holds nothing: it
// allocates only when admitted, so a cancel while waiting leaves nothing
// behind. Only the head of the queue may allocate, so a long prompt is
// never starved by short ones that arrive after it.
type Admission struct {
	pool     Blocks
	maxQueue int
	// observe, when set, is called with each admitted request's wait and
	// the number still waiting, and with wait < 0 when only the number
	// waiting changed (metrics).
	observe func(wait time.Duration, waiting int)

	mu    sync.Mutex
	queue []*turn // head first
	busy  bool    // an admitted request is allocating: the next waits for Done
}

type turn struct {
	head chan struct{} // closed when this turn is at the head
}

// NewAdmission returns the queue in front of pool (maxQueue ≥ 0 waiting).
func NewAdmission(pool Blocks, maxQueue int, observe func(wait time.Duration, waiting int)) *Admission {
	return &Admission{pool: pool, maxQueue: maxQueue, observe: observe}
}

// Waiting is the number of requests in the queue.
func (a *Admission) Waiting() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.queue)
}

// Admit waits until n blocks are available and it is this request's turn.
// On success the caller allocates and then calls done (whether the
// allocation succeeded or not), which lets the next request in.
func (a *Admission) Admit(ctx context.Context, n int) (done func(), err error) {
	if n > a.pool.Capacity() {
		return nil, fmt.Errorf("%w: %d blocks, the pool holds %d", ErrTooLarge, n, a.pool.Capacity())
	}
	start := time.Now()
	t := &turn{head: make(chan struct{})}
	a.mu.Lock()
	if len(a.queue) == 0 && !a.busy && a.pool.Available() >= n {
		a.busy = true // the fast path: nobody waits, the blocks are there
		a.mu.Unlock()
		a.record(start)
		return a.release, nil
	}
	if len(a.queue) >= a.maxQueue {
		a.mu.Unlock()
		return nil, fmt.Errorf("%w (%d waiting)", ErrQueueFull, a.maxQueue)
	}
	a.queue = append(a.queue, t)
	if len(a.queue) == 1 && !a.busy {
		close(t.head)
	}
	waiting := len(a.queue)
	a.mu.Unlock()
	if a.observe != nil {
		a.observe(-1, waiting)
	}

	// Wait for the head of the queue, then for the blocks.
	select {
	case <-t.head:
	case <-ctx.Done():
		a.leave(t)
		return nil, ctx.Err()
	}
	for {
		freed := a.pool.Freed() // before the check: a free after it closes this
		if a.pool.Available() >= n {
			break
		}
		select {
		case <-freed:
		case <-ctx.Done():
			a.leave(t)
			return nil, ctx.Err()
		}
	}
	a.mu.Lock()
	a.queue = a.queue[1:] // t is the head
	a.busy = true
	a.mu.Unlock()
	a.record(start)
	return a.release, nil
}

func (a *Admission) record(start time.Time) {
	if a.observe != nil {
		a.observe(time.Since(start), a.Waiting())
	}
}

// release ends an admitted request's allocation and hands the head on.
func (a *Admission) release() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.busy = false
	if len(a.queue) > 0 {
		closeOnce(a.queue[0].head)
	}
}

// leave removes a waiting turn (its context ended); if it was the head,
// the next one becomes the head.
func (a *Admission) leave(t *turn) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for i, x := range a.queue {
		if x == t {
			a.queue = append(a.queue[:i], a.queue[i+1:]...)
			break
		}
	}
	if len(a.queue) > 0 && !a.busy {
		closeOnce(a.queue[0].head)
	}
	if a.observe != nil {
		a.observe(-1, len(a.queue))
	}
}

func closeOnce(c chan struct{}) {
	select {
	case <-c:
	default:
		close(c)
	}
}

// AdmitStatus is the gRPC status of an Admit error: a full queue is
// RESOURCE_EXHAUSTED (the router answers 429 with Retry-After), a request
// larger than the pool INVALID_ARGUMENT, a context end its own code.
func AdmitStatus(err error) error {
	switch {
	case errors.Is(err, ErrQueueFull):
		return status.Error(codes.ResourceExhausted, err.Error())
	case errors.Is(err, ErrTooLarge):
		return status.Error(codes.InvalidArgument, err.Error())
	}
	return status.FromContextError(err).Err()
}
