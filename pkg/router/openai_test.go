package router

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/pkg/metrics"
	"github.com/kvferry/kvferry/pkg/router/discovery"
	"github.com/kvferry/kvferry/pkg/ticket"
)

func TestPromptText(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want string
		ok   bool
	}{
		{`"the river"`, "the river", true},
		{`["the river"]`, "the river", true},
		{`["a","b"]`, "", false},
		{`[1,2]`, "", false},
		{`{}`, "", false},
	} {
		got, err := promptText(json.RawMessage(tc.in))
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("promptText(%s) = %q, %v", tc.in, got, err)
		}
	}
}

func TestMessageText(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want string
		ok   bool
	}{
		{`"hi"`, "hi", true},
		{`[{"type":"text","text":"a "},{"type":"text","text":"b"}]`, "a b", true},
		{`[{"type":"image_url","image_url":{}}]`, "", false},
		{`5`, "", false},
	} {
		got, err := messageText(json.RawMessage(tc.in))
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("messageText(%s) = %q, %v", tc.in, got, err)
		}
	}
}

func TestRenderChat(t *testing.T) {
	got := RenderChat([]ChatMessage{{Role: "system", Content: "be brief"}, {Role: "user", Content: "the river"}})
	if want := "system: be brief\nuser: the river\nassistant:"; got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
}

func TestSampling(t *testing.T) {
	tiny, _ := executor.Preset("tiny")
	r := &Router{cfg: Config{Model: tiny, MaxOutputTokens: 100, DefaultMaxTokens: 16}}
	i := func(v int) *int { return &v }
	f := func(v float32) *float32 { return &v }
	for _, tc := range []struct {
		name  string
		body  completionRequest
		param string
		max   uint32
	}{
		{"default", completionRequest{}, "", 16},
		{"max_tokens", completionRequest{MaxTokens: i(5)}, "", 5},
		{"max_completion_tokens wins", completionRequest{MaxTokens: i(5), MaxCompletionTokens: i(7)}, "", 7},
		{"too many", completionRequest{MaxTokens: i(101)}, "max_tokens", 0},
		{"zero completion", completionRequest{MaxCompletionTokens: i(0)}, "max_completion_tokens", 0},
		{"temperature", completionRequest{Temperature: f(2.5)}, "temperature", 0},
		{"top_p", completionRequest{TopP: f(0)}, "top_p", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, param, err := r.sampling(tc.body)
			if tc.param != "" {
				if err == nil || param != tc.param {
					t.Fatalf("param %q err %v, want error on %q", param, err, tc.param)
				}
				return
			}
			if err != nil || s.GetMaxTokens() != tc.max {
				t.Fatalf("got %v %v, want max %d", s, err, tc.max)
			}
		})
	}
}

func fuzzRouter() *Router {
	tiny, _ := executor.Preset("tiny")
	r, _ := New(Config{CtxServers: discovery.Static{"127.0.0.1:1"}, GenServers: discovery.Static{"127.0.0.1:2"}, Model: tiny, ServedModel: "tiny",
		MaxBodyBytes: 1 << 16, MaxPromptTokens: 500, MaxOutputTokens: 64, DefaultMaxTokens: 16, Metrics: metrics.NewRouter(prometheus.NewRegistry())})
	return r
}

// fuzzParse: any body either parses into a job within the limits or is
// answered with a 4xx OpenAI error; nothing panics.
func fuzzParse(t *testing.T, r *Router, body []byte, chat bool) {
	req := httptest.NewRequest(http.MethodPost, "/v1/completions", bytes.NewReader(body))
	rec := httptest.NewRecorder()
	job, _, ok := r.parse(rec, req, chat)
	if !ok {
		if rec.Code < 400 || rec.Code >= 500 {
			t.Fatalf("rejected with status %d", rec.Code)
		}
		var e apiError
		if err := json.Unmarshal(rec.Body.Bytes(), &e); err != nil || e.Error.Message == "" {
			t.Fatalf("not an OpenAI error: %s", rec.Body)
		}
		return
	}
	if len(job.Prompt) == 0 || len(job.Prompt) > 500 || job.Sampling.GetMaxTokens() < 1 || job.Sampling.GetMaxTokens() > 64 || len(job.Stop) > maxStops {
		t.Fatalf("accepted a job outside the limits: %d tokens, max %d, %d stops", len(job.Prompt), job.Sampling.GetMaxTokens(), len(job.Stop))
	}
	if ticket.ValidateID(job.ID) != nil {
		t.Fatalf("bad request id %q", job.ID)
	}
}

func FuzzCompletionRequest(f *testing.F) {
	for _, s := range []string{
		`{"model":"tiny","prompt":"the river","max_tokens":5,"stop":["a","b"]}`,
		`{"model":"tiny","prompt":["x"],"n":2}`,
		`{"model":"tiny","prompt":"","temperature":9}`,
		`{`, `null`, `[]`,
	} {
		f.Add([]byte(s))
	}
	r := fuzzRouter()
	f.Fuzz(func(t *testing.T, body []byte) { fuzzParse(t, r, body, false) })
}

func FuzzChatRequest(f *testing.F) {
	for _, s := range []string{
		`{"model":"tiny","messages":[{"role":"user","content":"the river"}],"max_completion_tokens":3}`,
		`{"model":"tiny","messages":[{"role":"user","content":[{"type":"text","text":"a"}]}],"tools":[{}]}`,
		`{"model":"tiny","messages":[]}`,
	} {
		f.Add([]byte(s))
	}
	r := fuzzRouter()
	f.Fuzz(func(t *testing.T, body []byte) { fuzzParse(t, r, body, true) })
}

// A client's X-Request-Id never becomes a ticket: two requests that send
// the same one get different tickets, and the client's value is kept for
// correlation; a value that is not printable ASCII up to 128 bytes is
// ignored.
func TestRequestIDIsNotATicket(t *testing.T) {
	r := fuzzRouter()
	body := `{"model":"tiny","prompt":"the river","max_tokens":5}`
	parse := func(clientID string) Job {
		req := httptest.NewRequest(http.MethodPost, "/v1/completions", strings.NewReader(body))
		req.Header.Set("X-Request-Id", clientID)
		job, _, ok := r.parse(httptest.NewRecorder(), req, false)
		if !ok {
			t.Fatal("rejected")
		}
		return job
	}
	same := strings.Repeat("ab", 16) // a valid ticket id, as a client could send
	a, b := parse(same), parse(same)
	if a.ID == b.ID || a.ID == same || ticket.ValidateID(a.ID) != nil {
		t.Fatalf("tickets %q and %q for client id %q", a.ID, b.ID, same)
	}
	if a.ClientID != same || b.ClientID != same {
		t.Fatalf("client ids %q %q, want %q", a.ClientID, b.ClientID, same)
	}
	for _, bad := range []string{strings.Repeat("x", MaxClientIDBytes+1), "tab\there", "nul\x00"} {
		if got := parse(bad).ClientID; got != "" {
			t.Fatalf("client id %q accepted as %q", bad, got)
		}
	}
	if got := parse("order-17/retry 2").ClientID; got != "order-17/retry 2" {
		t.Fatalf("printable id not kept: %q", got)
	}
}
