package e2e

import (
	"encoding/json"
	"errors"
	"math"
	"testing"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"github.com/openai/openai-go/v3/shared"

	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/pkg/grammar"
	"github.com/kvferry/kvferry/pkg/router"
	"github.com/kvferry/kvferry/test/stack"
)

// weather is a tool as agent clients declare one.
var weather = openai.FunctionDefinitionParam{
	Name:        "get_weather",
	Description: openai.String("The weather in a city"),
	Parameters: openai.FunctionParameters{
		"type":       "object",
		"properties": map[string]any{"city": map[string]any{"type": "string"}, "days": map[string]any{"type": "integer"}},
		"required":   []string{"city", "days"},
	},
}

// chatReference is the in-process output for a request the router renders
// from msgs (with the tools' system message when given) under the JSON
// Schema schema ("" for none).
func chatReference(t *testing.T, msgs []router.ChatMessage, maxTokens int, seed int64, schema string, logprobs bool, top int) executor.Result {
	t.Helper()
	s := router.SamplingFor(maxTokens, nil, nil, &seed)
	s.Logprobs, s.TopLogprobs = logprobs, top
	if schema != "" {
		g, err := grammar.Schema([]byte(schema))
		if err != nil {
			t.Fatal(err)
		}
		s.Grammar = g
	}
	return executor.Reference(tiny, router.RenderChat(msgs), s)
}

func sameLogprob(got float64, want float32) bool { return float32(got) == want && !math.IsNaN(got) }

// TestOpenAIShapes: structured output, tool calls (whole and streamed) and
// logprobs through the official SDK, each equal to one process's output —
// the first token (and its grammar state and logprob) came from the
// context server, the rest from the generation server.
func TestOpenAIShapes(t *testing.T) {
	s := stack.Up(t, binDir, stack.Options{})
	testShapes(t, s)
}

// TestOpenAIShapesAggregated: the same shapes when one generation server
// prefills and decodes (no handoff): the baseline gives the same answers.
func TestOpenAIShapesAggregated(t *testing.T) {
	s := stack.Up(t, binDir, stack.Options{Aggregated: true})
	testShapes(t, s)
}

