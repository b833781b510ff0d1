package executor

import (
	"context"
	"slices"
	"sync"
)

// Prompt is one prompt's prefill in progress: the engine has its first
// Pos() tokens (a reused prefix imported at Begin, then the chunks run so
// far). Only the Prefiller's loop steps it; once Finished, First and Sums
// are its answer and its blocks hold its KV. The caller closes it.
type Prompt struct {
	tokens   []uint32
	sampling Sampling
	blocks   [][]byte
	reused   int // blocks already holding their KV (prefix reuse)
	pos      int // prompt tokens in the engine's KV so far

	finished     bool
	first        uint32
	firstLogprob *Logprob   // when the sampling asks for logprobs
	others       []uint32   // choices 1 to N-1's first tokens
	otherLPs     []*Logprob // and their logprobs
	sums         []uint64

	slot      int    // llama.cpp: the sequence id it holds
	close     func() // releases what the engine holds for it
	closeOnce sync.Once
}

// Remaining is how many prompt tokens the engine has not run yet.
func (p *Prompt) Remaining() int { return len(p.tokens) - p.pos }

// Finished reports whether the prompt's last token ran; then First and
// Sums are set and its blocks written.
func (p *Prompt) Finished() bool { return p.finished }

// First is the first generated token; Sums the checksum of each block.
func (p *Prompt) First() uint32 { return p.first }

// FirstLogprob is the first token's logprob, set once Finished when the
// sampling asked for logprobs.
func (p *Prompt) FirstLogprob() *Logprob { return p.firstLogprob }

// Sums is the checksum of each block, set once Finished.
func (p *Prompt) Sums() []uint64 { return p.sums }

// Close releases what the engine holds for the prompt. It is idempotent.
func (p *Prompt) Close() {
	p.closeOnce.Do(func() {
		if p.close != nil {
			p.close()
		}
	})
}

// newPrompt checks a prompt against its blocks. At least the last prompt
// token is always run, for its logits; the rest of the reused prefix is
// imported, never run.
func newPrompt(spec ModelSpec, tokens []uint32, s Sampling, blocks [][]byte, reused int) (*Prompt, error) {
	if err := checkBlocks(spec, len(tokens), blocks, reused); err != nil {
		return nil, err
	}
	return &Prompt{tokens: tokens, sampling: s, blocks: blocks, reused: reused, pos: min(reused*spec.BlockTokens, len(tokens)-1)}, nil
}

// PlanPrefill chooses one prefill step: how many tokens each waiting
// prompt (their remaining tokens, in arrival order) runs in it. Each gets
// at most chunk tokens, the step at most budget in all, the oldest first —
// so a long prompt advances a chunk a step while the prompts behind it
// still get the rest of the budget (chunked prefill), and no prompt is
// overtaken for ever (arrival order). A zero entry sits this step out.
func PlanPrefill(remaining []int, chunk, budget int) []int {
	plan := make([]int, len(remaining))
	for i, r := range remaining {
		if budget <= 0 {
			break
		}
		n := min(r, chunk, budget)
		plan[i] = n
		budget -= n
	}
	return plan
}

// Prefiller is a context server's prefill loop: continuous batching of
// prompts. Each step runs the next chunk of as many waiting prompts as
// PlanPrefill admits — one llama_decode over several sequence ids, one
// step time of the synthetic engine — so prompts that arrive together
// are computed together, and a long prompt does not stall short ones.
// Like the Decoder, its goroutine runs while prompts wait and ends with
// the last one; the next Prefill starts it again.
type Prefiller struct {
	engine    Engine
	chunk     int // most tokens of one prompt in a step
	maxTokens int // most tokens of a step
	onStep    func(prompts, tokens int)

	mu      sync.Mutex
	jobs    []*prefillJob // waiting, in arrival order
	running bool
	// cancelStep interrupts the step running now when every prompt of it
	// left (a synthetic step time nobody waits for).
	batch      []*prefillJob
	cancelStep context.CancelFunc
}

type prefillJob struct {
	p      *Prompt
	done   chan struct{} // closed when the loop let go of the prompt for good
	err    error
	inStep bool
	left   bool
}

// Defaults of the prefill loop.
const (
	// DefaultPrefillChunk is the most tokens of one prompt in a step: long
	// enough that a chunk amortises a step's fixed cost, short enough that
	// a 4k-token prompt lets others in eight times on its way.
	DefaultPrefillChunk = 512
	// DefaultMaxBatchTokens is the most tokens of one step, for every
	// prompt together: four full chunks.
	DefaultMaxBatchTokens = 2048
)

// NewPrefiller returns the prefill loop over engine (chunk and maxTokens
// ≤ 0: the defaults). onStep, when set, is called after each step with
// the prompts and tokens it ran (progress and metrics).
func NewPrefiller(engine Engine, chunk, maxTokens int, onStep func(prompts, tokens int)) *Prefiller {
	if chunk <= 0 {
		chunk = DefaultPrefillChunk
	}
	if maxTokens <= 0 {
		maxTokens = DefaultMaxBatchTokens
	}
	return &Prefiller{engine: engine, chunk: chunk, maxTokens: max(maxTokens, chunk), onStep: onStep}
}

