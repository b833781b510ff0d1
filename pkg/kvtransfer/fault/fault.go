// Package fault injects transport faults into kvferry's writers, for tests
// and chaos drills (--transport-fault): a *Fault is the
// kvtransfer.Injector every writer calls before and while it writes a
// session's blocks. A nil *Fault injects nothing.
package fault

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Fault injects a transport fault into a writer (and, for lose-abort-ack,
// the context server's abort handling), for tests and chaos drills:
// --transport-fault=KIND[:key=value,...]. Kinds:
//
//   - stall: after `after` blocks of a session, write nothing until the
//     fault window ends (a hung NIC or a stopped peer);
//   - delay: every block waits `delay` first, then arrives;
//   - error: the push fails at once, nothing written;
//   - partial: `after` blocks arrive, then the push fails;
//   - corrupt: blocks from `after` on are written with a byte flipped while
//     the push reports success (only checksums catch it);
//   - lose-notify: every block arrives but the DONE notification never does;
//   - lose-abort-ack: aborts take effect but are never acknowledged.
//
// Keys: after=N blocks moved before the fault starts in a session (0);
// for=DURATION the window, from the fault's creation, in which it acts
// (default: until restart); rate=F the fraction of sessions it hits (1);
// delay=DURATION the wait per block for delay (100ms). A stalled or delayed
// write still honours the push's cancellation.
type Fault struct {
	Kind  string
	After int
	For   time.Duration // 0: until restart
	Rate  float64
	Delay time.Duration
	start time.Time
}

// Kinds.
const (
	KindStall        = "stall"
	KindDelay        = "delay"
	KindError        = "error"
	KindPartial      = "partial"
	KindCorrupt      = "corrupt"
	KindLoseNotify   = "lose-notify"
	KindLoseAbortAck = "lose-abort-ack"
)

// ErrInjected is the failure an error or partial fault causes.
var ErrInjected = errors.New("fault: injected transport fault")

// Parse parses a --transport-fault value; "" means no fault (nil).
func Parse(spec string, now time.Time) (*Fault, error) {
	if spec == "" {
		return nil, nil
	}
	kind, args, _ := strings.Cut(spec, ":")
	f := &Fault{Kind: kind, Rate: 1, Delay: 100 * time.Millisecond, start: now}
	switch kind {
	case KindStall, KindDelay, KindError, KindPartial, KindCorrupt, KindLoseNotify, KindLoseAbortAck:
	default:
		return nil, fmt.Errorf("transport fault %q: kind must be one of stall, delay, error, partial, corrupt, lose-notify, lose-abort-ack", spec)
	}
	if args == "" {
		return f, nil
	}
	for _, kv := range strings.Split(args, ",") {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return nil, fmt.Errorf("transport fault %q: %q is not key=value", spec, kv)
		}
		var err error
		switch k {
		case "after":
			f.After, err = strconv.Atoi(v)
			if err == nil && f.After < 0 {
				err = fmt.Errorf("negative")
			}
		case "for":
			f.For, err = time.ParseDuration(v)
		case "rate":
			f.Rate, err = strconv.ParseFloat(v, 64)
			if err == nil && (f.Rate < 0 || f.Rate > 1) {
				err = fmt.Errorf("outside [0, 1]")
			}
		case "delay":
			f.Delay, err = time.ParseDuration(v)
		default:
			err = fmt.Errorf("unknown key")
		}
		if err != nil {
			return nil, fmt.Errorf("transport fault %q: %s=%s: %v", spec, k, v, err)
		}
	}
	return f, nil
}

// hits reports whether the fault applies to session (a stable choice).
func (f *Fault) hits(session uint64) bool {
	return f.Rate >= 1 || float64(mixID(session)%10000)/10000 < f.Rate
}

func mixID(x uint64) uint64 {
	x ^= x >> 33
	x *= 0xff51afd7ed558ccd
	x ^= x >> 33
	return x
}

// Active reports whether the fault acts on block i of session now.
func (f *Fault) Active(session uint64, i int) bool {
	if f == nil || i < f.After || !f.hits(session) {
		return false
	}
	return f.For <= 0 || time.Now().Before(f.start.Add(f.For))
}

// Before runs ahead of writing block i of session: it waits (stall,
// delay) or fails (error at the first block, partial at block `after`).
func (f *Fault) Before(ctx context.Context, session uint64, i int) error {
	if !f.Active(session, i) {
		return nil
	}
	var wait <-chan time.Time
	switch f.Kind {
	case KindError, KindPartial:
		return ErrInjected
	case KindDelay:
		d := f.Delay
		if f.For > 0 {
			d = min(d, time.Until(f.start.Add(f.For)))
		}
		t := time.NewTimer(d)
		defer t.Stop()
		wait = t.C
	case KindStall:
		if f.For > 0 {
			t := time.NewTimer(time.Until(f.start.Add(f.For)))
			defer t.Stop()
			wait = t.C
		}
	default:
		return nil
	}
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-wait:
		return nil
	}
}

// Payload returns what to write for block i: the block itself, or for a
// corrupt fault a copy with one byte flipped (the pool memory is never
// touched).
func (f *Fault) Payload(session uint64, i int, b []byte) []byte {
	if f == nil || f.Kind != KindCorrupt || len(b) == 0 || !f.Active(session, i) {
		return b
	}
	c := make([]byte, len(b))
	copy(c, b)
	c[len(c)/2] ^= 0x5a
	return c
}

// LosesNotify reports whether the DONE notification of session is dropped.
func (f *Fault) LosesNotify(session uint64) bool {
	return f != nil && f.Kind == KindLoseNotify && f.Active(session, f.After)
}

// LosesAbortAck reports whether aborts go unacknowledged now.
func (f *Fault) LosesAbortAck() bool {
	return f != nil && f.Kind == KindLoseAbortAck && (f.For <= 0 || time.Now().Before(f.start.Add(f.For)))
}
