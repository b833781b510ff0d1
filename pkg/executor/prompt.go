package executor

import (
	"context"
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

// DefaultPrefillChunk is the most tokens of one prompt in a prefill step:
// long enough that a chunk amortises a step's fixed cost, short enough
// that a 4k-token prompt lets others in eight times on its way.
const DefaultPrefillChunk = 512

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

// Prefilled is a finished prompt's answer; zero before it finished.
func (p *Prompt) Prefilled() Prefilled {
	if !p.finished {
		return Prefilled{}
	}
	return Prefilled{First: p.first, Logprob: p.firstLogprob, Others: p.others, OtherLogprobs: p.otherLPs, Sums: p.sums}
}

// Prefill runs one prompt alone through engine, chunk by chunk: the
// prefill of a single caller (references, tests, benchmarks).
func Prefill(ctx context.Context, engine Engine, tokens []uint32, s Sampling, blocks [][]byte, reused int) (uint32, []uint64, error) {
	out, err := PrefillAlone(ctx, engine, tokens, s, blocks, reused)
	return out.First, out.Sums, err
}

// PrefillAlone is Prefill with the whole answer (logprobs, every choice's
// first token).
func PrefillAlone(ctx context.Context, engine Engine, tokens []uint32, s Sampling, blocks [][]byte, reused int) (Prefilled, error) {
	p, err := engine.BeginPrefill(ctx, tokens, s, blocks, reused)
	if err != nil {
		return Prefilled{}, err
	}
	defer p.Close()
	for !p.finished {
		if err := engine.PrefillStep(ctx, []*Prompt{p}, []int{min(p.Remaining(), DefaultPrefillChunk)}); err != nil {
			return Prefilled{}, err
		}
	}
	return p.Prefilled(), nil
}
