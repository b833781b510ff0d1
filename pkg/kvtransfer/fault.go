package kvtransfer

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Fault injects a transport fault into a Sender, for tests and chaos
// drills: --transport-fault=KIND[:key=value,...]. Kinds here: stall (after
// `after` blocks of a session, write nothing until the fault window ends)
// and delay (wait `d` before each block). Keys: after=N blocks moved before
// the fault starts in a session (0); for=DURATION the window, from the
// fault's creation, in which it acts (default: until restart); rate=F the
// fraction of sessions it hits (1); d=DURATION the delay per block (100ms).
// A stalled or delayed write still honours the push's cancellation.
type Fault struct {
	Kind  string
	After int
	For   time.Duration // 0: until restart
	Rate  float64
	Delay time.Duration
	start time.Time
}

// Fault kinds implemented here.
const (
	FaultStall = "stall"
	FaultDelay = "delay"
)

// ParseFault parses a --transport-fault value; "" means no fault (nil).
func ParseFault(spec string, now time.Time) (*Fault, error) {
	if spec == "" {
		return nil, nil
	}
	kind, args, _ := strings.Cut(spec, ":")
	f := &Fault{Kind: kind, Rate: 1, Delay: 100 * time.Millisecond, start: now}
	switch kind {
	case FaultStall, FaultDelay:
	default:
		return nil, fmt.Errorf("transport fault %q: kind must be %s or %s", spec, FaultStall, FaultDelay)
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
		case "d":
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

// before runs ahead of writing block i of session.
func (f *Fault) before(ctx context.Context, session uint64, i int) error {
	if f == nil || i < f.After || !f.hits(session) {
		return nil
	}
	var end time.Time // zero: until restart
	if f.For > 0 {
		end = f.start.Add(f.For)
		if !time.Now().Before(end) {
			return nil // the window is over: healed
		}
	}
	var wait <-chan time.Time
	switch f.Kind {
	case FaultDelay:
		d := f.Delay
		if !end.IsZero() {
			d = min(d, time.Until(end))
		}
		t := time.NewTimer(d)
		defer t.Stop()
		wait = t.C
	case FaultStall:
		if !end.IsZero() {
			t := time.NewTimer(time.Until(end))
			defer t.Stop()
			wait = t.C
		}
	}
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-wait:
		return nil
	}
}
