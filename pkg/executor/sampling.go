package executor

import (
	"fmt"
	"math"
	"slices"

	"github.com/kvferry/kvferry/pkg/grammar"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

// MaxTopLogprobs is OpenAI's bound on top_logprobs.
const MaxTopLogprobs = 20

// MaxChoices bounds n: each choice holds an engine sequence on the
// generation server for its whole decode (DefaultLlamaSlots of them).
const MaxChoices = 8

// Logprob is a generated token's log probability and the most likely
// tokens at its position (Top, most likely first).
type Logprob struct {
	Token   uint32
	Logprob float32
	Top     []TopLogprob
}

// TopLogprob is one alternative of a position.
type TopLogprob struct {
	Token   uint32
	Logprob float32
}

// Proto is the wire form; nil for nil.
func (lp *Logprob) Proto() *kvferryv1.TokenLogprob {
	if lp == nil {
		return nil
	}
	out := &kvferryv1.TokenLogprob{Token: lp.Token, Logprob: lp.Logprob}
	for _, t := range lp.Top {
		out.Top = append(out.Top, &kvferryv1.TopLogprob{Token: t.Token, Logprob: t.Logprob})
	}
	return out
}

// LogprobOf converts the wire form; nil for nil.
func LogprobOf(p *kvferryv1.TokenLogprob) *Logprob {
	if p == nil {
		return nil
	}
	lp := &Logprob{Token: p.GetToken(), Logprob: p.GetLogprob()}
	for _, t := range p.GetTop() {
		lp.Top = append(lp.Top, TopLogprob{Token: t.GetToken(), Logprob: t.GetLogprob()})
	}
	return lp
}

// ToSampling converts wire sampling parameters, compiling the JSON Schema
// that constrains the output, if any; a schema it cannot compile, or
// top_logprobs out of range, is an error for the caller (InvalidArgument).
func ToSampling(p *kvferryv1.SamplingParams) (Sampling, error) {
	s := Sampling{
		MaxTokens: int(p.GetMaxTokens()), Temperature: p.GetTemperature(), TopP: p.GetTopP(), Seed: p.GetSeed(), IgnoreEOS: p.GetIgnoreEos(),
		Logprobs: p.GetLogprobs(), TopLogprobs: int(p.GetTopLogprobs()), N: max(int(p.GetN()), 1),
	}
	if s.TopLogprobs > MaxTopLogprobs {
		return Sampling{}, fmt.Errorf("top_logprobs %d is over %d", s.TopLogprobs, MaxTopLogprobs)
	}
	if s.N > MaxChoices {
		return Sampling{}, fmt.Errorf("n %d is over %d", s.N, MaxChoices)
	}
	if schema := p.GetJsonSchema(); schema != "" {
		g, err := grammar.Schema([]byte(schema))
		if err != nil {
			return Sampling{}, fmt.Errorf("json schema: %w", err)
		}
		s.Grammar = g
	}
	return s, nil
}

// matcherFor starts the grammar of s, or returns nil when s has none.
func matcherFor(s Sampling) *grammar.Matcher {
	if s.Grammar == nil {
		return nil
	}
	return grammar.NewMatcher(s.Grammar)
}

// ErrGrammar is returned when a token the grammar refuses reaches a
// sequence (a first token from a peer that sampled without the grammar).
var ErrGrammar = fmt.Errorf("executor: the token is not allowed by the output's grammar")

// acceptPiece advances m (if any) over a token's piece; end tokens are
// allowed only where the text may end.
func acceptPiece(m *grammar.Matcher, v Vocabulary, tok uint32, first bool) error {
	if m == nil {
		return nil
	}
	if v.IsEnd(tok) {
		if !m.CanEnd() {
			return ErrGrammar
		}
		return nil
	}
	if !m.Accept(v.Piece(tok, first)) {
		return fmt.Errorf("%w (token %d)", ErrGrammar, tok)
	}
	return nil
}

// allowed reports, per token id, whether the grammar allows it next: an
// end-of-generation token where the text may end, any other token whose
// whole piece the matcher accepts. Pieces that add no text are never
// allowed (they could repeat for ever).
func allowed(m *grammar.Matcher, v Vocabulary, first bool, keep func(tok uint32) bool) []uint32 {
	var out []uint32
	canEnd := m.CanEnd()
	for tok := range uint32(v.Size()) {
		if keep != nil && !keep(tok) {
			continue
		}
		if v.IsEnd(tok) {
			if canEnd {
				out = append(out, tok)
			}
			continue
		}
		if !m.MustEnd() && m.Allows(v.Piece(tok, first)) {
			out = append(out, tok)
		}
	}
	return out
}

// maskLogits sets every token the grammar refuses to -Inf, in place, and
// reports whether any token is left.
func maskLogits(logits []float32, m *grammar.Matcher, v Vocabulary, first bool) bool {
	ok := allowed(m, v, first, nil)
	next := 0
	for tok := range logits {
		if next < len(ok) && ok[next] == uint32(tok) {
			next++
			continue
		}
		logits[tok] = float32(math.Inf(-1))
	}
	return len(ok) > 0
}

// logprobOf is the log-softmax of logits at tok, with the top most likely
// tokens (ties to the lower id).
func logprobOf(logits []float32, tok uint32, top int) *Logprob {
	maxL := float32(math.Inf(-1))
	for _, l := range logits {
		maxL = max(maxL, l)
	}
	var sum float64
	for _, l := range logits {
		if !math.IsInf(float64(l), -1) {
			sum += math.Exp(float64(l - maxL))
		}
	}
	lse := float64(maxL) + math.Log(sum)
	lp := &Logprob{Token: tok, Logprob: float32(float64(logits[tok]) - lse)}
	if top <= 0 {
		return lp
	}
	best := make([]uint32, 0, top+1)
	for id := range uint32(len(logits)) {
		if math.IsInf(float64(logits[id]), -1) {
			continue
		}
		at, _ := slices.BinarySearchFunc(best, id, func(a, b uint32) int {
			switch {
			case logits[a] > logits[b]:
				return -1
			case logits[a] < logits[b]:
				return 1
			}
			return int(a) - int(b)
		})
		if at >= top {
			continue
		}
		best = slices.Insert(best, at, id)
		if len(best) > top {
			best = best[:top]
		}
	}
	for _, id := range best {
		lp.Top = append(lp.Top, TopLogprob{Token: id, Logprob: float32(float64(logits[id]) - lse)})
	}
	return lp
}

// Synthetic sampling under a grammar or with logprobs. The plain path
// (neither) is the one these engines always had.

// syntheticEmits: the synthetic model emits printable ASCII bytes and
// words, never a control byte or one above ASCII (its text stays valid
// UTF-8 and on one line whatever the grammar allows).
func syntheticEmits(tok uint32) bool { return tok >= 0x20 && tok < 0x7f || tok >= 256 }

// closers are the pieces the synthetic model prefers one step in three
// under a grammar, so strings, arrays and objects end within tens of
// tokens instead of wandering to max_tokens.
var closers = []uint32{'"', '}', ']'}

// pickConstrained picks a token the matcher allows from hash h; end is
// set when the sequence ends here (the grammar is complete, or it allows
// nothing the model has). ok is what was allowed.
func pickConstrained(h uint64, m *grammar.Matcher, first bool) (tok uint32, end bool, ok []uint32) {
	if m.MustEnd() {
		return 0, true, nil
	}
	ok = allowed(m, SyntheticVocabulary, first, syntheticEmits)
	if len(ok) == 0 || m.CanEnd() && h%4 == 0 {
		return 0, true, ok
	}
	if (h>>2)%3 == 0 {
		var close []uint32
		for _, c := range closers {
			if _, found := slices.BinarySearch(ok, c); found {
				close = append(close, c)
			}
		}
		if len(close) > 0 {
			return close[(h>>8)%uint64(len(close))], false, ok
		}
	}
	tok = ok[(h>>8)%uint64(len(ok))]
	return tok, tok == TokenEOS, ok
}

// syntheticLogprob is the synthetic model's distribution at a position,
// a function of its hash: the chosen token the most likely, then top-1
// others from candidates (or the vocabulary's words), each 0.75 nats less.
func syntheticLogprob(h uint64, tok uint32, top int, candidates []uint32) *Logprob {
	lp := &Logprob{Token: tok, Logprob: -float32((h>>40)%1000+1) / 1000}
	if top <= 0 {
		return lp
	}
	lp.Top = append(lp.Top, TopLogprob{Token: tok, Logprob: lp.Logprob})
	seen := map[uint32]bool{tok: true}
	for j := uint64(1); len(lp.Top) < top && j <= uint64(4*top); j++ {
		var alt uint32
		if len(candidates) > 0 {
			alt = candidates[mix(h^j)%uint64(len(candidates))]
		} else {
			alt = wordToken(mix(h ^ j))
		}
		if seen[alt] {
			continue
		}
		seen[alt] = true
		lp.Top = append(lp.Top, TopLogprob{Token: alt, Logprob: lp.Logprob - 0.75*float32(len(lp.Top))})
	}
	return lp
}
