package router

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc/codes"

	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/pkg/ticket"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

// apiError is the OpenAI error body.
type apiError struct {
	Error apiErrorBody `json:"error"`
}

type apiErrorBody struct {
	Message string  `json:"message"`
	Type    string  `json:"type"`
	Param   *string `json:"param"`
	Code    *string `json:"code"`
}

func writeError(w http.ResponseWriter, status int, typ, param, code, format string, args ...any) {
	body := apiError{Error: apiErrorBody{Message: fmt.Sprintf(format, args...), Type: typ}}
	if param != "" {
		body.Error.Param = &param
	}
	if code != "" {
		body.Error.Code = &code
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(body)
}

func badRequest(w http.ResponseWriter, param, format string, args ...any) {
	writeError(w, http.StatusBadRequest, "invalid_request_error", param, "", format, args...)
}

// writeRunError maps a router error to an HTTP status and OpenAI error.
func writeRunError(w http.ResponseWriter, err error, requestID string) {
	err = Public(err, requestID)
	switch CodeOf(err) {
	case codes.InvalidArgument:
		badRequest(w, "", "%v", err)
	case codes.ResourceExhausted:
		// Too many requests in flight here, or the servers' admission
		// queues are full: both pass with time.
		w.Header().Set("Retry-After", "1")
		if err == ErrOverloaded {
			writeError(w, http.StatusTooManyRequests, "rate_limit_error", "", "too_many_requests", "%v; retry after 1 s", err)
			return
		}
		writeError(w, http.StatusTooManyRequests, "rate_limit_error", "", "overloaded", "the servers' KV queues are full, retry after 1 s: %v", err)
	case codes.DeadlineExceeded:
		writeError(w, http.StatusGatewayTimeout, "server_error", "", "timeout", "%v", err)
	case codes.Unavailable:
		writeError(w, http.StatusServiceUnavailable, "server_error", "", "unavailable", "%v", err)
	case codes.AlreadyExists:
		writeError(w, http.StatusConflict, "invalid_request_error", "", "duplicate_request_id", "%v", err)
	case codes.Canceled:
		writeError(w, 499, "invalid_request_error", "", "cancelled", "%v", err)
	default:
		writeError(w, http.StatusInternalServerError, "server_error", "", "", "%v", err)
	}
}

// completionRequest is the body of /v1/completions and, with Messages,
// /v1/chat/completions.
type completionRequest struct {
	Model               string          `json:"model"`
	Prompt              json.RawMessage `json:"prompt"`
	Messages            []chatMessage   `json:"messages"`
	MaxTokens           *int            `json:"max_tokens"`
	MaxCompletionTokens *int            `json:"max_completion_tokens"`
	Temperature         *float32        `json:"temperature"`
	TopP                *float32        `json:"top_p"`
	Seed                *int64          `json:"seed"`
	IgnoreEOS           bool            `json:"ignore_eos"` // vLLM's extension: generate until max_tokens
	Stream              bool            `json:"stream"`
	StreamOptions       *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
	User string          `json:"user"`
	Stop json.RawMessage `json:"stop"`

	// The shapes beyond free text (shapes.go): logprobs is a boolean in
	// chat, a number in completions.
	Logprobs       json.RawMessage `json:"logprobs"`
	TopLogprobs    *int            `json:"top_logprobs"`
	ResponseFormat json.RawMessage `json:"response_format"`
	Tools          json.RawMessage `json:"tools"`
	ToolChoice     json.RawMessage `json:"tool_choice"`
	// ParallelToolCalls is accepted either way: a reply makes at most one
	// call, which both settings allow.
	ParallelToolCalls *bool `json:"parallel_tool_calls"`

	// Parameters kvferry does not support: any meaningful value is a 400
	// naming it, never silently ignored.
	N                *int            `json:"n"`
	BestOf           *int            `json:"best_of"`
	Echo             *bool           `json:"echo"`
	Suffix           *string         `json:"suffix"`
	Functions        json.RawMessage `json:"functions"`
	FunctionCall     json.RawMessage `json:"function_call"`
	LogitBias        json.RawMessage `json:"logit_bias"`
	PresencePenalty  *float64        `json:"presence_penalty"`
	FrequencyPenalty *float64        `json:"frequency_penalty"`

	shape shape // what parseBody read of the shapes
}

// maxStops is OpenAI's limit on stop sequences.
const maxStops = 4

// unsupported returns the first parameter given a value kvferry cannot
// honour, with a sentence; "" when there is none.
func (b *completionRequest) unsupported() (param, msg string) {
	set := func(raw json.RawMessage) bool {
		v := strings.TrimSpace(string(raw))
		return v != "" && v != "null" && v != "false" && v != "0" && v != "[]" && v != "{}"
	}
	switch {
	case b.BestOf != nil && *b.BestOf != 1:
		return "best_of", "only best_of=1 is supported"
	case b.Echo != nil && *b.Echo:
		return "echo", "echo is not supported"
	case b.Suffix != nil && *b.Suffix != "":
		return "suffix", "suffix is not supported"
	case set(b.Functions):
		return "functions", "functions are not supported; use tools"
	case set(b.FunctionCall) && strings.Trim(string(b.FunctionCall), `" `) != "none":
		return "function_call", "functions are not supported; use tools and tool_choice"
	case set(b.LogitBias):
		return "logit_bias", "logit_bias is not supported"
	case b.PresencePenalty != nil && *b.PresencePenalty != 0:
		return "presence_penalty", "presence_penalty is not supported"
	case b.FrequencyPenalty != nil && *b.FrequencyPenalty != 0:
		return "frequency_penalty", "frequency_penalty is not supported"
	}
	return "", ""
}

// stops parses `stop`: a string or a list of at most four strings.
func stops(raw json.RawMessage) ([]string, error) {
	if v := strings.TrimSpace(string(raw)); v == "" || v == "null" {
		return nil, nil
	}
	var one string
	if err := json.Unmarshal(raw, &one); err == nil {
		if one == "" {
			return nil, nil
		}
		return []string{one}, nil
	}
	var list []string
	if err := json.Unmarshal(raw, &list); err != nil {
		return nil, errors.New("stop must be a string or a list of strings")
	}
	if len(list) > maxStops {
		return nil, fmt.Errorf("stop takes at most %d sequences, got %d", maxStops, len(list))
	}
	out := list[:0]
	for _, s := range list {
		if s != "" {
			out = append(out, s)
		}
	}
	return out, nil
}

type chatMessage struct {
	Role      string          `json:"role"`
	Content   json.RawMessage `json:"content"`
	ToolCalls []toolCallJSON  `json:"tool_calls"`
}

// MaxClientIDBytes bounds a client's request id.
const MaxClientIDBytes = 128

// ValidateClientID accepts a client's request id: 1 to 128 printable ASCII
// bytes. It is correlation only, never a ticket.
func ValidateClientID(id string) error {
	if id == "" || len(id) > MaxClientIDBytes {
		return fmt.Errorf("request id must be 1 to %d bytes, got %d", MaxClientIDBytes, len(id))
	}
	for i := 0; i < len(id); i++ {
		if id[i] < 0x20 || id[i] > 0x7e {
			return fmt.Errorf("request id byte %d is not printable ASCII", i)
		}
	}
	return nil
}

// RenderChat is kvferry's chat rendering, for models without a template
// (executor.RenderChat).
func RenderChat(msgs []ChatMessage) string { return executor.RenderChat(msgs) }

// ChatMessage is a rendered chat message.
type ChatMessage = executor.ChatMessage

// messageText accepts a string or a list of text parts.
func messageText(raw json.RawMessage) (string, error) {
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		return s, nil
	}
	var parts []struct {
		Type string `json:"type"`
		Text string `json:"text"`
	}
	if err := json.Unmarshal(raw, &parts); err != nil {
		return "", errors.New("content must be a string or a list of text parts")
	}
	var b strings.Builder
	for _, p := range parts {
		if p.Type != "text" {
			return "", fmt.Errorf("content part type %q is not supported", p.Type)
		}
		b.WriteString(p.Text)
	}
	return b.String(), nil
}

