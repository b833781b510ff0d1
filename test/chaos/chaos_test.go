// Package chaos is kvferry's gate: storms of streaming requests, half of
// them aborted by the client at random moments, on real processes, with
// peers stopped, killed and faulty, then probes. Every scenario prints one
// result line and the run a final "chaos: N passed, M failed" line.
//
//	make test    runs the short gate: one storm at concurrency 64 and a
//	             stopped generation server (a few seconds);
//	make chaos   runs every scenario (-chaos.full), bounded to 20 minutes.
package chaos

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"

	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/pkg/router"
	"github.com/kvferry/kvferry/test/stack"
)

var (
	full       = flag.Bool("chaos.full", false, "run every scenario at full size (make chaos)")
	transports = flag.String("chaos.transports", "tcp,shm,aggregated", "comma-separated transports: the whole gate runs once on each (aggregated: no context servers and no transfer; generation servers that prefill too — the storms and the stopped peer)")
	engines    = flag.String("chaos.engines", "synthetic,llamacpp", "comma-separated engines: the whole gate runs once on each (llamacpp: the test model stories260K)")
)

var binDir string

func TestMain(m *testing.M) {
	flag.Parse()
	// Race-detector binaries: a race report in any log fails the gate.
	os.Exit(stack.RunWithBinaries(m, true, &binDir))
}

var tiny, _ = executor.Preset("tiny")

// engine is what the gate needs to know of the engine it runs on.
type engine struct {
	llama bool
	model string // the served name
	// maxWords bounds storm prompts (100 to maxWords words).
	maxWords int
	// base is the words prompts are made of.
	base string
	// canary is the prompt and the text the canary must give (greedy).
	canaryPrompt, canaryText string
}

func engineFor(t *testing.T, name string) engine {
	switch name {
	case executor.EngineSynthetic:
		seed := int64(99)
		prompt := words("the quiet river harbour light signal path ferry stone bridge tower window", 300)
		return engine{model: "tiny", maxWords: 8000, base: "the quiet river harbour light signal path ferry stone bridge tower window",
			canaryPrompt: prompt, canaryText: executor.Reference(tiny, prompt, router.SamplingFor(16, &zero, nil, &seed)).Text}
	case executor.EngineLlamaCpp:
		// Prompts within the model's 2,048-token context; the canary is the
		// model's known greedy text.
		return engine{llama: true, model: stack.TestModelName, maxWords: 1200, base: "Once upon a time there was a little dog who liked to run in the park with his friend",
			canaryPrompt: stack.KnownPrompt, canaryText: stack.KnownOutput}
	}
	t.Fatalf("unknown engine %q", name)
	return engine{}
}

var zero = float32(0)

// words builds a prompt of n words of base (n tokens for the synthetic
// engine's vocabulary).
func words(base string, n int) string {
	fields := strings.Fields(base)
	var b strings.Builder
	for i := range n {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(fields[i%len(fields)])
	}
	return b.String()
}

type stormResult struct {
	sent, ok, aborted, rejected, failed int64
	firstErr                            atomic.Value // string: the first failure, for the result line
}

func (r *stormResult) String() string {
	s := fmt.Sprintf("%d sent, %d ok, %d aborted, %d rejected (pool full), %d failed", r.sent, r.ok, r.aborted, r.rejected, r.failed)
	if e, ok := r.firstErr.Load().(string); ok {
		s += "; first failure: " + e
	}
	return s
}

