// Package grammar constrains generated text to a language: a context-free
// grammar over bytes (rules of alternatives of byte classes and rule
// references, the shape of llama.cpp's GBNF) and a Matcher that follows
// the text so far as a set of pushdown stacks, as llama.cpp's grammar
// sampler does. It has no I/O and no engine in it: both engines mask the
// tokens whose bytes the Matcher refuses, and because a Matcher's state is
// a function of the accepted text alone, the generation server rebuilds
// the context server's state exactly by accepting the first token — the
// grammar state crosses the handoff as the tokens themselves.
//
// Schema compiles the common subset of JSON Schema into a Grammar
// (response_format json_schema and json_object, and tool calls).
package grammar

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
)

// Limits that bound a grammar's cost, so that a request's schema cannot
// make a server spend unbounded memory or time.
const (
	// MaxElements bounds a compiled grammar (about 16 bytes each).
	MaxElements = 1 << 16
	// maxStacks bounds the stacks a Matcher follows at once: JSON grammars
	// are nearly deterministic (a few stacks for optional white space and
	// properties); more means a pathological schema, and the text that
	// would need them is refused rather than followed at any cost.
	maxStacks = 1024
	// maxDepth bounds a stack's height (nesting) and an expansion's
	// recursion, so a left-recursive rule ends instead of looping.
	maxDepth = 512
)

// ErrTooLarge is returned for a grammar over MaxElements.
var ErrTooLarge = errors.New("grammar: too large")

type kind uint8

const (
	kindEnd   kind = iota // the end of an alternative
	kindChars             // one byte of a class
	kindRef               // a rule
)

// class is a set of bytes.
type class [4]uint64

func (c class) has(b byte) bool { return c[b>>6]&(1<<(b&63)) != 0 }
func (c *class) add(b byte)     { c[b>>6] |= 1 << (b & 63) }

type element struct {
	kind  kind
	rule  int32 // kindRef
	chars int32 // kindChars: index into Grammar.classes
}

// Grammar is a compiled grammar, immutable and safe to share.
type Grammar struct {
	elems   []element
	classes []class
	alts    [][]int32 // per rule, each alternative's first element
	root    int32
}

// item is one element of an alternative while a grammar is built.
type item struct {
	ref   int32 // a rule, when chars is nil
	chars *class
}

// builder assembles rules; rules refer to each other by id, so a rule can
// be referenced before it is defined (recursion).
type builder struct {
	rules [][][]item
	size  int
}

func (b *builder) newRule() int32 {
	b.rules = append(b.rules, nil)
	return int32(len(b.rules) - 1)
}

func (b *builder) define(r int32, alts ...[]item) error {
	for _, a := range alts {
		b.size += len(a) + 1
	}
	if b.size > MaxElements {
		return ErrTooLarge
	}
	b.rules[r] = append(b.rules[r], alts...)
	return nil
}

// rule defines a new rule of alts.
func (b *builder) rule(alts ...[]item) (int32, error) {
	r := b.newRule()
	return r, b.define(r, alts...)
}

func (b *builder) build(root int32) (*Grammar, error) {
	g := &Grammar{root: root, alts: make([][]int32, len(b.rules))}
	for r, alts := range b.rules {
		if len(alts) == 0 {
			return nil, fmt.Errorf("grammar: rule %d has no alternative", r)
		}
		for _, a := range alts {
			g.alts[r] = append(g.alts[r], int32(len(g.elems)))
			for _, it := range a {
				if it.chars != nil {
					g.classes = append(g.classes, *it.chars)
					g.elems = append(g.elems, element{kind: kindChars, chars: int32(len(g.classes) - 1)})
				} else {
					g.elems = append(g.elems, element{kind: kindRef, rule: it.ref})
				}
			}
			g.elems = append(g.elems, element{kind: kindEnd})
		}
	}
	return g, nil
}

// ref is an item that matches rule r.
func ref(r int32) item { return item{ref: r} }

// lit is the items that match s exactly.
func lit(s string) []item {
	out := make([]item, len(s))
	for i := 0; i < len(s); i++ {
		var c class
		c.add(s[i])
		out[i] = item{chars: &c}
	}
	return out
}

// oneOf is an item that matches one byte of set.
func oneOf(set string) item {
	var c class
	for i := 0; i < len(set); i++ {
		c.add(set[i])
	}
	return item{chars: &c}
}

// span is an item that matches one byte in [lo, hi].
func span(lo, hi byte) item {
	var c class
	for b := int(lo); b <= int(hi); b++ {
		c.add(byte(b))
	}
	return item{chars: &c}
}

// except is an item that matches one byte not in set and not below 0x20.
func except(set string) item {
	var c class
	for b := 0x20; b <= 0xff; b++ {
		if b >= 0x80 || strings.IndexByte(set, byte(b)) < 0 {
			c.add(byte(b))
		}
	}
	return item{chars: &c}
}

func seq(parts ...any) []item {
	var out []item
	for _, p := range parts {
		switch v := p.(type) {
		case item:
			out = append(out, v)
		case []item:
			out = append(out, v...)
		case string:
			out = append(out, lit(v)...)
		default:
			panic(fmt.Sprintf("grammar: seq of %T", p))
		}
	}
	return out
}

