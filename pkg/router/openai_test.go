package router

import (
	"encoding/json"
	"testing"

	"github.com/kvferry/kvferry/pkg/executor"
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
	got := RenderChat([]ChatMessage{{"system", "be brief"}, {"user", "the river"}})
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
