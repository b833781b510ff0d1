package router

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"unicode/utf8"

	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/pkg/grammar"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

// The OpenAI shapes beyond free text: logprobs, structured output
// (response_format) and tool calls. Structured output and a required tool
// call become a JSON Schema the servers compile into a grammar
// (SamplingParams.json_schema); tools are rendered into the prompt.

// Tool choice modes.
const (
	toolsNone     = "none"
	toolsAuto     = "auto"
	toolsRequired = "required"
	toolsNamed    = "named"
)

// maxCompletionLogprobs is the completions API's bound on logprobs.
const maxCompletionLogprobs = 5

// shape is what a request asks of its output beyond free text.
type shape struct {
	logprobs bool
	top      int
	schema   string // for the grammar; "" for free text
	tools    []tool
	mode     string // toolsNone … toolsNamed
}

type tool struct {
	Name        string          `json:"name"`
	Description string          `json:"description,omitempty"`
	Parameters  json.RawMessage `json:"parameters,omitempty"`
}

var toolName = regexp.MustCompile(`^[a-zA-Z0-9_-]{1,64}$`)

// isSet reports a JSON value other than absent or null.
func isSet(raw json.RawMessage) bool {
	v := strings.TrimSpace(string(raw))
	return v != "" && v != "null"
}

// shapeOf reads logprobs, response_format, tools and tool_choice; a bad
// value returns the parameter and a sentence for a 400.
func (b *completionRequest) shapeOf(chat bool) (sh shape, param string, err error) {
	if param, err := b.readLogprobs(chat, &sh); err != nil {
		return sh, param, err
	}
	if isSet(b.ResponseFormat) {
		var rf struct {
			Type       string `json:"type"`
			JSONSchema *struct {
				Name   string          `json:"name"`
				Schema json.RawMessage `json:"schema"`
			} `json:"json_schema"`
		}
		if err := json.Unmarshal(b.ResponseFormat, &rf); err != nil {
			return sh, "response_format", errors.New("response_format must be an object with a type")
		}
		switch rf.Type {
		case "text":
		case "json_object":
			sh.schema = grammar.JSONObject
		case "json_schema":
			if rf.JSONSchema == nil || !isSet(rf.JSONSchema.Schema) {
				return sh, "response_format.json_schema.schema", errors.New("json_schema needs a schema")
			}
			sh.schema = string(rf.JSONSchema.Schema)
		default:
			return sh, "response_format.type", fmt.Errorf("response_format type %q is not one of text, json_object, json_schema", rf.Type)
		}
	}
	if param, err := b.readTools(chat, &sh); err != nil {
		return sh, param, err
	}
	if sh.schema != "" {
		if _, err := grammar.Schema([]byte(sh.schema)); err != nil {
			param := "response_format"
			if sh.mode == toolsRequired || sh.mode == toolsNamed {
				param = "tools"
			}
			return sh, param, fmt.Errorf("the schema cannot constrain output: %v", err)
		}
	}
	return sh, "", nil
}

func (b *completionRequest) readLogprobs(chat bool, sh *shape) (string, error) {
	if chat {
		if isSet(b.Logprobs) {
			if err := json.Unmarshal(b.Logprobs, &sh.logprobs); err != nil {
				return "logprobs", errors.New("logprobs must be a boolean")
			}
		}
		if b.TopLogprobs != nil {
			if *b.TopLogprobs < 0 || *b.TopLogprobs > executor.MaxTopLogprobs {
				return "top_logprobs", fmt.Errorf("top_logprobs must be between 0 and %d", executor.MaxTopLogprobs)
			}
			if *b.TopLogprobs > 0 && !sh.logprobs {
				return "top_logprobs", errors.New("top_logprobs needs logprobs set to true")
			}
			sh.top = *b.TopLogprobs
		}
		return "", nil
	}
	if b.TopLogprobs != nil {
		return "top_logprobs", errors.New("top_logprobs is a chat parameter; completions take logprobs as a number")
	}
	if isSet(b.Logprobs) {
		var n int
		if err := json.Unmarshal(b.Logprobs, &n); err != nil || n < 0 || n > maxCompletionLogprobs {
			return "logprobs", fmt.Errorf("logprobs must be an integer between 0 and %d", maxCompletionLogprobs)
		}
		sh.logprobs, sh.top = true, n
	}
	return "", nil
}