func testShapes(t *testing.T, s *stack.Stack) {
	c := openai.NewClient(option.WithBaseURL(s.OpenAIURL+"/"), option.WithMaxRetries(0))
	ctx := testCtx(t)
	user := "what is the weather in the harbour city"
	msgs := []openai.ChatCompletionMessageParamUnion{openai.UserMessage(user)}
	rendered := []router.ChatMessage{{Role: "user", Content: user}}

	t.Run("json_schema", func(t *testing.T) {
		schema := map[string]any{"type": "object", "properties": map[string]any{"city": map[string]any{"type": "string"}, "ok": map[string]any{"type": "boolean"}}, "required": []string{"city", "ok"}}
		text, _ := json.Marshal(schema)
		for seed := range int64(4) {
			resp, err := c.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: "tiny", Messages: msgs, MaxCompletionTokens: openai.Int(120), Seed: openai.Int(seed),
				ResponseFormat: openai.ChatCompletionNewParamsResponseFormatUnion{OfJSONSchema: &shared.ResponseFormatJSONSchemaParam{
					JSONSchema: shared.ResponseFormatJSONSchemaJSONSchemaParam{Name: "answer", Schema: schema}}}})
			if err != nil {
				t.Fatal(err)
			}
			want := chatReference(t, rendered, 120, seed, string(text), false, 0)
			got := resp.Choices[0].Message.Content
			if got != want.Text || string(resp.Choices[0].FinishReason) != want.Finish.String() {
				t.Fatalf("seed %d: %q (%s), reference %q (%v)", seed, got, resp.Choices[0].FinishReason, want.Text, want.Finish)
			}
			if want.Finish == executor.FinishStop {
				var v struct {
					City *string `json:"city"`
					OK   *bool   `json:"ok"`
				}
				if err := json.Unmarshal([]byte(got), &v); err != nil || v.City == nil || v.OK == nil {
					t.Fatalf("seed %d: %q does not satisfy the schema: %v", seed, got, err)
				}
			}
		}
	})

	t.Run("tool_call", func(t *testing.T) {
		params := openai.ChatCompletionNewParams{Model: "tiny", Messages: msgs, MaxCompletionTokens: openai.Int(160), Seed: openai.Int(2),
			Tools:      []openai.ChatCompletionToolUnionParam{openai.ChatCompletionFunctionTool(weather)},
			ToolChoice: openai.ChatCompletionToolChoiceOptionUnionParam{OfAuto: openai.String("required")}}
		resp, err := c.Chat.Completions.New(ctx, params)
		if err != nil {
			t.Fatal(err)
		}
		ch := resp.Choices[0]
		if ch.FinishReason != "tool_calls" || len(ch.Message.ToolCalls) != 1 || ch.Message.Content != "" {
			t.Fatalf("required tool call: finish %q, calls %+v, content %q", ch.FinishReason, ch.Message.ToolCalls, ch.Message.Content)
		}
		call := ch.Message.ToolCalls[0]
		var args struct {
			City *string `json:"city"`
			Days *int    `json:"days"`
		}
		if call.Function.Name != "get_weather" || json.Unmarshal([]byte(call.Function.Arguments), &args) != nil || args.City == nil || args.Days == nil {
			t.Fatalf("call %s(%s)", call.Function.Name, call.Function.Arguments)
		}
		// Streamed: the SDK's accumulator rebuilds the same call from the
		// deltas.
		st := c.Chat.Completions.NewStreaming(ctx, params)
		var acc openai.ChatCompletionAccumulator
		for st.Next() {
			acc.AddChunk(st.Current())
		}
		if err := st.Err(); err != nil {
			t.Fatal(err)
		}
		sc := acc.Choices[0]
		if sc.FinishReason != "tool_calls" || len(sc.Message.ToolCalls) != 1 || sc.Message.ToolCalls[0].Function.Name != call.Function.Name ||
			sc.Message.ToolCalls[0].Function.Arguments != call.Function.Arguments {
			t.Fatalf("streamed call %+v (%s), whole %s(%s)", sc.Message.ToolCalls, sc.FinishReason, call.Function.Name, call.Function.Arguments)
		}
		// A follow-up turn carrying the call and its result renders and runs.
		follow := append(msgs, openai.ChatCompletionMessageParamUnion{OfAssistant: &openai.ChatCompletionAssistantMessageParam{
			ToolCalls: []openai.ChatCompletionMessageToolCallUnionParam{{OfFunction: &openai.ChatCompletionMessageFunctionToolCallParam{
				ID: call.ID, Function: openai.ChatCompletionMessageFunctionToolCallFunctionParam{Name: call.Function.Name, Arguments: call.Function.Arguments}}}}}},
			openai.ToolMessage(`{"sky":"clear"}`, call.ID))
		resp, err = c.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: "tiny", Messages: follow, MaxCompletionTokens: openai.Int(8),
			Tools: params.Tools, ToolChoice: openai.ChatCompletionToolChoiceOptionUnionParam{OfAuto: openai.String("none")}})
		if err != nil || resp.Choices[0].Message.Content == "" || len(resp.Choices[0].Message.ToolCalls) != 0 {
			t.Fatalf("follow-up with tool_choice none: %+v %v", resp, err)
		}
	})

	t.Run("chat_logprobs", func(t *testing.T) {
		params := openai.ChatCompletionNewParams{Model: "tiny", Messages: msgs, MaxCompletionTokens: openai.Int(12), Seed: openai.Int(7),
			Logprobs: openai.Bool(true), TopLogprobs: openai.Int(3)}
		resp, err := c.Chat.Completions.New(ctx, params)
		if err != nil {
			t.Fatal(err)
		}
		want := chatReference(t, rendered, 12, 7, "", true, 3)
		lps := resp.Choices[0].Logprobs.Content
		if len(lps) != len(want.Tokens) || int(resp.Usage.CompletionTokens) != len(want.Tokens) {
			t.Fatalf("%d logprobs, %d tokens; reference has %d", len(lps), resp.Usage.CompletionTokens, len(want.Tokens))
		}
		for i, lp := range lps {
			if !sameLogprob(lp.Logprob, want.Logprobs[i].Logprob) || len(lp.TopLogprobs) != len(want.Logprobs[i].Top) {
				t.Fatalf("token %d: %+v, reference %+v", i, lp, want.Logprobs[i])
			}
		}
		st := c.Chat.Completions.NewStreaming(ctx, params)
		n := 0
		for st.Next() {
			for _, ch := range st.Current().Choices {
				for _, lp := range ch.Logprobs.Content {
					if n >= len(want.Logprobs) || !sameLogprob(lp.Logprob, want.Logprobs[n].Logprob) {
						t.Fatalf("streamed token %d: %+v", n, lp)
					}
					n++
				}
			}
		}
		if err := st.Err(); err != nil || n != len(want.Logprobs) {
			t.Fatalf("streamed %d logprobs of %d: %v", n, len(want.Logprobs), err)
		}
	})

	t.Run("completion_logprobs", func(t *testing.T) {
		prompt := "the quiet river"
		resp, err := c.Completions.New(ctx, openai.CompletionNewParams{Model: "tiny", Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String(prompt)},
			MaxTokens: openai.Int(10), Seed: openai.Int(3), Logprobs: openai.Int(2)})
		if err != nil {
			t.Fatal(err)
		}
		s := router.SamplingFor(10, nil, nil, new(int64(3)))
		s.Logprobs, s.TopLogprobs = true, 2
		want := executor.Reference(tiny, prompt, s)
		lp := resp.Choices[0].Logprobs
		if len(lp.Tokens) != len(want.Tokens) || len(lp.TopLogprobs) != len(want.Tokens) {
			t.Fatalf("%d tokens with logprobs, reference %d", len(lp.Tokens), len(want.Tokens))
		}
		text := ""
		for i := range lp.Tokens {
			if !sameLogprob(lp.TokenLogprobs[i], want.Logprobs[i].Logprob) || lp.TextOffset[i] != int64(len(text)) {
				t.Fatalf("token %d: %q %g at %d", i, lp.Tokens[i], lp.TokenLogprobs[i], lp.TextOffset[i])
			}
			text += lp.Tokens[i]
		}
		if text != resp.Choices[0].Text {
			t.Fatalf("tokens spell %q, text %q", text, resp.Choices[0].Text)
		}
	})

	t.Run("n", func(t *testing.T) {
		// Three choices from one prefill and one transfer: choice i is the
		// reference under its own seed (executor.ChoiceSeed), whole and
		// streamed.
		params := openai.ChatCompletionNewParams{Model: "tiny", Messages: msgs, MaxCompletionTokens: openai.Int(16), Seed: openai.Int(5), N: openai.Int(3),
			Logprobs: openai.Bool(true)}
		resp, err := c.Chat.Completions.New(ctx, params)
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Choices) != 3 {
			t.Fatalf("%d choices, want 3", len(resp.Choices))
		}
		total := 0
		for i, ch := range resp.Choices {
			seed := int64(executor.ChoiceSeed(5, i))
			want := chatReference(t, rendered, 16, seed, "", true, 0)
			if ch.Index != int64(i) || ch.Message.Content != want.Text || string(ch.FinishReason) != want.Finish.String() || len(ch.Logprobs.Content) != len(want.Tokens) {
				t.Fatalf("choice %d: %q (%s, %d logprobs), reference %q (%v, %d tokens)", i, ch.Message.Content, ch.FinishReason, len(ch.Logprobs.Content), want.Text, want.Finish, len(want.Tokens))
			}
			total += len(want.Tokens)
		}
		if int(resp.Usage.CompletionTokens) != total {
			t.Fatalf("usage %d completion tokens, the choices have %d", resp.Usage.CompletionTokens, total)
		}
		st := c.Chat.Completions.NewStreaming(ctx, params)
		var acc openai.ChatCompletionAccumulator
		for st.Next() {
			acc.AddChunk(st.Current())
		}
		if err := st.Err(); err != nil || len(acc.Choices) != 3 {
			t.Fatalf("streamed: %d choices, %v", len(acc.Choices), err)
		}
		for i, ch := range acc.Choices {
			if ch.Message.Content != resp.Choices[i].Message.Content {
				t.Fatalf("streamed choice %d %q, whole %q", i, ch.Message.Content, resp.Choices[i].Message.Content)
			}
		}
	})

	t.Run("bad_shapes", func(t *testing.T) {
		for _, tc := range []struct {
			param string
			p     openai.ChatCompletionNewParams
		}{
			{"response_format", openai.ChatCompletionNewParams{Model: "tiny", Messages: msgs, ResponseFormat: openai.ChatCompletionNewParamsResponseFormatUnion{OfJSONSchema: &shared.ResponseFormatJSONSchemaParam{
				JSONSchema: shared.ResponseFormatJSONSchemaJSONSchemaParam{Name: "x", Schema: map[string]any{"type": "string", "pattern": "^a"}}}}}},
			{"tool_choice", openai.ChatCompletionNewParams{Model: "tiny", Messages: msgs, Tools: []openai.ChatCompletionToolUnionParam{openai.ChatCompletionFunctionTool(weather)},
				ToolChoice: openai.ToolChoiceOptionFunctionToolChoice(openai.ChatCompletionNamedToolChoiceFunctionParam{Name: "nope"})}},
			{"top_logprobs", openai.ChatCompletionNewParams{Model: "tiny", Messages: msgs, TopLogprobs: openai.Int(2)}},
			{"n", openai.ChatCompletionNewParams{Model: "tiny", Messages: msgs, N: openai.Int(executor.MaxChoices + 1)}},
		} {
			_, err := c.Chat.Completions.New(ctx, tc.p)
			var apiErr *openai.Error
			if !errors.As(err, &apiErr) || apiErr.StatusCode != 400 || apiErr.Param != tc.param {
				t.Fatalf("%s: %v", tc.param, err)
			}
		}
	})
	checkIdle(t, s)
	s.StopAll(t)
}
