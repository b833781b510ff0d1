package grammar

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
)

// MaxSchemaBytes bounds a schema's text.
const MaxSchemaBytes = 64 << 10

// maxBoundedItems bounds minItems and maxItems: each item up to the bound
// is its own rule.
const maxBoundedItems = 64

// maxWhiteSpace is the most white space bytes allowed between JSON tokens:
// enough for a newline and an indent, not so many that a model can spend
// its tokens on blanks (a known way constrained JSON loops).
const maxWhiteSpace = 4

// ignored are JSON Schema keywords that annotate and never constrain.
var ignored = map[string]bool{
	"title": true, "description": true, "default": true, "examples": true, "$schema": true, "$id": true,
	"$comment": true, "deprecated": true, "readOnly": true, "writeOnly": true, "format": true,
	"$defs": true, "definitions": true, "strict": true,
}

// understood are the keywords Schema compiles.
var understood = map[string]bool{
	"type": true, "properties": true, "required": true, "additionalProperties": true, "items": true,
	"minItems": true, "maxItems": true, "enum": true, "const": true, "anyOf": true, "oneOf": true,
	"allOf": true, "$ref": true,
}

// JSONObject is the schema of response_format json_object: any object.
const JSONObject = `{"type":"object"}`

// Schema compiles a JSON Schema into the grammar of the JSON texts that
// satisfy it, with no white space before or after the value. Supported:
// type (one or a list), properties in their order (required ones always,
// others optional; additional properties only when the schema lists no
// properties), items, minItems/maxItems up to 64, enum, const, anyOf,
// oneOf (as anyOf), allOf of one schema, local $ref (#, #/$defs/…,
// #/definitions/…) including recursion. Annotations (title, description,
// format, …) are ignored; any other keyword (pattern, minimum, …) is an
// error naming it, never silently dropped.
func Schema(text []byte) (*Grammar, error) {
	if len(text) > MaxSchemaBytes {
		return nil, fmt.Errorf("schema is %d bytes, the limit is %d", len(text), MaxSchemaBytes)
	}
	var root any
	if err := json.Unmarshal(text, &root); err != nil {
		return nil, fmt.Errorf("schema is not JSON: %w", err)
	}
	c := &compiler{b: &builder{}, root: text, refs: map[string]int32{}}
	c.common()
	r, err := c.node(text, "#")
	if err != nil {
		return nil, err
	}
	return c.b.build(r)
}

type compiler struct {
	b    *builder
	root json.RawMessage
	refs map[string]int32 // $ref → its rule, defined once
	// Shared rules.
	ws, value, object, array, str, number, integer, boolean, null int32
}