func promptText(raw json.RawMessage) (string, error) {
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		return s, nil
	}
	var list []string
	if err := json.Unmarshal(raw, &list); err == nil && len(list) == 1 {
		return list[0], nil
	}
	return "", errors.New("prompt must be a string (or a list of one string)")
}

// Handler returns the public OpenAI HTTP API, behind the API-key check
// when keys are configured.
func (r *Router) Handler() http.Handler {
	mux := r.routes()
	if r.cfg.APIKeys == nil {
		return mux
	}
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		tenant, ok := r.cfg.APIKeys.BearerTenant(req.Header.Get("Authorization"))
		if !ok {
			writeError(w, http.StatusUnauthorized, "invalid_request_error", "", "invalid_api_key", "missing or incorrect API key: send Authorization: Bearer <key>")
			return
		}
		mux.ServeHTTP(w, req.WithContext(withTenant(req.Context(), tenant)))
	})
}

func (r *Router) routes() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/completions", r.methods(http.MethodPost, func(w http.ResponseWriter, req *http.Request) { r.serveCompletion(w, req, false) }))
	mux.HandleFunc("/v1/chat/completions", r.methods(http.MethodPost, func(w http.ResponseWriter, req *http.Request) { r.serveCompletion(w, req, true) }))
	mux.HandleFunc("/v1/models", r.methods(http.MethodGet, r.serveModels))
	mux.HandleFunc("/v1/models/{id...}", r.methods(http.MethodGet, r.serveModel))
	mux.HandleFunc("/", func(w http.ResponseWriter, req *http.Request) {
		writeError(w, http.StatusNotFound, "invalid_request_error", "", "not_found", "no route for %s %s", req.Method, req.URL.Path)
	})
	return mux
}

