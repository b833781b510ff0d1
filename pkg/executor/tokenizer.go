package executor

import (
	"strings"
)

// Token ids: 0–255 are byte-fallback tokens, then a word separator, the end
// of sequence, then one id per vocabulary word.
const (
	TokenSeparator uint32 = 256
	TokenEOS       uint32 = 257
	firstWordToken uint32 = 258
)

// vocabulary is the synthetic model's word list; decode only ever emits these
// words (and EOS), so generated text reads as words.
var vocabulary = strings.Fields(`
the of and to in is was that for on with as by at from it be this are or an
which but not have has had were they their one all we can more about there
when will would what so if out up into time some other than then them only
new also its like over these first two may after any where most very through
long people way make made just many before must between well should each much
day work part world use great still little know back take being under never
good same last while might found year place three small large around every
cache block memory token server router context stream transfer model layer
head prompt batch decode prefill ferry river boat harbour light signal path
quiet steady bright swift gentle early late north south east west sea wind
stone tree field garden city road bridge tower window door table book letter
morning evening night summer winter spring autumn cloud rain snow fire water
red blue green golden silver white black open close begin end carry hold
`)

var wordIDs = func() map[string]uint32 {
	m := make(map[string]uint32, len(vocabulary))
	for i, w := range vocabulary {
		m[w] = firstWordToken + uint32(i)
	}
	return m
}()

// maxWordBytes is the longest vocabulary word.
var maxWordBytes = func() int {
	n := 0
	for _, w := range vocabulary {
		n = max(n, len(w))
	}
	return n
}()

// VocabSize is the number of token ids.
func VocabSize() int { return int(firstWordToken) + len(vocabulary) }

// Tokenize splits text on white space; a vocabulary word becomes one token,
// any other word becomes its bytes followed by a separator.
func Tokenize(text string) []uint32 {
	fields := strings.Fields(text)
	out := make([]uint32, 0, len(fields))
	for _, f := range fields {
		if id, ok := wordIDs[f]; ok {
			out = append(out, id)
			continue
		}
		for i := 0; i < len(f); i++ {
			out = append(out, uint32(f[i]))
		}
		out = append(out, TokenSeparator)
	}
	return out
}

// TokenText returns the text of one token as it is streamed after earlier
// tokens: a word is preceded by a space unless first is set. EOS has no text.
func TokenText(tok uint32, first bool) string {
	switch {
	case tok < 256:
		return string([]byte{byte(tok)})
	case tok == TokenSeparator:
		return " "
	case tok == TokenEOS:
		return ""
	}
	i := int(tok - firstWordToken)
	if i >= len(vocabulary) {
		return ""
	}
	if first {
		return vocabulary[i]
	}
	return " " + vocabulary[i]
}

// Detokenize renders generated synthetic tokens as text.
func Detokenize(tokens []uint32) string { return Text(SyntheticVocabulary, tokens) }
