package bench

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"

	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/pkg/sched"
	"github.com/kvferry/kvferry/test/stack"
)

// engineOutput is the tokens each measured request decodes.
const engineOutput = 128

// enginePrompt is a story prompt of about n tokens of the test model.
func enginePrompt(v executor.Vocabulary, n int) string {
	sentence := "Once upon a time there was a little dog who liked to run in the park with his friend. "
	return strings.Repeat(sentence, n/len(v.Encode(sentence)))
}

// benchModel is the model BenchmarkLlamaEngine serves: KVFERRY_BENCH_MODEL
// (a GGUF cmd/kvgguf generated, whose KV is real in size) or the test model.
func benchModel(b *testing.B) (path, name string, generated bool) {
	if p := os.Getenv("KVFERRY_BENCH_MODEL"); p != "" {
		return p, strings.TrimSuffix(filepath.Base(p), ".gguf"), true
	}
	return stack.TestModelPath(b), stack.TestModelName, false
}

// BenchmarkLlamaEngine: the test model through the whole stack (router,
// context server, KV transfer, generation server, OpenAI streaming) beside
// the same model driven in this process through yzma — the limit — in the
// same run. Each iteration is one request of a ~500-token prompt and 128
// greedy output tokens. Reports prefill tokens/s, TTFT and decode tokens/s.
func BenchmarkLlamaEngine(b *testing.B) {
	// One thread, as each server of the stack has (stack.Options.Llama):
	// prefill runs on the context server's, decode on the generation
	// server's.
	model, name, generated := benchModel(b)
	cfg := executor.LlamaConfig{ModelPath: model, LibDir: stack.LlamaLibDir(b), Slots: 2, Threads: 1, GPULayers: -1}
	e, err := executor.NewLlama(cfg)
	if err != nil {
		b.Fatal(err)
	}
	defer e.Close()
	// Every request starts with its own number, so no prompt shares a first
	// block with another: the context server's prefix-reuse cache never
	// hits and every request prefills all its tokens, as in-process.
	base := enginePrompt(e.Vocabulary(), 500)
	prompts := make([]string, 0, 256)
	var promptTokens []int
	for i := range cap(prompts) {
		prompts = append(prompts, fmt.Sprintf("%d. %s", i, base))
		promptTokens = append(promptTokens, len(e.Vocabulary().Encode(prompts[i])))
	}
	s := executor.Sampling{MaxTokens: engineOutput}

	b.Run("inprocess", func(b *testing.B) {
		var prefill, decode time.Duration
		var decoded, prompted, i int
		for b.Loop() {
			toks := e.Vocabulary().Encode(prompts[i%len(prompts)])
			i++
			prompted += len(toks)
			res, err := e.Generate(context.Background(), toks, s)
			if err != nil {
				b.Fatal(err)
			}
			prefill += res.FirstToken
			decode += res.Total - res.FirstToken
			decoded += len(res.Tokens) - 1
		}
		report(b, prompted, prefill, prefill, decode, decoded)
	})

	b.Run("stack", func(b *testing.B) {
		st := stack.Up(b, binDir, stack.Options{Llama: true, ModelPath: model})
		defer st.StopAll(b)
		c := openai.NewClient(option.WithBaseURL(st.OpenAIURL+"/"), option.WithAPIKey("unused"), option.WithMaxRetries(0))
		var ttft, decode time.Duration
		var decoded, prompted, i int
		for b.Loop() {
			text := prompts[i%len(prompts)]
			prompted += promptTokens[i%len(prompts)]
			i++
			start := time.Now()
			stream := c.Completions.NewStreaming(context.Background(), openai.CompletionNewParams{
				Model: openai.CompletionNewParamsModel(name), Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String(text)},
				MaxTokens: openai.Int(engineOutput), Temperature: openai.Float(0),
			}, option.WithJSONSet("ignore_eos", generated))
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
		report(b, prompted, ttft, ttft, decode, decoded)
	})
}

// report turns totals over b.N requests into per-request figures; the
// stack's prefill rate is prompt tokens over TTFT (prefill, transfer and
// the first hop back included).
func report(b *testing.B, promptTokens int, prefill, ttft, decode time.Duration, decoded int) {
	n := float64(b.N)
	b.ReportMetric(float64(promptTokens)/prefill.Seconds(), "prefill-tok/s")
	b.ReportMetric(ttft.Seconds()*1000/n, "ttft-ms")
	b.ReportMetric(float64(decoded)/decode.Seconds(), "decode-tok/s")
	b.ReportMetric(0, "ns/op")
}

