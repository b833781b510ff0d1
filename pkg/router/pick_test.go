package router

import (
	"testing"
	"time"
)

func backends(addrs ...string) []*backend {
	out := make([]*backend, len(addrs))
	for i, a := range addrs {
		out[i] = &backend{addr: a, role: "context"}
		out[i].ready.Store(true)
	}
	return out
}

func defaultPolicy(t *testing.T) *policy {
	t.Helper()
	r, err := ParseRouting(DefaultRouting)
	if err != nil {
		t.Fatal(err)
	}
	return newPolicy(r)
}

func TestPickLeastInflightAndReadiness(t *testing.T) {
	bs := backends("a:1", "b:1", "c:1")
	p := defaultPolicy(t)
	now := time.Now()
	bs[0].inflight.Store(2)
	bs[1].inflight.Store(1)
	bs[2].ready.Store(false)
	if got := p.pick(&Request{Now: now}, bs); got != bs[1] {
		t.Fatalf("picked %s, want b:1 (least in flight among ready)", got.addr)
	}
	// Nothing ready: fall back to trying anyway.
	for _, b := range bs {
		b.ready.Store(false)
	}
	if got := p.pick(&Request{Now: now}, bs); got == nil {
		t.Fatal("no pick when no backend is ready")
	}
	if got := p.pick(&Request{Now: now, exclude: map[*backend]bool{bs[0]: true, bs[1]: true, bs[2]: true}}, bs); got != nil {
		t.Fatalf("picked %s although every backend is excluded", got.addr)
	}
}

func TestPrefixAffinityIsStable(t *testing.T) {
	bs := backends("a:1", "b:1", "c:1", "d:1")
	p := defaultPolicy(t)
	first := p.pick(&Request{PrefixHash: 42, Now: time.Now()}, bs)
	first.inflight.Add(-1)
	for range 10 {
		got := p.pick(&Request{PrefixHash: 42, Now: time.Now()}, bs)
		got.inflight.Add(-1)
		if got != first {
			t.Fatalf("prefix 42 went to %s, then %s", first.addr, got.addr)
		}
	}
}

func TestBreaker(t *testing.T) {
	bs := backends("a:1", "b:1")
	p := defaultPolicy(t)
	t0 := time.Now()
	for range breakerThreshold {
		bs[0].result(false, t0)
	}
	for range 5 {
		got := p.pick(&Request{Now: t0.Add(time.Second)}, bs)
		if got != bs[1] {
			t.Fatalf("open breaker still picked: %s", got.addr)
		}
		got.inflight.Add(-1)
	}
	// After the cooldown one probe goes through (half-open), no second.
	bs[1].inflight.Store(100) // make a:1 preferred
	later := t0.Add(breakerCooldown + time.Second)
	if got := p.pick(&Request{Now: later}, bs); got != bs[0] {
		t.Fatalf("half-open probe went to %v", got)
	}
	if got := p.pick(&Request{Now: later}, bs); got != bs[1] {
		t.Fatalf("second request during the probe went to %v", got)
	}
	bs[0].result(true, later)
	if got := p.pick(&Request{Now: later}, bs); got != bs[0] {
		t.Fatalf("closed breaker not picked: %v", got)
	}
	// A failed probe reopens at once.
	bs[0].result(false, later)
	bs[0].result(false, later)
	bs[0].result(false, later)
	if !bs[0].openAt.Equal(later) {
		t.Fatal("breaker not open after failures")
	}
}

// TestPrecisePrefix: the server whose last digest holds the most leading
// blocks of the prompt wins, against one with less work in flight (at a
// weight above the difference); a block missing in the middle ends the
// prefix; with no digest every server scores 0 and load decides.
func TestPrecisePrefix(t *testing.T) {
	bs := backends("a:1", "b:1", "c:1")
	r, err := ParseRouting("ready,least-inflight:1,precise-prefix:4,max-score")
	if err != nil {
		t.Fatal(err)
	}
	p := newPolicy(r)
	prompt := []uint64{11, 12, 13, 14}
	digest := func(b *backend, hs ...uint64) {
		set := map[uint64]struct{}{}
		for _, h := range hs {
			set[h] = struct{}{}
		}
		b.digest.Store(&set)
	}
	digest(bs[0], 11, 13, 14) // one leading block: 11
	digest(bs[1], 11, 12, 13) // three
	bs[1].inflight.Store(2)
	if got := bs[0].CachedPrefix(prompt); got != 1 {
		t.Fatalf("a:1 holds %d leading blocks, want 1", got)
	}
	if got := p.pick(&Request{BlockHashes: prompt, Now: time.Now()}, bs); got != bs[1] {
		t.Fatalf("picked %s, want b:1 (3 of 4 blocks cached)", got.addr)
	}
	bs[0].inflight.Store(1)
	if got := p.pick(&Request{Now: time.Now()}, bs); got != bs[2] {
		t.Fatalf("without block hashes picked %s, want c:1 (least in flight)", got.addr)
	}
}
