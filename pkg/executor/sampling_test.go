package executor

import (
	"context"
	"encoding/json"
	"errors"
	"math"
	"reflect"
	"testing"

	"github.com/kvferry/kvferry/pkg/grammar"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

// weatherSchema is a tool call's shape, as the router builds it.
const weatherSchema = `{"type":"object","properties":{"name":{"const":"get_weather"},"arguments":{"type":"object",
	"properties":{"city":{"type":"string"},"days":{"type":"integer"}},"required":["city","days"]}},"required":["name","arguments"]}`

func compiled(t testing.TB, schema string) *grammar.Grammar {
	t.Helper()
	g, err := grammar.Schema([]byte(schema))
	if err != nil {
		t.Fatal(err)
	}
	return g
}

// checkConstrained: a finished constrained output is JSON of the schema's
// shape; logprobs line up with the tokens, each top list sorted, each
// value a log probability.
func checkConstrained(t *testing.T, res Result, s Sampling) {
	t.Helper()
	if s.Grammar != nil && res.Finish == FinishStop {
		var v map[string]any
		if err := json.Unmarshal([]byte(res.Text), &v); err != nil {
			t.Fatalf("finished constrained output %q is not a JSON object: %v", res.Text, err)
		}
	}
	if !s.Logprobs {
		if res.Logprobs != nil {
			t.Fatal("logprobs without asking")
		}
		return
	}
	if len(res.Logprobs) != len(res.Tokens) {
		t.Fatalf("%d logprobs for %d tokens", len(res.Logprobs), len(res.Tokens))
	}
	for i, lp := range res.Logprobs {
		if lp.Token != res.Tokens[i] || lp.Logprob > 0 || len(lp.Top) != s.TopLogprobs && len(lp.Top) == 0 && s.TopLogprobs > 0 {
			t.Fatalf("logprob %d: %+v for token %d", i, lp, res.Tokens[i])
		}
		for j := 1; j < len(lp.Top); j++ {
			if lp.Top[j].Logprob > lp.Top[j-1].Logprob {
				t.Fatalf("logprob %d: top not sorted: %+v", i, lp.Top)
			}
		}
	}
}

// samplingCases are the OpenAI shapes beyond free text.
func samplingCases(t *testing.T) []Sampling {
	return []Sampling{
		{MaxTokens: 24, Logprobs: true},
		{MaxTokens: 24, Temperature: 0.8, TopP: 0.95, Seed: 5, Logprobs: true, TopLogprobs: 3},
		{MaxTokens: 96, Grammar: compiled(t, grammar.JSONObject)},
		{MaxTokens: 96, Temperature: 0.9, Seed: 3, Grammar: compiled(t, weatherSchema), Logprobs: true, TopLogprobs: 2},
	}
}

// The first token is sampled on the context server, the rest on the
// generation server: constrained output and logprobs must equal one
// process's, grammar state and logprobs included.
func TestSyntheticShapesAcrossHandoff(t *testing.T) {
	spec, _ := Preset("tiny")
	ctxE, genE := NewSynthetic(spec, Timing{}), NewSynthetic(spec, Timing{})
	finished := 0
	for _, prompt := range []string{"the quiet river", "call the weather tool for the harbour city " + longPrompt(40)} {
		for _, s := range samplingCases(t) {
			toks := Tokenize(prompt)
			got := disaggregate(t, ctxE, genE, toks, s, blocksFor(spec, len(toks)), 0)
			ref := Reference(spec, prompt, s)
			if got.Text != ref.Text || got.Finish != ref.Finish || !reflect.DeepEqual(got.Logprobs, ref.Logprobs) {
				t.Fatalf("%q: disaggregated %q %v %v\nreference %q %v %v", prompt, got.Text, got.Finish, got.Logprobs, ref.Text, ref.Finish, ref.Logprobs)
			}
			checkConstrained(t, got, s)
			if s.Grammar != nil && got.Finish == FinishStop {
				finished++
			}
		}
	}
	if finished == 0 {
		t.Fatal("no constrained output finished within max_tokens: the synthetic model never closes its JSON")
	}
}

func TestLlamaShapesAcrossHandoff(t *testing.T) {
	ctxE, genE := testEngines(t)
	for _, s := range samplingCases(t) {
		for _, p := range testPrompts[:3] {
			toks := ctxE.Vocabulary().Encode(p)
			ref, err := genE.Generate(context.Background(), toks, s)
			if err != nil {
				t.Fatal(err)
			}
			got := disaggregate(t, ctxE, genE, toks, s, newBlocks(ctxE.Model(), len(toks)), 0)
			if got.Text != ref.Text || got.Finish != ref.Finish || !reflect.DeepEqual(got.Logprobs, ref.Logprobs) {
				t.Fatalf("%q: disaggregated %q %v\nreference %q %v", p, got.Text, got.Finish, ref.Text, ref.Finish)
			}
			checkConstrained(t, got, s)
			if s.Grammar != nil {
				m := grammar.NewMatcher(s.Grammar)
				if !m.Accept(got.Text) {
					t.Fatalf("%q: output %q leaves the grammar", p, got.Text)
				}
			}
		}
	}
}

// A first token the grammar refuses (a peer that sampled without it) is
// refused by StartDecode on both engines.
func TestFirstTokenOutsideGrammar(t *testing.T) {
	spec, _ := Preset("tiny")
	e := NewSynthetic(spec, Timing{})
	s := Sampling{MaxTokens: 8, Grammar: compiled(t, grammar.JSONObject)}
	toks := Tokenize("the river")
	blocks := blocksFor(spec, len(toks))
	if _, _, err := e.Prefill(context.Background(), toks, Sampling{MaxTokens: 8}, blocks, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := e.StartDecode(context.Background(), blocks, Checksums(blocks), len(toks), wordIDs["the"], s); !errors.Is(err, ErrGrammar) {
		t.Fatalf("StartDecode with a word for a JSON object: %v, want ErrGrammar", err)
	}
}

func TestToSampling(t *testing.T) {
	if _, err := ToSampling(&kvferryv1.SamplingParams{JsonSchema: `{"type":"string","pattern":"x"}`}); err == nil {
		t.Fatal("an unsupported schema compiled")
	}
	if _, err := ToSampling(&kvferryv1.SamplingParams{TopLogprobs: MaxTopLogprobs + 1}); err == nil {
		t.Fatal("top_logprobs over the bound accepted")
	}
	s, err := ToSampling(&kvferryv1.SamplingParams{JsonSchema: grammar.JSONObject, Logprobs: true, TopLogprobs: 2})
	if err != nil || s.Grammar == nil || !s.Logprobs || s.TopLogprobs != 2 {
		t.Fatalf("ToSampling: %+v %v", s, err)
	}
}

func TestLogprobOf(t *testing.T) {
	logits := []float32{1, 3, 2, float32(math.Inf(-1))}
	lp := logprobOf(logits, 2, 3)
	if lp.Token != 2 || len(lp.Top) != 3 || lp.Top[0].Token != 1 || lp.Top[1].Token != 2 || lp.Top[2].Token != 0 {
		t.Fatalf("logprobOf: %+v", lp)
	}
	if lp.Top[1].Logprob != lp.Logprob || lp.Logprob >= 0 {
		t.Fatalf("chosen %g, in top %g", lp.Logprob, lp.Top[1].Logprob)
	}
}

// BenchmarkLlamaShapes: what a grammar and logprobs cost a decode on the
// test model (512 tokens of vocabulary), against the plain path in the
// same run: ns per generated token.
func BenchmarkLlamaShapes(b *testing.B) {
	e, _ := testEngines(b)
	toks := e.Vocabulary().Encode("Once upon a time")
	for _, bc := range []struct {
		name string
		s    Sampling
	}{
		{"plain", Sampling{MaxTokens: 48, IgnoreEOS: true}},
		{"logprobs-top5", Sampling{MaxTokens: 48, IgnoreEOS: true, Logprobs: true, TopLogprobs: 5}},
		{"json_object", Sampling{MaxTokens: 48, Grammar: compiled(b, grammar.JSONObject)}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			n := 0
			for b.Loop() {
				res, err := e.Generate(context.Background(), toks, bc.s)
				if err != nil {
					b.Fatal(err)
				}
				n += len(res.Tokens)
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(n), "ns/token")
		})
	}
}

// choicesAcrossHandoff prefills once with N choices, decodes every choice
// from the same blocks on genE, and returns each choice's result.
func choicesAcrossHandoff(t *testing.T, ctxE, genE Engine, toks []uint32, s Sampling) []Result {
	t.Helper()
	blocks := make([][]byte, ctxE.Model().BlocksFor(len(toks)))
	for i := range blocks {
		blocks[i] = make([]byte, ctxE.Model().BlockBytes())
	}
	out, err := PrefillAlone(context.Background(), ctxE, toks, s, blocks, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(out.Others) != s.N-1 {
		t.Fatalf("%d other first tokens for n = %d", len(out.Others), s.N)
	}
	firsts := append([]uint32{out.First}, out.Others...)
	lps := append([]*Logprob{out.Logprob}, out.OtherLogprobs...)
	var res []Result
	for i, first := range firsts {
		sq, err := genE.StartDecode(context.Background(), blocks, out.Sums, len(toks), first, s.Choice(i))
		if err != nil {
			t.Fatal(err)
		}
		for sq.Finish() == FinishNone {
			if err := genE.Step(context.Background(), []*Sequence{sq}); err != nil {
				t.Fatal(err)
			}
		}
		r := Result{Tokens: sq.Tokens(), Text: Text(genE.Vocabulary(), sq.Tokens()), Finish: sq.Finish()}
		if lps[i] != nil {
			r.Logprobs = append([]Logprob{*lps[i]}, sq.Logprobs()...)
		}
		sq.Close()
		res = append(res, r)
	}
	return res
}

// n choices from one prefill and one set of blocks: choice i equals a
// request of one choice with Choice(i)'s sampling, in one process.
func TestChoicesShareOnePrefill(t *testing.T) {
	spec, _ := Preset("tiny")
	syn := NewSynthetic(spec, Timing{})
	s := Sampling{MaxTokens: 20, Seed: 9, N: 3, Logprobs: true, TopLogprobs: 2}
	got := choicesAcrossHandoff(t, syn, syn, Tokenize("the quiet river"), s)
	texts := map[string]bool{}
	for i, r := range got {
		ref := Reference(spec, "the quiet river", s.Choice(i))
		if r.Text != ref.Text || !reflect.DeepEqual(r.Logprobs, ref.Logprobs) {
			t.Fatalf("choice %d: %q, reference %q", i, r.Text, ref.Text)
		}
		texts[r.Text] = true
	}
	if len(texts) < 2 {
		t.Fatalf("three choices with their own seeds gave one text: %v", texts)
	}
	if s.Choice(0).Seed != s.Seed || s.Choice(1).Seed == s.Seed || s.Choice(2).N != 1 {
		t.Fatal("choice 0 must keep the request's seed, the others their own, each one choice")
	}
}

func TestLlamaChoicesShareOnePrefill(t *testing.T) {
	ctxE, genE := testEngines(t)
	s := Sampling{MaxTokens: 16, Temperature: 0.9, Seed: 4, N: 3, Grammar: compiled(t, weatherSchema)}
	toks := ctxE.Vocabulary().Encode("Once upon a time")
	for i, r := range choicesAcrossHandoff(t, ctxE, genE, toks, s) {
		ref, err := genE.Generate(context.Background(), toks, s.Choice(i))
		if err != nil {
			t.Fatal(err)
		}
		if r.Text != ref.Text || r.Finish != ref.Finish {
			t.Fatalf("choice %d: %q, alone %q", i, r.Text, ref.Text)
		}
	}
}