// common defines the rules every JSON grammar uses.
func (c *compiler) common() {
	b := c.b
	wsChar := oneOf(" \t\n\r")
	// ws: up to maxWhiteSpace bytes, as a chain of optional ones.
	c.ws = b.newRule()
	prev := c.ws
	for range maxWhiteSpace {
		next := b.newRule()
		_ = b.define(prev, seq(), seq(wsChar, ref(next)))
		prev = next
	}
	_ = b.define(prev, seq())

	hex := func() item { return oneOf("0123456789abcdefABCDEF") }
	esc, _ := b.rule(seq(oneOf(`"\/bfnrt`)), seq("u", hex(), hex(), hex(), hex()))
	char, _ := b.rule(seq(except(`"\`)), seq(`\`, ref(esc)))
	chars := b.newRule()
	_ = b.define(chars, seq(), seq(ref(char), ref(chars)))
	c.str, _ = b.rule(seq(`"`, ref(chars), `"`))

	digits := b.newRule()
	_ = b.define(digits, seq(), seq(span('0', '9'), ref(digits)))
	intPart, _ := b.rule(seq("0"), seq(span('1', '9'), ref(digits)))
	sign, _ := b.rule(seq(), seq("-"))
	c.integer, _ = b.rule(seq(ref(sign), ref(intPart)))
	frac, _ := b.rule(seq(), seq(".", span('0', '9'), ref(digits)))
	expSign, _ := b.rule(seq(), seq(oneOf("+-")))
	exp, _ := b.rule(seq(), seq(oneOf("eE"), ref(expSign), span('0', '9'), ref(digits)))
	c.number, _ = b.rule(seq(ref(c.integer), ref(frac), ref(exp)))
	c.boolean, _ = b.rule(seq("true"), seq("false"))
	c.null, _ = b.rule(seq("null"))

	c.value = b.newRule()
	c.object = c.genericObject(c.value)
	c.array = c.arrayOf(c.value)
	_ = b.define(c.value, seq(ref(c.object)), seq(ref(c.array)), seq(ref(c.str)), seq(ref(c.number)), seq(ref(c.boolean)), seq(ref(c.null)))
}

// genericObject is an object with any keys whose values match val.
func (c *compiler) genericObject(val int32) int32 {
	b := c.b
	member, _ := b.rule(seq(ref(c.str), ref(c.ws), ":", ref(c.ws), ref(val)))
	more := b.newRule()
	_ = b.define(more, seq(), seq(ref(c.ws), ",", ref(c.ws), ref(member), ref(more)))
	r, _ := b.rule(seq("{", ref(c.ws), "}"), seq("{", ref(c.ws), ref(member), ref(more), ref(c.ws), "}"))
	return r
}

// arrayOf is an array of any length whose items match val.
func (c *compiler) arrayOf(val int32) int32 {
	b := c.b
	more := b.newRule()
	_ = b.define(more, seq(), seq(ref(c.ws), ",", ref(c.ws), ref(val), ref(more)))
	r, _ := b.rule(seq("[", ref(c.ws), "]"), seq("[", ref(c.ws), ref(val), ref(more), ref(c.ws), "]"))
	return r
}

// node compiles one schema and returns its rule.
func (c *compiler) node(raw json.RawMessage, path string) (int32, error) {
	raw = bytes.TrimSpace(raw)
	switch string(raw) {
	case "true":
		return c.value, nil
	case "false":
		return 0, fmt.Errorf("%s: the schema false matches nothing", path)
	}
	keys, obj, err := orderedObject(raw)
	if err != nil {
		return 0, fmt.Errorf("%s: a schema must be an object or a boolean", path)
	}
	for _, k := range keys {
		if !ignored[k] && !understood[k] {
			return 0, fmt.Errorf("%s: keyword %q is not supported", path, k)
		}
	}
	if r, ok := obj["$ref"]; ok {
		if len(keys) > 1 && slices.ContainsFunc(keys, func(k string) bool { return understood[k] && k != "$ref" }) {
			return 0, fmt.Errorf("%s: $ref beside other constraints is not supported", path)
		}
		var target string
		if err := json.Unmarshal(r, &target); err != nil {
			return 0, fmt.Errorf("%s: $ref must be a string", path)
		}
		return c.ref(target, path)
	}
	if r, ok := obj["const"]; ok {
		return c.literals(path, []json.RawMessage{r})
	}
	if r, ok := obj["enum"]; ok {
		var vals []json.RawMessage
		if err := json.Unmarshal(r, &vals); err != nil || len(vals) == 0 {
			return 0, fmt.Errorf("%s: enum must be a non-empty array", path)
		}
		return c.literals(path, vals)
	}
	for _, k := range []string{"anyOf", "oneOf", "allOf"} {
		r, ok := obj[k]
		if !ok {
			continue
		}
		var subs []json.RawMessage
		if err := json.Unmarshal(r, &subs); err != nil || len(subs) == 0 {
			return 0, fmt.Errorf("%s: %s must be a non-empty array", path, k)
		}
		if k == "allOf" && len(subs) != 1 {
			return 0, fmt.Errorf("%s: allOf of more than one schema is not supported", path)
		}
		rule := c.b.newRule()
		for i, s := range subs {
			sr, err := c.node(s, fmt.Sprintf("%s/%s/%d", path, k, i))
			if err != nil {
				return 0, err
			}
			if err := c.b.define(rule, seq(ref(sr))); err != nil {
				return 0, err
			}
		}
		return rule, nil
	}
	types, err := typesOf(obj, path)
	if err != nil {
		return 0, err
	}
	rule := c.b.newRule()
	for _, t := range types {
		var tr int32
		switch t {
		case "string":
			tr = c.str
		case "number":
			tr = c.number
		case "integer":
			tr = c.integer
		case "boolean":
			tr = c.boolean
		case "null":
			tr = c.null
		case "object":
			tr, err = c.objectNode(obj, path)
		case "array":
			tr, err = c.arrayNode(obj, path)
		default:
			return 0, fmt.Errorf("%s: type %q is not a JSON Schema type", path, t)
		}
		if err != nil {
			return 0, err
		}
		if err := c.b.define(rule, seq(ref(tr))); err != nil {
			return 0, err
		}
	}
	return rule, nil
}

// typesOf reads "type"; without it the keywords present imply it (any
// value when none do).
func typesOf(obj map[string]json.RawMessage, path string) ([]string, error) {
	raw, ok := obj["type"]
	if !ok {
		switch {
		case obj["properties"] != nil || obj["additionalProperties"] != nil || obj["required"] != nil:
			return []string{"object"}, nil
		case obj["items"] != nil || obj["minItems"] != nil || obj["maxItems"] != nil:
			return []string{"array"}, nil
		}
		return []string{"object", "array", "string", "number", "boolean", "null"}, nil
	}
	var one string
	if err := json.Unmarshal(raw, &one); err == nil {
		return []string{one}, nil
	}
	var many []string
	if err := json.Unmarshal(raw, &many); err != nil || len(many) == 0 {
		return nil, fmt.Errorf("%s: type must be a string or a non-empty array of strings", path)
	}
	return many, nil
}

func (c *compiler) objectNode(obj map[string]json.RawMessage, path string) (int32, error) {
	props, propSchemas, err := orderedObject(obj["properties"])
	if obj["properties"] == nil {
		props, propSchemas, err = nil, nil, nil
	}
	if err != nil {
		return 0, fmt.Errorf("%s: properties must be an object", path)
	}
	var required []string
	if r, ok := obj["required"]; ok {
		if err := json.Unmarshal(r, &required); err != nil {
			return 0, fmt.Errorf("%s: required must be an array of strings", path)
		}
		for _, name := range required {
			if !slices.Contains(props, name) {
				return 0, fmt.Errorf("%s: required property %q is not in properties", path, name)
			}
		}
	}
	if len(props) == 0 {
		// No properties: any keys, values per additionalProperties.
		val := c.value
		if ap, ok := obj["additionalProperties"]; ok {
			if string(bytes.TrimSpace(ap)) == "false" {
				return c.b.rule(seq("{", ref(c.ws), "}"))
			}
			if val, err = c.node(ap, path+"/additionalProperties"); err != nil {
				return 0, err
			}
		}
		return c.genericObject(val), nil
	}
	// Listed properties, in order; optional ones may be left out. tail[i]
	// is what may follow once properties before i are placed; after is
	// whether one was placed (then a comma comes first).
	n := len(props)
	members := make([]int32, n)
	for i, name := range props {
		key, _ := json.Marshal(name)
		vr, err := c.node(propSchemas[name], path+"/properties/"+name)
		if err != nil {
			return 0, err
		}
		if members[i], err = c.b.rule(seq(string(key), ref(c.ws), ":", ref(c.ws), ref(vr))); err != nil {
			return 0, err
		}
	}
	first, after := make([]int32, n+1), make([]int32, n+1)
	for i := range n + 1 {
		first[i], after[i] = c.b.newRule(), c.b.newRule()
	}
	if err := c.b.define(first[n], seq()); err != nil {
		return 0, err
	}
	if err := c.b.define(after[n], seq()); err != nil {
		return 0, err
	}
	for i := n - 1; i >= 0; i-- {
		must := slices.Contains(required, props[i])
		if err := c.b.define(first[i], seq(ref(members[i]), ref(after[i+1]))); err != nil {
			return 0, err
		}
		if err := c.b.define(after[i], seq(ref(c.ws), ",", ref(c.ws), ref(members[i]), ref(after[i+1]))); err != nil {
			return 0, err
		}
		if !must {
			if err := c.b.define(first[i], seq(ref(first[i+1]))); err != nil {
				return 0, err
			}
			if err := c.b.define(after[i], seq(ref(after[i+1]))); err != nil {
				return 0, err
			}
		}
	}
	return c.b.rule(seq("{", ref(c.ws), ref(first[0]), ref(c.ws), "}"))
}

func (c *compiler) arrayNode(obj map[string]json.RawMessage, path string) (int32, error) {
	each := c.value
	if raw, ok := obj["items"]; ok {
		var err error
		if each, err = c.node(raw, path+"/items"); err != nil {
			return 0, err
		}
	}
	lo, hi := 0, -1
	for k, dst := range map[string]*int{"minItems": &lo, "maxItems": &hi} {
		if raw, ok := obj[k]; ok {
			if err := json.Unmarshal(raw, dst); err != nil || *dst < 0 || *dst > maxBoundedItems {
				return 0, fmt.Errorf("%s: %s must be an integer from 0 to %d", path, k, maxBoundedItems)
			}
		}
	}
	if hi >= 0 && hi < lo {
		return 0, fmt.Errorf("%s: maxItems %d is below minItems %d", path, hi, lo)
	}
	if lo == 0 && hi < 0 {
		return c.arrayOf(each), nil
	}
	// rest[k]: what may follow the k-th item (1-based), a comma first.
	b := c.b
	sep := seq(ref(c.ws), ",", ref(c.ws), ref(each))
	var unbounded int32 = -1
	if hi < 0 {
		unbounded = b.newRule()
		if err := b.define(unbounded, seq(), append(slices.Clone(sep), ref(unbounded))); err != nil {
			return 0, err
		}
	}
	top := max(hi, lo)
	rest := make([]int32, top+1)
	for k := top; k >= 1; k-- {
		rest[k] = b.newRule()
		var alts [][]item
		if k >= lo { // enough items: the array may close here
			alts = append(alts, seq())
		}
		switch {
		case k < top:
			alts = append(alts, append(slices.Clone(sep), ref(rest[k+1])))
		case unbounded >= 0:
			alts = append(alts, seq(ref(unbounded)))
		}
		if err := b.define(rest[k], alts...); err != nil {
			return 0, err
		}
	}
	var alts [][]item
	if lo == 0 {
		alts = append(alts, seq("[", ref(c.ws), "]"))
	}
	if top >= 1 {
		alts = append(alts, seq("[", ref(c.ws), ref(each), ref(rest[1]), ref(c.ws), "]"))
	}
	return b.rule(alts...)
}

// literals matches exactly one of vals, each as its compact JSON text.
func (c *compiler) literals(path string, vals []json.RawMessage) (int32, error) {
	rule := c.b.newRule()
	for _, v := range vals {
		var buf bytes.Buffer
		if err := json.Compact(&buf, v); err != nil {
			return 0, fmt.Errorf("%s: %w", path, err)
		}
		if err := c.b.define(rule, lit(buf.String())); err != nil {
			return 0, err
		}
	}
	return rule, nil
}

// ref resolves a local reference; its rule is made once, before its
// schema compiles, so a recursive schema refers to itself.
func (c *compiler) ref(target, path string) (int32, error) {
	if r, ok := c.refs[target]; ok {
		return r, nil
	}
	if target != "#" && !strings.HasPrefix(target, "#/") {
		return 0, fmt.Errorf("%s: only local references (#/...) are supported, got %q", path, target)
	}
	raw := c.root
	if target != "#" {
		for _, part := range strings.Split(strings.TrimPrefix(target, "#/"), "/") {
			part = strings.ReplaceAll(strings.ReplaceAll(part, "~1", "/"), "~0", "~")
			var obj map[string]json.RawMessage
			if err := json.Unmarshal(raw, &obj); err != nil || obj[part] == nil {
				return 0, fmt.Errorf("%s: reference %q does not resolve", path, target)
			}
			raw = obj[part]
		}
	}
	rule := c.b.newRule()
	c.refs[target] = rule
	sr, err := c.node(raw, target)
	if err != nil {
		return 0, err
	}
	return rule, c.b.define(rule, seq(ref(sr)))
}

// orderedObject decodes a JSON object keeping its keys' order.
func orderedObject(raw json.RawMessage) ([]string, map[string]json.RawMessage, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	tok, err := dec.Token()
	if err != nil || tok != json.Delim('{') {
		return nil, nil, errors.New("not an object")
	}
	var keys []string
	vals := map[string]json.RawMessage{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, nil, err
		}
		key, _ := tok.(string)
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return nil, nil, err
		}
		if _, dup := vals[key]; !dup {
			keys = append(keys, key)
		}
		vals[key] = v
	}
	return keys, vals, nil
}
