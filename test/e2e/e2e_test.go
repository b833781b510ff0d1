// Package e2e runs the three kvferry binaries as real processes and drives
// them with the official OpenAI Go SDK, raw HTTP and gRPC.
package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/pkg/metrics"
	"github.com/kvferry/kvferry/pkg/router"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
	"github.com/kvferry/kvferry/test/stack"
)

var binDir string

func TestMain(m *testing.M) { os.Exit(stack.RunWithBinaries(m, true, &binDir)) }

var tiny, _ = executor.Preset("tiny")

func client(s *stack.Stack) openai.Client {
	return openai.NewClient(option.WithBaseURL(s.OpenAIURL+"/"), option.WithAPIKey("unused"), option.WithMaxRetries(0))
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), stack.ShouldHappen)
	t.Cleanup(cancel)
	return ctx
}

// checkIdle waits until both servers are idle: nothing in flight or
// quarantined, and the only owned blocks are the prefix-reuse cache's.
func checkIdle(t *testing.T, s *stack.Stack) {
	t.Helper()
	for _, base := range []string{s.CtxHTTP, s.GenHTTP} {
		if base == "" {
			continue // aggregated: no context server
		}
		stack.Eventually(t, base+" idle", func() bool {
			p, err := stack.ScrapePool(base)
			return err == nil && p.Idle() && p.Free+p.Owned == p.Capacity
		})
	}
}

func longPrompt(words int) string {
	base := strings.Fields("the quiet river carries light through the harbour at night while the ferry holds its steady path")
	var b strings.Builder
	for i := range words {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(base[i%len(base)])
	}
	return b.String()
}

