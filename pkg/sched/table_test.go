package sched

import (
	"errors"
	"testing"
	"time"

	"pgregory.net/rapid"

	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

type entry struct{ Request }

const id = "0123456789abcdef0123456789abcdef"

func TestTableArrivals(t *testing.T) {
	tb := NewTable[*entry]()
	fp, other := Fingerprint{1}, Fingerprint{2}
	if _, a, err := tb.Arrive(id, 2, fp); err != nil || a != ArriveNew {
		t.Fatalf("first arrival: %v %v", a, err)
	}
	tb.Add(id, 2, fp, false, &entry{})
	for _, tc := range []struct {
		name    string
		attempt uint32
		fp      Fingerprint
		want    Arrival
		err     error
	}{
		{"duplicate", 2, fp, ArriveDuplicate, nil},
		{"same attempt, other request", 2, other, 0, ErrConflict},
		{"stale", 1, fp, 0, ErrStale},
		{"newer attempt", 3, other, ArriveSupersedes, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			prev, a, err := tb.Arrive(id, tc.attempt, tc.fp)
			if !errors.Is(err, tc.err) || (err == nil && a != tc.want) {
				t.Fatalf("got %v %v, want %v %v", a, err, tc.want, tc.err)
			}
			if err == nil && prev.Attempt() != 2 {
				t.Fatalf("previous entry is attempt %d, want 2", prev.Attempt())
			}
		})
	}
	if _, ok := tb.Get(id, 1); ok {
		t.Fatal("Get found attempt 1, the table holds attempt 2")
	}
	if live := tb.Drain(); len(live) != 1 {
		t.Fatalf("drain: %d live requests, want 1", len(live))
	}
	if _, _, err := tb.Arrive("ffffffffffffffffffffffffffffffff", 1, fp); !errors.Is(err, ErrDraining) {
		t.Fatalf("arrival while draining: %v, want ErrDraining", err)
	}
}

func TestRequestCancelOutcomes(t *testing.T) {
	now := time.Unix(100, 0)
	for _, tc := range []struct {
		name       string
		advertised bool // arrived advertised (generation side)
		path       []Stage
		healthy    bool
		want       kvferryv1.CancelOutcome
		stop       bool
	}{
		{"queued", false, nil, true, kvferryv1.CancelOutcome_CANCEL_OUTCOME_CANCELLED_BEFORE_ADVERTISE, true},
		{"prefilling", false, []Stage{StagePrefilling}, true, kvferryv1.CancelOutcome_CANCEL_OUTCOME_CANCELLED_BEFORE_ADVERTISE, true},
		{"advertised", false, []Stage{StagePrefilling, StageAdvertised}, true, kvferryv1.CancelOutcome_CANCEL_OUTCOME_CANCEL_REQUESTED_IN_FLIGHT, true},
		{"advertised, backend unhealthy", false, []Stage{StagePrefilling, StageAdvertised}, false, kvferryv1.CancelOutcome_CANCEL_OUTCOME_BACKEND_UNHEALTHY, true},
		{"transferring", false, []Stage{StagePrefilling, StageAdvertised, StageTransferring}, true, kvferryv1.CancelOutcome_CANCEL_OUTCOME_CANCEL_REQUESTED_IN_FLIGHT, true},
		{"handed off", false, []Stage{StagePrefilling, StageAdvertised, StageTransferring, StageHandedOff}, true, kvferryv1.CancelOutcome_CANCEL_OUTCOME_ALREADY_COMPLETE, false},
		{"generation side, queued", true, nil, true, kvferryv1.CancelOutcome_CANCEL_OUTCOME_CANCEL_REQUESTED_IN_FLIGHT, true},
		{"decoding", true, []Stage{StageTransferring, StageDecoding}, true, kvferryv1.CancelOutcome_CANCEL_OUTCOME_CANCEL_REQUESTED_IN_FLIGHT, true},
		{"aggregated, decoding", false, []Stage{StagePrefilling, StageDecoding}, true, kvferryv1.CancelOutcome_CANCEL_OUTCOME_CANCELLED_BEFORE_ADVERTISE, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tb := NewTable[*entry]()
			e := &entry{}
			tb.Add(id, 1, Fingerprint{}, tc.advertised, e)
			for _, s := range tc.path {
				if err := e.Advance(s, now); err != nil {
					t.Fatal(err)
				}
			}
			c := e.Cancel(now, tc.healthy)
			if c.Outcome != tc.want || c.Stop != tc.stop {
				t.Fatalf("cancel: %+v, want outcome %v stop %v", c, tc.want, tc.stop)
			}
		})
	}
}