func (b *completionRequest) readTools(chat bool, sh *shape) (string, error) {
	sh.mode = toolsNone
	if !isSet(b.Tools) {
		if isSet(b.ToolChoice) && strings.Trim(string(b.ToolChoice), `" `) != toolsNone {
			return "tool_choice", errors.New("tool_choice needs tools")
		}
		return "", nil
	}
	if !chat {
		return "tools", errors.New("tools are a chat completions parameter")
	}
	var decl []struct {
		Type     string `json:"type"`
		Function *tool  `json:"function"`
	}
	if err := json.Unmarshal(b.Tools, &decl); err != nil {
		return "tools", errors.New("tools must be a list of {type: function, function: {name, description, parameters}}")
	}
	for i, d := range decl {
		if d.Type != "function" || d.Function == nil || !toolName.MatchString(d.Function.Name) {
			return fmt.Sprintf("tools[%d]", i), errors.New("a tool must be of type function with a name of 1 to 64 letters, digits, _ or -")
		}
		sh.tools = append(sh.tools, *d.Function)
	}
	sh.mode = toolsAuto
	var named string
	if isSet(b.ToolChoice) {
		var s string
		var obj struct {
			Function struct {
				Name string `json:"name"`
			} `json:"function"`
		}
		switch {
		case json.Unmarshal(b.ToolChoice, &s) == nil:
			if s != toolsNone && s != toolsAuto && s != toolsRequired {
				return "tool_choice", fmt.Errorf("tool_choice %q is not one of none, auto, required", s)
			}
			sh.mode = s
		case json.Unmarshal(b.ToolChoice, &obj) == nil && obj.Function.Name != "":
			named, sh.mode = obj.Function.Name, toolsNamed
		default:
			return "tool_choice", errors.New("tool_choice must be none, auto, required or {type: function, function: {name}}")
		}
	}
	if sh.mode != toolsRequired && sh.mode != toolsNamed {
		return "", nil
	}
	if sh.schema != "" {
		return "response_format", errors.New("response_format and a required tool call cannot both constrain the output")
	}
	var alts []json.RawMessage
	for _, t := range sh.tools {
		if sh.mode == toolsNamed && t.Name != named {
			continue
		}
		params := t.Parameters
		if !isSet(params) {
			params = json.RawMessage(grammar.JSONObject)
		}
		name, _ := json.Marshal(t.Name)
		alts = append(alts, json.RawMessage(fmt.Sprintf(`{"type":"object","properties":{"name":{"const":%s},"arguments":%s},"required":["name","arguments"]}`, name, params)))
	}
	switch len(alts) {
	case 0:
		return "tool_choice", fmt.Errorf("tool_choice names %q, which is not among the tools", named)
	case 1:
		sh.schema = string(alts[0])
	default:
		any, _ := json.Marshal(map[string]any{"anyOf": alts})
		sh.schema = string(any)
	}
	return "", nil
}

// toolsPrompt is the system message that tells the model its tools and
// the one shape of a call.
func toolsPrompt(tools []tool) string {
	var b strings.Builder
	b.WriteString("You can call functions. To call one, answer with only a JSON object {\"name\": <function name>, \"arguments\": <arguments object>}. Functions:")
	for _, t := range tools {
		line, _ := json.Marshal(t)
		b.WriteString("\n")
		b.Write(line)
	}
	return b.String()
}

// toolCallJSON is a call as a request's assistant message carries it.
type toolCallJSON struct {
	ID       string `json:"id"`
	Type     string `json:"type"`
	Function struct {
		Name      string `json:"name"`
		Arguments string `json:"arguments"`
	} `json:"function"`
}

// callsText renders an assistant message's earlier tool calls as the text
// the model would have written for them.
func callsText(calls []toolCallJSON) string {
	var b strings.Builder
	for i, c := range calls {
		if i > 0 {
			b.WriteString("\n")
		}
		args := json.RawMessage(c.Function.Arguments)
		if !json.Valid(args) {
			args, _ = json.Marshal(c.Function.Arguments)
		}
		line, _ := json.Marshal(map[string]any{"name": c.Function.Name, "arguments": args})
		b.Write(line)
	}
	return b.String()
}