// TestOpenAI: completions and chat, plain and streamed, through the SDK;
// every text equals the aggregated Reference, which proves every KV byte
// crossed from the context server to the generation server intact.
func TestOpenAI(t *testing.T) {
	s := stack.Up(t, binDir, stack.Options{})
	c := client(s)
	ctx := testCtx(t)
	seed, temp := int64(42), float32(0.7)

	prompts := map[string]string{"short": "the quiet river", "multi-block": longPrompt(300), "byte-fallback": "Hello, kvferry! ¿Qué tal?"}
	for name, prompt := range prompts {
		t.Run("completion/"+name, func(t *testing.T) {
			want := executor.Reference(tiny, prompt, router.SamplingFor(24, &temp, nil, &seed))
			resp, err := c.Completions.New(ctx, openai.CompletionNewParams{
				Model:       "tiny",
				Prompt:      openai.CompletionNewParamsPromptUnion{OfString: openai.String(prompt)},
				MaxTokens:   openai.Int(24),
				Temperature: openai.Float(float64(temp)),
				Seed:        openai.Int(seed),
			})
			if err != nil {
				t.Fatal(err)
			}
			if got := resp.Choices[0].Text; got != want.Text {
				t.Fatalf("text %q, reference %q", got, want.Text)
			}
			if got := string(resp.Choices[0].FinishReason); got != want.Finish.String() {
				t.Fatalf("finish %q, reference %q", got, want.Finish)
			}
			if resp.Usage.PromptTokens != int64(want.PromptTokens) || resp.Usage.CompletionTokens != int64(len(want.Tokens)) {
				t.Fatalf("usage %+v, want prompt %d completion %d", resp.Usage, want.PromptTokens, len(want.Tokens))
			}
		})
		t.Run("completion-stream/"+name, func(t *testing.T) {
			want := executor.Reference(tiny, prompt, router.SamplingFor(24, nil, nil, &seed))
			st := c.Completions.NewStreaming(ctx, openai.CompletionNewParams{
				Model:     "tiny",
				Prompt:    openai.CompletionNewParamsPromptUnion{OfString: openai.String(prompt)},
				MaxTokens: openai.Int(24),
				Seed:      openai.Int(seed),
			})
			var text strings.Builder
			finish := ""
			chunks := 0
			for st.Next() {
				ch := st.Current()
				chunks++
				text.WriteString(ch.Choices[0].Text)
				if ch.Choices[0].FinishReason != "" {
					finish = string(ch.Choices[0].FinishReason)
				}
			}
			if err := st.Err(); err != nil {
				t.Fatal(err)
			}
			if text.String() != want.Text || finish != want.Finish.String() {
				t.Fatalf("stream %q/%s, reference %q/%s", text.String(), finish, want.Text, want.Finish)
			}
			// The first token comes from the prefill, the rest from decode
			// steps; tokens that are ready together (an engine with no step
			// time) may share a chunk, but an answer is never one block.
			if len(want.Tokens) > 1 && chunks < 2 {
				t.Fatalf("%d chunks for %d tokens: not streamed", chunks, len(want.Tokens))
			}
		})
	}

	msgs := []router.ChatMessage{{Role: "system", Content: "you are a ferry"}, {Role: "user", Content: "tell me about the river"}}
	chatPrompt := router.RenderChat(msgs)
	chatParams := openai.ChatCompletionNewParams{
		Model:               "tiny",
		Messages:            []openai.ChatCompletionMessageParamUnion{openai.SystemMessage(msgs[0].Content), openai.UserMessage(msgs[1].Content)},
		MaxCompletionTokens: openai.Int(20),
		Seed:                openai.Int(seed),
	}
	t.Run("chat", func(t *testing.T) {
		want := executor.Reference(tiny, chatPrompt, router.SamplingFor(20, nil, nil, &seed))
		resp, err := c.Chat.Completions.New(ctx, chatParams)
		if err != nil {
			t.Fatal(err)
		}
		if got := resp.Choices[0].Message.Content; got != want.Text {
			t.Fatalf("chat %q, reference %q", got, want.Text)
		}
		if resp.Object != "chat.completion" || resp.Model != "tiny" || !strings.HasPrefix(resp.ID, "chatcmpl-") {
			t.Fatalf("envelope: object %q model %q id %q", resp.Object, resp.Model, resp.ID)
		}
	})
	t.Run("chat-stream", func(t *testing.T) {
		want := executor.Reference(tiny, chatPrompt, router.SamplingFor(20, nil, nil, &seed))
		p := chatParams
		p.StreamOptions = openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)}
		st := c.Chat.Completions.NewStreaming(ctx, p)
		acc := openai.ChatCompletionAccumulator{}
		for st.Next() {
			acc.AddChunk(st.Current())
		}
		if err := st.Err(); err != nil {
			t.Fatal(err)
		}
		if got := acc.Choices[0].Message.Content; got != want.Text {
			t.Fatalf("chat stream %q, reference %q", got, want.Text)
		}
		if acc.Usage.CompletionTokens != int64(len(want.Tokens)) {
			t.Fatalf("usage %+v, want %d completion tokens", acc.Usage, len(want.Tokens))
		}
	})
	t.Run("models", func(t *testing.T) {
		page, err := c.Models.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(page.Data) != 1 || page.Data[0].ID != "tiny" {
			t.Fatalf("models %+v", page.Data)
		}
		m, err := c.Models.Get(ctx, "tiny")
		if err != nil || m.ID != "tiny" {
			t.Fatalf("get model: %+v %v", m, err)
		}
		_, err = c.Models.Get(ctx, "gpt-4")
		var apiErr *openai.Error
		if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusNotFound {
			t.Fatalf("unknown model: %v", err)
		}
	})
	checkIdle(t, s)
	s.StopAll(t)
}

// TestAbort: a client that goes away mid-decode or mid-prefill leaves no
// block held on either server.
func TestAbort(t *testing.T) {
	// Slow enough to abort in the middle: a 600-token prefill takes 0.6 s,
	// each decode step 20 ms.
	s := stack.Up(t, binDir, stack.Options{PrefillTokensPerSecond: 1000, DecodeStepTime: 20 * time.Millisecond})
	c := client(s)

	t.Run("mid-decode", func(t *testing.T) {
		abortMidDecode(t, s, c)
		checkIdle(t, s)
	})
	t.Run("mid-prefill", func(t *testing.T) {
		ctx, cancel := context.WithCancel(testCtx(t))
		defer cancel()
		done := make(chan error, 1)
		go func() {
			_, err := c.Completions.New(ctx, openai.CompletionNewParams{
				Model: "tiny", Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String(longPrompt(600))},
				MaxTokens: openai.Int(10),
			})
			done <- err
		}()
		stack.Eventually(t, "context server prefilling", func() bool {
			return stack.Metric(t, s.CtxHTTP, `kvferry_blockpool_blocks{state="owned"}`) > stack.Metric(t, s.CtxHTTP, `kvferry_blockpool_cached_blocks`)
		})
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Fatalf("err %v, want context.Canceled", err)
		}
		checkIdle(t, s)
	})
	// Both aborts fanned a Cancel out to both servers. The stream's own
	// cancellation usually ends the request first, so the outcome may be
	// already_complete; what matters is that each cancel was answered.
	for _, base := range []string{s.CtxHTTP, s.GenHTTP} {
		if base == "" {
			continue // aggregated: no context server
		}
		stack.Eventually(t, base+" cancel outcomes counted", func() bool {
			sum := 0.0
			for _, o := range metrics.CancelOutcomes {
				sum += stack.Metric(t, base, `kvferry_cancel_outcomes_total{outcome="`+o+`"}`)
			}
			return sum >= 2
		})
	}
	s.StopAll(t)
}