func (r *Router) methods(method string, h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, req *http.Request) {
		if req.Method != method {
			w.Header().Set("Allow", method)
			writeError(w, http.StatusMethodNotAllowed, "invalid_request_error", "", "method_not_allowed", "%s is not allowed on %s; use %s", req.Method, req.URL.Path, method)
			return
		}
		h(w, req)
	}
}

type modelObject struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	OwnedBy string `json:"owned_by"`
}

func (r *Router) model() modelObject {
	return modelObject{ID: r.cfg.ServedModel, Object: "model", Created: r.created, OwnedBy: "kvferry"}
}

func (r *Router) serveModels(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{"object": "list", "data": []modelObject{r.model()}})
}

func (r *Router) serveModel(w http.ResponseWriter, req *http.Request) {
	if id := req.PathValue("id"); id != r.cfg.ServedModel {
		writeError(w, http.StatusNotFound, "invalid_request_error", "model", "model_not_found", "the model %q does not exist", id)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(r.model())
}

// readBody reads a request body of at most MaxBodyBytes within
// BodyReadTimeout, before the request takes an in-flight slot: a client
// that trickles its body holds a connection and a goroutine until the
// deadline, never a slot. On failure it has written the error response
// (413 too large, 408 too slow) and returns ok = false.
func (r *Router) readBody(w http.ResponseWriter, req *http.Request) (raw []byte, ok bool) {
	tooLarge := func() {
		writeError(w, http.StatusRequestEntityTooLarge, "invalid_request_error", "", "request_too_large", "request body exceeds %d bytes", r.cfg.MaxBodyBytes)
	}
	if req.ContentLength > r.cfg.MaxBodyBytes {
		tooLarge() // refused from its header, before a byte is read
		return nil, false
	}
	if r.cfg.BodyReadTimeout > 0 {
		rc := http.NewResponseController(w)
		if err := rc.SetReadDeadline(time.Now().Add(r.cfg.BodyReadTimeout)); err == nil {
			// Cleared as soon as the body is in: the server's background
			// read, which notices a client going away, must not time out.
			defer func() { _ = rc.SetReadDeadline(time.Time{}) }()
		}
	}
	r.cfg.Metrics.AddReadingBody(1)
	defer r.cfg.Metrics.AddReadingBody(-1)
	var buf bytes.Buffer
	if req.ContentLength > 0 {
		buf.Grow(int(req.ContentLength) + 1)
	}
	_, err := buf.ReadFrom(http.MaxBytesReader(w, req.Body, r.cfg.MaxBodyBytes))
	var tooBig *http.MaxBytesError
	switch {
	case err == nil:
		return buf.Bytes(), true
	case errors.As(err, &tooBig):
		tooLarge()
	case errors.Is(err, os.ErrDeadlineExceeded):
		w.Header().Set("Connection", "close")
		writeError(w, http.StatusRequestTimeout, "invalid_request_error", "", "request_timeout", "the request body did not arrive within %v", r.cfg.BodyReadTimeout)
	default:
		badRequest(w, "", "the request body could not be read")
	}
	return nil, false
}

// parse reads and validates a request body (readBody, then parseBody).
func (r *Router) parse(w http.ResponseWriter, req *http.Request, chat bool) (job Job, body completionRequest, ok bool) {
	raw, ok := r.readBody(w, req)
	if !ok {
		return job, body, false
	}
	return r.parseBody(w, req, raw, chat)
}

// parseBody validates a request body; on failure it has written the error
// response and returns ok = false.
func (r *Router) parseBody(w http.ResponseWriter, req *http.Request, raw []byte, chat bool) (job Job, body completionRequest, ok bool) {
	// Unmarshal, not a Decoder: no second copy of the body, and data after
	// the object is an error.
	if err := json.Unmarshal(raw, &body); err != nil {
		badRequest(w, "", "invalid JSON body: %v", err)
		return job, body, false
	}
	if body.Model == "" {
		badRequest(w, "model", "you must provide a model parameter")
		return job, body, false
	}
	if param, msg := body.unsupported(); param != "" {
		badRequest(w, param, "%s", msg)
		return job, body, false
	}
	stopSeqs, err := stops(body.Stop)
	if err != nil {
		badRequest(w, "stop", "%v", err)
		return job, body, false
	}
	if body.Model != r.cfg.ServedModel {
		writeError(w, http.StatusNotFound, "invalid_request_error", "model", "model_not_found", "the model %q does not exist; this server serves %q", body.Model, r.cfg.ServedModel)
		return job, body, false
	}
	sh, param, err := body.shapeOf(chat)
	if err != nil {
		badRequest(w, param, "%v", err)
		return job, body, false
	}
	body.shape = sh
	var prompt string
	if chat {
		if len(body.Messages) == 0 {
			badRequest(w, "messages", "you must provide at least one message")
			return job, body, false
		}
		msgs := make([]ChatMessage, 0, len(body.Messages)+1)
		if sh.mode != toolsNone {
			msgs = append(msgs, ChatMessage{Role: "system", Content: toolsPrompt(sh.tools)})
		}
		for i, m := range body.Messages {
			text, err := messageText(m.Content)
			if len(m.ToolCalls) > 0 && !isSet(m.Content) {
				text, err = callsText(m.ToolCalls), nil
			}
			if err != nil || m.Role == "" {
				badRequest(w, fmt.Sprintf("messages[%d]", i), "invalid message: %v", errors.Join(err, roleErr(m.Role)))
				return job, body, false
			}
			msgs = append(msgs, ChatMessage{Role: m.Role, Content: text})
		}
		prompt = r.cfg.Vocab.Chat(msgs)
	} else {
		if len(body.Prompt) == 0 {
			badRequest(w, "prompt", "you must provide a prompt")
			return job, body, false
		}
		p, err := promptText(body.Prompt)
		if err != nil {
			badRequest(w, "prompt", "%v", err)
			return job, body, false
		}
		prompt = p
	}
	sampling, param, err := r.sampling(body)
	if err != nil {
		badRequest(w, param, "%v", err)
		return job, body, false
	}
	if err := r.promptBound(prompt); err != nil {
		badRequest(w, "prompt", "%v", err)
		return job, body, false
	}
	tokens := r.cfg.Vocab.Encode(prompt)
	switch {
	case len(tokens) == 0:
		badRequest(w, "prompt", "the prompt is empty")
		return job, body, false
	case len(tokens) > r.cfg.MaxPromptTokens:
		badRequest(w, "prompt", "the prompt has %d tokens, the limit is %d", len(tokens), r.cfg.MaxPromptTokens)
		return job, body, false
	case len(tokens) >= r.cfg.Model.MaxContextTokens:
		badRequest(w, "prompt", "the prompt has %d tokens; this model's context length is %d tokens", len(tokens), r.cfg.Model.MaxContextTokens)
		return job, body, false
	case len(tokens)+int(sampling.GetMaxTokens()) > r.cfg.Model.MaxContextTokens:
		badRequest(w, "max_tokens", "prompt (%d tokens) plus max_tokens (%d) exceeds the context length of %d", len(tokens), sampling.GetMaxTokens(), r.cfg.Model.MaxContextTokens)
		return job, body, false
	}
	// The ticket is always ours; the client's X-Request-Id (any printable
	// value up to 128 bytes) is kept for correlation and echoed back.
	clientID := req.Header.Get("X-Request-Id")
	if ValidateClientID(clientID) != nil {
		clientID = ""
	}
	return Job{ID: ticket.NewID(), ClientID: clientID, Prompt: tokens, Sampling: sampling, Stop: stopSeqs}, body, true
}

// promptBound refuses, before tokenizing, a prompt certain to have more
// than MaxPromptTokens tokens (executor.MinTokens): an oversized prompt
// costs its bytes, never a tokenization's memory.
func (r *Router) promptBound(prompt string) error {
	if n := executor.MinTokens(r.cfg.Vocab, prompt); n > r.cfg.MaxPromptTokens {
		return fmt.Errorf("the prompt has at least %d tokens (%d bytes), the limit is %d", n, len(prompt), r.cfg.MaxPromptTokens)
	}
	return nil
}

func roleErr(role string) error {
	if role == "" {
		return errors.New("role is required")
	}
	return nil
}

func (r *Router) sampling(body completionRequest) (*kvferryv1.SamplingParams, string, error) {
	maxTokens := r.cfg.DefaultMaxTokens
	param := "max_tokens"
	if body.MaxCompletionTokens != nil {
		maxTokens, param = *body.MaxCompletionTokens, "max_completion_tokens"
	} else if body.MaxTokens != nil {
		maxTokens = *body.MaxTokens
	}
	if maxTokens < 1 || maxTokens > r.cfg.MaxOutputTokens {
		return nil, param, fmt.Errorf("%s must be between 1 and %d, got %d", param, r.cfg.MaxOutputTokens, maxTokens)
	}
	s := &kvferryv1.SamplingParams{MaxTokens: uint32(maxTokens), TopP: 1, Temperature: 1}
	if body.Temperature != nil {
		if *body.Temperature < 0 || *body.Temperature > 2 {
			return nil, "temperature", fmt.Errorf("temperature must be between 0 and 2, got %g", *body.Temperature)
		}
		s.Temperature = *body.Temperature
	}
	if body.TopP != nil {
		if *body.TopP <= 0 || *body.TopP > 1 {
			return nil, "top_p", fmt.Errorf("top_p must be in (0, 1], got %g", *body.TopP)
		}
		s.TopP = *body.TopP
	}
	if body.Seed != nil {
		s.Seed = uint64(*body.Seed)
	}
	s.IgnoreEos = body.IgnoreEOS
	s.Logprobs, s.TopLogprobs, s.JsonSchema = body.shape.logprobs, uint32(body.shape.top), body.shape.schema
	if body.N != nil {
		if *body.N < 1 || *body.N > executor.MaxChoices {
			return nil, "n", fmt.Errorf("n must be between 1 and %d, got %d", executor.MaxChoices, *body.N)
		}
		s.N = uint32(*body.N)
	}
	return s, "", nil
}

// SamplingFor returns the engine sampling the router uses for a request with
// these optional OpenAI parameters; tests use it to compute Reference.
func SamplingFor(maxTokens int, temperature, topP *float32, seed *int64) executor.Sampling {
	s := executor.Sampling{MaxTokens: maxTokens, Temperature: 1, TopP: 1}
	if temperature != nil {
		s.Temperature = *temperature
	}
	if topP != nil {
		s.TopP = *topP
	}
	if seed != nil {
		s.Seed = uint64(*seed)
	}
	return s
}

type usageJSON struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
	TotalTokens      int `json:"total_tokens"`
}