func TestRequestTransitions(t *testing.T) {
	now := time.Unix(100, 0)
	e := &entry{}
	if err := e.Advance(StageDecoding, now); !errors.Is(err, ErrTransition) {
		t.Fatalf("queued → decoding: %v, want ErrTransition", err)
	}
	if !e.End(now) || e.End(now) {
		t.Fatal("End must end the request exactly once")
	}
	if err := e.Advance(StagePrefilling, now); !errors.Is(err, ErrTransition) {
		t.Fatalf("ended → prefilling: %v, want ErrTransition", err)
	}
}

// TestTableProperties drives random requests through arrivals, stage
// moves, holds, cancels, ends and sweeps, and checks the table's
// promises: cancel-to-free is observed exactly once per cancelled request
// and only when nothing is held; a request still holding blocks or not
// ended is never forgotten; a stale or conflicting arrival changes nothing.
func TestTableProperties(t *testing.T) {
	rapid.Check(t, func(rt *rapid.T) {
		tb := NewTable[*entry]()
		tb.TTL = 10 * time.Second
		tb.MaxTombstones = rapid.IntRange(0, 4).Draw(rt, "max_tombstones")
		ids := []string{"00000000000000000000000000000001", "00000000000000000000000000000002", "00000000000000000000000000000003"}
		now := time.Unix(0, 0)
		freedSeen := map[*entry]int{}
		superseded := map[*entry]bool{}
		var all []*entry
		for range rapid.IntRange(1, 60).Draw(rt, "events") {
			now = now.Add(time.Duration(rapid.IntRange(0, 5).Draw(rt, "dt")) * time.Second)
			rid := rapid.SampledFrom(ids).Draw(rt, "id")
			switch rapid.IntRange(0, 5).Draw(rt, "event") {
			case 0: // arrive
				attempt := uint32(rapid.IntRange(1, 3).Draw(rt, "attempt"))
				fp := Fingerprint{byte(rapid.IntRange(0, 1).Draw(rt, "fp"))}
				before, had := tb.Current(rid)
				prev, a, err := tb.Arrive(rid, attempt, fp)
				if err != nil {
					if cur, _ := tb.Current(rid); cur != before || !had {
						rt.Fatalf("refused arrival changed the table")
					}
					continue
				}
				if a == ArriveDuplicate {
					continue
				}
				if a == ArriveSupersedes {
					prev.End(now) // its owner still gives its holds back
					superseded[prev] = true
				}
				e := &entry{}
				tb.Add(rid, attempt, fp, false, e)
				all = append(all, e)
			case 1: // advance along the context server's path
				if e, ok := tb.Current(rid); ok && !e.Done() {
					s := map[Stage]Stage{StageQueued: StagePrefilling, StagePrefilling: StageAdvertised, StageAdvertised: StageTransferring, StageTransferring: StageHandedOff}[e.Stage()]
					if s != 0 {
						if err := e.Advance(s, now); err != nil {
							rt.Fatal(err)
						}
					}
				}
			case 2: // hold
				if e, ok := tb.Current(rid); ok && !e.Done() {
					e.Hold()
				}
			case 3: // drop a hold of any request still holding
				for _, e := range all {
					if e.Holds() > 0 {
						if _, ok := e.Drop(now); ok {
							freedSeen[e]++
						}
						break
					}
				}
			case 4: // cancel
				if e, ok := tb.Current(rid); ok {
					c := e.Cancel(now, true)
					if c.HasFreed {
						freedSeen[e]++
					}
					if c.HasFreed && e.Holds() > 0 {
						rt.Fatalf("cancel observed a free with %d holds", e.Holds())
					}
					if c.Stop {
						e.End(now)
					}
				}
			case 5:
				tb.Sweep(now)
			}
			for _, e := range all {
				if freedSeen[e] > 1 {
					rt.Fatalf("cancel-to-free observed %d times", freedSeen[e])
				}
				if freedSeen[e] == 1 && e.Holds() > 0 {
					rt.Fatalf("cancel-to-free observed with %d holds left", e.Holds())
				}
			}
			// A request leaves the table only superseded (after its owner
			// ended it) or swept once ended and holding nothing.
			for _, e := range all {
				if !superseded[e] && idOf(tb, e) == "" && (!e.Done() || e.Holds() > 0) {
					rt.Fatalf("a request still live or holding (%s, %d holds) was forgotten", e.Stage(), e.Holds())
				}
			}
		}
	})
}

func idOf(tb *Table[*entry], e *entry) string {
	for rid, x := range tb.All() {
		if x == e {
			return rid
		}
	}
	return ""
}
