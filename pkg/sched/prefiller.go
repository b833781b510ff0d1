package sched

import (
	"context"
	"slices"
	"sync"

	"github.com/kvferry/kvferry/pkg/executor"
)

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
	engine    executor.Engine
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
	p      *executor.Prompt
	done   chan struct{} // closed when the loop let go of the prompt for good
	err    error
	inStep bool
	left   bool
}

// DefaultMaxBatchTokens is the most tokens of one prefill step, for every
// prompt together: four full chunks (executor.DefaultPrefillChunk).
const DefaultMaxBatchTokens = 4 * executor.DefaultPrefillChunk

// NewPrefiller returns the prefill loop over engine (chunk and maxTokens
// ≤ 0: the defaults). onStep, when set, is called after each step with
// the prompts and tokens it ran (progress and metrics).
func NewPrefiller(engine executor.Engine, chunk, maxTokens int, onStep func(prompts, tokens int)) *Prefiller {
	if chunk <= 0 {
		chunk = executor.DefaultPrefillChunk
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
func (f *Prefiller) Prefill(ctx context.Context, tokens []uint32, s executor.Sampling, blocks [][]byte, reused int) (uint32, []uint64, error) {
	out, err := f.Run(ctx, tokens, s, blocks, reused)
	return out.First, out.Sums, err
}

// Run is Prefill with the first token's logprob.
func (f *Prefiller) Run(ctx context.Context, tokens []uint32, s executor.Sampling, blocks [][]byte, reused int) (executor.Prefilled, error) {
	p, err := f.engine.BeginPrefill(ctx, tokens, s, blocks, reused)
	if err != nil {
		return executor.Prefilled{}, err
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
		return executor.Prefilled{}, ctx.Err()
	}
	if j.err != nil {
		return executor.Prefilled{}, j.err
	}
	return p.Prefilled(), nil
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

		prompts := make([]*executor.Prompt, len(batch))
		for i, j := range batch {
			prompts[i] = j.p
		}
		err := f.engine.PrefillStep(ctx, prompts, counts)
		cancel()

		f.mu.Lock()
		f.batch = nil
		for _, j := range batch {
			j.inStep = false
			if err != nil || j.left || j.p.Finished() {
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
