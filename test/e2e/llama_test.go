package e2e

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/openai/openai-go/v3"

	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/pkg/router"
	"github.com/kvferry/kvferry/test/stack"
)

var (
	refOnce   sync.Once
	refEngine *executor.Llama
	refErr    error
)

// llamaReference is the test model in this process: prefill and decode in
// one llama.cpp sequence, no transfer — what every disaggregated run must
// equal, token for token.
func llamaReference(t *testing.T) *executor.Llama {
	t.Helper()
	cfg := executor.LlamaConfig{ModelPath: stack.TestModelPath(t), LibDir: stack.LlamaLibDir(t), Slots: 2, Threads: 1}
	refOnce.Do(func() { refEngine, refErr = executor.NewLlama(cfg) })
	if refErr != nil {
		t.Fatal(refErr)
	}
	return refEngine
}

func reference(t *testing.T, prompt string, s executor.Sampling) executor.Result {
	t.Helper()
	e := llamaReference(t)
	res, err := e.Generate(context.Background(), e.Vocabulary().Encode(prompt), s)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

var llamaPrompts = []string{
	"Once upon a time", "The little dog", "Lily and Ben went to the park", "One day, a big bird",
	"Tom had a red ball. He liked to play with it every day in the garden behind his house.",
	"There was a girl", "The sun was hot", "Mom said", "Once upon a time, there was a cat named Tim who loved fish.",
	"A boy found a box", "The tree was tall", "Sara wanted a cake", "Max and his dad",
	"It was a rainy day", "The bunny hopped", "A small fish swam", "Anna had a doll",
	"The car was fast and", "One morning, Sue woke up", "Tim saw a shiny stone",
}

func complete(ctx context.Context, c openai.Client, prompt string, maxTokens int64, temp *float32, seed int64, stream bool) (string, string, error) {
	params := openai.CompletionNewParams{
		Model:     stack.TestModelName,
		Prompt:    openai.CompletionNewParamsPromptUnion{OfString: openai.String(prompt)},
		MaxTokens: openai.Int(maxTokens),
		Seed:      openai.Int(seed),
	}
	if temp != nil {
		params.Temperature = openai.Float(float64(*temp))
	}
	if !stream {
		resp, err := c.Completions.New(ctx, params)
		if err != nil {
			return "", "", err
		}
		return resp.Choices[0].Text, string(resp.Choices[0].FinishReason), nil
	}
	st := c.Completions.NewStreaming(ctx, params)
	var text strings.Builder
	finish := ""
	for st.Next() {
		ch := st.Current()
		if len(ch.Choices) == 0 {
			continue
		}
		text.WriteString(ch.Choices[0].Text)
		if ch.Choices[0].FinishReason != "" {
			finish = string(ch.Choices[0].FinishReason)
		}
	}
	return text.String(), finish, st.Err()
}

// TestLlamaServing: stories260K served disaggregated, through the OpenAI
// SDK, equals the same model run in this process byte for byte — the known
// text first, then 20 prompts × {greedy, seeded temperature 0.8}, streamed
// and not, on tcp and shm.
func TestLlamaServing(t *testing.T) {
	for _, tr := range []struct {
		name     string
		ctx, gen []string
	}{
		{"tcp", nil, nil},
		{"shm", nil, nil},
	} {
		t.Run(tr.name, func(t *testing.T) {
			var args []string
			if tr.name == "shm" {
				args = []string{"--transport=shm", "--shm-dir=" + t.TempDir()}
			}
			s := stack.Up(t, binDir, stack.Options{Llama: true, CtxArgs: args, GenArgs: args})
			runLlamaServing(t, s)
			checkIdle(t, s)
			s.StopAll(t)
		})
	}
}

func runLlamaServing(t *testing.T, s *stack.Stack) {
	c := client(s)
	zero := float32(0)
	text, finish, err := complete(testCtx(t), c, stack.KnownPrompt, 40, &zero, 0, false)
	if err != nil {
		t.Fatal(err)
	}
	if text != stack.KnownOutput || finish != "length" {
		t.Fatalf("known prompt: %q (%s), want %q (length)", text, finish, stack.KnownOutput)
	}
	hot := float32(0.8)
	for i, prompt := range llamaPrompts {
		for _, temp := range []*float32{&zero, &hot} {
			seed := int64(1000 + i)
			want := reference(t, prompt, router.SamplingFor(24, temp, nil, &seed))
			for _, stream := range []bool{false, true} {
				text, finish, err := complete(testCtx(t), c, prompt, 24, temp, seed, stream)
				if err != nil {
					t.Fatal(err)
				}
				if text != want.Text || finish != want.Finish.String() {
					t.Fatalf("%q temperature %g stream %v: %q (%s), reference %q (%s)", prompt, *temp, stream, text, finish, want.Text, want.Finish)
				}
			}
		}
	}
}

// TestLlamaChatAndLimits: chat falls back to kvferry's rendering (the test
// model has no template), models lists the served name, a prompt over the
// model's context is a 400 naming the limit, and nothing is left held.
func TestLlamaChatAndLimits(t *testing.T) {
	s := stack.Up(t, binDir, stack.Options{Llama: true})
	c := client(s)
	ctx := testCtx(t)
	msgs := []router.ChatMessage{{Role: "user", Content: "Tell me a story about a dog."}}
	seed := int64(7)
	want := reference(t, llamaReference(t).Vocabulary().Chat(msgs), router.SamplingFor(20, nil, nil, &seed))
	resp, err := c.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
		Model:               stack.TestModelName,
		Messages:            []openai.ChatCompletionMessageParamUnion{openai.UserMessage(msgs[0].Content)},
		MaxCompletionTokens: openai.Int(20),
		Seed:                openai.Int(seed),
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := resp.Choices[0].Message.Content; got != want.Text {
		t.Fatalf("chat %q, reference %q", got, want.Text)
	}
	page, err := c.Models.List(ctx)
	if err != nil || len(page.Data) != 1 || page.Data[0].ID != stack.TestModelName {
		t.Fatalf("models %+v %v", page, err)
	}

	limit := llamaReference(t).Model().MaxContextTokens
	long := strings.Repeat("the dog ran and ", limit/3) // more tokens than the context, fewer than --max-prompt-tokens
	_, err = c.Completions.New(ctx, openai.CompletionNewParams{
		Model: stack.TestModelName, Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String(long)}, MaxTokens: openai.Int(4),
	})
	var apiErr *openai.Error
	if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusBadRequest || !strings.Contains(apiErr.Message, fmt.Sprintf("context length is %d tokens", limit)) {
		t.Fatalf("over-long prompt: %v (%s), want a 400 naming the context of %d", err, apiErr.RawJSON(), limit)
	}
	checkIdle(t, s)
	s.StopAll(t)
}

// TestLlamaLayoutMismatch: a generation server whose KV layout differs
// (here: another served model) refuses the advertisement before any byte
// moves; the client reads the fixed sentence, the router logs the field.
func TestLlamaLayoutMismatch(t *testing.T) {
	s := stack.Up(t, binDir, stack.Options{Llama: true, GenArgs: []string{"--served-model-name=other"}})
	c := client(s)
	_, err := c.Completions.New(testCtx(t), openai.CompletionNewParams{
		Model: stack.TestModelName, Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String("The little dog")}, MaxTokens: openai.Int(4),
	})
	var apiErr *openai.Error
	// The client reads a fixed sentence and the request id; the router's
	// log names the field under that id.
	if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusInternalServerError || !strings.Contains(apiErr.Message, "configured differently") ||
		!strings.Contains(apiErr.Message, "request id") || strings.Contains(apiErr.Message, "stories260K") {
		t.Fatalf("err %v, want a 500 with the fixed sentence for a configuration mismatch", err)
	}
	if !strings.Contains(s.Router.Log(), `kv layout mismatch: model is \"stories260K\" in the advertisement, \"other\" here`) {
		t.Fatal("the router's log does not name the layout mismatch")
	}
	checkIdle(t, s)
	s.StopAll(t)
}
