package loadgen

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
)

// Target is the endpoint and how requests are made to it.
type Target struct {
	URL    string // base URL, .../v1
	APIKey string
	Model  string
	// Chat sends chat completions (one user message) instead of completions.
	Chat bool
	// IgnoreEOS asks the server to generate max_tokens past end-of-text
	// (vLLM's and kvferry's ignore_eos; off for servers that refuse it).
	IgnoreEOS bool
	// Timeout bounds one request.
	Timeout time.Duration
}

// Workload is what the requests ask for.
type Workload struct {
	Prompts Prompts
	Output  Dist // max_tokens, where the prompt does not set it
	// AbortRate is the share of requests the client cancels, each before
	// a token position drawn uniformly below its max_tokens (0: before the
	// first token). An answer that ends before its position completes, so
	// the realized share is exact only when answers run to max_tokens.
	AbortRate float64
	Seed      uint64
}

// Load is one load level: a closed loop at Concurrency or an open loop
// at Rate requests a second (Poisson arrivals); it ends after Requests
// requests or Duration, whichever comes first (a zero one does not
// bound).
type Load struct {
	Concurrency int
	Rate        float64
	Requests    int
	Duration    time.Duration
}

// Name is the level as tables and charts call it: "c=8" or "4 req/s".
func (l Load) Name() string {
	if l.Rate > 0 {
		return fmt.Sprintf("%g req/s", l.Rate)
	}
	return fmt.Sprintf("c=%d", l.Concurrency)
}

// Outcomes of a request besides the error kinds (http_429, timeout,
// transport, ...).
const (
	OutcomeOK      = "ok"
	OutcomeAborted = "aborted"
)

// Record is what one request measured.
type Record struct {
	Start        time.Duration   // since the level started
	TTFT         time.Duration   // 0 when no token arrived
	Gaps         []time.Duration // between successive tokens
	Latency      time.Duration   // request sent to last byte
	PromptTokens int             // from the usage chunk (0 when none came)
	OutputTokens int             // from usage, else the token chunks seen
	Outcome      string
}

// Runner makes requests to one target.
type Runner struct {
	hc     *http.Client
	client openai.Client
	target Target
	work   Workload
}

// NewRunner returns a runner with its own HTTP connection pool.
func NewRunner(t Target, w Workload) *Runner {
	hc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 4096, ForceAttemptHTTP2: false}}
	opts := []option.RequestOption{option.WithBaseURL(t.URL), option.WithMaxRetries(0), option.WithHTTPClient(hc)}
	if t.APIKey != "" {
		opts = append(opts, option.WithAPIKey(t.APIKey))
	} else {
		opts = append(opts, option.WithAPIKey("none"))
	}
	return &Runner{hc: hc, client: openai.NewClient(opts...), target: t, work: w}
}

// Close closes the runner's idle connections (and their goroutines).
func (r *Runner) Close() { r.hc.CloseIdleConnections() }

// Run runs one load level until it ends (its requests issued, or its
// duration passed and the requests in flight finished) or ctx is done, calling onRecord
// (when not nil, from any goroutine) as each request finishes. It returns
// every record and the level's wall time.
func (r *Runner) Run(ctx context.Context, l Load, onRecord func(Record)) ([]Record, time.Duration, error) {
	if (l.Concurrency > 0) == (l.Rate > 0) {
		return nil, 0, errors.New("loadgen: a level has a concurrency or a rate, not both")
	}
	if l.Requests <= 0 && l.Duration <= 0 {
		return nil, 0, errors.New("loadgen: a level needs a request count or a duration")
	}
	// The level's duration stops new requests; those in flight finish
	// (each within Target.Timeout). ctx being done stops them too.
	issuing := ctx
	if l.Duration > 0 {
		var cancel context.CancelFunc
		issuing, cancel = context.WithTimeout(ctx, l.Duration)
		defer cancel()
	}
	start := time.Now()
	var mu sync.Mutex
	var recs []Record
	record := func(rec Record) {
		mu.Lock()
		recs = append(recs, rec)
		mu.Unlock()
		if onRecord != nil {
			onRecord(rec)
		}
	}
	var issued atomic.Int64
	take := func() bool { // claims the next request, if the level has one
		return issuing.Err() == nil && (l.Requests <= 0 || issued.Add(1) <= int64(l.Requests))
	}
	var wg sync.WaitGroup
	if l.Concurrency > 0 {
		for w := range l.Concurrency {
			rng := rand.New(rand.NewPCG(r.work.Seed, uint64(w)))
			wg.Go(func() {
				for take() {
					record(r.do(ctx, rng, start))
				}
			})
		}
	} else {
		arrivals := rand.New(rand.NewPCG(r.work.Seed, 1<<32))
		timer := time.NewTimer(0)
		defer timer.Stop()
		for n := uint64(0); ; n++ {
			select {
			case <-timer.C:
			case <-issuing.Done():
			}
			if !take() {
				break
			}
			rng := rand.New(rand.NewPCG(r.work.Seed, n))
			wg.Go(func() { record(r.do(ctx, rng, start)) })
			timer.Reset(time.Duration(arrivals.ExpFloat64() / l.Rate * float64(time.Second)))
		}
	}
	wg.Wait()
	return recs, time.Since(start), nil
}

