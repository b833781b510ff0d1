package e2e

import (
	"testing"
	"time"

	"github.com/openai/openai-go/v3"

	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/pkg/router"
	"github.com/kvferry/kvferry/test/stack"
)

// TestAggregated: a router and a generation server, both --aggregated, no
// context server. The generation server prefills and decodes; the answers
// equal the same Reference the disaggregated stack is held to, and a
// client that goes away mid-decode leaves no block held.
func TestAggregated(t *testing.T) {
	s := stack.Up(t, binDir, stack.Options{Aggregated: true, DecodeStepTime: 5 * time.Millisecond})
	c := client(s)
	ctx := testCtx(t)
	seed := int64(42)
	genIdle := func(t *testing.T) {
		t.Helper()
		stack.Eventually(t, "generation server idle", func() bool {
			p, err := stack.ScrapePool(s.GenHTTP)
			return err == nil && p.Idle() && p.Free == p.Capacity
		})
	}
	for name, prompt := range map[string]string{"short": "the quiet river", "multi-block": longPrompt(300)} {
		t.Run("completion/"+name, func(t *testing.T) {
			want := executor.Reference(tiny, prompt, router.SamplingFor(24, nil, nil, &seed))
			resp, err := c.Completions.New(ctx, openai.CompletionNewParams{
				Model: "tiny", Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String(prompt)},
				MaxTokens: openai.Int(24), Seed: openai.Int(seed),
			})
			if err != nil {
				t.Fatal(err)
			}
			if got := resp.Choices[0].Text; got != want.Text {
				t.Fatalf("text %q, reference %q", got, want.Text)
			}
			if resp.Usage.PromptTokens != int64(want.PromptTokens) || resp.Usage.CompletionTokens != int64(len(want.Tokens)) {
				t.Fatalf("usage %+v, want prompt %d completion %d", resp.Usage, want.PromptTokens, len(want.Tokens))
			}
		})
	}
	t.Run("abort mid-decode", func(t *testing.T) {
		abortMidDecode(t, s, c)
		genIdle(t)
	})
	// The prefills ran on the generation server's own prefill loop.
	if n := stack.Metric(t, s.GenHTTP, `kvferry_scheduler_prefill_batch_prompts_count`); n < 3 {
		t.Fatalf("the generation server recorded %v prefill steps, want at least 3", n)
	}
	genIdle(t)
	s.StopAll(t)
}
