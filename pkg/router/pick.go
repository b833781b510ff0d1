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
	record   func(n int64) // exports the in-flight count; may be nil
	ready    atomic.Bool   // from the health loop; true until first checked

	// digest is the context server's prefix cache as its last
	// PrefixDigest listed it (routing hashes); nil before the first.
	digest atomic.Pointer[map[uint64]struct{}]

	// gauges orders setting b's metric series against deleting them when
	// discovery drops b: once forgotten, a request still finishing on b
	// (or a digest poll) never brings its series back.
	gauges    sync.Mutex
	forgotten bool

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

// Request is what routing plugins see of a request.
type Request struct {
	PrefixHash uint64 // hash of the prompt's first block; 0 for none
	// BlockHashes are the routing hashes of the prompt's full blocks under
	// its tenant (executor.RouteHashes), for a context server's pick while
	// the router polls digests (PrefixDigestInterval); nil otherwise.
	BlockHashes []uint64
	Now         time.Time // the pick's clock (breakers, plugins with time)
	exclude     map[*backend]bool
}

// Server is what routing plugins see of a context or generation server.
type Server interface {
	Addr() string
	Role() string // "context" or "generation"
	Inflight() int64
	Ready() bool // the last readiness probe answered SERVING
	// CachedPrefix is how many leading hashes of a prompt's BlockHashes
	// the server's prefix cache held at its last digest (0 for a
	// generation server, or before the first digest).
	CachedPrefix(hashes []uint64) int
}

func (b *backend) Addr() string    { return b.addr }
func (b *backend) Role() string    { return b.role }
func (b *backend) Inflight() int64 { return b.inflight.Load() }
func (b *backend) Ready() bool     { return b.ready.Load() }

func (b *backend) CachedPrefix(hashes []uint64) int {
	d := b.digest.Load()
	if d == nil {
		return 0
	}
	for i, h := range hashes {
		if _, ok := (*d)[h]; !ok {
			return i
		}
	}
	return len(hashes)
}

// Filter drops servers that must not get the request. It returns a
// subset of servers (plugins never make servers up).
type Filter interface {
	Filter(req *Request, servers []Server) []Server
}

// Scorer scores a server for the request; higher is better. A chain adds
// its scorers' scores, each times its weight.
type Scorer interface {
	Score(req *Request, s Server) float64
}

// Scored is a candidate and its summed score.
type Scored struct {
	Server
	Score float64
}

// Picker chooses one of the scored candidates (never empty).
type Picker interface {
	Pick(req *Request, candidates []Scored) Server
}

// FilterFunc adapts a predicate to Filter.
type FilterFunc func(req *Request, s Server) bool

// Filter keeps the servers the predicate admits.
func (f FilterFunc) Filter(req *Request, servers []Server) []Server {
	out := servers[:0:0]
	for _, s := range servers {
		if f(req, s) {
			out = append(out, s)
		}
	}
	return out
}

// ReadyOnly drops servers whose readiness probe fails.
var ReadyOnly = FilterFunc(func(_ *Request, s Server) bool { return s.Ready() })

// LeastInflight prefers the server with the least work in flight (its
// score is minus the requests in flight there).
type LeastInflight struct{}

// Score is minus the server's requests in flight.
func (LeastInflight) Score(_ *Request, s Server) float64 { return -float64(s.Inflight()) }

// PrefixAffinity prefers the server a shared prompt prefix hashes to
// (rendezvous hashing), so its reuse cache is hit: a score in [0, 1).
// At weight 0.5 (the default) it is worth half a request in flight, so
// load wins over affinity.
type PrefixAffinity struct{}

// Score is the server's rendezvous weight for the prompt's prefix.
func (PrefixAffinity) Score(req *Request, s Server) float64 {
	if req.PrefixHash == 0 {
		return 0
	}
	h := fnv.New64a()
	_, _ = h.Write([]byte(s.Addr()))
	x := h.Sum64() ^ req.PrefixHash
	x ^= x >> 33
	x *= 0xff51afd7ed558ccd
	x ^= x >> 33
	return float64(x>>11) / float64(1<<53)
}

