package router

import (
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
)

// Routing is a routing chain (the Gateway API Inference Extension's shape):
// filters narrow the candidates, weighted scorers score them, a picker
// chooses. The router applies it to context and generation servers alike,
// after dropping servers that already failed the request and before its
// circuit breaker has the last word.
type Routing struct {
	Filters []Filter
	Scorers []Weighted
	Picker  Picker // nil: MaxScore
}

// Weighted is a scorer and its weight in the sum.
type Weighted struct {
	Scorer
	Weight float64
}

// The plugins a --routing spec can name.
var (
	FilterPlugins = map[string]Filter{"ready": ReadyOnly}
	ScorerPlugins = map[string]Scorer{"least-inflight": LeastInflight{}, "prefix-affinity": PrefixAffinity{}, "precise-prefix": PrecisePrefix{}}
	PickerPlugins = map[string]func() Picker{"max-score": func() Picker { return &MaxScore{} }}
)

// DefaultRouting is the chain kvferry routes with unless told otherwise:
// ready servers, least work in flight, prefix affinity worth half a
// request, the best score (round robin among equals).
const DefaultRouting = "ready,least-inflight:1,prefix-affinity:0.5,max-score"

// ParseRouting reads a chain: comma-separated plugin names, a scorer
// optionally with :WEIGHT (default 1), at most one picker (default
// max-score).
func ParseRouting(spec string) (Routing, error) {
	var r Routing
	for _, item := range strings.Split(spec, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		name, weight, hasWeight := strings.Cut(item, ":")
		if f, ok := FilterPlugins[name]; ok && !hasWeight {
			r.Filters = append(r.Filters, f)
			continue
		}
		if p, ok := PickerPlugins[name]; ok && !hasWeight {
			if r.Picker != nil {
				return Routing{}, fmt.Errorf("routing %q: more than one picker", spec)
			}
			r.Picker = p()
			continue
		}
		s, ok := ScorerPlugins[name]
		if !ok {
			return Routing{}, fmt.Errorf("routing %q: unknown plugin %q (filters: %s; scorers, NAME[:WEIGHT]: %s; pickers: %s)", spec, item,
				known(FilterPlugins), known(ScorerPlugins), known(PickerPlugins))
		}
		w := 1.0
		if hasWeight {
			v, err := strconv.ParseFloat(weight, 64)
			if err != nil || !(v > 0) || v > 1e6 {
				return Routing{}, fmt.Errorf("routing %q: weight of %s must be a positive number, got %q", spec, name, weight)
			}
			w = v
		}
		r.Scorers = append(r.Scorers, Weighted{Scorer: s, Weight: w})
	}
	if r.Picker == nil {
		r.Picker = &MaxScore{}
	}
	return r, nil
}

func known[V any](m map[string]V) string {
	return strings.Join(slices.Sorted(maps.Keys(m)), ", ")
}
