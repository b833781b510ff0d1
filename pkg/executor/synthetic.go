package executor

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/bits"
	"sync"
	"time"

	"github.com/kvferry/kvferry/pkg/grammar"
)

// Sampling are the decode parameters the engine honours.
type Sampling struct {
	MaxTokens   int
	Temperature float32
	TopP        float32
	Seed        uint64
	// IgnoreEOS generates past end-of-generation until MaxTokens (not
	// under a Grammar: a complete text ends).
	IgnoreEOS bool
	// Logprobs asks for each generated token's Logprob, with TopLogprobs
	// alternatives.
	Logprobs    bool
	TopLogprobs int
	// Grammar constrains the output (response_format, tool calls); nil:
	// free text. Compiled once per request, shared read-only.
	Grammar *grammar.Grammar
	// N is the number of choices sampled from one prefill (0 and 1: one);
	// choice i samples as Choice(i).
	N int
}

// Choice is the sampling of choice i of s alone: its seed ChoiceSeed(i),
// N 1. Choice 0 is s itself.
func (s Sampling) Choice(i int) Sampling {
	s.Seed, s.N = ChoiceSeed(s.Seed, i), 1
	return s
}

// ChoiceSeed is choice i's seed: the request's for choice 0, a mix of it
// and i for the others (the generation server and a reference compute
// the same one).
func ChoiceSeed(seed uint64, i int) uint64 {
	if i == 0 {
		return seed
	}
	return mix(seed ^ uint64(i)*0xa0761d6478bd642f)
}

// FinishReason tells why a sequence stopped.
type FinishReason int

// Finish reasons.
const (
	FinishNone FinishReason = iota
	FinishStop
	FinishLength
)

// String returns the OpenAI name of the reason.
func (f FinishReason) String() string {
	switch f {
	case FinishStop:
		return "stop"
	case FinishLength:
		return "length"
	}
	return ""
}

// Engine is the seam for model execution. A prefill writes a prompt's KV
// into pool blocks and returns the first token, in steps that batch
// prompts (Prefiller); a Sequence decodes from KV blocks, in steps that
// batch sequences (Decoder).
type Engine interface {
	Model() ModelSpec
	// Vocabulary is the model's tokenizer.
	Vocabulary() Vocabulary
	// BeginPrefill prepares the prefill of tokens into blocks
	// (BlocksFor(len(tokens)) blocks of BlockBytes each). The first reused
	// blocks already hold their KV (prefix reuse): they are read, never
	// written. It may wait, while ctx lives, for engine capacity.
	BeginPrefill(ctx context.Context, tokens []uint32, s Sampling, blocks [][]byte, reused int) (*Prompt, error)
	// PrefillStep runs the next counts[i] tokens of each prompt of the
	// batch in one engine step. A prompt whose last token ran is Finished:
	// its blocks hold its KV, its first token and checksums are set.
	PrefillStep(ctx context.Context, batch []*Prompt, counts []int) error
	// StartDecode builds the decode state from received KV blocks whose
	// checksums (Checksums) the caller verified. It may wait, while ctx
	// lives, for engine capacity (a free llama.cpp sequence). The caller
	// closes the Sequence when the request ends.
	StartDecode(ctx context.Context, blocks [][]byte, sums []uint64, promptTokens int, first uint32, s Sampling) (*Sequence, error)
	// Step advances every sequence of the batch by one token, taking the
	// engine's decode step time.
	Step(ctx context.Context, batch []*Sequence) error
}

// Checksums is the checksum of each block, in order.
func Checksums(blocks [][]byte) []uint64 {
	sums := make([]uint64, len(blocks))
	for i, b := range blocks {
		sums[i] = Checksum(b)
	}
	return sums
}

// Timing is the synthetic engine's timing model. Zero values mean instant.
type Timing struct {
	PrefillTokensPerSecond float64
	DecodeStepTime         time.Duration
}

// Synthetic is the embedded engine. It is safe for concurrent use.
type Synthetic struct {
	spec   ModelSpec
	timing Timing
	// device is the one accelerator the timing models: a prefill step and
	// a decode step of the same engine (an aggregated server's) take turns
	// on it, as kernels do on one GPU.
	device chan struct{}
}

