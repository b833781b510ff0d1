package kvtransfer

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Outcome is a session's logical outcome, decided once and reported to the
// owner at once (docs/architecture.md, Transfers).
type Outcome uint8

// Logical outcomes.
const (
	OutcomeNone Outcome = iota
	OutcomeCompleted
	OutcomeFailed
	OutcomeCancelled
	OutcomeTimedOut
)

func (o Outcome) String() string {
	if names := [...]string{"none", "completed", "failed", "cancelled", "timed_out"}; int(o) < len(names) {
		return names[o]
	}
	return fmt.Sprintf("outcome(%d)", uint8(o))
}

// Disposition is a session's physical disposition: whether a transport or
// peer may still touch the session's memory.
type Disposition uint8

// Physical dispositions.
const (
	// DispActive: the transfer runs; its blocks are IN_FLIGHT.
	DispActive Disposition = iota
	// DispQuiesced: proven that nothing touches the memory any more.
	DispQuiesced
	// DispInDoubt: ended, but quiescence is not proven; blocks QUARANTINED.
	DispInDoubt
	// DispPoisoned: quiescence was never proven before the quarantine
	// deadline; blocks out of circulation for good.
	DispPoisoned
)

func (d Disposition) String() string {
	if names := [...]string{"active", "quiesced", "in_doubt", "poisoned"}; int(d) < len(names) {
		return names[d]
	}
	return fmt.Sprintf("disposition(%d)", uint8(d))
}

// Proof is what proves a session's memory quiet. A timer, a lease or a
// successful release call is never proof.
type Proof uint8

// Proofs of quiescence.
const (
	// ProofTransportTerminal: the transport reports the posted operation terminal.
	ProofTransportTerminal Proof = iota + 1
	// ProofAbortAck: the peer acknowledged an abort with "no more writes".
	ProofAbortAck
	// ProofPeerDead: the peer process is proven dead (same host).
	ProofPeerDead
	// ProofNeverPosted: nothing was ever posted to a transport.
	ProofNeverPosted
)

// Timeouts are a session's limits (defaults: 10 s, 60 s, 120 s; the README's Configuration).
type Timeouts struct {
	// Progress ends an active transfer that moved no byte for this long.
	Progress time.Duration
	// Deadline ends an active transfer this long after it started.
	Deadline time.Duration
	// Quarantine poisons in-doubt blocks not proven quiet this long after
	// the session ended.
	Quarantine time.Duration
}

// Actions tell the owner what to do after a step. Several may be set.
type Actions uint8

// Actions the owner carries out, in this order.
const (
	// ActNotify: the logical outcome was just decided; answer the waiters.
	ActNotify Actions = 1 << iota
	// ActAbort: ask the transport and the peer to stop (best effort).
	ActAbort
	// ActQuarantine: move the session's pinned blocks to QUARANTINED.
	ActQuarantine
	// ActUnpin: drop the session's pins (blocks leave IN_FLIGHT).
	ActUnpin
	// ActUnquarantine: quiescence proven after quarantine; return the blocks.
	ActUnquarantine
	// ActPoison: the quarantine deadline passed; poison the blocks.
	ActPoison
)

// Has reports whether a is set.
func (as Actions) Has(a Actions) bool { return as&a != 0 }

// Session is the lifecycle of one transfer on one side, as a state machine
// that does no I/O: its owner feeds it events with the current time (from
// whatever clock it uses) and carries out the returned actions. This is
// what lets a deterministic simulation drive it.
//
// Queued (not started) → Active → Ended(outcome) with a disposition:
// Quiesced directly, or InDoubt → Quiesced (proof) / Poisoned (deadline).
type Session struct {
	t Timeouts

	started      bool
	startedAt    time.Time
	lastProgress time.Time
	bytes        int64

	outcome     Outcome
	endedAt     time.Time
	disp        Disposition
	proof       Proof
	transportOK bool // the transport finished its writes (sender) or all data arrived (receiver)
}

// NewSession returns a queued session.
func NewSession(t Timeouts) *Session { return &Session{t: t} }

// Outcome returns the logical outcome, OutcomeNone while undecided.
func (s *Session) Outcome() Outcome { return s.outcome }

// Disposition returns the physical disposition.
func (s *Session) Disposition() Disposition { return s.disp }

// Started reports whether the transfer was posted.
func (s *Session) Started() bool { return s.started }

// StartedAt returns when the transfer was posted.
func (s *Session) StartedAt() time.Time { return s.startedAt }

// EndedAt returns when the logical outcome was decided.
func (s *Session) EndedAt() time.Time { return s.endedAt }

// Bytes returns the bytes moved.
func (s *Session) Bytes() int64 { return s.bytes }

// Proof returns what proved quiescence (0 while not proven).
func (s *Session) ProofOf() Proof { return s.proof }