// toolHead matches the start of a call in the model's text, up to its
// arguments (the grammar puts name first).
var toolHead = regexp.MustCompile(`^\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*`)

// toolStream turns the model's text into a tool call as it streams: the
// call's name once its head is complete, then its arguments as they come,
// holding back the closing braces and white space that may be the
// call's own end.
type toolStream struct {
	buf      strings.Builder
	name     string
	started  bool
	argsFrom int // where the arguments start in buf
	sent     int // bytes of arguments handed out
}

// feed adds text and returns the arguments text that is now certain; when
// final, the rest of the arguments, without the call's closing brace.
func (ts *toolStream) feed(text string, final bool) string {
	ts.buf.WriteString(text)
	all := ts.buf.String()
	if !ts.started {
		m := toolHead.FindStringSubmatchIndex(all)
		if m == nil {
			return ""
		}
		if err := json.Unmarshal([]byte(all[m[2]:m[3]]), &ts.name); err != nil {
			return ""
		}
		ts.started, ts.argsFrom = true, m[1]
	}
	args := all[ts.argsFrom:]
	if lead := len(args) - len(strings.TrimLeft(args, " \t\r\n")); ts.sent == 0 && lead > 0 {
		ts.argsFrom += lead // white space before the arguments is the call's, not theirs
		args = args[lead:]
	}
	end := len(args)
	if final {
		end = len(strings.TrimRight(args, " \t\r\n"))
		if end > 0 && args[end-1] == '}' {
			end = len(strings.TrimRight(args[:end-1], " \t\r\n"))
		}
	} else {
		end = len(strings.TrimRight(args, "} \t\r\n"))
	}
	if end <= ts.sent {
		return ""
	}
	out := args[ts.sent:end]
	ts.sent = end
	return out
}

// text is everything fed so far.
func (ts *toolStream) text() string { return ts.buf.String() }

// call returns the call's name and arguments when the whole text is one
// call to a known tool, with arguments that are a JSON object.
func parseCall(text string, tools []tool) (name, args string, ok bool) {
	var c struct {
		Name      string          `json:"name"`
		Arguments json.RawMessage `json:"arguments"`
	}
	dec := json.NewDecoder(strings.NewReader(text))
	if err := dec.Decode(&c); err != nil || dec.More() {
		return "", "", false
	}
	if a := bytes.TrimSpace(c.Arguments); len(a) == 0 || a[0] != '{' {
		return "", "", false
	}
	for _, t := range tools {
		if t.Name == c.Name {
			return c.Name, string(c.Arguments), true
		}
	}
	return "", "", false
}

// tokenText is a token's text for logprobs: its piece, valid UTF-8, and
// its bytes (a piece may be part of a character).
func (r *Router) tokenText(tok uint32, first bool) (string, []int) {
	piece := r.cfg.Vocab.Piece(tok, first)
	b := make([]int, len(piece))
	for i := 0; i < len(piece); i++ {
		b[i] = int(piece[i])
	}
	if !utf8.ValidString(piece) {
		piece = strings.ToValidUTF8(piece, "\uFFFD")
	}
	return piece, b
}