var _ Engine = (*Synthetic)(nil)

// NewSynthetic returns the synthetic engine for a model spec and timing.
func NewSynthetic(spec ModelSpec, timing Timing) *Synthetic {
	return &Synthetic{spec: spec, timing: timing, device: make(chan struct{}, 1)}
}

// busy holds the device for d (nothing when d is 0), or until ctx ends.
func (e *Synthetic) busy(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	select {
	case e.device <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-e.device }()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// Model returns the engine's KV geometry.
func (e *Synthetic) Model() ModelSpec { return e.spec }

// ErrBlocks is returned when the caller's blocks do not fit the prompt.
var ErrBlocks = errors.New("executor: blocks do not match the prompt")

// Prefill runs one prompt alone (see the package's Prefill).
func (e *Synthetic) Prefill(ctx context.Context, tokens []uint32, s Sampling, blocks [][]byte, reused int) (uint32, []uint64, error) {
	return Prefill(ctx, e, tokens, s, blocks, reused)
}

// BeginPrefill implements Engine.
func (e *Synthetic) BeginPrefill(ctx context.Context, tokens []uint32, s Sampling, blocks [][]byte, reused int) (*Prompt, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return newPrompt(e.spec, tokens, s, blocks, reused)
}

// PrefillStep implements Engine. A step costs the time of every token it
// runs (prefill is compute-bound: batching prompts shares the step, not
// the arithmetic); the tokens served from the reuse cache cost nothing.
func (e *Synthetic) PrefillStep(ctx context.Context, batch []*Prompt, counts []int) error {
	total, err := checkStep(batch, counts)
	if err != nil {
		return err
	}
	if e.timing.PrefillTokensPerSecond > 0 {
		if err := e.busy(ctx, time.Duration(float64(total)/e.timing.PrefillTokensPerSecond*float64(time.Second))); err != nil {
			return err
		}
	} else if err := ctx.Err(); err != nil {
		return err
	}
	for i, p := range batch {
		p.pos += counts[i]
		if p.Remaining() == 0 {
			writeKV(e.spec, p.tokens, p.blocks, p.reused)
			p.sums = Checksums(p.blocks)
			p.first, p.firstLogprob = firstSampled(Digest(p.sums), p.sampling)
			for i := 1; i < p.sampling.N; i++ {
				tok, lp := firstSampled(Digest(p.sums), p.sampling.Choice(i))
				p.others, p.otherLPs = append(p.others, tok), append(p.otherLPs, lp)
			}
			p.finished = true
		}
	}
	return nil
}

// checkStep checks a prefill step's plan and returns its token count.
func checkStep(batch []*Prompt, counts []int) (int, error) {
	if len(counts) != len(batch) {
		return 0, fmt.Errorf("%w: %d counts for %d prompts", ErrBlocks, len(counts), len(batch))
	}
	total := 0
	for i, p := range batch {
		if counts[i] <= 0 || counts[i] > p.Remaining() || p.finished {
			return 0, fmt.Errorf("%w: %d tokens of a prompt with %d left", ErrBlocks, counts[i], p.Remaining())
		}
		total += counts[i]
	}
	return total, nil
}

// checkBlocks checks a prompt of n tokens against its blocks.
func checkBlocks(spec ModelSpec, n int, blocks [][]byte, reused int) error {
	if want := spec.BlocksFor(n); n == 0 || len(blocks) != want {
		return fmt.Errorf("%w: %d tokens need %d blocks, got %d", ErrBlocks, n, want, len(blocks))
	}
	if reused < 0 || reused > n/spec.BlockTokens {
		return fmt.Errorf("%w: %d reused blocks of %d full ones", ErrBlocks, reused, n/spec.BlockTokens)
	}
	for i, b := range blocks {
		if len(b) != spec.BlockBytes() {
			return fmt.Errorf("%w: block %d has %d bytes, want %d", ErrBlocks, i, len(b), spec.BlockBytes())
		}
	}
	return nil
}

// Vocabulary implements Engine.
func (e *Synthetic) Vocabulary() Vocabulary { return SyntheticVocabulary }

// StartDecode implements Engine. The decode digest is made of the
// checksums of every received byte.
func (e *Synthetic) StartDecode(ctx context.Context, blocks [][]byte, sums []uint64, promptTokens int, first uint32, s Sampling) (*Sequence, error) {
	if len(sums) != len(blocks) {
		return nil, fmt.Errorf("%w: %d checksums for %d blocks", ErrBlocks, len(sums), len(blocks))
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return newSequence(Digest(sums), promptTokens, first, s)
}

// Step implements Engine.
func (e *Synthetic) Step(ctx context.Context, batch []*Sequence) error {
	if err := e.busy(ctx, e.timing.DecodeStepTime); err != nil {
		return err
	}
	for _, sq := range batch {
		sq.step()
	}
	return nil
}

// Sequence is the decode state of one request.
type Sequence struct {
	key          uint64 // synthetic: the digest-derived sampling key
	promptTokens int
	tokens       []uint32 // generated so far, first token included, EOS excluded
	max          int
	ignoreEOS    bool
	finish       FinishReason

	sampling Sampling
	// matcher follows the grammar, if any, over every token so far.
	matcher *grammar.Matcher
	// logprobs are the decode's tokens' (tokens[1:]; the first token's is
	// the prefill's), when the sampling asks for them.
	logprobs []Logprob

	slot      int    // llama.cpp: the sequence id it holds
	close     func() // releases what the engine holds for it
	closeOnce sync.Once
}

// Close releases what the engine holds for the sequence (a llama.cpp
// sequence and its cells). It is idempotent.
func (sq *Sequence) Close() {
	sq.closeOnce.Do(func() {
		if sq.close != nil {
			sq.close()
		}
	})
}

func newSequence(digest uint64, promptTokens int, first uint32, s Sampling) (*Sequence, error) {
	sq := &Sequence{key: samplingKey(digest, s), max: max(s.MaxTokens, 1), ignoreEOS: s.IgnoreEOS, promptTokens: promptTokens, sampling: s, matcher: matcherFor(s)}
	if err := acceptPiece(sq.matcher, SyntheticVocabulary, first, true); err != nil {
		return nil, err
	}
	sq.tokens = append(sq.tokens, first)
	if len(sq.tokens) >= sq.max {
		sq.finish = FinishLength
	}
	return sq, nil
}

// OnClose adds f to what Close runs, after what the engine releases (an
// owner that must know when a sequence is let go: tests of the loops).
func (sq *Sequence) OnClose(f func()) {
	prev := sq.close
	sq.close = func() {
		if prev != nil {
			prev()
		}
		f()
	}
}

// Tokens returns the tokens generated so far, the first one included.
func (sq *Sequence) Tokens() []uint32 { return sq.tokens }

// PromptTokens returns the prompt length the sequence decodes after.
func (sq *Sequence) PromptTokens() int { return sq.promptTokens }

// Finish returns why the sequence stopped, or FinishNone while it runs.
func (sq *Sequence) Finish() FinishReason { return sq.finish }

// Logprobs are the logprobs of Tokens()[1:] (the decode's), when the
// sampling asked for them.
func (sq *Sequence) Logprobs() []Logprob { return sq.logprobs }

// eosOdds: one step in eosOdds ends the sequence, so short completions end
// with finish_reason "stop" often enough for tests to see both reasons.
const eosOdds = 48

func (sq *Sequence) step() {
	if sq.finish != FinishNone {
		return
	}
	n := len(sq.tokens)
	h := mix(sq.key ^ uint64(n)*0x9e3779b97f4a7c15 ^ uint64(sq.tokens[n-1]))
	var tok uint32
	var candidates []uint32 // for the logprobs' alternatives
	if sq.matcher == nil {
		if h%eosOdds == 0 && !sq.ignoreEOS {
			sq.finish = FinishStop
			return
		}
		tok = wordToken(h >> 8)
	} else {
		var end bool
		if tok, end, candidates = pickConstrained(h, sq.matcher, false); end {
			sq.finish = FinishStop
			return
		}
		sq.matcher.Accept(TokenText(tok, false)) // allowed: pickConstrained checked it
	}
	if sq.sampling.Logprobs {
		sq.logprobs = append(sq.logprobs, *syntheticLogprob(h, tok, sq.sampling.TopLogprobs, candidates))
	}
	sq.tokens = append(sq.tokens, tok)
	if len(sq.tokens) >= sq.max {
		sq.finish = FinishLength
	}
}

func samplingKey(digest uint64, s Sampling) uint64 {
	return mix(digest ^ mix(s.Seed) ^ uint64(math.Float32bits(s.Temperature))<<1 ^ uint64(math.Float32bits(s.TopP))<<33)
}

func wordToken(h uint64) uint32 { return firstWordToken + uint32(h%uint64(len(vocabulary))) }

// firstSampled is the first token of a prompt whose KV digests to
// digest, and its logprob when s asks for it. Unconstrained, it never ends
// the sequence; under a grammar it is one the grammar allows first.
func firstSampled(digest uint64, s Sampling) (uint32, *Logprob) {
	h := mix(samplingKey(digest, s) ^ 0xf1f57)
	tok, candidates := wordToken(h), []uint32(nil)
	if m := matcherFor(s); m != nil {
		var end bool
		if tok, end, candidates = pickConstrained(h, m, true); end {
			tok = TokenEOS // nothing fits: StartDecode refuses it (ErrGrammar)
		}
	}
	if !s.Logprobs {
		return tok, nil
	}
	return tok, syntheticLogprob(h, tok, s.TopLogprobs, candidates)
}

// mix is the splitmix64 finaliser.
func mix(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// writeKV fills blocks[skip:] with the KV of tokens: token i's bytes are a
// stream seeded by the hash chain of tokens[0..i], so they depend on the
// whole prefix. The tail of the last block is zero.
func writeKV(spec ModelSpec, tokens []uint32, blocks [][]byte, skip int) {
	per := spec.BytesPerToken()
	var chain uint64 = 0x6b766665727279 // "kvferry"
	for i, tok := range tokens {
		chain = mix(chain ^ uint64(tok) ^ uint64(i)<<32)
		if i/spec.BlockTokens < skip {
			continue
		}
		b := blocks[i/spec.BlockTokens]
		off := (i % spec.BlockTokens) * per
		fill(b[off:off+per], chain)
	}
	if rem := len(tokens) % spec.BlockTokens; rem != 0 {
		clear(blocks[len(blocks)-1][rem*per:])
	}
}

// fill writes a splitmix64 stream seeded by seed.
func fill(b []byte, seed uint64) {
	s := seed
	i := 0
	for ; i+8 <= len(b); i += 8 {
		s += 0x9e3779b97f4a7c15
		binary.LittleEndian.PutUint64(b[i:], mix(s))
	}
	for ; i < len(b); i++ {
		s += 0x9e3779b97f4a7c15
		b[i] = byte(mix(s))
	}
}

// Checksum is a 64-bit hash of every byte of b.
func Checksum(b []byte) uint64 {
	h := uint64(len(b)) * 0x9e3779b97f4a7c15
	i := 0
	for ; i+8 <= len(b); i += 8 {
		h = bits.RotateLeft64(h^binary.LittleEndian.Uint64(b[i:])*0xc2b2ae3d27d4eb4f, 31) * 0x9e3779b97f4a7c15
	}
	for ; i < len(b); i++ {
		h = bits.RotateLeft64(h^uint64(b[i])*0xc2b2ae3d27d4eb4f, 31) * 0x9e3779b97f4a7c15
	}
	return mix(h)
}

// Digest combines per-block checksums, in order, into the decode digest.
func Digest(sums []uint64) uint64 {
	var d uint64 = 0x646967657374
	for _, s := range sums {
		d = mix(d ^ s)
	}
	return d
}

// Result is a whole generation: the generated tokens (EOS excluded), their
// text and why it stopped.
type Result struct {
	PromptTokens int
	Tokens       []uint32
	Text         string
	Finish       FinishReason
	// Logprobs has one entry per token of Tokens when the sampling asked
	// for them.
	Logprobs []Logprob
	// FirstToken and Total are the wall time to the first token and to the
	// end (llama.cpp's Generate; zero for the synthetic Reference).
	FirstToken, Total time.Duration
}

// Reference returns the aggregated (non-disaggregated) output of the
// synthetic engine for prompt and s: prefill and decode in one process, no
// transfer. A disaggregated run must produce exactly this.
func Reference(spec ModelSpec, prompt string, s Sampling) Result {
	tokens := Tokenize(prompt)
	if len(tokens) == 0 {
		return Result{}
	}
	blocks := make([][]byte, spec.BlocksFor(len(tokens)))
	for i := range blocks {
		blocks[i] = make([]byte, spec.BlockBytes())
	}
	writeKV(spec, tokens, blocks, 0)
	sums := Checksums(blocks)
	first, lp := firstSampled(Digest(sums), s)
	sq, err := newSequence(Digest(sums), len(tokens), first, s)
	if err != nil {
		return Result{PromptTokens: len(tokens), Finish: FinishStop}
	}
	for sq.Finish() == FinishNone {
		sq.step()
	}
	res := Result{PromptTokens: len(tokens), Tokens: sq.Tokens(), Text: Detokenize(sq.Tokens()), Finish: sq.Finish()}
	if lp != nil {
		res.Logprobs = append([]Logprob{*lp}, sq.Logprobs()...)
	}
	return res
}

// BlockHashes returns the prefix-reuse key of each full block of tokens: a
// hash chain, so block j's key depends on every token up to its end and on
// the model geometry. The partial last block has no key.
func BlockHashes(spec ModelSpec, tokens []uint32) []uint64 { return RouteHashes(spec, "", tokens) }

// RouteHashes are BlockHashes under a salt (the tenant that salts the
// prefix cache's keys): what context servers publish of their cache
// (PrefixDigest) and routers compute of a prompt to find where its prefix
// is cached. Unkeyed, so fit for routing only, never as a cache key.
func RouteHashes(spec ModelSpec, salt string, tokens []uint32) []uint64 {
	full := len(tokens) / spec.BlockTokens
	out := make([]uint64, full)
	h := mix(uint64(spec.BytesPerToken())<<20 ^ uint64(spec.BlockTokens))
	for i := 0; i < len(salt); i++ {
		h = mix(h ^ uint64(salt[i]) ^ 1<<40)
	}
	for j := range full {
		for _, t := range tokens[j*spec.BlockTokens : (j+1)*spec.BlockTokens] {
			h = mix(h ^ uint64(t))
		}
		out[j] = h
	}
	return out
}

// PrefixKeys computes the prefix-reuse cache's keys: a chain of
// SHA-256 over the model's identity, a secret drawn at start and each full
// block's tokens, so that no one outside the process can compute a key,
// let alone craft a prompt whose key collides with another prompt's
// (which would serve that prompt's KV). BlockHashes, unkeyed, is only fit
// for routing affinity.
type PrefixKeys struct {
	spec   ModelSpec
	secret [32]byte
}

// NewPrefixKeys draws the secret.
func NewPrefixKeys(spec ModelSpec) *PrefixKeys {
	k := &PrefixKeys{spec: spec}
	if _, err := rand.Read(k.secret[:]); err != nil {
		panic(fmt.Sprintf("executor: crypto/rand: %v", err)) // the platform has no randomness: nothing is safe
	}
	return k
}

// Keys returns the key of each full block of tokens under salt; block j's
// key covers the salt and every token up to its end. The partial last
// block has none. Equal prompts under different salts (tenants) share no
// key, so no block.
func (k *PrefixKeys) Keys(salt string, tokens []uint32) []uint64 {
	full := len(tokens) / k.spec.BlockTokens
	out := make([]uint64, full)
	h := sha256.New()
	var chain [sha256.Size]byte
	h.Write(k.secret[:])
	fmt.Fprintf(h, "%s|%s|%s|%d|%d|%d:%s", k.spec.Engine, k.spec.ModelSHA256, k.spec.Name, k.spec.BytesPerToken(), k.spec.BlockTokens, len(salt), salt)
	h.Sum(chain[:0])
	var b [4]byte
	for j := range full {
		h.Reset()
		h.Write(chain[:])
		for _, t := range tokens[j*k.spec.BlockTokens : (j+1)*k.spec.BlockTokens] {
			binary.LittleEndian.PutUint32(b[:], t)
			h.Write(b[:])
		}
		h.Sum(chain[:0])
		out[j] = binary.LittleEndian.Uint64(chain[:8])
	}
	return out
}