// stream is what the two streaming APIs have in common.
type stream interface {
	Next() bool
	Err() error
	Close() error
}

// do makes one request and measures it. A request cut short by ctx (an
// interrupted run, not its own timeout or abort) still counts, as a
// transport error, so every request issued has one outcome.
func (r *Runner) do(ctx context.Context, rng *rand.Rand, level time.Time) Record {
	p := r.work.Prompts.Next(rng)
	maxTokens := p.MaxTokens
	if maxTokens == 0 {
		maxTokens = r.work.Output.Sample(rng)
	}
	abortAt := -1 // abort before the token with this index
	if rng.Float64() < r.work.AbortRate {
		abortAt = rng.IntN(maxTokens)
	}
	rctx, cancel := context.WithCancel(ctx) // ctx done: the run was interrupted
	defer cancel()
	if r.target.Timeout > 0 {
		var tcancel context.CancelFunc
		rctx, tcancel = context.WithTimeout(rctx, r.target.Timeout)
		defer tcancel()
	}
	var opts []option.RequestOption
	if r.target.IgnoreEOS {
		opts = append(opts, option.WithJSONSet("ignore_eos", true))
	}
	usageOpt := openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)}
	start := time.Now()
	rec := Record{Start: start.Sub(level)}
	var st stream
	var content func() string
	var usage func() openai.CompletionUsage
	if r.target.Chat {
		s := r.client.Chat.Completions.NewStreaming(rctx, openai.ChatCompletionNewParams{Model: r.target.Model,
			Messages:            []openai.ChatCompletionMessageParamUnion{openai.UserMessage(p.Text)},
			MaxCompletionTokens: openai.Int(int64(maxTokens)), StreamOptions: usageOpt}, opts...)
		st = s
		content = func() string {
			if c := s.Current(); len(c.Choices) > 0 {
				return c.Choices[0].Delta.Content
			}
			return ""
		}
		usage = func() openai.CompletionUsage { return s.Current().Usage }
	} else {
		s := r.client.Completions.NewStreaming(rctx, openai.CompletionNewParams{Model: openai.CompletionNewParamsModel(r.target.Model),
			Prompt:    openai.CompletionNewParamsPromptUnion{OfString: openai.String(p.Text)},
			MaxTokens: openai.Int(int64(maxTokens)), StreamOptions: usageOpt}, opts...)
		st = s
		content = func() string {
			if c := s.Current(); len(c.Choices) > 0 {
				return c.Choices[0].Text
			}
			return ""
		}
		usage = func() openai.CompletionUsage { return s.Current().Usage }
	}
	defer st.Close()
	tokens, last := 0, start
	for {
		if tokens == abortAt {
			cancel()
			rec.Outcome = OutcomeAborted
			break
		}
		if !st.Next() {
			break
		}
		if u := usage(); u.CompletionTokens > 0 || u.PromptTokens > 0 {
			rec.PromptTokens, rec.OutputTokens = int(u.PromptTokens), int(u.CompletionTokens)
		}
		if content() == "" {
			continue
		}
		now := time.Now()
		if tokens == 0 {
			rec.TTFT = now.Sub(start)
		} else {
			rec.Gaps = append(rec.Gaps, now.Sub(last))
		}
		last = now
		tokens++
	}
	rec.Latency = time.Since(start)
	if rec.OutputTokens == 0 {
		rec.OutputTokens = tokens
	}
	if rec.Outcome == "" {
		rec.Outcome = OutcomeOK
		if err := st.Err(); err != nil {
			rec.Outcome = ErrorKind(err)
		}
	}
	return rec
}

// ErrorKind names an error for the errors-by-kind table: http_STATUS for
// an answer with an error status, stream_error for an error event in a
// stream, timeout, or transport.
func ErrorKind(err error) string {
	var apiErr *openai.Error
	switch {
	case errors.As(err, &apiErr) && apiErr.StatusCode > 0:
		return fmt.Sprintf("http_%d", apiErr.StatusCode)
	case errors.As(err, &apiErr):
		return "stream_error" // an error event after the answer began
	case errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	default:
		return "transport"
	}
}
