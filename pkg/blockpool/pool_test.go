package blockpool

import (
	"context"
	"errors"
	"math/rand/v2"
	"testing"
)

func mustNew(t *testing.T, capacity, size int) *Pool {
	t.Helper()
	p, err := New(capacity, size)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func check(t *testing.T, p *Pool) {
	t.Helper()
	if err := p.CheckInvariant(); err != nil {
		t.Fatal(err)
	}
}

func TestNewRejectsBadSizes(t *testing.T) {
	for _, tc := range []struct{ capacity, size int }{{0, 1}, {1, 0}, {-1, 4}} {
		if _, err := New(tc.capacity, tc.size); err == nil {
			t.Errorf("New(%d, %d): want error", tc.capacity, tc.size)
		}
	}
}

func TestLifecycle(t *testing.T) {
	ctx := context.Background()
	p := mustNew(t, 8, 64)
	ids, err := p.Allocate(ctx, 3)
	if err != nil {
		t.Fatal(err)
	}
	check(t, p)
	steps := []struct {
		name string
		op   func() error
		want Counts
	}{
		{"allocated", func() error { return nil }, Counts{Capacity: 8, Free: 5, Owned: 3}},
		{"pin", func() error { return p.Pin(ids) }, Counts{Capacity: 8, Free: 5, InFlight: 3}},
		{"release while pinned keeps in flight", func() error { return p.Release(ids) }, Counts{Capacity: 8, Free: 5, InFlight: 3}},
		{"unpin frees", func() error { return p.Unpin(ids) }, Counts{Capacity: 8, Free: 8}},
	}
	for _, s := range steps {
		if err := s.op(); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		check(t, p)
		if got := p.Counts(); got != s.want {
			t.Fatalf("%s: counts %+v, want %+v", s.name, got, s.want)
		}
	}
}

func TestQuarantineAndPoison(t *testing.T) {
	ctx := context.Background()
	p := mustNew(t, 4, 16)
	ids, _ := p.Allocate(ctx, 2)
	if err := p.Pin(ids); err != nil {
		t.Fatal(err)
	}
	if err := p.Quarantine(ids); err != nil {
		t.Fatal(err)
	}
	if err := p.Release(ids); err != nil {
		t.Fatal(err)
	}
	check(t, p)
	if got := p.Counts().Quarantined; got != 2 {
		t.Fatalf("quarantined %d, want 2", got)
	}
	// Unpin is not proof: a quarantined block does not leave by Unpin.
	if err := p.Unpin(ids); !errors.Is(err, ErrBadBlock) {
		t.Fatalf("unpin of quarantined: %v, want ErrBadBlock", err)
	}
	if err := p.Unquarantine(ids[:1]); err != nil {
		t.Fatal(err)
	}
	if err := p.Poison(ids[1:]); err != nil {
		t.Fatal(err)
	}
	check(t, p)
	if got, want := p.Counts(), (Counts{Capacity: 4, Free: 3, Poisoned: 1}); got != want {
		t.Fatalf("counts %+v, want %+v", got, want)
	}
	// A poisoned block is never handed out again.
	got, err := p.Allocate(ctx, 3)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range got {
		if id == ids[1] {
			t.Fatalf("poisoned block %d reallocated", id)
		}
	}
	if _, err := p.Allocate(ctx, 1); !errors.Is(err, ErrExhausted) {
		t.Fatalf("allocate from full pool: %v, want ErrExhausted", err)
	}
}

func TestAllocateAllOrNothing(t *testing.T) {
	p := mustNew(t, 4, 16)
	if _, err := p.Allocate(context.Background(), 5); !errors.Is(err, ErrExhausted) {
		t.Fatalf("err %v, want ErrExhausted", err)
	}
	if got := p.Counts().Free; got != 4 {
		t.Fatalf("free %d after failed allocate, want 4", got)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := p.Allocate(ctx, 1); !errors.Is(err, context.Canceled) {
		t.Fatalf("err %v, want context.Canceled", err)
	}
}

func TestRejectsBadIDs(t *testing.T) {
	p := mustNew(t, 2, 16)
	ids, _ := p.Allocate(context.Background(), 1)
	for _, tc := range []struct {
		name string
		op   func() error
	}{
		{"release free block", func() error { return p.Release([]ID{1}) }},
		{"release outside", func() error { return p.Release([]ID{9}) }},
		{"duplicate", func() error { return p.Release([]ID{ids[0], ids[0]}) }},
		{"unpin unpinned", func() error { return p.Unpin(ids) }},
		{"poison unquarantined", func() error { return p.Poison(ids) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.op(); !errors.Is(err, ErrBadBlock) {
				t.Fatalf("err %v, want ErrBadBlock", err)
			}
			check(t, p)
		})
	}
}

func TestBytesAreDisjoint(t *testing.T) {
	p := mustNew(t, 3, 8)
	for i := range 3 {
		b := p.Bytes(ID(i))
		for j := range b {
			b[j] = byte(i + 1)
		}
	}
	for i := range 3 {
		for _, v := range p.Bytes(ID(i)) {
			if v != byte(i+1) {
				t.Fatalf("block %d overwritten: %d", i, v)
			}
		}
		if cap(p.Bytes(ID(i))) != 8 {
			t.Fatalf("block %d slice can grow into its neighbour", i)
		}
	}
}

// TestConservationRandom drives random operations and checks the invariant
// after every one.
func TestConservationRandom(t *testing.T) {
	ctx := context.Background()
	p := mustNew(t, 32, 8)
	rng := rand.New(rand.NewPCG(1, 2))
	type held struct {
		ids              []ID
		pinned, quarant  bool
		released, poison bool
	}
	var live []*held
	for range 5000 {
		switch rng.IntN(6) {
		case 0:
			ids, err := p.Allocate(ctx, 1+rng.IntN(4))
			if err == nil {
				live = append(live, &held{ids: ids})
			} else if !errors.Is(err, ErrExhausted) {
				t.Fatal(err)
			}
		case 1:
			if h := pick(rng, live); h != nil && !h.pinned && !h.released {
				if err := p.Pin(h.ids); err != nil {
					t.Fatal(err)
				}
				h.pinned = true
			}
		case 2:
			if h := pick(rng, live); h != nil && h.pinned && !h.quarant {
				if err := p.Unpin(h.ids); err != nil {
					t.Fatal(err)
				}
				h.pinned = false
			}
		case 3:
			if h := pick(rng, live); h != nil && !h.released {
				if err := p.Release(h.ids); err != nil {
					t.Fatal(err)
				}
				h.released = true
			}
		case 4:
			if h := pick(rng, live); h != nil && h.pinned && !h.quarant {
				if err := p.Quarantine(h.ids); err != nil {
					t.Fatal(err)
				}
				h.quarant = true
			}
		case 5:
			if h := pick(rng, live); h != nil && h.quarant && !h.poison {
				var err error
				if rng.IntN(4) == 0 {
					err = p.Poison(h.ids)
					h.poison = true
				} else {
					err = p.Unquarantine(h.ids)
					h.quarant, h.pinned = false, false
				}
				if err != nil {
					t.Fatal(err)
				}
			}
		}
		check(t, p)
		// Forget holders that can no longer change.
		kept := live[:0]
		for _, h := range live {
			if !(h.released && !h.pinned) && !h.poison {
				kept = append(kept, h)
			}
		}
		live = kept
	}
}

func pick[T any](rng *rand.Rand, xs []*T) *T {
	if len(xs) == 0 {
		return nil
	}
	return xs[rng.IntN(len(xs))]
}
