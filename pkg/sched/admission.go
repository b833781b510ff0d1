package sched

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// ErrQueueFull is Admit's answer when MaxQueue requests already wait.
var ErrQueueFull = errors.New("sched: the admission queue is full")

// ErrTooLarge is Admit's answer for a request needing more blocks than the
// pool holds: no amount of waiting admits it.
var ErrTooLarge = errors.New("sched: the request needs more blocks than the pool holds")

// Blocks is what admission needs of a block pool.
type Blocks interface {
	Capacity() int
	// Available is FREE plus evictable blocks.
	Available() int
	// Freed is closed when a block next becomes allocatable.
	Freed() <-chan struct{}
}

// Queue is the admission order, without I/O: who waits for blocks, in
// arrival order, at most max of them, and whether an admitted request is
// allocating now. Only the head may be admitted, and only when its blocks
// are available — so a long prompt is never starved by short ones that
// arrive after it. Admission drives it with goroutines and channels; the
// scheduler simulation drives it on a virtual clock.
type Queue[T comparable] struct {
	max     int
	waiting []T  // head first
	busy    bool // an admitted request is allocating: the next waits for Done
}

// NewQueue returns an empty queue of at most max waiting.
func NewQueue[T comparable](max int) *Queue[T] { return &Queue[T]{max: max} }

// Arrive places a request needing n blocks when available are: admitted at
// once (nobody waits, nobody allocates, the blocks are there: the caller
// allocates, then calls Done), queued, or refused with ErrQueueFull.
func (q *Queue[T]) Arrive(x T, n, available int) (admitted bool, err error) {
	if len(q.waiting) == 0 && !q.busy && available >= n {
		q.busy = true
		return true, nil
	}
	if len(q.waiting) >= q.max {
		return false, fmt.Errorf("%w (%d waiting)", ErrQueueFull, q.max)
	}
	q.waiting = append(q.waiting, x)
	return false, nil
}

// Head is the request whose turn it is, if any: the first waiting one
// while nobody allocates.
func (q *Queue[T]) Head() (T, bool) {
	if len(q.waiting) == 0 || q.busy {
		var zero T
		return zero, false
	}
	return q.waiting[0], true
}

// Admit admits the head (its blocks are available): it leaves the queue
// and allocates; Done ends its allocation.
func (q *Queue[T]) Admit() {
	q.waiting = q.waiting[1:]
	q.busy = true
}

// Done ends an admitted request's allocation: the next head's turn.
func (q *Queue[T]) Done() { q.busy = false }

// Leave removes a waiting request (its wait ended: cancelled, deadline).
func (q *Queue[T]) Leave(x T) {
	if i := slices.Index(q.waiting, x); i >= 0 {
		q.waiting = slices.Delete(q.waiting, i, i+1)
	}
}

// Len is the number waiting.
func (q *Queue[T]) Len() int { return len(q.waiting) }

// Admission is a server's waiting queue in front of block allocation: a
// request that cannot get its blocks waits, in arrival order, until they
// are available, its context ends, or — with MaxQueue requests already
// waiting — is refused at once. A waiting request holds nothing: it
// allocates only when admitted, so a cancel while waiting leaves nothing
// behind. The order is a Queue's.
type Admission struct {
	pool Blocks
	// observe, when set, is called with each admitted request's wait and
	// the number still waiting, and with wait < 0 when only the number
	// waiting changed (metrics).
	observe func(wait time.Duration, waiting int)

	mu    sync.Mutex
	queue *Queue[*turn]
}

type turn struct {
	head chan struct{} // closed when this turn is at the head
}

// NewAdmission returns the queue in front of pool (maxQueue ≥ 0 waiting).
func NewAdmission(pool Blocks, maxQueue int, observe func(wait time.Duration, waiting int)) *Admission {
	return &Admission{pool: pool, observe: observe, queue: NewQueue[*turn](maxQueue)}
}

// Waiting is the number of requests in the queue.
func (a *Admission) Waiting() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.queue.Len()
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
	admitted, err := a.queue.Arrive(t, n, a.pool.Available())
	if err != nil || admitted {
		a.mu.Unlock()
		if err != nil {
			return nil, err
		}
		a.record(start)
		return a.release, nil
	}
	a.signalHeadLocked()
	waiting := a.queue.Len()
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
	a.queue.Admit() // t is the head
	a.mu.Unlock()
	a.record(start)
	return a.release, nil
}

func (a *Admission) record(start time.Time) {
	if a.observe != nil {
		a.observe(time.Since(start), a.Waiting())
	}
}

// signalHeadLocked tells the head, if any, that it is its turn.
func (a *Admission) signalHeadLocked() {
	if h, ok := a.queue.Head(); ok {
		closeOnce(h.head)
	}
}

// release ends an admitted request's allocation and hands the head on.
func (a *Admission) release() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.queue.Done()
	a.signalHeadLocked()
}

// leave removes a waiting turn (its context ended); if it was the head,
// the next one becomes the head.
func (a *Admission) leave(t *turn) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.queue.Leave(t)
	a.signalHeadLocked()
	if a.observe != nil {
		a.observe(-1, a.queue.Len())
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
