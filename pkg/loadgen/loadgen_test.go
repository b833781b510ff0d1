package loadgen

import (
	"context"
	"encoding/json"
	"fmt"
	"image/png"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kvferry/kvferry/internal/leakcheck"
)

func TestMain(m *testing.M) { leakcheck.VerifyTestMain(m) }

func TestParseDist(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, c := range []struct {
		in     string
		lo, hi int
	}{{"7", 7, 7}, {"fixed:3", 3, 3}, {"uniform:5:9", 5, 9}, {"normal:100:0", 100, 100}} {
		d, err := ParseDist(c.in)
		if err != nil {
			t.Fatalf("%s: %v", c.in, err)
		}
		for range 200 {
			if v := d.Sample(rng); v < c.lo || v > c.hi {
				t.Fatalf("%s sampled %d", c.in, v)
			}
		}
		if again, err := ParseDist(d.String()); err != nil || again.String() != d.String() {
			t.Fatalf("%s prints as %s, which reads back as %v %v", c.in, d, again, err)
		}
	}
	d, _ := ParseDist("normal:2:50")
	for range 1000 {
		if d.Sample(rng) < 1 {
			t.Fatal("a normal length below 1")
		}
	}
	for _, bad := range []string{"", "0", "-3", "fixed:0", "fixed:1.5", "uniform:9:5", "uniform:0:5", "normal:0:1", "normal:5:-1", "poisson:3", "uniform:1", "fixed:NaN"} {
		if _, err := ParseDist(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestReadJSONL(t *testing.T) {
	l, err := ReadJSONL(strings.NewReader("{\"prompt\": \"a b\"}\n\n{\"prompt\": \"c\", \"max_tokens\": 4}\n"))
	if err != nil || len(l) != 2 || l[1].MaxTokens != 4 || l[0].Text != "a b" {
		t.Fatalf("%+v %v", l, err)
	}
	for _, bad := range []string{"", "{\"prompt\": \"\"}", "{\"text\": \"x\"}", "not json", "{\"prompt\": \"x\", \"max_tokens\": -1}"} {
		if _, err := ReadJSONL(strings.NewReader(bad)); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// Synthetic prompts share no prefix but the one asked for: the first
// eight words of 500 prompts are all different, and with a prefix every
// prompt starts with it and then differs.
func TestSyntheticPromptsShareNoPrefix(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	prefix := SharedPrefix(rng, 12)
	if n := len(strings.Fields(prefix)); n != 12 {
		t.Fatalf("prefix %q has %d words, want 12", prefix, n)
	}
	other := SharedPrefix(rng, 12)
	for _, s := range []Synthetic{{Words: fixed(20)}, {Words: fixed(20), Prefixes: []string{prefix}}, {Words: fixed(20), Prefixes: []string{prefix, other}}} {
		seen := map[string]bool{}
		used := map[string]bool{}
		for range 500 {
			text := s.Next(rng).Text
			rest, ok := text, len(s.Prefixes) == 0
			for _, p := range s.Prefixes {
				if r, cut := strings.CutPrefix(text, p); cut {
					rest, ok = r, true
					used[p] = true
				}
			}
			if !ok {
				t.Fatalf("prompt %q does not start with one of the prefixes %q", text, s.Prefixes)
			}
			w := strings.Fields(rest)
			if len(w) != 20 {
				t.Fatalf("prompt %q: %d words after the prefix, want 20", text, len(w))
			}
			key := strings.Join(w[:8], " ")
			if seen[key] {
				t.Fatalf("two prompts share the first eight words %q after the prefix", key)
			}
			seen[key] = true
		}
		if len(used) != len(s.Prefixes) {
			t.Fatalf("500 prompts used %d of %d prefixes", len(used), len(s.Prefixes))
		}
	}
}

func TestSummarize(t *testing.T) {
	ms := time.Millisecond
	recs := []Record{
		{TTFT: 10 * ms, Gaps: []time.Duration{2 * ms, 4 * ms}, Latency: 16 * ms, OutputTokens: 3, PromptTokens: 5, Outcome: OutcomeOK},
		{TTFT: 30 * ms, Gaps: []time.Duration{20 * ms}, Latency: 50 * ms, OutputTokens: 2, PromptTokens: 5, Outcome: OutcomeOK},
		{TTFT: 5 * ms, Latency: 6 * ms, OutputTokens: 1, Outcome: OutcomeAborted},
		{Outcome: "http_429"},
	}
	s := Summarize(Load{Concurrency: 2}, recs, 2*time.Second, SLO{TTFT: 20 * ms, ITL: 5 * ms})
	switch {
	case s.Requests != 4 || s.Completed != 2 || s.Aborted != 1 || s.Errors != 1 || s.ErrorsByKind["http_429"] != 1:
		t.Fatalf("counts %+v", s)
	case s.TTFT.P50 != 10 || s.TTFT.P99 != 30 || s.TTFT.Mean != 20:
		t.Fatalf("ttft %+v", s.TTFT)
	case s.ITL.P50 != 4 || s.ITL.P99 != 20:
		t.Fatalf("itl %+v", s.ITL)
	case s.OutputTokens != 6 || s.OutputTokensPerS != 3 || s.RequestsPerS != 1 || s.GoodputPerS != 0.5:
		t.Fatalf("rates %+v", s)
	case len(s.CDF.TTFT) != 101 || s.CDF.TTFT[0] != 10 || s.CDF.TTFT[100] != 30:
		t.Fatalf("cdf %v", s.CDF.TTFT)
	}
	// A stall bound: the first request's mean gap (3 ms) passes a 3.5 ms
	// mean bound, its longest (4 ms) fails a 3.5 ms stall bound.
	if g := Summarize(Load{Concurrency: 2}, recs, 2*time.Second, SLO{ITL: 3500 * time.Microsecond}).GoodputPerS; g != 0.5 {
		t.Fatalf("goodput under a mean gap bound: %v, want 0.5", g)
	}
	if g := Summarize(Load{Concurrency: 2}, recs, 2*time.Second, SLO{MaxITL: 3500 * time.Microsecond}).GoodputPerS; g != 0 {
		t.Fatalf("goodput under a longest gap bound: %v, want 0", g)
	}
}

func TestLevelLine(t *testing.T) {
	s := Summary{DurationS: 20.04, Completed: 118, Aborted: 2, Errors: 1, RequestsPerS: 5.5, OutputTokensPerS: 353.4,
		TTFT: Percentiles{P50: 69.1}, ITL: Percentiles{P50: 20.85}}
	want := "c=8 done in 20.0s: 118 ok, 2 aborted, 1 errors; 5.50 req/s, 353.4 output tokens/s, ttft p50 69.1ms, itl p50 20.85ms"
	if got := LevelLine("c=8", s); got != want {
		t.Fatalf("got  %q\nwant %q", got, want)
	}
}

// fakeServer is an OpenAI completions endpoint with known timing: the
// first token after ttft, then one token every itl, max_tokens of them,
// then a usage chunk. A prompt containing "reject" answers 429. It counts
// the requests whose client went away before the end.
type fakeServer struct {
	ttft, itl time.Duration
	gone      atomic.Int64
	served    atomic.Int64
}

func (f *fakeServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	var body struct {
		Prompt    string `json:"prompt"`
		Messages  []any  `json:"messages"`
		MaxTokens int    `json:"max_tokens"`
		MaxComp   int    `json:"max_completion_tokens"`
		Stream    bool   `json:"stream"`
	}
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil || !body.Stream {
		http.Error(w, `{"error":{"message":"bad"}}`, http.StatusBadRequest)
		return
	}
	f.served.Add(1)
	if strings.Contains(body.Prompt, "reject") {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusTooManyRequests)
		_, _ = w.Write([]byte(`{"error":{"message":"busy","type":"rate_limit_error"}}`))
		return
	}
	n := max(body.MaxTokens, body.MaxComp)
	chat := strings.HasSuffix(r.URL.Path, "/chat/completions")
	w.Header().Set("Content-Type", "text/event-stream")
	w.WriteHeader(http.StatusOK)
	fl := w.(http.Flusher)
	fl.Flush()
	delay := f.ttft
	for i := range n {
		select {
		case <-time.After(delay): // the injected latency, not a synchronisation
		case <-r.Context().Done():
			f.gone.Add(1)
			return
		}
		delay = f.itl
		chunk := fmt.Sprintf(`{"id":"x","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":"t%d ","finish_reason":null}]}`, i)
		if chat {
			chunk = fmt.Sprintf(`{"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"t%d "},"finish_reason":null}]}`, i)
		}
		fmt.Fprintf(w, "data: %s\n\n", chunk)
		fl.Flush()
	}
	fmt.Fprintf(w, "data: {\"id\":\"x\",\"object\":\"text_completion\",\"created\":1,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":%d,\"total_tokens\":%d}}\n\n", n, n+3)
	fmt.Fprint(w, "data: [DONE]\n\n")
	fl.Flush()
}

func serveFake(t *testing.T, f *fakeServer) string {
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	return srv.URL + "/v1"
}

// TestMeasuresInjectedLatency: against a server with a known TTFT and
// inter-token gap, the measured p50s are at least the injected ones and
// within a tolerance above them (a loaded machine only adds delay).
func TestMeasuresInjectedLatency(t *testing.T) {
	f := &fakeServer{ttft: 60 * time.Millisecond, itl: 15 * time.Millisecond}
	url := serveFake(t, f)
	for _, chat := range []bool{false, true} {
		r := NewRunner(Target{URL: url, Model: "m", Chat: chat, Timeout: 30 * time.Second}, Workload{Prompts: Synthetic{Words: fixed(4)}, Output: fixed(8), Seed: 3})
		l := Load{Concurrency: 4, Requests: 12}
		recs, wall, err := r.Run(context.Background(), l, nil)
		if err != nil {
			t.Fatal(err)
		}
		s := Summarize(l, recs, wall, SLO{})
		if s.Completed != 12 || s.Errors != 0 || s.OutputTokens != 12*8 || s.PromptTokens != 12*3 {
			t.Fatalf("chat=%v: %+v", chat, s)
		}
		if s.TTFT.P50 < 60 || s.TTFT.P50 > 60*1.5+20 {
			t.Errorf("chat=%v: ttft p50 %.1f ms, injected 60", chat, s.TTFT.P50)
		}
		if s.ITL.P50 < 15*0.9 || s.ITL.P50 > 15*1.5+10 {
			t.Errorf("chat=%v: itl p50 %.1f ms, injected 15", chat, s.ITL.P50)
		}
		if want := 60 + 7*15.0; s.Latency.P50 < want {
			t.Errorf("chat=%v: latency p50 %.1f ms below the injected %.0f", chat, s.Latency.P50, want)
		}
	}
}

// TestAbortsAndErrors: aborted requests are cancelled at the server (it
// sees the client go), rejected ones are counted by kind, and every
// request issued has exactly one outcome.
func TestAbortsAndErrors(t *testing.T) {
	f := &fakeServer{ttft: 5 * time.Millisecond, itl: 5 * time.Millisecond}
	url := serveFake(t, f)
	prompts := List{{Text: "fine"}, {Text: "please reject"}}
	r := NewRunner(Target{URL: url, Model: "m", Timeout: 30 * time.Second}, Workload{Prompts: prompts, Output: fixed(20), AbortRate: 0.5, Seed: 9})
	l := Load{Concurrency: 8, Requests: 80}
	recs, wall, err := r.Run(context.Background(), l, nil)
	if err != nil {
		t.Fatal(err)
	}
	s := Summarize(l, recs, wall, SLO{})
	if s.Requests != 80 || s.Completed+s.Aborted+s.Errors != 80 {
		t.Fatalf("outcomes %+v", s)
	}
	if s.ErrorsByKind["http_429"] == 0 || s.Errors != s.ErrorsByKind["http_429"] {
		t.Fatalf("errors by kind %v", s.ErrorsByKind)
	}
	if s.Aborted == 0 || s.Completed == 0 {
		t.Fatalf("no aborts or no completions: %+v", s)
	}
	// Every abort that happened mid-stream was seen by the server.
	deadline := time.Now().Add(10 * time.Second)
	for f.gone.Load() == 0 && time.Now().Before(deadline) {
		<-time.After(5 * time.Millisecond)
	}
	if f.gone.Load() == 0 {
		t.Fatal("the server never saw a client go away")
	}
}

// TestOpenLoop: a rate level issues its requests with Poisson gaps and
// ends at its count.
func TestOpenLoop(t *testing.T) {
	f := &fakeServer{ttft: time.Millisecond, itl: time.Millisecond}
	url := serveFake(t, f)
	r := NewRunner(Target{URL: url, Model: "m", Timeout: 30 * time.Second}, Workload{Prompts: Synthetic{Words: fixed(2)}, Output: fixed(2), Seed: 5})
	l := Load{Rate: 200, Requests: 40}
	recs, _, err := r.Run(context.Background(), l, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 40 || f.served.Load() != 40 {
		t.Fatalf("%d records, %d served, want 40", len(recs), f.served.Load())
	}
	if _, _, err := r.Run(context.Background(), Load{Rate: 1, Concurrency: 1, Requests: 1}, nil); err == nil {
		t.Fatal("a level with both a rate and a concurrency ran")
	}
}

// TestResultsAndPlots: results.json round-trips and every chart is a PNG.
func TestResultsAndPlots(t *testing.T) {
	dir := t.TempDir()
	ms := time.Millisecond
	var runs []Summary
	for i, c := range []int{1, 8} {
		recs := []Record{{TTFT: time.Duration(10+i) * ms, Gaps: []time.Duration{ms, 2 * ms}, Latency: 20 * ms, OutputTokens: 3, Outcome: OutcomeOK}}
		runs = append(runs, Summarize(Load{Concurrency: c}, recs, time.Second, SLO{}))
	}
	res := Results{Schema: Schema, Label: "a", Runs: runs}
	path, err := res.Write(dir)
	if err != nil {
		t.Fatal(err)
	}
	back, err := ReadResults(path)
	if err != nil || len(back.Runs) != 2 || back.Runs[1].Concurrency != 8 {
		t.Fatalf("%+v %v", back, err)
	}
	var raw map[string]any
	b, _ := os.ReadFile(path)
	_ = json.Unmarshal(b, &raw)
	run0 := raw["runs"].([]any)[0].(map[string]any)
	for _, k := range []string{"concurrency", "ttft_ms", "itl_ms", "latency_ms", "output_tokens_per_s", "requests_per_s", "errors"} {
		if _, ok := run0[k]; !ok {
			t.Errorf("results.json run lacks %q", k)
		}
	}
	paths, err := WritePlots(dir, res)
	if err != nil {
		t.Fatal(err)
	}
	b2 := res
	b2.Label = "b"
	cmp, err := WriteCompare(filepath.Join(dir), res, b2)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range append(paths, cmp...) {
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		cfg, err := png.DecodeConfig(f)
		f.Close()
		if err != nil || cfg.Width < 100 {
			t.Fatalf("%s: %v %+v", p, err, cfg)
		}
	}
	if len(paths) != 6 || len(cmp) != 3 {
		t.Fatalf("%d charts, %d comparison charts", len(paths), len(cmp))
	}
	bad := filepath.Join(dir, "bad.json")
	_ = os.WriteFile(bad, []byte(`{"schema":"kvload/0"}`), 0o644)
	if _, err := ReadResults(bad); err == nil {
		t.Fatal("another schema read")
	}
}

func TestProgressLine(t *testing.T) {
	var b strings.Builder
	p := NewProgress(&b, "c=4", 10, time.Hour)
	p.Add(Record{TTFT: 12 * time.Millisecond, Gaps: []time.Duration{3 * time.Millisecond}, Outcome: OutcomeOK})
	p.Add(Record{Outcome: "http_500"})
	line := p.Line()
	p.Stop()
	for _, want := range []string{"c=4", "2/10", "ttft p50 12.0ms", "itl p50 3.0ms", "errors 1"} {
		if !strings.Contains(line, want) {
			t.Errorf("progress %q lacks %q", line, want)
		}
	}
	if !strings.HasSuffix(b.String(), "\n") {
		t.Error("Stop did not end the line")
	}
}

// TestDurationLetsInFlightFinish: a level bounded by time stops issuing at
// its end, and the requests in flight then complete rather than fail.
func TestDurationLetsInFlightFinish(t *testing.T) {
	f := &fakeServer{ttft: 30 * time.Millisecond, itl: 30 * time.Millisecond}
	url := serveFake(t, f)
	r := NewRunner(Target{URL: url, Model: "m", Timeout: 30 * time.Second}, Workload{Prompts: Synthetic{Words: fixed(2)}, Output: fixed(10), Seed: 5})
	recs, wall, err := r.Run(context.Background(), Load{Concurrency: 3, Duration: 200 * time.Millisecond}, nil)
	if err != nil {
		t.Fatal(err)
	}
	s := Summarize(Load{Concurrency: 3}, recs, wall, SLO{})
	if s.Requests == 0 || s.Errors != 0 || s.Completed != s.Requests {
		t.Fatalf("%+v", s)
	}
}