// logprobsJSON renders a chunk's logprobs in the API's shape: chat's
// {content: [{token, logprob, bytes, top_logprobs}]}, or completions'
// {tokens, token_logprobs, top_logprobs, text_offset}. at is the count of
// tokens generated before the chunk, offset the completion text's bytes.
func (r *Router) logprobsJSON(chat bool, lps []*kvferryv1.TokenLogprob, at int, offset *int) map[string]any {
	if chat {
		content := make([]map[string]any, 0, len(lps))
		for i, lp := range lps {
			tok, b := r.tokenText(lp.GetToken(), at+i == 0)
			top := make([]map[string]any, 0, len(lp.GetTop()))
			for _, t := range lp.GetTop() {
				tt, tb := r.tokenText(t.GetToken(), at+i == 0)
				top = append(top, map[string]any{"token": tt, "logprob": t.GetLogprob(), "bytes": tb})
			}
			content = append(content, map[string]any{"token": tok, "logprob": lp.GetLogprob(), "bytes": b, "top_logprobs": top})
		}
		return map[string]any{"content": content, "refusal": nil}
	}
	tokens, values, offsets := make([]string, 0, len(lps)), make([]float32, 0, len(lps)), make([]int, 0, len(lps))
	var tops []map[string]float32
	for i, lp := range lps {
		tok, b := r.tokenText(lp.GetToken(), at+i == 0)
		tokens, values, offsets = append(tokens, tok), append(values, lp.GetLogprob()), append(offsets, *offset)
		*offset += len(b)
		top := map[string]float32{}
		for _, t := range lp.GetTop() {
			tt, _ := r.tokenText(t.GetToken(), at+i == 0)
			if _, dup := top[tt]; !dup {
				top[tt] = t.GetLogprob()
			}
		}
		tops = append(tops, top)
	}
	return map[string]any{"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
}

// toolCall is a call in a response.
func toolCall(id, name, args string) map[string]any {
	return map[string]any{"id": id, "type": "function", "function": map[string]any{"name": name, "arguments": args}}
}

// chatStream shapes a streamed response's choices: text deltas, or — when
// tools may be called — a call's name then its arguments as deltas.
// Required calls stream as they come; in auto mode a reply that starts
// with "{" is held to its end and then sent as a call if it is one.
type chatStream struct {
	index       int // the choice
	chat, calls bool
	mode        string
	tools       []tool
	callID      string
	first       bool

	held    strings.Builder // auto mode: text not sent yet
	decided bool            // auto mode: text or a possible call
	maybe   bool            // auto mode: it started with "{"
	ts      toolStream
	header  bool // the call's name was sent
}

// choice returns the choice of one chunk, or nil when nothing can be sent
// yet.
func (cs *chatStream) choice(text string, finish executor.FinishReason, final bool) map[string]any {
	c := map[string]any{"index": cs.index, "finish_reason": finishJSON(finish), "logprobs": nil}
	if !cs.chat {
		c["text"] = text
		return c
	}
	delta := map[string]any{}
	if cs.first {
		delta["role"] = "assistant"
	}
	content, calls := cs.split(text, final)
	if content != "" || cs.first && calls == nil {
		delta["content"] = content
	}
	if calls != nil {
		delta["tool_calls"] = calls
	}
	if cs.header && finish == executor.FinishStop {
		c["finish_reason"] = "tool_calls"
	}
	if len(delta) == 0 && !final {
		return nil
	}
	cs.first = false
	c["delta"] = delta
	return c
}

// split divides a chunk's text into content and call deltas.
func (cs *chatStream) split(text string, final bool) (string, []any) {
	if !cs.calls {
		return text, nil
	}
	if cs.mode == toolsAuto && !cs.decided {
		cs.held.WriteString(text)
		t := strings.TrimLeft(cs.held.String(), " \t\r\n")
		if t == "" && !final {
			return "", nil
		}
		cs.decided, cs.maybe = true, strings.HasPrefix(t, "{")
		text = cs.held.String()
		if !cs.maybe {
			return text, nil
		}
		cs.held.Reset()
	}
	if cs.mode == toolsAuto {
		if !cs.maybe {
			return text, nil
		}
		cs.ts.buf.WriteString(text)
		if !final {
			return "", nil
		}
		all := cs.ts.text()
		name, args, ok := parseCall(all, cs.tools)
		if !ok {
			return all, nil
		}
		cs.header = true
		return "", []any{map[string]any{"index": 0, "id": cs.callID, "type": "function", "function": map[string]any{"name": name, "arguments": args}}}
	}
	args := cs.ts.feed(text, final)
	var out []any
	switch {
	case cs.ts.started && !cs.header:
		cs.header = true
		out = append(out, map[string]any{"index": 0, "id": cs.callID, "type": "function", "function": map[string]any{"name": cs.ts.name, "arguments": args}})
	case args != "":
		out = append(out, map[string]any{"index": 0, "function": map[string]any{"arguments": args}})
	}
	if final && !cs.ts.started {
		return cs.ts.text(), out // never became a call (cut by max_tokens): the text as it is
	}
	return "", out
}