// PrecisePrefix prefers the context server whose prefix cache holds the
// most of the prompt's leading blocks, as its last PrefixDigest listed
// them: a score in [0, 1], the share of the prompt's full blocks it would
// reuse. Unlike PrefixAffinity it sees what each cache really holds
// (evictions included) and counts every block, not the first only.
type PrecisePrefix struct{}

// Score is the share of the prompt's full blocks cached on the server.
func (PrecisePrefix) Score(req *Request, s Server) float64 {
	if len(req.BlockHashes) == 0 {
		return 0
	}
	return float64(s.CachedPrefix(req.BlockHashes)) / float64(len(req.BlockHashes))
}

// MaxScore picks the highest score; ties go round robin.
type MaxScore struct{ next atomic.Uint64 }

// Pick returns the first candidate with the highest score, starting the
// scan one further each call.
func (m *MaxScore) Pick(_ *Request, cands []Scored) Server {
	start := int(m.next.Add(1))
	best := -1
	for i := range cands {
		k := (start + i) % len(cands)
		if best < 0 || cands[k].Score > cands[best].Score {
			best = k
		}
	}
	return cands[best].Server
}

// policy is a routing chain: filters, weighted scorers and a picker, with
// the router's own rules around them (excluded servers never, the
// breaker's word last).
type policy struct {
	filters []Filter
	scorers []Weighted
	picker  Picker
}

func newPolicy(r Routing) *policy {
	p := &policy{filters: r.Filters, scorers: r.Scorers, picker: r.Picker}
	if p.picker == nil {
		p.picker = &MaxScore{}
	}
	return p
}

// pick chooses a backend and counts it in flight; nil when none passes.
// If the filters drop everything, it falls back to the unfiltered (not
// excluded) set: a router whose probes lag should still try.
func (p *policy) pick(req *Request, all []*backend) *backend {
	var base []Server
	for _, b := range all {
		if !req.exclude[b] {
			base = append(base, b)
		}
	}
	cands := base
	for _, f := range p.filters {
		cands = f.Filter(req, cands)
	}
	if len(cands) == 0 {
		cands = base
	}
	// The breaker is the last word: an open one is never tried, and a
	// half-open one admits a single probe.
	scored := make([]Scored, 0, len(cands))
	for _, s := range cands {
		b, ok := s.(*backend)
		if !ok || !b.admitPeek(req.Now) {
			continue
		}
		sum := 0.0
		for _, w := range p.scorers {
			sum += w.Weight * w.Score(req, s)
		}
		scored = append(scored, Scored{Server: s, Score: sum})
	}
	if len(scored) == 0 {
		return nil
	}
	best, ok := p.picker.Pick(req, scored).(*backend)
	if !ok || !best.admit(req.Now) {
		return nil
	}
	best.add(1)
	return best
}

// add moves the in-flight count and its gauge.
func (b *backend) add(n int64) {
	b.inflight.Add(n)
	if b.record != nil {
		// Read under the lock: concurrent adds publish the latest count.
		b.gauge(func() { b.record(b.inflight.Load()) })
	}
}

// gauge sets b's series with set, unless discovery forgot b.
func (b *backend) gauge(set func()) {
	b.gauges.Lock()
	defer b.gauges.Unlock()
	if !b.forgotten {
		set()
	}
}

// forget deletes b's series with del, for good.
func (b *backend) forget(del func()) {
	b.gauges.Lock()
	defer b.gauges.Unlock()
	b.forgotten = true
	del()
}

// admitPeek is admit without taking the half-open slot.
func (b *backend) admitPeek(now time.Time) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.openAt.IsZero() || (now.Sub(b.openAt) >= breakerCooldown && !b.probing)
}