func (s *Session) String() string {
	return fmt.Sprintf("session{started=%v outcome=%s disp=%s bytes=%d}", s.started, s.outcome, s.disp, s.bytes)
}

// Start records that the transfer was posted at now: the progress timer and
// the deadline are anchored here, never at admission.
func (s *Session) Start(now time.Time) Actions {
	if s.started || s.outcome != OutcomeNone {
		return 0
	}
	s.started, s.startedAt, s.lastProgress = true, now, now
	return 0
}

// Progress records n bytes moved at now.
func (s *Session) Progress(now time.Time, n int64) Actions {
	if s.outcome != OutcomeNone || !s.started {
		return 0
	}
	s.bytes += n
	if n > 0 {
		s.lastProgress = now
	}
	return 0
}

// Complete records that the transfer finished: every byte moved and the
// transport reports the operation terminal. COMPLETED and quiesced.
func (s *Session) Complete(now time.Time) Actions {
	s.transportOK = true
	if s.outcome != OutcomeNone {
		// Late success after the session had ended: it proves quiescence.
		return s.Prove(now, ProofTransportTerminal)
	}
	return s.end(now, OutcomeCompleted, ProofTransportTerminal)
}

// Fail records a transport or peer failure (bad frame, checksum mismatch,
// connection lost). quiet is the proof when the failure itself proves that
// nothing touches the memory any more (the reader ended), else 0.
func (s *Session) Fail(now time.Time, quiet Proof) Actions {
	if s.outcome != OutcomeNone {
		if quiet != 0 {
			return s.Prove(now, quiet)
		}
		return 0
	}
	return s.end(now, OutcomeFailed, quiet)
}

// Returned records a synchronous transport call that came back with
// outcome o: its return is the proof (it no longer touches the memory), so
// the session ends quiesced. A later event changes nothing.
func (s *Session) Returned(now time.Time, o Outcome) Actions {
	if s.outcome != OutcomeNone || o == OutcomeNone {
		return s.Prove(now, ProofTransportTerminal)
	}
	return s.end(now, o, ProofTransportTerminal)
}

// Cancel records a local cancel. A queued session ends quiesced (nothing was
// posted); an active one ends in doubt and asks for an abort.
func (s *Session) Cancel(now time.Time) Actions {
	if s.outcome != OutcomeNone {
		return 0
	}
	if !s.started {
		return s.end(now, OutcomeCancelled, ProofNeverPosted)
	}
	return s.end(now, OutcomeCancelled, 0)
}

// Tick applies the timers at now: no progress for Progress or past the
// Deadline ends an active session TIMED_OUT (in doubt); an in-doubt session
// past the quarantine deadline is poisoned. A queued session never times
// out here: its wait is bounded by its request, not by the transfer.
func (s *Session) Tick(now time.Time) Actions {
	switch {
	case s.outcome == OutcomeNone && s.started:
		if now.Sub(s.lastProgress) >= s.t.Progress || now.Sub(s.startedAt) >= s.t.Deadline {
			return s.end(now, OutcomeTimedOut, 0)
		}
	case s.disp == DispInDoubt && now.Sub(s.endedAt) >= s.t.Quarantine:
		s.disp = DispPoisoned
		return ActPoison
	}
	return 0
}

// Prove records proof of quiescence. Before the outcome it does nothing
// (a quiet transport mid-transfer is not an outcome); after it, it returns
// in-doubt blocks to the pool.
func (s *Session) Prove(now time.Time, p Proof) Actions {
	if s.outcome == OutcomeNone || s.disp != DispInDoubt {
		return 0
	}
	s.disp, s.proof = DispQuiesced, p
	return ActUnquarantine
}

// QuarantineDeadline returns when an in-doubt session will be poisoned.
func (s *Session) QuarantineDeadline() time.Time { return s.endedAt.Add(s.t.Quarantine) }

// end decides the logical outcome once. With proof the blocks leave
// IN_FLIGHT at once; without, they are quarantined and an abort is asked.
func (s *Session) end(now time.Time, o Outcome, proof Proof) Actions {
	s.outcome, s.endedAt = o, now
	if proof != 0 {
		s.disp, s.proof = DispQuiesced, proof
		return ActNotify | ActUnpin
	}
	s.disp = DispInDoubt
	return ActNotify | ActAbort | ActQuarantine
}

// WriteOutcome is the outcome a Writer.Write that returned err reports:
// completed, timed out (its deadline or no progress), cancelled, or
// failed. A sender feeds it to Session.Returned.
func WriteOutcome(err error) Outcome {
	switch {
	case err == nil:
		return OutcomeCompleted
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, ErrNoProgress):
		return OutcomeTimedOut
	case errors.Is(err, context.Canceled):
		return OutcomeCancelled
	}
	return OutcomeFailed
}