// storm sends total streaming requests at concurrency conc, prompt lengths
// from 100 to e.maxWords words; half are aborted by the client at a random
// moment (before the first token, mid-transfer, mid-decode). One in two
// asks for more than free text — two choices (n), logprobs, or JSON output
// (response_format) — so faults and aborts meet every shape's path too.
func storm(ctx context.Context, c openai.Client, e engine, total, conc int, seed uint64) *stormResult {
	r := &stormResult{}
	rng := rand.New(rand.NewPCG(seed, seed))
	type job struct {
		prompt string
		abort  time.Duration // 0: never
		shape  int           // 0, 1, 2: plain; 3: n = 2; 4: logprobs; 5: JSON
	}
	jobs := make(chan job, total)
	for range total {
		j := job{prompt: words(e.base, 100+rng.IntN(e.maxWords-100)), shape: rng.IntN(6)}
		if rng.IntN(2) == 0 {
			j.abort = time.Duration(1+rng.IntN(300)) * time.Millisecond
		}
		jobs <- j
	}
	close(jobs)
	var wg sync.WaitGroup
	for range conc {
		wg.Go(func() {
			for j := range jobs {
				if ctx.Err() != nil {
					return
				}
				atomic.AddInt64(&r.sent, 1)
				rctx, cancel := context.WithTimeout(ctx, 60*time.Second)
				abort := time.AfterFunc(time.Hour, cancel)
				if j.abort > 0 {
					abort.Reset(j.abort)
				}
				params := openai.CompletionNewParams{Model: openai.CompletionNewParamsModel(e.model),
					Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String(j.prompt)}, MaxTokens: openai.Int(32)}
				var opts []option.RequestOption
				switch j.shape {
				case 3:
					params.N = openai.Int(2)
				case 4:
					params.Logprobs = openai.Int(2)
				case 5:
					opts = append(opts, option.WithJSONSet("response_format", map[string]string{"type": "json_object"}))
				}
				st := c.Completions.NewStreaming(rctx, params, opts...)
				for st.Next() {
				}
				err := st.Err()
				_ = st.Close()
				abort.Stop()
				var apiErr *openai.Error
				switch {
				case err == nil:
					atomic.AddInt64(&r.ok, 1)
				case errors.Is(err, context.Canceled) || rctx.Err() != nil:
					atomic.AddInt64(&r.aborted, 1)
				case errors.As(err, &apiErr) && (apiErr.StatusCode == 503 || apiErr.StatusCode == 429):
					atomic.AddInt64(&r.rejected, 1) // the pool is sized to fill: overload is an answer
				default:
					atomic.AddInt64(&r.failed, 1)
					r.firstErr.CompareAndSwap(nil, err.Error())
				}
				cancel()
			}
		})
	}
	wg.Wait()
	return r
}

// gate holds the pass criteria common to every scenario.
type gate struct {
	t       *testing.T
	e       engine
	s       *stack.Stack
	c       openai.Client
	passed  int
	failed  int
	results []string
}

// check runs the after-fault criteria: a probe succeeds within 30 s, the
// canary gives exactly the Reference, every live server goes idle (only the
// reuse cache owns blocks, nothing in flight or quarantined), and no log
// shows a panic or a race report.
func (g *gate) check(name string, started time.Time, extra string, ok bool, why string) {
	probeOK := false
	probeStart := time.Now()
	deadline := probeStart.Add(30 * time.Second)
	for time.Now().Before(deadline) && !probeOK {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err := g.c.Completions.New(ctx, openai.CompletionNewParams{Model: openai.CompletionNewParamsModel(g.e.model),
			Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String("the river")}, MaxTokens: openai.Int(2)})
		cancel()
		probeOK = err == nil
	}
	recovery := time.Since(probeStart)
	if !probeOK {
		ok, why = false, "no probe succeeded within 30 s of the fault ending"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	maxTokens := int64(16)
	if g.e.llama {
		maxTokens = 40 // the known output's length
	}
	resp, err := g.c.Completions.New(ctx, openai.CompletionNewParams{Model: openai.CompletionNewParamsModel(g.e.model),
		Prompt:    openai.CompletionNewParamsPromptUnion{OfString: openai.String(g.e.canaryPrompt)},
		MaxTokens: openai.Int(maxTokens), Seed: openai.Int(99), Temperature: openai.Float(0)})
	cancel()
	if ok && (err != nil || resp.Choices[0].Text != g.e.canaryText) {
		ok, why = false, fmt.Sprintf("canary: %v", err)
		if err == nil {
			why = fmt.Sprintf("canary text %q, want %q", resp.Choices[0].Text, g.e.canaryText)
		}
	}
	if ok {
		if bad := g.idle(); bad != "" {
			ok, why = false, bad
		}
	}
	for _, p := range append(append([]*stack.Proc{g.s.Router}, g.s.Ctxs...), g.s.Gens...) {
		if l := p.Log(); ok && (strings.Contains(l, "WARNING: DATA RACE") || strings.Contains(l, "panic:")) {
			ok, why = false, p.Name+" logged a race or a panic"
		}
	}
	status := "ok"
	if !ok {
		status = "FAILED: " + why
		g.failed++
	} else {
		g.passed++
	}
	line := fmt.Sprintf("chaos: %-28s %s (%s; probe recovered in %s; blocks at end %s; %s)", name, status, extra,
		recovery.Round(time.Millisecond), g.blocks(), time.Since(started).Round(time.Millisecond))
	fmt.Println(line)
	g.results = append(g.results, line)
}