// stack is a pushdown stack of element positions, its top last: the top
// is the next element to match, those below are where each enclosing rule
// continues.
type stack []int32

// Matcher follows text through a grammar. The zero value is not usable;
// NewMatcher starts one. A Matcher is not safe for concurrent use.
type Matcher struct {
	g      *Grammar
	stacks []stack
	seen   map[string]struct{}
	// next is the bytes that may come next, computed once per state:
	// masking a vocabulary asks it once per token.
	next      class
	nextValid bool
}

// NewMatcher returns a matcher at the start of g's language.
func NewMatcher(g *Grammar) *Matcher {
	m := &Matcher{g: g, seen: map[string]struct{}{}}
	for _, a := range g.alts[g.root] {
		m.stacks = m.expand(m.stacks, stack{a}, 0)
	}
	m.stacks = m.dedupe(m.stacks)
	return m
}

// expand adds to out every stack that s reaches without consuming a byte:
// ones whose top is a byte class, and the empty stack (the text may end).
func (m *Matcher) expand(out []stack, s stack, depth int) []stack {
	if depth > maxDepth || len(s) > maxDepth {
		return out // a left-recursive or too deep path: dropped
	}
	if len(s) == 0 {
		return append(out, s)
	}
	top := s[len(s)-1]
	switch e := m.g.elems[top]; e.kind {
	case kindEnd:
		return m.expand(out, s[:len(s)-1], depth+1)
	case kindChars:
		return append(out, s)
	default: // kindRef: continue after it, then into each alternative
		base := make(stack, len(s)-1, len(s)+1)
		copy(base, s[:len(s)-1])
		if m.g.elems[top+1].kind != kindEnd {
			base = append(base, top+1) // a reference last in its alternative leaves nothing to continue: right recursion does not grow the stack
		}
		for _, a := range m.g.alts[e.rule] {
			next := make(stack, len(base), len(base)+1)
			copy(next, base)
			out = m.expand(out, append(next, a), depth+1)
		}
		return out
	}
}

// dedupe drops repeated stacks (alternatives that met again), in place.
func (m *Matcher) dedupe(stacks []stack) []stack {
	clear(m.seen)
	out := stacks[:0]
	var key []byte
	for _, s := range stacks {
		key = key[:0]
		for _, p := range s {
			key = binary.LittleEndian.AppendUint32(key, uint32(p))
		}
		if _, dup := m.seen[string(key)]; dup {
			continue
		}
		m.seen[string(key)] = struct{}{}
		out = append(out, s)
	}
	return out
}

// step returns the stacks after byte c, or nil when no stack takes it.
func (m *Matcher) step(stacks []stack, c byte) []stack {
	var out []stack
	for _, s := range stacks {
		if len(s) == 0 {
			continue
		}
		top := s[len(s)-1]
		e := m.g.elems[top]
		if e.kind != kindChars || !m.g.classes[e.chars].has(c) {
			continue
		}
		next := make(stack, len(s), len(s)+1)
		copy(next, s)
		next[len(next)-1] = top + 1
		out = m.expand(out, next, 0)
		if len(out) > maxStacks {
			return nil
		}
	}
	return out
}

// Accept advances the matcher over text and reports whether the grammar
// allows it; a refused text leaves the matcher as it was.
func (m *Matcher) Accept(text string) bool {
	stacks := m.stacks
	for i := 0; i < len(text); i++ {
		stacks = m.step(stacks, text[i])
		if len(stacks) == 0 {
			return false
		}
		stacks = m.dedupe(stacks)
	}
	m.stacks, m.nextValid = stacks, false
	return true
}

// Allows reports whether text may come next, without advancing.
func (m *Matcher) Allows(text string) bool {
	if text == "" {
		return false // a token that adds nothing could repeat forever
	}
	if !m.nextValid {
		m.next, m.nextValid = m.first(), true
	}
	if !m.next.has(text[0]) {
		return false
	}
	if len(text) == 1 {
		return true // a stack whose top takes the byte takes it
	}
	stacks := m.stacks
	for i := 0; i < len(text); i++ {
		stacks = m.step(stacks, text[i])
		if len(stacks) == 0 {
			return false
		}
		stacks = m.dedupe(stacks)
	}
	return true
}

// first is the set of bytes that may come next.
func (m *Matcher) first() class {
	var c class
	for _, s := range m.stacks {
		if len(s) == 0 {
			continue
		}
		if e := m.g.elems[s[len(s)-1]]; e.kind == kindChars {
			for i, w := range m.g.classes[e.chars] {
				c[i] |= w
			}
		}
	}
	return c
}

// CanEnd reports whether the text so far is a whole sentence of the
// language: an end-of-generation token is allowed now.
func (m *Matcher) CanEnd() bool {
	for _, s := range m.stacks {
		if len(s) == 0 {
			return true
		}
	}
	return false
}

// MustEnd reports whether nothing but the end may come next.
func (m *Matcher) MustEnd() bool {
	for _, s := range m.stacks {
		if len(s) != 0 {
			return false
		}
	}
	return true
}
