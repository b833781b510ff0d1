//go:build ucx

package e2e

import (
	"testing"

	"github.com/openai/openai-go/v3"

	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/pkg/router"
	"github.com/kvferry/kvferry/test/stack"
)

// TestUCXTransport runs the stack with --transport=ucx on both servers, over
// UCX's shared-memory transports and over its tcp: texts equal the
// Reference and both pools return to idle.
func TestUCXTransport(t *testing.T) {
	for _, tls := range []string{"posix,cma", "tcp"} {
		t.Run(tls, func(t *testing.T) {
			t.Setenv("UCX_TLS", tls) // the servers inherit it
			t.Setenv("UCX_NET_DEVICES", "lo")
			ucx := []string{"--transport=ucx"}
			s := stack.Up(t, binDir, stack.Options{CtxArgs: ucx, GenArgs: ucx})
			c := client(s)
			seed := int64(11)
			for _, prompt := range []string{"the quiet river", longPrompt(1200)} {
				want := executor.Reference(tiny, prompt, router.SamplingFor(16, nil, nil, &seed))
				resp, err := c.Completions.New(testCtx(t), openai.CompletionNewParams{
					Model: "tiny", Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String(prompt)},
					MaxTokens: openai.Int(16), Seed: openai.Int(seed),
				})
				if err != nil {
					t.Fatal(err)
				}
				if got := resp.Choices[0].Text; got != want.Text {
					t.Fatalf("%d-byte prompt: text %q, reference %q", len(prompt), got, want.Text)
				}
			}
			checkIdle(t, s)
			s.StopAll(t)
		})
	}
}