// idle polls every live server until idle, for up to 30 s.
func (g *gate) idle() string {
	var bad string
	tick := time.NewTicker(50 * time.Millisecond) // polling with a deadline
	defer tick.Stop()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		bad = ""
		for _, base := range append(append([]string{}, g.s.CtxHTTPs...), g.s.GenHTTPs...) {
			p, err := stack.ScrapePool(base)
			if err != nil {
				bad = base + ": " + err.Error()
				break
			}
			if !p.Idle() {
				bad = base + " not idle"
				break
			}
		}
		if bad == "" {
			return ""
		}
		<-tick.C
	}
	return bad
}

// blocks sums the pools of every live server: free, owned (of which in
// the reuse cache), in flight, quarantined, poisoned.
func (g *gate) blocks() string {
	var sum stack.Pool
	for _, base := range append(append([]string{}, g.s.CtxHTTPs...), g.s.GenHTTPs...) {
		p, err := stack.ScrapePool(base)
		if err != nil {
			return err.Error()
		}
		sum.Free += p.Free
		sum.Owned += p.Owned
		sum.Cached += p.Cached
		sum.InFlight += p.InFlight
		sum.Quarantined += p.Quarantined
		sum.Poisoned += p.Poisoned
	}
	return fmt.Sprintf("free %.0f owned %.0f (cached %.0f) in_flight %.0f quarantined %.0f poisoned %.0f", sum.Free, sum.Owned, sum.Cached, sum.InFlight, sum.Quarantined, sum.Poisoned)
}

func (g *gate) finish() {
	fmt.Printf("chaos: %d passed, %d failed\n", g.passed, g.failed)
	if g.failed > 0 {
		g.t.Errorf("chaos: %d of %d scenarios failed:\n%s", g.failed, g.passed+g.failed, strings.Join(g.results, "\n"))
	}
}

// aggregated is the pseudo-transport of an aggregated stack.
const aggregated = "aggregated"

func newGate(t *testing.T, e engine, transport string) *gate {
	both := []string{"--transport=" + transport, "--shm-dir=" + t.TempDir()}
	if transport == aggregated {
		both = nil
	}
	s := stack.Up(t, binDir, stack.Options{Llama: e.llama, Ctxs: 2, Gens: 2, PoolBlocks: 2048, PrefillTokensPerSecond: 200000, DecodeStepTime: 2 * time.Millisecond,
		Aggregated: transport == aggregated, CtxArgs: both,
		GenArgs: append([]string{"--progress-deadline=5s", "--health-interval=200ms", "--canary-interval=1s"}, both...)})
	c := openai.NewClient(option.WithBaseURL(s.OpenAIURL+"/"), option.WithAPIKey("unused"), option.WithMaxRetries(0))
	return &gate{t: t, e: e, s: s, c: c}
}

// TestChaos is the gate: the short version in make test, everything with
// -chaos.full (make chaos), once per transport, and once aggregated
// (the scenarios that need a context server skipped).
func TestChaos(t *testing.T) {
	for _, en := range strings.Split(*engines, ",") {
		for _, tr := range strings.Split(*transports, ",") {
			t.Run(en+"/"+tr, func(t *testing.T) { chaos(t, engineFor(t, en), tr) })
		}
	}
}