// BenchmarkLlamaConcurrency: aggregate output tokens/s through the whole
// stack with conc clients at once (64-token prompts, 64 greedy output
// tokens each), beside the same model batched in this process through the
// same decode loop (sched.Decoder), same run. Each iteration is conc
// requests.
func BenchmarkLlamaConcurrency(b *testing.B) {
	// One process with the machine's CPUs (two here) against two servers
	// of one thread each; flash attention off on both (llama.cpp's CPU kernel is slow for
	// this model's 8-wide heads).
	cfg := executor.LlamaConfig{ModelPath: stack.TestModelPath(b), LibDir: stack.LlamaLibDir(b), Slots: 64, FlashAttention: "off", GPULayers: -1}
	e, err := executor.NewLlama(cfg)
	if err != nil {
		b.Fatal(err)
	}
	defer e.Close()
	const out = 64
	base := enginePrompt(e.Vocabulary(), 60)
	serverArgs := []string{"--llama-slots=64", "--llama-flash-attn=off"} // one thread each (stack.Options.Llama)
	st := stack.Up(b, binDir, stack.Options{Llama: true, GenArgs: serverArgs, CtxArgs: serverArgs})
	defer st.StopAll(b)
	c := openai.NewClient(option.WithBaseURL(st.OpenAIURL+"/"), option.WithAPIKey("unused"), option.WithMaxRetries(0))
	n := 0
	for _, conc := range []int{1, 8, 32} {
		b.Run(fmt.Sprintf("inprocess/conc=%d", conc), func(b *testing.B) {
			var toks int64
			var mu sync.Mutex
			for b.Loop() {
				// The prompts are prefilled together (sched.Prefiller)
				// and decoded together (sched.Decoder), as the servers do.
				f := sched.NewPrefiller(e, 0, 0, nil)
				d := sched.NewDecoder(e, 0, nil)
				var wg sync.WaitGroup
				for i := range conc {
					p := e.Vocabulary().Encode(fmt.Sprintf("%d. %s", n+i, base))
					wg.Go(func() {
						got, err := generateInProcess(f, d, e, p, executor.Sampling{MaxTokens: out})
						if err != nil {
							b.Error(err)
							return
						}
						mu.Lock()
						toks += int64(got)
						mu.Unlock()
					})
				}
				wg.Wait()
				n += conc
			}
			b.ReportMetric(float64(toks)/b.Elapsed().Seconds(), "out-tok/s")
			b.ReportMetric(0, "ns/op")
		})
		b.Run(fmt.Sprintf("stack/conc=%d", conc), func(b *testing.B) {
			var toks int64
			var mu sync.Mutex
			for b.Loop() {
				var wg sync.WaitGroup
				for i := range conc {
					prompt := fmt.Sprintf("%d. %s", n+i, base)
					wg.Go(func() {
						resp, err := c.Completions.New(context.Background(), openai.CompletionNewParams{
							Model: stack.TestModelName, Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String(prompt)},
							MaxTokens: openai.Int(out), Temperature: openai.Float(0),
						})
						if err != nil {
							b.Error(err)
							return
						}
						mu.Lock()
						toks += resp.Usage.CompletionTokens
						mu.Unlock()
					})
				}
				wg.Wait()
				n += conc
			}
			b.ReportMetric(float64(toks)/b.Elapsed().Seconds(), "out-tok/s")
			b.ReportMetric(0, "ns/op")
		})
	}
}

// generateInProcess prefills p through f, decodes it through d and returns
// the tokens generated.
func generateInProcess(f *sched.Prefiller, d *sched.Decoder, e executor.Engine, p []uint32, s executor.Sampling) (int, error) {
	blocks := make([][]byte, e.Model().BlocksFor(len(p)))
	for j := range blocks {
		blocks[j] = make([]byte, e.Model().BlockBytes())
	}
	first, sums, err := f.Prefill(context.Background(), p, s, blocks, 0)
	if err != nil {
		return 0, err
	}
	sq, err := e.StartDecode(context.Background(), blocks, sums, len(p), first, s)
	if err != nil {
		return 0, err
	}
	m := d.Join(sq)
	defer d.Leave(m)
	toks := 0
	for {
		<-m.Ready()
		got, err := d.Take(m)
		if err != nil {
			return toks, err
		}
		toks += len(got.Tokens)
		if got.Finish != executor.FinishNone {
			return toks, nil
		}
	}
}
