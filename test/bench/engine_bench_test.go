package bench

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"

	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/test/stack"
)

// engineOutput is the tokens each measured request decodes.
const engineOutput = 128

// enginePrompt is a story prompt of about n tokens of the test model.
func enginePrompt(v executor.Vocabulary, n int) (string, []uint32) {
	sentence := "Once upon a time there was a little dog who liked to run in the park with his friend. "
	text := strings.Repeat(sentence, n/len(v.Encode(sentence))+1)
	toks := v.Encode(text)
	for len(toks) > n {
		text = text[:len(text)-1]
		toks = v.Encode(text)
	}
	return text, toks
}

// BenchmarkLlamaEngine: the test model through the whole stack (router,
// context server, KV transfer, generation server, OpenAI streaming) beside
// the same model driven in this process through yzma — the limit — in the
// same run. Each iteration is one request of a ~512-token prompt and 128
// greedy output tokens. Reports prefill tokens/s, TTFT and decode tokens/s.
func BenchmarkLlamaEngine(b *testing.B) {
	cfg := executor.LlamaConfig{ModelPath: stack.TestModelPath(b), LibDir: stack.LlamaLibDir(b), Slots: 2}
	e, err := executor.NewLlama(cfg)
	if err != nil {
		b.Fatal(err)
	}
	defer e.Close()
	text, toks := enginePrompt(e.Vocabulary(), 512)
	s := executor.Sampling{MaxTokens: engineOutput}

	b.Run("inprocess", func(b *testing.B) {
		var prefill, decode time.Duration
		var decoded int
		for b.Loop() {
			res, err := e.Generate(context.Background(), toks, s)
			if err != nil {
				b.Fatal(err)
			}
			prefill += res.FirstToken
			decode += res.Total - res.FirstToken
			decoded += len(res.Tokens) - 1
		}
		report(b, len(toks), prefill, prefill, decode, decoded)
	})

	b.Run("stack", func(b *testing.B) {
		st := stack.Up(b, binDir, stack.Options{Llama: true})
		defer st.StopAll(b)
		c := openai.NewClient(option.WithBaseURL(st.OpenAIURL+"/"), option.WithAPIKey("unused"), option.WithMaxRetries(0))
		var ttft, decode time.Duration
		var decoded int
		for b.Loop() {
			start := time.Now()
			stream := c.Completions.NewStreaming(context.Background(), openai.CompletionNewParams{
				Model: stack.TestModelName, Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String(text)},
				MaxTokens: openai.Int(engineOutput), Temperature: openai.Float(0),
			})
			var first time.Time
			chunks := 0
			for stream.Next() {
				if first.IsZero() {
					first = time.Now()
				}
				chunks++
			}
			if err := stream.Err(); err != nil {
				b.Fatal(err)
			}
			ttft += first.Sub(start)
			decode += time.Since(first)
			decoded += chunks - 1
		}
		report(b, len(toks), ttft, ttft, decode, decoded)
	})
}

// report turns totals over b.N requests into per-request figures.
func report(b *testing.B, promptTokens int, prefill, ttft, decode time.Duration, decoded int) {
	n := float64(b.N)
	b.ReportMetric(float64(promptTokens)*n/prefill.Seconds(), "prefill-tok/s")
	b.ReportMetric(ttft.Seconds()*1000/n, "ttft-ms")
	b.ReportMetric(float64(decoded)/decode.Seconds(), "decode-tok/s")
	b.ReportMetric(0, "ns/op")
}