func usageOf(u Usage) *usageJSON {
	return &usageJSON{PromptTokens: u.PromptTokens, CompletionTokens: u.CompletionTokens, TotalTokens: u.PromptTokens + u.CompletionTokens}
}

func finishJSON(f executor.FinishReason) *string {
	if f == executor.FinishNone {
		return nil
	}
	s := f.String()
	return &s
}

func (r *Router) serveCompletion(w http.ResponseWriter, req *http.Request, chat bool) {
	raw, ok := r.readBody(w, req)
	if !ok {
		r.cfg.Metrics.RecordRequest("rejected", 0)
		return
	}
	release, err := r.Admit()
	if err != nil {
		writeRunError(w, err, "")
		return
	}
	defer release()
	job, body, ok := r.parseBody(w, req, raw, chat)
	if !ok {
		r.cfg.Metrics.RecordRequest("rejected", 0)
		return
	}
	job.Tenant = TenantOf(req.Context()) // Handler admitted the key
	if job.ClientID != "" {
		w.Header().Set("X-Request-Id", job.ClientID)
	} else {
		w.Header().Set("X-Request-Id", job.ID)
	}
	prefix, object, chunkObject := "cmpl-", "text_completion", "text_completion"
	if chat {
		prefix, object, chunkObject = "chatcmpl-", "chat.completion", "chat.completion.chunk"
	}
	base := map[string]any{"id": prefix + job.ID, "created": time.Now().Unix(), "model": r.cfg.ServedModel}
	with := func(obj string, kv map[string]any) map[string]any {
		out := map[string]any{"object": obj}
		for k, v := range base {
			out[k] = v
		}
		for k, v := range kv {
			out[k] = v
		}
		return out
	}
	sh := body.shape
	calls := chat && sh.mode != toolsNone
	n := max(int(job.Sampling.GetN()), 1)
	callID := func(i int) string {
		if i == 0 {
			return "call_" + job.ID
		}
		return fmt.Sprintf("call_%s_%d", job.ID, i)
	}
	if !body.Stream {
		texts, lps, finishes := make([]strings.Builder, n), make([][]*kvferryv1.TokenLogprob, n), make([]executor.FinishReason, n)
		usage, err := r.Run(req.Context(), job, func(c Chunk) error {
			texts[c.Index].WriteString(c.Text)
			lps[c.Index] = append(lps[c.Index], c.Logprobs...)
			finishes[c.Index] = c.Finish
			return nil
		})
		if err != nil {
			r.lg.Info("request failed", zap.String("request_id", job.ID), zap.String("client_request_id", job.ClientID), zap.Error(err))
			writeRunError(w, err, job.ID)
			return
		}
		choices := make([]any, n)
		for i := range choices {
			c := map[string]any{"index": i, "finish_reason": finishJSON(finishes[i]), "logprobs": nil}
			if sh.logprobs {
				offset := 0
				c["logprobs"] = r.logprobsJSON(chat, lps[i], 0, &offset)
			}
			text := texts[i].String()
			if chat {
				msg := map[string]any{"role": "assistant", "content": text}
				if name, args, ok := parseCall(text, sh.tools); calls && ok {
					msg["content"] = nil
					msg["tool_calls"] = []any{toolCall(callID(i), name, args)}
					c["finish_reason"] = "tool_calls"
				}
				c["message"] = msg
			} else {
				c["text"] = text
			}
			choices[i] = c
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(with(object, map[string]any{"choices": choices, "usage": usageOf(usage)}))
		return
	}

	flusher, _ := w.(http.Flusher)
	rc := http.NewResponseController(w)
	started := false
	send := func(v any) error {
		if r.cfg.StreamWriteTimeout > 0 {
			// A client that stops reading blocks this write until the
			// deadline; the error then cancels the request and frees its
			// blocks on both servers.
			_ = rc.SetWriteDeadline(time.Now().Add(r.cfg.StreamWriteTimeout))
		}
		if !started {
			w.Header().Set("Content-Type", "text/event-stream")
			w.Header().Set("Cache-Control", "no-cache")
			w.WriteHeader(http.StatusOK)
			started = true
		}
		b, err := json.Marshal(v)
		if err != nil {
			return err
		}
		if _, err := fmt.Fprintf(w, "data: %s\n\n", b); err != nil {
			return err
		}
		if flusher != nil {
			flusher.Flush()
		}
		return nil
	}
	// Per choice: its stream shape, tokens sent, completion text offset
	// and logprobs not sent yet.
	type choiceState struct {
		cs         *chatStream
		at, offset int
		lps        []*kvferryv1.TokenLogprob
	}
	states := make([]choiceState, n)
	for i := range states {
		states[i].cs = &chatStream{index: i, chat: chat, calls: calls, mode: sh.mode, tools: sh.tools, callID: callID(i), first: true}
	}
	usage, err := r.Run(req.Context(), job, func(c Chunk) error {
		st := &states[c.Index]
		st.lps = append(st.lps, c.Logprobs...)
		ch := st.cs.choice(c.Text, c.Finish, c.Finish != executor.FinishNone)
		if ch == nil {
			return nil // held: the start of what may be a tool call
		}
		if sh.logprobs && len(st.lps) > 0 {
			ch["logprobs"] = r.logprobsJSON(chat, st.lps, st.at, &st.offset)
			st.at += len(st.lps)
			st.lps = nil
		}
		return send(with(chunkObject, map[string]any{"choices": []any{ch}}))
	})
	if err != nil {
		if !started {
			writeRunError(w, err, job.ID)
			return
		}
		// Headers are gone: the OpenAI convention is an error event.
		r.lg.Info("stream failed", zap.String("request_id", job.ID), zap.String("client_request_id", job.ClientID), zap.Error(err))
		_ = send(apiError{Error: apiErrorBody{Message: Public(err, job.ID).Error(), Type: "server_error"}})
		return
	}
	if body.StreamOptions != nil && body.StreamOptions.IncludeUsage {
		_ = send(with(chunkObject, map[string]any{"choices": []any{}, "usage": usageOf(usage)}))
	}
	_, _ = io.WriteString(w, "data: [DONE]\n\n")
	if flusher != nil {
		flusher.Flush()
	}
}