// abortMidDecode streams a long answer, reads three chunks, checks that
// the generation server holds the request's blocks, and goes away.
func abortMidDecode(t *testing.T, s *stack.Stack, c openai.Client) {
	t.Helper()
	ctx, cancel := context.WithCancel(testCtx(t))
	defer cancel()
	st := c.Completions.NewStreaming(ctx, openai.CompletionNewParams{
		Model: "tiny", Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String(longPrompt(100))},
		MaxTokens: openai.Int(1000), Seed: openai.Int(3),
	})
	defer func() { _ = st.Close() }()
	for range 3 {
		if !st.Next() {
			t.Fatalf("stream ended early: %v", st.Err())
		}
	}
	if owned := stack.Metric(t, s.GenHTTP, `kvferry_blockpool_blocks{state="owned"}`); owned == 0 {
		t.Fatal("generation server holds no block mid-decode")
	}
}

// TestBadInput: each bad request gets its documented status and an OpenAI
// error body, and leaves no block held.
func TestBadInput(t *testing.T) {
	s := stack.Up(t, binDir, stack.Options{ExtraRouterArgs: []string{"--max-body-bytes=4096", "--max-prompt-tokens=200"}})
	for _, tc := range []struct {
		name, method, path, body string
		status                   int
		param                    string
	}{
		{"malformed json", "POST", "/completions", `{"model":`, 400, ""},
		{"trailing garbage", "POST", "/completions", `{"model":"tiny","prompt":"a"} x`, 400, ""},
		{"missing model", "POST", "/completions", `{"prompt":"the river"}`, 400, "model"},
		{"missing prompt", "POST", "/completions", `{"model":"tiny"}`, 400, "prompt"},
		{"missing messages", "POST", "/chat/completions", `{"model":"tiny"}`, 400, "messages"},
		{"unknown model", "POST", "/completions", `{"model":"gpt-9","prompt":"the river"}`, 404, "model"},
		{"wrong method", "GET", "/completions", ``, 405, ""},
		{"wrong method chat", "PUT", "/chat/completions", `{}`, 405, ""},
		{"oversized body", "POST", "/completions", `{"model":"tiny","prompt":"` + strings.Repeat("a ", 4000) + `"}`, 413, ""},
		{"prompt too long", "POST", "/completions", `{"model":"tiny","prompt":"` + longPrompt(300) + `"}`, 400, "prompt"},
		{"max_tokens zero", "POST", "/completions", `{"model":"tiny","prompt":"the river","max_tokens":0}`, 400, "max_tokens"},
		{"temperature out of range", "POST", "/completions", `{"model":"tiny","prompt":"the river","temperature":3}`, 400, "temperature"},
		{"unknown route", "GET", "/embeddings", ``, 404, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, err := http.NewRequestWithContext(testCtx(t), tc.method, s.OpenAIURL+tc.path, strings.NewReader(tc.body))
			if err != nil {
				t.Fatal(err)
			}
			req.Header.Set("Content-Type", "application/json")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tc.status, b)
			}
			var e struct {
				Error struct {
					Message string  `json:"message"`
					Type    string  `json:"type"`
					Param   *string `json:"param"`
					Code    *string `json:"code"`
				} `json:"error"`
			}
			if err := json.Unmarshal(b, &e); err != nil || e.Error.Message == "" || e.Error.Type == "" {
				t.Fatalf("not an OpenAI error body: %s (%v)", b, err)
			}
			if !strings.Contains(string(b), `"param"`) || !strings.Contains(string(b), `"code"`) {
				t.Fatalf("error body lacks param or code: %s", b)
			}
			if tc.param != "" && (e.Error.Param == nil || *e.Error.Param != tc.param) {
				t.Fatalf("param %v, want %q: %s", e.Error.Param, tc.param, b)
			}
		})
	}
	// The SDK surfaces the same errors as *openai.Error.
	c := client(s)
	_, err := c.Completions.New(testCtx(t), openai.CompletionNewParams{Model: "nope", Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String("the")}})
	var apiErr *openai.Error
	if !errors.As(err, &apiErr) || apiErr.StatusCode != 404 {
		t.Fatalf("sdk error %v, want 404 *openai.Error", err)
	}
	checkIdle(t, s)
	s.StopAll(t)
}

