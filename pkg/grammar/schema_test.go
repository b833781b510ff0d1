package grammar

import (
	"errors"
	"fmt"
	"strings"
	"testing"
)

// whole reports whether text is a whole sentence of g.
func whole(g *Grammar, text string) bool {
	m := NewMatcher(g)
	return m.Accept(text) && m.CanEnd()
}

// Schemas as clients send them: OpenAI's structured-output examples,
// a Pydantic model's export ($defs, anyOf with null, titles), a recursive
// one, and the tool-call shape the router builds.
var schemaCases = []struct {
	name, schema string
	ok, bad      []string
}{
	{
		name:   "json_object",
		schema: JSONObject,
		ok:     []string{`{}`, `{"a":1}`, `{ "a" : [1, 2.5e-3, "x\"y", true, null, {"b":{}}] }`, "{\n  \"k\": \"\\u00e9\"\n}"},
		bad:    []string{`[]`, `{"a":}`, `{"a":1,}`, `{a:1}`, `"x"`, `{"a":01}`, `{}{}`, `{"a":"` + "\x01" + `"}`, ` {}`},
	},
	{
		name: "openai math reasoning",
		schema: `{"type":"object","properties":{"steps":{"type":"array","items":{"type":"object",
			"properties":{"explanation":{"type":"string"},"output":{"type":"string"}},
			"required":["explanation","output"],"additionalProperties":false}},
			"final_answer":{"type":"string"}},"required":["steps","final_answer"],"additionalProperties":false}`,
		ok: []string{`{"steps":[],"final_answer":"x"}`, `{"steps":[{"explanation":"a","output":"b"}], "final_answer":"42"}`},
		bad: []string{`{"final_answer":"x","steps":[]}`, `{"steps":[]}`, `{"steps":[{"output":"b","explanation":"a"}],"final_answer":"x"}`,
			`{"steps":[],"final_answer":"x","extra":1}`, `{"steps":[],"final_answer":1}`},
	},
	{
		name: "pydantic",
		schema: `{"$defs":{"Pet":{"properties":{"kind":{"enum":["cat","dog"],"title":"Kind","type":"string"},
			"age":{"anyOf":[{"type":"integer"},{"type":"null"}],"default":null,"title":"Age"}},
			"required":["kind"],"title":"Pet","type":"object"}},
			"properties":{"name":{"title":"Name","type":"string","format":"email"},"pets":{"items":{"$ref":"#/$defs/Pet"},"title":"Pets","type":"array","maxItems":2}},
			"required":["name","pets"],"title":"Owner","type":"object"}`,
		ok: []string{`{"name":"a","pets":[]}`, `{"name":"a","pets":[{"kind":"cat"},{"kind":"dog","age":null}]}`, `{"name":"a","pets":[{"kind":"dog","age":-3}]}`},
		bad: []string{`{"name":"a","pets":[{"kind":"cow"}]}`, `{"name":"a","pets":[{"kind":"cat"},{"kind":"cat"},{"kind":"cat"}]}`,
			`{"name":"a","pets":[{"age":1}]}`, `{"name":"a","pets":[{"kind":"cat","age":1.5}]}`},
	},
	{
		name:   "recursive",
		schema: `{"type":"object","properties":{"value":{"type":"integer"},"children":{"type":"array","items":{"$ref":"#"}}},"required":["value"]}`,
		ok:     []string{`{"value":1}`, `{"value":1,"children":[{"value":2,"children":[{"value":3}]}]}`},
		bad:    []string{`{"value":1,"children":[{"children":[]}]}`},
	},
	{
		name: "tool call",
		schema: `{"anyOf":[{"type":"object","properties":{"name":{"const":"get_weather"},"arguments":{"type":"object","properties":{"city":{"type":"string"},"unit":{"enum":["c","f"]}},"required":["city"]}},"required":["name","arguments"]},
			{"type":"object","properties":{"name":{"const":"noop"},"arguments":{"type":"object"}},"required":["name","arguments"]}]}`,
		ok:  []string{`{"name":"get_weather","arguments":{"city":"Oslo"}}`, `{"name":"get_weather","arguments":{"city":"Oslo","unit":"c"}}`, `{"name":"noop","arguments":{"x":[1]}}`},
		bad: []string{`{"name":"other","arguments":{}}`, `{"name":"get_weather","arguments":{"unit":"c"}}`, `{"arguments":{},"name":"noop"}`},
	},
	{
		name:   "bounded array and type list",
		schema: `{"type":"array","items":{"type":["string","null"]},"minItems":1,"maxItems":3}`,
		ok:     []string{`["a"]`, `[null,"b",null]`},
		bad:    []string{`[]`, `["a","b","c","d"]`, `[1]`},
	},
}

