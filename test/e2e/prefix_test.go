package e2e

import (
	"fmt"
	"testing"

	"github.com/openai/openai-go/v3"

	"github.com/kvferry/kvferry/pkg/executor"

	"github.com/kvferry/kvferry/test/stack"
)

// TestPrecisePrefixRouting: three context servers; the router polls what
// each one's prefix cache holds (PrefixDigest) and the precise-prefix
// scorer sends every later prompt sharing a cached prefix to the server
// that holds it: a repeated 6-block prompt reuses all 6 blocks each time,
// a prompt that shares only its first 3 blocks reuses those 3, and the
// router's kvferry_prefix_blocks_total shows requested, available, routed
// and reused blocks agreeing.
func TestPrecisePrefixRouting(t *testing.T) {
	s := stack.Up(t, binDir, stack.Options{Ctxs: 3, ExtraRouterArgs: []string{
		"--routing=ready,least-inflight:1,precise-prefix:4,max-score", "--prefix-digest-interval=100ms"}})
	c := client(s)
	complete := func(prompt string) {
		if _, err := c.Completions.New(testCtx(t), openai.CompletionNewParams{Model: "tiny",
			Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String(prompt)}, MaxTokens: openai.Int(2)}); err != nil {
			t.Fatal(err)
		}
	}
	metric := func(kind string) float64 {
		return stack.Metric(t, s.RouterAdmin, fmt.Sprintf(`kvferry_prefix_blocks_total{kind=%q}`, kind))
	}
	prompt := longPrompt(96)
	shared := longPrompt(48) + " stone tree field garden city road bridge tower window door table book letter morning evening night"
	blocks := len(executor.Tokenize(prompt)) / tiny.BlockTokens
	a, b := executor.Tokenize(prompt), executor.Tokenize(shared)
	common := 0
	for common < min(len(a), len(b)) && a[common] == b[common] {
		common++
	}
	sharedBlocks, sharedFull := common/tiny.BlockTokens, len(b)/tiny.BlockTokens
	if blocks < 4 || sharedBlocks < 2 || sharedBlocks >= sharedFull {
		t.Fatalf("prompts of %d blocks sharing %d of %d: not a test", blocks, sharedBlocks, sharedFull)
	}
	complete(prompt)
	stack.Eventually(t, "a digest listing the prompt's blocks", func() bool {
		for _, ctx := range s.CtxGRPCs {
			if n, ok := stack.MetricIf(t, s.RouterAdmin, fmt.Sprintf(`kvferry_router_prefix_digest_blocks{server=%q}`, ctx)); ok && n >= float64(blocks) {
				return true
			}
		}
		return false
	})
	reused0, requested0 := metric("reused"), metric("requested")
	for range 6 {
		complete(prompt)
	}
	if got := metric("reused") - reused0; got != float64(6*blocks) {
		t.Fatalf("6 repeats reused %v blocks, want %d (every block, every time)", got, 6*blocks)
	}
	complete(shared)
	if got := metric("reused") - reused0 - float64(6*blocks); got != float64(sharedBlocks) {
		t.Fatalf("a prompt sharing %d blocks reused %v", sharedBlocks, got)
	}
	if req, avail, routed := metric("requested")-requested0, metric("available"), metric("routed"); req != float64(6*blocks+sharedFull) || avail != routed {
		t.Fatalf("requested %v (want %d), available %v, routed %v (want equal)", req, 6*blocks+sharedFull, avail, routed)
	}
	checkIdle(t, s)
}
