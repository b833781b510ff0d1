package e2e

import (
	"errors"
	"strings"
	"testing"

	"github.com/openai/openai-go/v3"

	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/pkg/router"
	"github.com/kvferry/kvferry/test/stack"
)

// TestShmTransport runs the stack with --transport=shm on both servers:
// the generation server's pool is shared memory the context server copies
// into. Texts equal the Reference (every KV byte crossed intact), and both
// pools return to idle, after aborts too.
func TestShmTransport(t *testing.T) {
	shm := []string{"--transport=shm", "--shm-dir=" + t.TempDir()}
	s := stack.Up(t, binDir, stack.Options{CtxArgs: shm, GenArgs: shm})
	c := client(s)
	for _, prompt := range []string{"the quiet river", longPrompt(300), longPrompt(1200)} {
		expectReference(t, c, prompt, 7)
	}
	if moved := stack.Metric(t, s.GenHTTP, `kvferry_transfer_bytes_total{side="receiver"}`); moved == 0 {
		t.Fatal("no transfer bytes counted on the generation server")
	}
	checkIdle(t, s)
	s.StopAll(t)
}

// TestTransportMismatch: a context server on tcp and a generation server
// on shm never move a byte: the generation server refuses the
// advertisement (it names the writer's transport) before allocating, the
// client gets a fixed error instead of a hang (the router logs both
// transports), and no block is held anywhere.
func TestTransportMismatch(t *testing.T) {
	s := stack.Up(t, binDir, stack.Options{GenArgs: []string{"--transport=shm", "--shm-dir=" + t.TempDir()}})
	c := client(s)
	_, err := c.Completions.New(testCtx(t), openai.CompletionNewParams{
		Model: "tiny", Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String("the quiet river")},
		MaxTokens: openai.Int(4),
	})
	var apiErr *openai.Error
	if !errors.As(err, &apiErr) || !strings.Contains(apiErr.Message, "configured differently") || !strings.Contains(apiErr.Message, "request id") {
		t.Fatalf("err %v, want an OpenAI error with the fixed sentence for a configuration mismatch", err)
	}
	if !strings.Contains(s.Router.Log(), `writes with transport \"tcp\", this generation server receives with \"shm\"`) {
		t.Fatal("the router's log does not name the transport mismatch")
	}
	checkIdle(t, s)
	s.StopAll(t)
}

// expectReference completes prompt (16 tokens, seed) through the SDK and
// fails unless the text is the aggregated Reference: every KV byte crossed
// from the context server to the generation server intact.
func expectReference(t *testing.T, c openai.Client, prompt string, seed int64) {
	t.Helper()
	want := executor.Reference(tiny, prompt, router.SamplingFor(16, nil, nil, &seed))
	r := <-completeAsync(t, c, prompt, 16, seed)
	if r.err != nil {
		t.Fatal(r.err)
	}
	if r.text != want.Text {
		t.Fatalf("%d-byte prompt: text %q, reference %q", len(prompt), r.text, want.Text)
	}
}

// completion is what completeAsync delivers.
type completion struct {
	text string
	err  error
}

// completeAsync sends one completion in the background (maxTokens, seed);
// its text or error arrives on the channel, which has room for it, so the
// goroutine ends whether or not the test reads it.
func completeAsync(t *testing.T, c openai.Client, prompt string, maxTokens, seed int64) <-chan completion {
	done := make(chan completion, 1)
	go func() {
		resp, err := c.Completions.New(testCtx(t), openai.CompletionNewParams{
			Model: "tiny", Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String(prompt)},
			MaxTokens: openai.Int(maxTokens), Seed: openai.Int(seed),
		})
		if err != nil {
			done <- completion{err: err}
			return
		}
		done <- completion{text: resp.Choices[0].Text}
	}()
	return done
}
