package router

import (
	"encoding/json"
	"strings"
	"testing"
)

// A call streamed in any two pieces gives the name once and the same
// arguments as the whole text parsed at once.
func TestToolStreamSplits(t *testing.T) {
	tools := []tool{{Name: "get_weather"}}
	for _, text := range []string{
		`{"name":"get_weather","arguments":{"city":"Oslo"}}`,
		"{ \"name\" : \"get_weather\" ,\n \"arguments\" :  {\"city\":\"a}b\", \"n\":{\"x\":[1,2]}} \n}",
	} {
		name, args, ok := parseCall(text, tools)
		if !ok || name != "get_weather" {
			t.Fatalf("parseCall(%q) = %q %q %v", text, name, args, ok)
		}
		for cut := 0; cut <= len(text); cut++ {
			var ts toolStream
			got := ts.feed(text[:cut], false) + ts.feed(text[cut:], true)
			if ts.name != name || got != args {
				t.Fatalf("cut at %d: %q(%q), want %q(%q)", cut, ts.name, got, name, args)
			}
			if !json.Valid([]byte(got)) {
				t.Fatalf("cut at %d: arguments %q are not JSON", cut, got)
			}
		}
	}
	var ts toolStream
	if got := ts.feed(`"just text"`, true); got != "" || ts.started || ts.text() != `"just text"` {
		t.Fatalf("text that is no call: %q started=%v", got, ts.started)
	}
}

func TestParseCall(t *testing.T) {
	tools := []tool{{Name: "f"}}
	for text, want := range map[string]bool{
		`{"name":"f","arguments":{}}`:       true,
		`{"name":"g","arguments":{}}`:       false,
		`{"name":"f","arguments":"x"}`:      false,
		`{"name":"f","arguments":{}} extra`: false,
		`the river`:                         false,
	} {
		if _, _, ok := parseCall(text, tools); ok != want {
			t.Errorf("parseCall(%q) = %v, want %v", text, ok, want)
		}
	}
}

// The shapes' precise errors, and the schema a required call builds.
func TestShapeOf(t *testing.T) {
	for _, tc := range []struct {
		body       string
		chat       bool
		param, err string
	}{
		{`{"logprobs":6}`, false, "logprobs", "between 0 and 5"},
		{`{"top_logprobs":2}`, true, "top_logprobs", "needs logprobs"},
		{`{"logprobs":true,"top_logprobs":21}`, true, "top_logprobs", "between 0 and 20"},
		{`{"response_format":{"type":"yaml"}}`, true, "response_format.type", "not one of"},
		{`{"response_format":{"type":"json_schema"}}`, true, "response_format.json_schema.schema", "needs a schema"},
		{`{"tools":[{"type":"function","function":{"name":"f"}}]}`, false, "tools", "chat completions"},
		{`{"tools":[{"type":"function","function":{"name":"bad name"}}]}`, true, "tools[0]", "a tool must"},
		{`{"tool_choice":"required"}`, true, "tool_choice", "needs tools"},
		{`{"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{"a":{"minimum":1}}}}}],"tool_choice":"required"}`, true, "tools", "minimum"},
		{`{"tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"required","response_format":{"type":"json_object"}}`, true, "response_format", "cannot both"},
	} {
		var b completionRequest
		if err := json.Unmarshal([]byte(tc.body), &b); err != nil {
			t.Fatal(err)
		}
		_, param, err := b.shapeOf(tc.chat)
		if err == nil || param != tc.param || !strings.Contains(err.Error(), tc.err) {
			t.Errorf("%s: param %q err %v, want %q with %q", tc.body, param, err, tc.param, tc.err)
		}
	}
	var b completionRequest
	_ = json.Unmarshal([]byte(`{"tools":[{"type":"function","function":{"name":"f"}},{"type":"function","function":{"name":"g"}}],"tool_choice":{"type":"function","function":{"name":"g"}}}`), &b)
	sh, _, err := b.shapeOf(true)
	if err != nil || sh.mode != toolsNamed || !strings.Contains(sh.schema, `"const":"g"`) || strings.Contains(sh.schema, `"const":"f"`) {
		t.Fatalf("named call: %+v %v", sh, err)
	}
}
