package blockpool

import (
	"context"
	"errors"
	"testing"

	"pgregory.net/rapid"
)

// holder is one request's claim in the property test's model.
type holder struct {
	ids      []ID
	pinned   bool
	quarant  bool
	released bool
}

// TestPoolProperties drives random operation sequences (allocation with
// eviction, publish, lookup, ref, release, pin, unpin, quarantine,
// unquarantine, poison) and checks after every step: the states sum to the
// capacity and the internal structures agree (CheckInvariant); a block
// handed out by Allocate was FREE or evictable; a poisoned block is never
// handed out or served from the cache again.
func TestPoolProperties(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		capacity := rapid.IntRange(1, 24).Draw(t, "capacity")
		p, _ := New(capacity, 8)
		ctx := context.Background()
		var live []*holder
		poisoned := map[ID]bool{}
		hashes := rapid.SampledFrom([]uint64{1, 2, 3, 4, 5, 6})
		pick := func(t *rapid.T, ok func(*holder) bool) *holder {
			var cands []*holder
			for _, h := range live {
				if ok(h) {
					cands = append(cands, h)
				}
			}
			if len(cands) == 0 {
				return nil
			}
			return rapid.SampledFrom(cands).Draw(t, "holder")
		}
		t.Repeat(map[string]func(*rapid.T){
			"allocate": func(t *rapid.T) {
				n := rapid.IntRange(1, 5).Draw(t, "n")
				before := p.Counts()
				ids, err := p.Allocate(ctx, n)
				if err != nil {
					if !errors.Is(err, ErrExhausted) {
						t.Fatal(err)
					}
					if before.Free+p.lruLenForTest() >= n {
						t.Fatalf("exhausted with %d free + %d evictable for %d", before.Free, p.lruLenForTest(), n)
					}
					return
				}
				for _, id := range ids {
					if poisoned[id] {
						t.Fatalf("poisoned block %d allocated", id)
					}
				}
				live = append(live, &holder{ids: ids})
			},
			"publish": func(t *rapid.T) {
				if h := pick(t, func(h *holder) bool { return !h.released && !h.quarant }); h != nil {
					if _, err := p.Publish(h.ids[0], hashes.Draw(t, "hash")); err != nil && !outOfCirculation(p, h.ids) {
						t.Fatal(err)
					}
				}
			},
			"lookup": func(t *rapid.T) {
				want := []uint64{hashes.Draw(t, "h1"), hashes.Draw(t, "h2")}
				ids := p.Lookup(want)
				for i, id := range ids {
					if poisoned[id] {
						t.Fatalf("poisoned block %d served from the cache", id)
					}
					if b := p.blocks[id]; !b.cached || b.hash != want[i] {
						t.Fatalf("lookup %#x returned block %d with hash %#x", want[i], id, b.hash)
					}
				}
				if len(ids) > 0 {
					live = append(live, &holder{ids: ids})
				}
			},
			"release": func(t *rapid.T) {
				if h := pick(t, func(h *holder) bool { return !h.released }); h != nil {
					if err := p.Release(h.ids); err != nil {
						t.Fatal(err)
					}
					h.released = true
				}
			},
			"pin": func(t *rapid.T) {
				if h := pick(t, func(h *holder) bool { return !h.released && !h.pinned }); h != nil {
					err := p.Pin(h.ids)
					if err != nil && outOfCirculation(p, h.ids) {
						return // a shared block is quarantined by another transfer: refused, as it must be
					}
					if err != nil {
						t.Fatal(err)
					}
					h.pinned = true
				}
			},
			"unpin": func(t *rapid.T) {
				if h := pick(t, func(h *holder) bool { return h.pinned && !h.quarant }); h != nil {
					if err := p.Unpin(h.ids); err != nil {
						t.Fatal(err)
					}
					h.pinned = false
				}
			},
			"quarantine": func(t *rapid.T) {
				if h := pick(t, func(h *holder) bool { return h.pinned && !h.quarant && distinctPins(live, h) }); h != nil {
					if err := p.Quarantine(h.ids); err != nil {
						t.Fatal(err)
					}
					h.quarant = true
				}
			},
			"reap": func(t *rapid.T) {
				if h := pick(t, func(h *holder) bool { return h.quarant }); h != nil {
					if rapid.Bool().Draw(t, "poison") {
						if err := p.Poison(h.ids); err != nil {
							t.Fatal(err)
						}
						for _, id := range h.ids {
							poisoned[id] = true
						}
					} else {
						if err := p.Unquarantine(h.ids); err != nil {
							t.Fatal(err)
						}
					}
					h.quarant, h.pinned = false, false
					h.ids = nil // this claim is over either way
					h.released = true
				}
			},
			"": func(t *rapid.T) {
				if err := p.CheckInvariant(); err != nil {
					t.Fatal(err)
				}
				c := p.Counts()
				if c.Sum() != c.Capacity {
					t.Fatalf("states sum %d, capacity %d", c.Sum(), c.Capacity)
				}
				for id := range poisoned {
					if p.State(id) != Poisoned {
						t.Fatalf("poisoned block %d is %s", id, p.State(id))
					}
				}
			},
		})
	})
}

// distinctPins: quarantining is per transfer; the model only quarantines a
// holder whose blocks no other pinned holder shares (shared cached blocks
// pinned by two transfers are quarantined by neither in this model).
func distinctPins(live []*holder, h *holder) bool {
	mine := map[ID]bool{}
	for _, id := range h.ids {
		mine[id] = true
	}
	for _, o := range live {
		if o == h || !o.pinned {
			continue
		}
		for _, id := range o.ids {
			if mine[id] {
				return false
			}
		}
	}
	return true
}

// outOfCirculation: some block is quarantined or poisoned.
func outOfCirculation(p *Pool, ids []ID) bool {
	for _, id := range ids {
		if s := p.State(id); s == Quarantined || s == Poisoned {
			return true
		}
	}
	return false
}

func (p *Pool) lruLenForTest() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.lruLen
}