// TestRouterGRPC: the gRPC front door streams the same text as Reference,
// and Cancel of an unknown id answers found=false.
func TestRouterGRPC(t *testing.T) {
	s := stack.Up(t, binDir, stack.Options{})
	cc, err := grpc.NewClient(s.RouterGRPC, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	rc := kvferryv1.NewRouterServiceClient(cc)
	ctx := testCtx(t)
	prompt := longPrompt(40)
	sp := &kvferryv1.SamplingParams{MaxTokens: 30, Temperature: 1, TopP: 1, Seed: 9}
	want := executor.Reference(tiny, prompt, plainSampling(sp))
	st, err := rc.Generate(ctx, &kvferryv1.RouterServiceGenerateRequest{Model: "tiny", Prompt: prompt, Sampling: sp})
	if err != nil {
		t.Fatal(err)
	}
	var text strings.Builder
	for {
		m, err := st.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		text.WriteString(m.GetText())
	}
	if text.String() != want.Text {
		t.Fatalf("grpc %q, reference %q", text.String(), want.Text)
	}
	resp, err := rc.Cancel(ctx, &kvferryv1.RouterServiceCancelRequest{RequestId: strings.Repeat("ab", 16)})
	if err != nil || resp.GetFound() {
		t.Fatalf("cancel unknown: %+v %v", resp, err)
	}
	// A message over the gRPC limit (4 MiB) is refused before any work.
	huge, err := rc.Generate(ctx, &kvferryv1.RouterServiceGenerateRequest{Model: "tiny", Prompt: strings.Repeat("river ", 1<<20), Sampling: sp})
	if err == nil {
		_, err = huge.Recv()
	}
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("a 6 MiB prompt: %v, want ResourceExhausted", err)
	}
	checkIdle(t, s)
	s.StopAll(t)
}

// TestBadFlags: an invalid flag is one clear line on stderr and exit 2.
func TestBadFlags(t *testing.T) {
	for _, tc := range []struct {
		bin  string
		args []string
		want string
	}{
		{"ctxserver", []string{"--pool-blocks=0"}, "--pool-blocks"},
		{"genserver", []string{"--model=gpt-9"}, "unknown model"},
		{"router", []string{"--ctx-servers="}, "--ctx-servers"},
		{"router", []string{"--no-such-flag"}, "no-such-flag"},
		{"router", []string{"--routing=ready,fastest"}, `unknown plugin "fastest"`},
		{"genserver", []string{"--data-tls"}, "--data-tls needs --tls-cert"},
		{"ctxserver", []string{"--tls-cert=c.pem", "--tls-key=k.pem"}, "--tls-cert needs --tls-ca"},
		{"router", []string{"--tls-cert=c.pem", "--tls-key=k.pem"}, "--tls-cert needs --tls-ca"},
	} {
		t.Run(tc.bin+" "+tc.args[0], func(t *testing.T) {
			cmd := exec.CommandContext(testCtx(t), filepath.Join(binDir, tc.bin), tc.args...)
			out, err := cmd.CombinedOutput()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != 2 {
				t.Fatalf("err %v, want exit 2; output %s", err, out)
			}
			if lines := strings.Count(strings.TrimSpace(string(out)), "\n"); lines != 0 || !strings.Contains(string(out), tc.want) {
				t.Fatalf("output %q: want one line naming %q", out, tc.want)
			}
		})
	}
}

// plainSampling converts sampling parameters that carry no schema.
func plainSampling(p *kvferryv1.SamplingParams) executor.Sampling {
	s, err := executor.ToSampling(p)
	if err != nil {
		panic(err)
	}
	return s
}
