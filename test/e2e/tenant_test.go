package e2e

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"google.golang.org/grpc/metadata"

	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
	"github.com/kvferry/kvferry/test/stack"
)

// TestTenantsAreApart: keys k1 and k2 belong to tenant acme, k3 is its
// own. The prefix cache is shared within a tenant and not across: acme's
// second request reuses the first's blocks (the cache does not grow), k3's
// identical prompt computes its own (it grows by as many) — no timing
// oracle on another tenant's prompts. And another tenant cannot cancel a
// request by its X-Request-Id: k3's Cancel finds nothing and the stream
// goes on; acme's own key cancels it.
func TestTenantsAreApart(t *testing.T) {
	keys := filepath.Join(t.TempDir(), "keys")
	if err := os.WriteFile(keys, []byte("k1 acme\nk2 acme\nk3\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s := stack.Up(t, binDir, stack.Options{DecodeStepTime: 10 * time.Millisecond, ExtraRouterArgs: []string{"--api-keys-file=" + keys}})
	as := func(key string) openai.Client {
		return openai.NewClient(option.WithBaseURL(s.OpenAIURL+"/"), option.WithAPIKey(key), option.WithMaxRetries(0))
	}
	cached := func() float64 { return stack.Metric(t, s.CtxHTTP, "kvferry_blockpool_cached_blocks") }
	prompt := longPrompt(64) // 4 full blocks of the tiny preset
	complete := func(key string) {
		c := as(key)
		if _, err := c.Completions.New(testCtx(t), openai.CompletionNewParams{Model: "tiny",
			Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String(prompt)}, MaxTokens: openai.Int(2)}); err != nil {
			t.Fatalf("as %s: %v", key, err)
		}
	}
	complete("k1")
	first := cached()
	if first < 4 {
		t.Fatalf("%v blocks cached after the first prompt, want at least 4", first)
	}
	complete("k2")
	if got := cached(); got != first {
		t.Fatalf("same tenant: cache %v → %v, want reuse", first, got)
	}
	complete("k3")
	if got := cached(); got != 2*first {
		t.Fatalf("another tenant: cache %v → %v, want its own %v blocks", first, got, first)
	}

	ctx, cancel := context.WithCancel(testCtx(t))
	defer cancel()
	c1 := as("k1")
	st := c1.Completions.NewStreaming(ctx, openai.CompletionNewParams{Model: "tiny",
		Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String("the river")}, MaxTokens: openai.Int(1000)},
		option.WithHeader("X-Request-Id", "victim-1"), option.WithJSONSet("ignore_eos", true))
	defer func() { _ = st.Close() }()
	if !st.Next() {
		t.Fatalf("stream: %v", st.Err())
	}
	rc := kvferryv1.NewRouterServiceClient(grpcConn(t, s.RouterGRPC))
	cancelAs := func(key string) bool {
		resp, err := rc.Cancel(metadata.AppendToOutgoingContext(testCtx(t), "authorization", "Bearer "+key), &kvferryv1.RouterServiceCancelRequest{RequestId: "victim-1"})
		if err != nil {
			t.Fatalf("Cancel as %s: %v", key, err)
		}
		return resp.GetFound()
	}
	if cancelAs("k3") {
		t.Fatal("another tenant's key found (and cancelled) the request")
	}
	if !st.Next() {
		t.Fatalf("the stream ended after another tenant's cancel: %v", st.Err())
	}
	if !cancelAs("k2") {
		t.Fatal("the tenant's own key did not find its request")
	}
	n := 0
	for st.Next() {
		n++
	}
	if n >= 998 {
		t.Fatalf("the stream ran to its end (%d more chunks) after its tenant cancelled it", n)
	}
	checkIdle(t, s)
}
