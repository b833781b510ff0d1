package router

import (
	"hash/fnv"
	"sync"
	"sync/atomic"
	"time"
)

// backend is one context or generation server as the router sees it.
type backend struct {
	addr     string
	role     string
	inflight atomic.Int64
	gauge    interface{ Set(float64) } // the exported in-flight gauge; may be nil
	ready    atomic.Bool               // from the health loop; true until first checked

	mu       sync.Mutex // guards the breaker
	failures int        // consecutive
	openAt   time.Time  // zero: closed
	probing  bool       // half-open: one request is trying
}

// Circuit breaker settings: three consecutive failures eject a server for
// breakerCooldown; then one request probes it (half-open) and its result
// closes or reopens the breaker.
const (
	breakerThreshold = 3
	breakerCooldown  = 5 * time.Second
)

// admit reports whether the breaker lets a request through now, taking the
// half-open probe slot when it is the one.
func (b *backend) admit(now time.Time) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case b.openAt.IsZero():
		return true
	case now.Sub(b.openAt) < breakerCooldown || b.probing:
		return false
	default:
		b.probing = true
		return true
	}
}

// abandon gives back a half-open probe slot taken by a pick that was never
// used, without judging the server.
func (b *backend) abandon() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.probing = false
}

// result records a request's outcome on this server.
func (b *backend) result(ok bool, now time.Time) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.probing = false
	if ok {
		b.failures, b.openAt = 0, time.Time{}
		return
	}
	b.failures++
	if b.failures >= breakerThreshold || !b.openAt.IsZero() {
		b.openAt = now
	}
}

// pickRequest is what the plugins see of a request.
type pickRequest struct {
	prefixHash uint64 // hash of the prompt's first block; 0 for none
	exclude    map[*backend]bool
	now        time.Time
}

// Filter drops backends that must not get the request.
type Filter interface {
	Filter(req *pickRequest, bs []*backend) []*backend
}

// Scorer scores a backend; higher is better.
type Scorer interface {
	Score(req *pickRequest, b *backend) float64
}

// filterFunc adapts a predicate to Filter.
type filterFunc func(req *pickRequest, b *backend) bool

func (f filterFunc) Filter(req *pickRequest, bs []*backend) []*backend {
	out := bs[:0:0]
	for _, b := range bs {
		if f(req, b) {
			out = append(out, b)
		}
	}
	return out
}

var (
	// notExcluded drops servers that already failed this request.
	notExcluded = filterFunc(func(req *pickRequest, b *backend) bool { return !req.exclude[b] })
	// readyOnly drops servers whose readiness probe fails.
	readyOnly = filterFunc(func(_ *pickRequest, b *backend) bool { return b.ready.Load() })
)

// leastInflight prefers the server with the least work in flight.
type leastInflight struct{}

func (leastInflight) Score(_ *pickRequest, b *backend) float64 { return -float64(b.inflight.Load()) }

// prefixAffinity prefers, among equally loaded servers, the one a shared
// prompt prefix hashes to (rendezvous hashing), so its reuse cache is hit.
// Worth half a request in flight: load wins over affinity.
type prefixAffinity struct{}

func (prefixAffinity) Score(req *pickRequest, b *backend) float64 {
	if req.prefixHash == 0 {
		return 0
	}
	h := fnv.New64a()
	_, _ = h.Write([]byte(b.addr))
	x := h.Sum64() ^ req.prefixHash
	x ^= x >> 33
	x *= 0xff51afd7ed558ccd
	x ^= x >> 33
	return 0.5 * float64(x>>11) / float64(1<<53)
}

// policy is a filter chain, scorers and the max-score picker with a
// round-robin tie break.
type policy struct {
	filters []Filter
	scorers []Scorer
	next    atomic.Uint64
}

// pick chooses a backend and counts it in flight; nil when none passes.
// If readiness filters everything out, it falls back to the unfiltered
// (not excluded) set: a router whose probes lag should still try.
func (p *policy) pick(req *pickRequest, all []*backend) *backend {
	cands := notExcluded.Filter(req, all)
	base := cands
	for _, f := range p.filters {
		cands = f.Filter(req, cands)
	}
	if len(cands) == 0 {
		cands = base
	}
	// The breaker is the last word: an open one is never tried, and a
	// half-open one admits a single probe.
	start := int(p.next.Add(1))
	var best *backend
	bestScore := 0.0
	for i := range cands {
		b := cands[(start+i)%len(cands)]
		s := 0.0
		for _, sc := range p.scorers {
			s += sc.Score(req, b)
		}
		if best == nil || s > bestScore {
			if b.admitPeek(req.now) {
				best, bestScore = b, s
			}
		}
	}
	if best == nil || !best.admit(req.now) {
		return nil
	}
	best.add(1)
	return best
}

// add moves the in-flight count and its gauge.
func (b *backend) add(n int64) {
	v := b.inflight.Add(n)
	if b.gauge != nil {
		b.gauge.Set(float64(v))
	}
}

// admitPeek is admit without taking the half-open slot.
func (b *backend) admitPeek(now time.Time) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.openAt.IsZero() || (now.Sub(b.openAt) >= breakerCooldown && !b.probing)
}
