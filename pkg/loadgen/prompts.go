package loadgen

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"
)

// Prompt is one request's input: the text and, when the prompt file gives
// one, its own output length.
type Prompt struct {
	Text      string
	MaxTokens int // 0: from the output distribution
}

// Prompts yields the prompts of a run.
type Prompts interface {
	Next(rng *rand.Rand) Prompt
}

// words are what synthetic prompts are made of: common English words, so
// that a real tokenizer sees about one token a word.
var words = strings.Fields("the quiet river carries light through the harbour at night while the ferry holds its steady path past stone bridges and old towers where windows glow and people walk home along the water")

// Synthetic makes prompts of a number of words drawn from a distribution,
// each word drawn at random, so that two prompts share a prefix only by
// chance (a serving stack's prefix cache does not flatter it) — after one
// of Prefixes, drawn at random, when there are any (system prompts, to
// measure the cache on purpose).
type Synthetic struct {
	Words    Dist
	Prefixes []string
}

// SharedPrefix returns n words drawn from rng: a prefix for Synthetic.
func SharedPrefix(rng *rand.Rand, n int) string {
	return randomWords(rng, n, "")
}

// Next returns a prefix, if any, and then a prompt of Words random words.
func (s Synthetic) Next(rng *rand.Rand) Prompt {
	prefix := ""
	if len(s.Prefixes) > 0 {
		prefix = s.Prefixes[rng.IntN(len(s.Prefixes))]
	}
	return Prompt{Text: randomWords(rng, s.Words.Sample(rng), prefix)}
}

func randomWords(rng *rand.Rand, n int, prefix string) string {
	var b strings.Builder
	b.WriteString(prefix)
	for range n {
		if b.Len() > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(words[rng.IntN(len(words))])
	}
	return b.String()
}

// List hands out prompts read from a file, at random.
type List []Prompt

// Next returns a random prompt of the list.
func (l List) Next(rng *rand.Rand) Prompt { return l[rng.IntN(len(l))] }

// ReadJSONL reads one prompt a line: {"prompt": "...", "max_tokens": N}
// (max_tokens optional). Blank lines are skipped; anything else is an
// error naming the line.
func ReadJSONL(r io.Reader) (List, error) {
	var out List
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		var v struct {
			Prompt    *string `json:"prompt"`
			MaxTokens int     `json:"max_tokens"`
		}
		dec := json.NewDecoder(strings.NewReader(line))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&v); err != nil {
			return nil, fmt.Errorf("prompts line %d: %w", n, err)
		}
		if v.Prompt == nil || *v.Prompt == "" || v.MaxTokens < 0 {
			return nil, fmt.Errorf("prompts line %d: want {\"prompt\": non-empty text, \"max_tokens\": N ≥ 1 (optional)}", n)
		}
		out = append(out, Prompt{Text: *v.Prompt, MaxTokens: v.MaxTokens})
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(out) == 0 {
		return nil, errors.New("prompts: the file has no prompt")
	}
	return out, nil
}
