package router

import (
	"strings"
	"testing"
	"time"
)

func TestParseRouting(t *testing.T) {
	r, err := ParseRouting(DefaultRouting)
	if err != nil || len(r.Filters) != 1 || len(r.Scorers) != 2 || r.Scorers[1].Weight != 0.5 || r.Picker == nil {
		t.Fatalf("default: %+v %v", r, err)
	}
	r, err = ParseRouting(" least-inflight ")
	if err != nil || len(r.Filters) != 0 || len(r.Scorers) != 1 || r.Scorers[0].Weight != 1 {
		t.Fatalf("one scorer: %+v %v", r, err)
	}
	for spec, want := range map[string]string{
		"ready,fastest":                 `unknown plugin "fastest"`,
		"least-inflight:0":              "weight of least-inflight must be a positive number",
		"least-inflight:x":              "weight of least-inflight must be a positive number",
		"ready:2":                       `unknown plugin "ready:2"`,
		"max-score,max-score":           "more than one picker",
		"prefix-affinity:NaN,max-score": "must be a positive number",
		"least-inflight:1e9":            "must be a positive number",
	} {
		if _, err := ParseRouting(spec); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: %v, want an error containing %q", spec, err, want)
		}
	}
}

// notOn is a plugin written against the exported interfaces only: it
// drops one address.
type notOn string

func (n notOn) Filter(_ *Request, servers []Server) []Server {
	var out []Server
	for _, s := range servers {
		if s.Addr() != string(n) {
			out = append(out, s)
		}
	}
	return out
}

// loadBlind scores every server the same, so weights decide.
type loadBlind struct{}

func (loadBlind) Score(*Request, Server) float64 { return 0 }

// TestCustomChain: a chain of plugins written outside the package's
// defaults decides the pick; weights scale scorers; the breaker and the
// exclusion set still apply around any chain.
func TestCustomChain(t *testing.T) {
	bs := backends("a:1", "b:1", "c:1")
	bs[0].inflight.Store(5)
	bs[1].inflight.Store(0)
	bs[2].inflight.Store(1)
	now := time.Now()
	p := newPolicy(Routing{Filters: []Filter{notOn("b:1")}, Scorers: []Weighted{{LeastInflight{}, 1}, {loadBlind{}, 100}}})
	if got := p.pick(&Request{Now: now}, bs); got != bs[2] {
		t.Fatalf("picked %v, want c:1 (b:1 filtered out, c:1 least loaded of the rest)", got.addr)
	}
	if got := p.pick(&Request{Now: now, exclude: map[*backend]bool{bs[2]: true}}, bs); got != bs[0] {
		t.Fatalf("picked %v, want a:1 (c:1 excluded)", got.addr)
	}
	for range breakerThreshold {
		bs[0].result(false, now)
	}
	if got := p.pick(&Request{Now: now, exclude: map[*backend]bool{bs[2]: true}}, bs); got != nil {
		t.Fatalf("picked %v through an open breaker", got.addr)
	}
}
