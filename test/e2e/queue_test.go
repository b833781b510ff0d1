package e2e

import (
	"context"
	"errors"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"

	"github.com/kvferry/kvferry/test/stack"
)

// TestQueueInsteadOf503: pools that hold two prompts at a time, 24
// concurrent requests: every one waits for its blocks in arrival order and
// completes (no 503), a third of them are aborted by their client while
// waiting or running, and both pools idle after.
func TestQueueInsteadOf503(t *testing.T) {
	small := []string{"--pool-blocks=64"}
	s := stack.Up(t, binDir, stack.Options{DecodeStepTime: 5 * time.Millisecond, CtxArgs: small, GenArgs: small})
	c := client(s)
	prompt := longPrompt(300) // 511 tokens: 32 blocks of the 64
	var wg sync.WaitGroup
	errs := make(chan error, 24)
	for i := range 24 {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), stack.ShouldHappen)
			defer cancel()
			if i%3 == 2 {
				// Aborted while it waits or decodes: leaves nothing behind.
				actx, acancel := context.WithTimeout(ctx, time.Duration(5+i*4)*time.Millisecond)
				defer acancel()
				ctx = actx
			}
			_, err := c.Completions.New(ctx, openai.CompletionNewParams{
				Model: "tiny", Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String(prompt)}, MaxTokens: openai.Int(32),
			})
			if err != nil && !(i%3 == 2 && errors.Is(err, context.DeadlineExceeded)) {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("request failed instead of waiting: %v", err)
	}
	if got := stack.Metric(t, s.CtxHTTP, "kvferry_scheduler_queue_seconds_count"); got < 16 {
		t.Errorf("context server admitted %v requests through its queue, want ≥ 16", got)
	}
	checkIdle(t, s)
	s.StopAll(t)
}

// TestQueueFullIs429: with no room to wait (--max-queue=0), a request that
// finds the pool full is refused at once, and the router answers 429 with
// Retry-After.
func TestQueueFullIs429(t *testing.T) {
	small := []string{"--pool-blocks=40", "--max-queue=0"}
	s := stack.Up(t, binDir, stack.Options{DecodeStepTime: 50 * time.Millisecond, CtxArgs: small, GenArgs: small, ExtraRouterArgs: []string{"--max-retries=0"}})
	c := client(s)
	prompt := longPrompt(300) // 32 blocks of the 40: one at a time
	var wg sync.WaitGroup
	got429 := make(chan string, 8)
	for range 8 {
		wg.Go(func() {
			_, err := c.Completions.New(testCtx(t), openai.CompletionNewParams{
				Model: "tiny", Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String(prompt)}, MaxTokens: openai.Int(16),
			})
			var apiErr *openai.Error
			switch {
			case errors.As(err, &apiErr) && apiErr.StatusCode == http.StatusTooManyRequests:
				got429 <- apiErr.Response.Header.Get("Retry-After")
			case err != nil:
				t.Errorf("want success or 429, got %v", err)
			}
		})
	}
	wg.Wait()
	close(got429)
	n := 0
	for ra := range got429 {
		n++
		if ra == "" {
			t.Error("429 without Retry-After")
		}
	}
	if n == 0 {
		t.Fatal("8 concurrent requests on a pool that holds one, no queue: none was refused with 429")
	}
	checkIdle(t, s)
	s.StopAll(t)
}
