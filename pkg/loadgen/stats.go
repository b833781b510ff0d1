package loadgen

import (
	"math"
	"slices"
	"time"
)

// SLO is the service level a request must meet to count toward goodput;
// a zero bound is not checked.
type SLO struct {
	TTFT   time.Duration // time to first token
	ITL    time.Duration // the request's mean inter-token gap
	MaxITL time.Duration // the request's longest inter-token gap (a stall)
}

// Percentiles are a latency distribution's summary, in milliseconds.
type Percentiles struct {
	P50  float64 `json:"p50"`
	P90  float64 `json:"p90"`
	P99  float64 `json:"p99"`
	Mean float64 `json:"mean"`
}

// CDF holds 101 quantiles (0 %, 1 %, … 100 %) of each distribution, in
// milliseconds: enough to draw its curve.
type CDF struct {
	TTFT    []float64 `json:"ttft_ms"`
	ITL     []float64 `json:"itl_ms"`
	Latency []float64 `json:"latency_ms"`
}

// Summary is one load level's figures.
type Summary struct {
	Concurrency  int            `json:"concurrency,omitempty"`
	Rate         float64        `json:"rate,omitempty"`
	Requests     int            `json:"requests"`
	Completed    int            `json:"completed"`
	Aborted      int            `json:"aborted"`
	Errors       int            `json:"errors"`
	ErrorsByKind map[string]int `json:"errors_by_kind"`
	DurationS    float64        `json:"duration_s"`
	// TTFT, ITL and Latency are over completed requests (an aborted one
	// measures the client, not the server).
	TTFT             Percentiles `json:"ttft_ms"`
	ITL              Percentiles `json:"itl_ms"`
	Latency          Percentiles `json:"latency_ms"`
	PromptTokens     int64       `json:"prompt_tokens"`
	OutputTokens     int64       `json:"output_tokens"`
	OutputTokensPerS float64     `json:"output_tokens_per_s"` // every token delivered, aborted requests' too
	RequestsPerS     float64     `json:"requests_per_s"`      // completed
	GoodputPerS      float64     `json:"goodput_requests_per_s"`
	CDF              CDF         `json:"cdf"`
}

// Load is the level the summary measured.
func (s Summary) Load() Load { return Load{Concurrency: s.Concurrency, Rate: s.Rate} }

// Summarize computes a level's figures from its records and wall time.
func Summarize(l Load, recs []Record, wall time.Duration, slo SLO) Summary {
	s := Summary{Concurrency: l.Concurrency, Rate: l.Rate, Requests: len(recs), ErrorsByKind: map[string]int{}, DurationS: wall.Seconds()}
	var ttft, itl, lat []float64
	good := 0
	for _, r := range recs {
		s.PromptTokens += int64(r.PromptTokens)
		s.OutputTokens += int64(r.OutputTokens)
		switch r.Outcome {
		case OutcomeOK:
			s.Completed++
		case OutcomeAborted:
			s.Aborted++
			continue
		default:
			s.Errors++
			s.ErrorsByKind[r.Outcome]++
			continue
		}
		ttft = append(ttft, Millis(r.TTFT))
		lat = append(lat, Millis(r.Latency))
		var sum, longest time.Duration
		for _, g := range r.Gaps {
			itl = append(itl, Millis(g))
			sum += g
			longest = max(longest, g)
		}
		meanITL := time.Duration(0)
		if len(r.Gaps) > 0 {
			meanITL = sum / time.Duration(len(r.Gaps))
		}
		if (slo.TTFT == 0 || r.TTFT <= slo.TTFT) && (slo.ITL == 0 || meanITL <= slo.ITL) && (slo.MaxITL == 0 || longest <= slo.MaxITL) {
			good++
		}
	}
	s.TTFT, s.CDF.TTFT = summarize(ttft)
	s.ITL, s.CDF.ITL = summarize(itl)
	s.Latency, s.CDF.Latency = summarize(lat)
	if secs := wall.Seconds(); secs > 0 {
		s.OutputTokensPerS = float64(s.OutputTokens) / secs
		s.RequestsPerS = float64(s.Completed) / secs
		s.GoodputPerS = float64(good) / secs
	}
	return s
}

// Millis is d in (fractional) milliseconds, the unit of every figure.
func Millis(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// summarize sorts xs and returns its percentiles and 101 quantiles
// (nearest rank); zeros and no quantiles when xs is empty.
func summarize(xs []float64) (Percentiles, []float64) {
	if len(xs) == 0 {
		return Percentiles{}, nil
	}
	slices.Sort(xs)
	var sum float64
	for _, x := range xs {
		sum += x
	}
	q := make([]float64, 101)
	for i := range q {
		q[i] = quantile(xs, float64(i)/100)
	}
	return Percentiles{P50: quantile(xs, 0.5), P90: quantile(xs, 0.9), P99: quantile(xs, 0.99), Mean: sum / float64(len(xs))}, q
}

// quantile is the nearest-rank quantile of sorted xs.
func quantile(sorted []float64, p float64) float64 {
	i := int(math.Ceil(p*float64(len(sorted)))) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}
