package sched

import (
	"errors"
	"fmt"
	"iter"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kvferry/kvferry/pkg/ticket"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

// Stage is where a request is on a server. A context server takes a
// request Queued → Prefilling → Advertised ⇄ Transferring → HandedOff; a
// generation server Queued → Transferring → Decoding, or, aggregated,
// Queued → Prefilling → Decoding. Any stage may end
// (Ended): finished, failed, cancelled, superseded or expired.
type Stage int

const (
	StageQueued       Stage = iota // waiting for its blocks: holds nothing
	StagePrefilling                // the engine writes its blocks
	StageAdvertised                // its blocks are offered under the handoff lease
	StageTransferring              // its blocks move between the servers
	StageDecoding                  // its sequence is in the decode batch
	StageHandedOff                 // the generation side has every block
	StageEnded
)

func (s Stage) String() string {
	return [...]string{"queued", "prefilling", "advertised", "transferring", "decoding", "handed_off", "ended"}[s]
}

// next lists the stages each stage may move to, besides Ended.
var next = [...][]Stage{
	StageQueued:       {StagePrefilling, StageTransferring},
	StagePrefilling:   {StageAdvertised, StageDecoding},
	StageAdvertised:   {StageTransferring},
	StageTransferring: {StageAdvertised, StageDecoding, StageHandedOff},
	StageDecoding:     {},
	StageHandedOff:    {},
	StageEnded:        {},
}

// ErrTransition is a move the lifecycle does not allow: a bookkeeping bug.
var ErrTransition = errors.New("sched: stage transition not allowed")

// Fingerprint identifies what was asked (prompt and sampling): a duplicate
// of a ticket must be the same request.
type Fingerprint [32]byte

// Request is one request's life on a server: its attempt, its stage, the
// holds (block references and transfer pins) it has not given back, and
// when it was cancelled and ended. It does no I/O and keeps no clock: its
// owner drives it with the time and carries out what it answers, like
// kvtransfer.Session.
type Request struct {
	attempt     uint32
	fingerprint Fingerprint
	stage       Stage
	advertised  bool // it arrived advertised (generation side) or was advertised here
	holds       int
	cancelAt    time.Time
	endedAt     time.Time
	freed       bool // cancel-to-free has been observed
}

// Req returns the request itself, so that a server's own request type
// that embeds Request can live in a Table.
func (r *Request) Req() *Request { return r }

// Attempt is the ticket's attempt this request serves.
func (r *Request) Attempt() uint32 { return r.attempt }

// Stage is where the request is.
func (r *Request) Stage() Stage { return r.stage }

// Holds is how many holds (references, pins) it has not given back.
func (r *Request) Holds() int { return r.holds }

// Done reports whether the request ended (handed off or ended).
func (r *Request) Done() bool { return r.stage == StageHandedOff || r.stage == StageEnded }

// Advance moves the request to stage s; a move the lifecycle does not
// allow (or any move of a request that ended) is ErrTransition.
func (r *Request) Advance(s Stage, now time.Time) error {
	for _, ok := range next[r.stage] {
		if ok == s {
			r.stage = s
			if s == StageAdvertised {
				r.advertised = true
			}
			if s == StageHandedOff {
				r.endedAt = now
			}
			return nil
		}
	}
	return fmt.Errorf("%w: %s → %s", ErrTransition, r.stage, s)
}

// End ends the request wherever it is (a handed-off request stays handed
// off). It reports whether this call ended it.
func (r *Request) End(now time.Time) bool {
	if r.Done() {
		return false
	}
	r.stage, r.endedAt = StageEnded, now
	return true
}

// Hold records one more hold on the request's blocks.
func (r *Request) Hold() { r.holds++ }

// Drop gives one hold back. When the last one goes after a cancel, it
// returns the cancel-to-free latency and true, once.
func (r *Request) Drop(now time.Time) (time.Duration, bool) {
	if r.holds == 0 {
		return 0, false // a bookkeeping bug; the pool's invariants report it
	}
	r.holds--
	return r.observeFree(now)
}

func (r *Request) observeFree(now time.Time) (time.Duration, bool) {
	if r.holds > 0 || r.cancelAt.IsZero() || r.freed {
		return 0, false
	}
	r.freed = true
	return now.Sub(r.cancelAt), true
}

// Cancelled is Cancel's answer: the structured outcome, whether the owner
// must stop the request's work (and end it), and the cancel-to-free
// latency when nothing was held. Whether the caller's resources are free
// is Holds() == 0 once the owner has acted.
type Cancelled struct {
	Outcome  kvferryv1.CancelOutcome
	Stop     bool
	Freed    time.Duration
	HasFreed bool
}

// Cancel cancels the request (the cancel outcomes of docs/architecture.md, Transfers): one not yet advertised
// is CANCELLED_BEFORE_ADVERTISE, one advertised or moving or decoding is
// CANCEL_REQUESTED_IN_FLIGHT (BACKEND_UNHEALTHY when the backend cannot be
// trusted to act on it), one that ended ALREADY_COMPLETE. The owner stops
// the work when Stop says so, then ends the request.
func (r *Request) Cancel(now time.Time, backendHealthy bool) Cancelled {
	if r.Done() {
		return Cancelled{Outcome: kvferryv1.CancelOutcome_CANCEL_OUTCOME_ALREADY_COMPLETE}
	}
	c := Cancelled{Outcome: kvferryv1.CancelOutcome_CANCEL_OUTCOME_CANCEL_REQUESTED_IN_FLIGHT, Stop: true}
	switch {
	case !r.advertised:
		c.Outcome = kvferryv1.CancelOutcome_CANCEL_OUTCOME_CANCELLED_BEFORE_ADVERTISE
	case !backendHealthy:
		c.Outcome = kvferryv1.CancelOutcome_CANCEL_OUTCOME_BACKEND_UNHEALTHY
	}
	if r.cancelAt.IsZero() {
		r.cancelAt = now
	}
	c.Freed, c.HasFreed = r.observeFree(now)
	return c
}

// Tracked is what a Table holds: a server's request type embedding Request.
type Tracked interface{ Req() *Request }

// Table is a server's request table, keyed by request id: which attempt
// is current, duplicates and stale attempts, cancels by ticket, tombstones
// of ended requests and draining. It is not safe for concurrent use: the
// server guards it with its lock.
type Table[T Tracked] struct {
	reqs map[string]T
	// MaxTombstones bounds the ended requests remembered; TTL is how long
	// one is remembered so that late duplicates and stale attempts are
	// recognised (well past any retry).
	MaxTombstones int
	TTL           time.Duration
	draining      bool
}

// DefaultTombstoneTTL is how long an ended request is remembered.
const DefaultTombstoneTTL = 10 * time.Minute

// NewTable returns an empty table.
func NewTable[T Tracked]() *Table[T] {
	return &Table[T]{reqs: map[string]T{}, MaxTombstones: ticket.MaxTombstones, TTL: DefaultTombstoneTTL}
}

// Arrival is what an arriving attempt is to the table.
type Arrival int

const (
	ArriveNew        Arrival = iota // a request the table has not seen
	ArriveDuplicate                 // the same attempt of the same request again
	ArriveSupersedes                // a newer attempt: the owner ends the previous one
)

// Errors of Arrive: the owner maps them to its protocol's codes.
var (
	ErrDraining = errors.New("the server is draining")
	ErrStale    = errors.New("stale attempt")
	ErrConflict = errors.New("the ticket is another request's (a different prompt or sampling)")
)

// Arrive decides what attempt of id is, given the table: new, a duplicate
// (the previous entry is returned), newer than the current one (the
// previous entry is returned for its owner to end), or refused — older
// than the current one (ErrStale), the same attempt of another request
// (ErrConflict), or the server draining (ErrDraining).
func (t *Table[T]) Arrive(id string, attempt uint32, fp Fingerprint) (prev T, a Arrival, err error) {
	if t.draining {
		return prev, 0, ErrDraining
	}
	prev, ok := t.reqs[id]
	if !ok {
		return prev, ArriveNew, nil
	}
	old := prev.Req()
	switch {
	case attempt < old.attempt:
		return prev, 0, fmt.Errorf("%w %d: attempt %d already seen", ErrStale, attempt, old.attempt)
	case attempt > old.attempt:
		return prev, ArriveSupersedes, nil
	case fp != old.fingerprint:
		return prev, 0, fmt.Errorf("ticket %s attempt %d: %w", id, attempt, ErrConflict)
	}
	return prev, ArriveDuplicate, nil
}

// Add puts a new request into the table, queued; r replaces any previous
// attempt of id (which its owner has ended).
func (t *Table[T]) Add(id string, attempt uint32, fp Fingerprint, advertised bool, r T) {
	*r.Req() = Request{attempt: attempt, fingerprint: fp, advertised: advertised}
	t.reqs[id] = r
}

// Get returns attempt of id, if that is the table's current one.
func (t *Table[T]) Get(id string, attempt uint32) (T, bool) {
	r, ok := t.reqs[id]
	if !ok || r.Req().attempt != attempt {
		var zero T
		return zero, false
	}
	return r, true
}

// Current returns the table's entry for id, whatever its attempt.
func (t *Table[T]) Current(id string) (T, bool) {
	r, ok := t.reqs[id]
	return r, ok
}

// All iterates the table.
func (t *Table[T]) All() iter.Seq2[string, T] {
	return func(yield func(string, T) bool) {
		for id, r := range t.reqs {
			if !yield(id, r) {
				return
			}
		}
	}
}

// Len is the number of requests remembered, tombstones included.
func (t *Table[T]) Len() int { return len(t.reqs) }

// Sweep forgets ended requests that hold nothing once they are older than
// TTL, and the oldest past MaxTombstones. It returns how many it forgot.
func (t *Table[T]) Sweep(now time.Time) int {
	ended := map[string]time.Time{}
	for id, r := range t.reqs {
		if q := r.Req(); q.Done() && q.holds == 0 {
			ended[id] = q.endedAt
		}
	}
	forget := ticket.Forget(ended, now, t.TTL, t.MaxTombstones)
	for _, id := range forget {
		delete(t.reqs, id)
	}
	return len(forget)
}

// Drain refuses every later arrival (ErrDraining) and returns the
// requests that have not ended, for the owner to wait for.
func (t *Table[T]) Drain() []T {
	t.draining = true
	var live []T
	for _, r := range t.reqs {
		if !r.Req().Done() {
			live = append(live, r)
		}
	}
	return live
}

// ArriveStatus is the gRPC status of an Arrive error: draining is
// UNAVAILABLE (the router tries another server), a stale attempt
// FAILED_PRECONDITION, another request's ticket ALREADY_EXISTS.
func ArriveStatus(err error) error {
	switch {
	case errors.Is(err, ErrDraining):
		return status.Error(codes.Unavailable, err.Error())
	case errors.Is(err, ErrStale):
		return status.Error(codes.FailedPrecondition, err.Error())
	case errors.Is(err, ErrConflict):
		return status.Error(codes.AlreadyExists, err.Error())
	}
	return status.Error(codes.Internal, err.Error())
}