// Prefill writes the KV of tokens into blocks (the first reused blocks
// already hold theirs), batched with the other prompts waiting, and
// returns the first generated token and each block's checksum. When ctx
// ends it returns ctx's error — only once no step writes the blocks any
// more, so the caller may free them at once.
func (f *Prefiller) Prefill(ctx context.Context, tokens []uint32, s Sampling, blocks [][]byte, reused int) (uint32, []uint64, error) {
	out, err := f.Run(ctx, tokens, s, blocks, reused)
	return out.First, out.Sums, err
}

// Prefilled is a finished prefill's answer.
type Prefilled struct {
	First   uint32
	Logprob *Logprob // the first token's, when asked for
	// Others are choices 1 to N-1's first tokens (Sampling.N > 1), sampled
	// from the same logits with their own seeds; OtherLogprobs theirs.
	Others        []uint32
	OtherLogprobs []*Logprob
	Sums          []uint64
}

// Run is Prefill with the first token's logprob.
func (f *Prefiller) Run(ctx context.Context, tokens []uint32, s Sampling, blocks [][]byte, reused int) (Prefilled, error) {
	p, err := f.engine.BeginPrefill(ctx, tokens, s, blocks, reused)
	if err != nil {
		return Prefilled{}, err
	}
	defer p.Close()
	j := &prefillJob{p: p, done: make(chan struct{})}
	f.mu.Lock()
	f.jobs = append(f.jobs, j)
	if !f.running {
		f.running = true
		go f.loop()
	}
	f.mu.Unlock()
	select {
	case <-j.done:
	case <-ctx.Done():
		f.leave(j)
		<-j.done // at most the step running it
		return Prefilled{}, ctx.Err()
	}
	if j.err != nil {
		return Prefilled{}, j.err
	}
	return Prefilled{First: p.first, Logprob: p.firstLogprob, Others: p.others, OtherLogprobs: p.otherLPs, Sums: p.sums}, nil
}

// leave takes a prompt out of the loop: at once when no step runs it, or
// when the step running it ends.
func (f *Prefiller) leave(j *prefillJob) {
	f.mu.Lock()
	defer f.mu.Unlock()
	j.left = true
	if j.inStep {
		if f.allLeftLocked() {
			f.cancelStep()
		}
		return // the loop closes done after the step
	}
	f.removeLocked(j)
	closeOnce(j.done)
}

func (f *Prefiller) allLeftLocked() bool {
	for _, j := range f.batch {
		if !j.left {
			return false
		}
	}
	return true
}

func (f *Prefiller) removeLocked(j *prefillJob) {
	if i := slices.Index(f.jobs, j); i >= 0 {
		f.jobs = slices.Delete(f.jobs, i, i+1)
	}
}

// Waiting is the number of prompts in the loop.
func (f *Prefiller) Waiting() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.jobs)
}

func (f *Prefiller) loop() {
	for {
		f.mu.Lock()
		if len(f.jobs) == 0 {
			f.running = false
			f.mu.Unlock()
			return
		}
		remaining := make([]int, len(f.jobs))
		for i, j := range f.jobs {
			remaining[i] = j.p.Remaining()
		}
		plan := PlanPrefill(remaining, f.chunk, f.maxTokens)
		var batch []*prefillJob
		var counts []int
		total := 0
		for i, j := range f.jobs {
			if plan[i] > 0 {
				j.inStep = true
				batch = append(batch, j)
				counts = append(counts, plan[i])
				total += plan[i]
			}
		}
		ctx, cancel := context.WithCancel(context.Background())
		f.batch, f.cancelStep = batch, cancel
		f.mu.Unlock()

		prompts := make([]*Prompt, len(batch))
		for i, j := range batch {
			prompts[i] = j.p
		}
		err := f.engine.PrefillStep(ctx, prompts, counts)
		cancel()

		f.mu.Lock()
		f.batch = nil
		for _, j := range batch {
			j.inStep = false
			if err != nil || j.left || j.p.finished {
				j.err = err
				f.removeLocked(j)
				closeOnce(j.done)
			}
		}
		f.mu.Unlock()
		if f.onStep != nil {
			f.onStep(len(batch), total)
		}
	}
}

// Prefill runs one prompt alone through engine, chunk by chunk: the
// prefill of a single caller (references, tests, benchmarks).
func Prefill(ctx context.Context, engine Engine, tokens []uint32, s Sampling, blocks [][]byte, reused int) (uint32, []uint64, error) {
	p, err := engine.BeginPrefill(ctx, tokens, s, blocks, reused)
	if err != nil {
		return 0, nil, err
	}
	defer p.Close()
	for !p.finished {
		if err := engine.PrefillStep(ctx, []*Prompt{p}, []int{min(p.Remaining(), DefaultPrefillChunk)}); err != nil {
			return 0, nil, err
		}
	}
	return p.first, p.sums, nil
}