func TestSchema(t *testing.T) {
	for _, tc := range schemaCases {
		t.Run(tc.name, func(t *testing.T) {
			g, err := Schema([]byte(tc.schema))
			if err != nil {
				t.Fatalf("Schema: %v", err)
			}
			for _, s := range tc.ok {
				if !whole(g, s) {
					t.Errorf("refused %s", s)
				}
			}
			for _, s := range tc.bad {
				if whole(g, s) {
					t.Errorf("accepted %s", s)
				}
			}
		})
	}
}

func TestSchemaErrors(t *testing.T) {
	for _, tc := range []struct{ schema, want string }{
		{`{"type":"string","pattern":"^a"}`, `keyword "pattern" is not supported`},
		{`{"type":"integer","minimum":0}`, `keyword "minimum" is not supported`},
		{`{"type":"objekt"}`, `type "objekt"`},
		{`{"$ref":"http://x/y"}`, "only local references"},
		{`{"$ref":"#/$defs/missing"}`, "does not resolve"},
		{`{"type":"object","properties":{"a":{}},"required":["b"]}`, `required property "b"`},
		{`false`, "matches nothing"},
		{`[1]`, "must be an object or a boolean"},
		{`{"type":"array","maxItems":100000}`, "maxItems must be an integer from 0 to 64"},
		{`{`, "not JSON"},
		{strings.Repeat(" ", MaxSchemaBytes+1), "the limit is"},
	} {
		if _, err := Schema([]byte(tc.schema)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Schema(%.40s) = %v, want an error with %q", tc.schema, err, tc.want)
		}
	}
}

// A self-referencing schema compiles (the reference is a rule) and a
// left-recursive one refuses text instead of looping.
func TestSelfReference(t *testing.T) {
	g, err := Schema([]byte(`{"$ref":"#"}`))
	if err != nil {
		t.Fatalf("Schema: %v", err)
	}
	if whole(g, `{}`) {
		t.Fatal("a schema that is only itself accepted text")
	}
}

// A huge schema is refused by size, not compiled at any cost.
func TestSchemaTooLarge(t *testing.T) {
	var b strings.Builder
	b.WriteString(`{"type":"object","properties":{`)
	for i := range 1500 {
		if i > 0 {
			b.WriteString(",")
		}
		fmt.Fprintf(&b, `"p%d":{"type":"array","maxItems":8}`, i)
	}
	b.WriteString(`}}`)
	if _, err := Schema([]byte(b.String())); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("a schema of 1,500 bounded arrays: %v, want ErrTooLarge", err)
	}
}

func TestMatcher(t *testing.T) {
	g, err := Schema([]byte(`{"type":"object","properties":{"n":{"type":"integer"}},"required":["n"]}`))
	if err != nil {
		t.Fatal(err)
	}
	m := NewMatcher(g)
	if m.Allows("") || !m.Allows(`{"n"`) || m.Allows(`{"m"`) || m.CanEnd() {
		t.Fatal("start state wrong")
	}
	if m.Accept(`{"x`) {
		t.Fatal("accepted a wrong key")
	}
	if !m.Accept(`{"n":12`) || m.CanEnd() || !m.Allows("3") || !m.Allows("}") {
		t.Fatal("refusal moved the matcher, or digits/close not allowed mid-number")
	}
	if !m.Accept("}") || !m.CanEnd() || !m.MustEnd() || m.Allows(" ") {
		t.Fatal("a closed object must end")
	}
}