func chaos(t *testing.T, e engine, transport string) {
	fmt.Printf("chaos: engine %s, transport %s\n", e.model, transport)
	g := newGate(t, e, transport)
	defer g.finish()
	concs, total, stop := []int{64}, 200, 3*time.Second
	if *full {
		concs, total, stop = []int{128, 256}, 600, 20*time.Second
	}
	for _, conc := range concs {
		start := time.Now()
		r := storm(context.Background(), g.c, e, total, conc, uint64(conc))
		g.check(fmt.Sprintf("storm conc=%d", conc), start, r.String(), r.failed == 0, fmt.Sprintf("%d requests failed", r.failed))
	}

	// Stopped peer: SIGSTOP a generation server during a storm, SIGCONT it.
	start := time.Now()
	done := make(chan *stormResult, 1)
	go func() { done <- storm(context.Background(), g.c, e, total/2, 32, 7) }()
	victim := g.s.Gens[1]
	stack.Eventually(t, "the storm reaches the victim", func() bool {
		return stack.Metric(t, g.s.RouterAdmin, fmt.Sprintf(`kvferry_router_backend_inflight_requests{role="generation",server=%q}`, g.s.GenGRPCs[1])) > 0
	})
	_ = victim.Signal(syscall.SIGSTOP)
	<-time.After(stop) // how long the peer stays stopped is the scenario itself
	_ = victim.Signal(syscall.SIGCONT)
	r := <-done
	// A request caught on the stopped peer may fail; the gate is the
	// aftermath (probes, canary, idle servers, clean logs).
	g.check(fmt.Sprintf("stopped peer %s", stop), start, r.String(), true, "")

	if *full && transport != aggregated {
		// Killed peer: SIGKILL a context server mid-storm, start a new one on its address.
		start = time.Now()
		go func() { done <- storm(context.Background(), g.c, e, total/2, 32, 8) }()
		stack.Eventually(t, "the storm reaches the victim", func() bool {
			return stack.Metric(t, g.s.RouterAdmin, fmt.Sprintf(`kvferry_router_backend_inflight_requests{role="context",server=%q}`, g.s.CtxGRPCs[1])) > 0
		})
		_ = g.s.Ctxs[1].Signal(syscall.SIGKILL)
		<-g.s.Ctxs[1].Done()
		g.s.Ctxs[1] = g.s.Ctxs[1].Restart(t)
		r = <-done
		// Requests on the killed server fail before their first token and
		// are retried; the rest may fail once; the gate is the aftermath.
		g.check("killed peer", start, r.String(), true, "")
	}
	if *full && transport != aggregated {
		// Sick transport: one context server restarted with a fault for a
		// window of 5 s, a storm through it, then the gate after the window.
		for _, fault := range []string{"stall", "partial:after=2", "corrupt", "lose-notify", "lose-abort-ack"} {
			start = time.Now()
			if err := g.s.Ctxs[1].Stop(); err != nil {
				t.Logf("stopping %s: %v", g.s.Ctxs[1].Name, err)
			}
			spec := fault + ":for=5s,rate=0.5"
			if strings.Contains(fault, ":") {
				spec = fault + ",for=5s,rate=0.5"
			}
			g.s.Ctxs[1] = g.s.Ctxs[1].RestartWith(t, "--transport-fault="+spec)
			// The window opens when the new process parses its flags, before
			// it answers ready: it is over 5 s after the first ready answer.
			stack.Eventually(t, "restarted context server ready", func() bool {
				code, _, err := stack.Get(g.s.CtxHTTPs[1] + "/readyz")
				return err == nil && code == http.StatusOK
			})
			windowOver := time.Now().Add(5 * time.Second)
			r = storm(context.Background(), g.c, e, 100, 32, 9)
			<-time.After(time.Until(windowOver)) // the fault window must be over before the gate
			g.check("sick transport "+fault, start, r.String(), true, "")
		}
	}
	g.s.StopAll(t)
}
