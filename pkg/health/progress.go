package health

import (
	"sync"
	"sync/atomic"
	"time"
)

// Progress tracks global progress while work is pending. It is lock-free,
// so a wedged server cannot stall the evaluator reading it.
type Progress struct {
	last    atomic.Int64 // unix nanos of the last progress
	pending atomic.Int64
}

// NewProgress returns a tracker whose last progress is now.
func NewProgress(now time.Time) *Progress {
	p := &Progress{}
	p.last.Store(now.UnixNano())
	return p
}

// Touch records progress at now: a prefill done, a block moved, a token
// decoded.
// A nil *Progress ignores every call, as do nil *Sessions.
func (p *Progress) Touch(now time.Time) {
	if p != nil {
		p.last.Store(now.UnixNano())
	}
}

// Begin records one more request pending; End one fewer. Begin after a
// stretch of idleness restarts the clock: idle time is not lack of progress.
func (p *Progress) Begin(now time.Time) {
	if p != nil && p.pending.Add(1) == 1 {
		p.Touch(now)
	}
}

// End records a request finished.
func (p *Progress) End() {
	if p != nil {
		p.pending.Add(-1)
	}
}

// Snapshot returns the pending count and the last progress.
func (p *Progress) Snapshot() (pending int64, last time.Time) {
	return p.pending.Load(), time.Unix(0, p.last.Load())
}

// Sessions tracks the in-flight transfer sessions of a server: when each
// started and when it last moved bytes. A small mutex, never held across
// anything but map work.
type Sessions struct {
	mu   sync.Mutex
	next uint64
	m    map[uint64]*sessionTimes
}

type sessionTimes struct{ start, progress time.Time }

// NewSessions returns an empty tracker.
func NewSessions() *Sessions { return &Sessions{m: map[uint64]*sessionTimes{}} }

// Add records a session started at now and returns its handle.
func (s *Sessions) Add(now time.Time) uint64 {
	if s == nil {
		return 0
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.next++
	s.m[s.next] = &sessionTimes{start: now, progress: now}
	return s.next
}

// Touch records progress of session id at now.
func (s *Sessions) Touch(id uint64, now time.Time) {
	if s == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if t, ok := s.m[id]; ok {
		t.progress = now
	}
}

// Remove forgets session id.
func (s *Sessions) Remove(id uint64) {
	if s == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.m, id)
}

// SessionsSnapshot summarises the in-flight sessions at a moment.
type SessionsSnapshot struct {
	InFlight int
	// OldestAge is the age of the oldest in-flight session.
	OldestAge time.Duration
	// OldestStuckAge is the age of the oldest session with no progress for
	// the progress deadline or past the transfer deadline; 0 when none.
	OldestStuckAge time.Duration
	// LongestPastDeadline is how far the worst session is past its transfer
	// deadline; 0 when none is.
	LongestPastDeadline time.Duration
}

func (s *Sessions) snapshot(now time.Time, progressDeadline, transferDeadline time.Duration) SessionsSnapshot {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := SessionsSnapshot{InFlight: len(s.m)}
	for _, t := range s.m {
		age := now.Sub(t.start)
		out.OldestAge = max(out.OldestAge, age)
		stuck := now.Sub(t.progress) >= progressDeadline || age > transferDeadline
		if stuck {
			out.OldestStuckAge = max(out.OldestStuckAge, age)
		}
		if age > transferDeadline {
			out.LongestPastDeadline = max(out.LongestPastDeadline, age-transferDeadline)
		}
	}
	return out
}
