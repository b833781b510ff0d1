package executor

import (
	"strings"
	"sync"
	"unicode/utf8"

	"github.com/hybridgroup/yzma/pkg/llama"
)

// Vocabulary turns text into a model's tokens and tokens into text.
type Vocabulary interface {
	// Encode tokenizes a prompt as the model expects it (special tokens
	// such as BOS added).
	Encode(text string) []uint32
	// Piece is the text of one generated token; first is set for the first
	// generated token. A piece may end inside a UTF-8 character: TextStream
	// holds such bytes until the character is complete.
	Piece(tok uint32, first bool) string
	// Size is the number of token ids.
	Size() int
	// IsEnd reports an end-of-generation token.
	IsEnd(tok uint32) bool
	// Chat renders chat messages into the prompt text, with the model's own
	// chat template where it has one.
	Chat(msgs []ChatMessage) string
	// MaxPieceBytes bounds the text one token covers, a run of white space
	// counted as one byte (MinTokens).
	MaxPieceBytes() int
}

// MinTokens is a lower bound on the tokens v.Encode(text) returns, found
// without tokenizing: every token covers at most v.MaxPieceBytes() bytes,
// a run of white space counted as one (the synthetic tokenizer drops
// white space; llama.cpp's pieces cover it, so the bound holds for both).
// The router refuses a prompt whose bound is over its token limit before
// it spends memory and time tokenizing it.
func MinTokens(v Vocabulary, text string) int {
	n, space := 0, false
	for i := 0; i < len(text); i++ {
		switch c := text[i]; c {
		case ' ', '\t', '\n', '\r', '\v', '\f':
			if !space {
				n++
			}
			space = true
		default:
			n++
			space = false
		}
	}
	return n / max(v.MaxPieceBytes(), 1)
}

// CanaryText is the pair canary's prompt, tokenized by each server's
// vocabulary (one full block of the synthetic presets: 16 tokens). The
// context server prefills it for TransferService.Canary; the generation
// server checks that the tokens it gets back are its own.
const CanaryText = "the ferry carries light across the quiet river at night while the harbour holds its steady signal"

// ChatMessage is a chat message as the prompt renders it.
type ChatMessage struct{ Role, Content string }

// RenderChat is kvferry's own chat rendering, for models without a
// template: one line per message, "<role>: <content>", then "assistant:"
// for the reply.
func RenderChat(msgs []ChatMessage) string {
	var b strings.Builder
	for _, m := range msgs {
		b.WriteString(m.Role)
		b.WriteString(": ")
		b.WriteString(m.Content)
		b.WriteString("\n")
	}
	b.WriteString("assistant:")
	return b.String()
}

// Text renders generated tokens as text: their pieces through a
// TextStream, as a generation server streams them (so invalid bytes read
// the same both ways).
func Text(v Vocabulary, tokens []uint32) string {
	var b strings.Builder
	var ts TextStream
	for i, t := range tokens {
		b.WriteString(ts.Push(v.Piece(t, i == 0)))
	}
	b.WriteString(ts.Flush())
	return b.String()
}

// TextStream turns token pieces into text that never splits a UTF-8
// character: bytes of an incomplete character at the end are held until a
// later piece completes them (or Flush gives them up).
type TextStream struct {
	held []byte
}

// Push appends a piece and returns the text that is complete now, always
// valid UTF-8: bytes that can never form a character (a model's byte
// tokens in an invalid order) become U+FFFD, as OpenAI's servers and
// llama-server render them — a protobuf string must be valid UTF-8, and
// a client's JSON parser expects it.
func (ts *TextStream) Push(piece string) string {
	ts.held = append(ts.held, piece...)
	cut := completePrefix(ts.held)
	out := strings.ToValidUTF8(string(ts.held[:cut]), "\uFFFD")
	ts.held = append(ts.held[:0], ts.held[cut:]...)
	return out
}

// Flush returns whatever is held (the stream ended): a character the end
// cut short is U+FFFD.
func (ts *TextStream) Flush() string {
	out := strings.ToValidUTF8(string(ts.held), "\uFFFD")
	ts.held = ts.held[:0]
	return out
}

// completePrefix is the length of b without a trailing incomplete UTF-8
// sequence. Invalid bytes that can never complete are let through (Push
// replaces them).
func completePrefix(b []byte) int {
	// A character is at most 4 bytes: look at the last three for the start
	// of one that the end cuts short.
	for i := len(b) - 1; i >= 0 && i >= len(b)-3; i-- {
		c := b[i]
		if c < utf8.RuneSelf {
			return len(b) // ASCII: nothing open
		}
		if utf8.RuneStart(c) {
			if !utf8.FullRune(b[i:]) {
				return i
			}
			return len(b)
		}
	}
	return len(b)
}

// syntheticVocab is the synthetic engine's word vocabulary.
type syntheticVocab struct{}

// SyntheticVocabulary is the synthetic engine's vocabulary.
var SyntheticVocabulary Vocabulary = syntheticVocab{}

func (syntheticVocab) Encode(text string) []uint32         { return Tokenize(text) }
func (syntheticVocab) Piece(tok uint32, first bool) string { return TokenText(tok, first) }
func (syntheticVocab) Size() int                           { return VocabSize() }
func (syntheticVocab) IsEnd(tok uint32) bool               { return tok == TokenEOS }
func (syntheticVocab) Chat(msgs []ChatMessage) string      { return RenderChat(msgs) }

// MaxPieceBytes: a vocabulary word and the white space after it; an
// unknown word is one token per byte plus a separator.
func (syntheticVocab) MaxPieceBytes() int { return maxWordBytes + 1 }

// LlamaVocab is a GGUF model's vocabulary through llama.cpp. It is safe for
// concurrent use.
type LlamaVocab struct {
	mu       sync.Mutex // llama.cpp's tokenizer caches are not documented as thread-safe
	v        llama.Vocab
	size     int
	template string
	maxPiece int // the longest piece's bytes
	// pieces and end are each token's text and end-of-generation flag,
	// read once at load: the decode path looks them up without a lock or a
	// call into llama.cpp.
	pieces []string
	end    []bool
}

func newLlamaVocab(model llama.Model) *LlamaVocab {
	v := llama.ModelGetVocab(model)
	lv := &LlamaVocab{v: v, size: int(llama.VocabNTokens(v)), template: llama.ModelChatTemplate(model, "")}
	lv.pieces, lv.end = make([]string, lv.size), make([]bool, lv.size)
	buf := make([]byte, 64)
	for tok := range lv.size {
		n := llama.TokenToPiece(v, llama.Token(tok), buf, 0, false)
		if n < 0 {
			buf = make([]byte, -n)
			n = llama.TokenToPiece(v, llama.Token(tok), buf, 0, false)
		}
		if n > 0 {
			lv.pieces[tok] = string(buf[:n])
			lv.maxPiece = max(lv.maxPiece, int(n))
		}
		lv.end[tok] = llama.VocabIsEOG(v, llama.Token(tok))
	}
	return lv
}

// Encode tokenizes as llama-server does for a completion prompt:
// add_special=true, parse_special=false.
func (lv *LlamaVocab) Encode(text string) []uint32 {
	lv.mu.Lock()
	defer lv.mu.Unlock()
	toks := llama.Tokenize(lv.v, text, true, false)
	out := make([]uint32, len(toks))
	for i, t := range toks {
		out[i] = uint32(t)
	}
	return out
}

// Piece is llama_token_to_piece of the token (special tokens render empty).
func (lv *LlamaVocab) Piece(tok uint32, _ bool) string {
	if int(tok) >= lv.size {
		return ""
	}
	return lv.pieces[tok]
}

// Size is the number of token ids.
func (lv *LlamaVocab) Size() int { return lv.size }

// MaxPieceBytes is the longest piece's text, one more for a space that
// SentencePiece models add before the first word.
func (lv *LlamaVocab) MaxPieceBytes() int { return lv.maxPiece + 1 }

// IsEnd reports an end-of-generation token (EOS, EOT, …).
func (lv *LlamaVocab) IsEnd(tok uint32) bool {
	if int(tok) >= lv.size {
		return false
	}
	return lv.end[tok]
}

// Chat applies the model's chat template, or kvferry's rendering when the
// model has none (or llama.cpp does not know it).
func (lv *LlamaVocab) Chat(msgs []ChatMessage) string {
	if lv.template == "" || len(msgs) == 0 {
		return RenderChat(msgs)
	}
	cm := make([]llama.ChatMessage, len(msgs))
	size := 256
	for i, m := range msgs {
		cm[i] = llama.NewChatMessage(m.Role, m.Content)
		size += 2 * (len(m.Role) + len(m.Content))
	}
	buf := make([]byte, size)
	n := llama.ChatApplyTemplate(lv.template, cm, true, buf)
	if int(n) > len(buf) {
		buf = make([]byte, n)
		n = llama.ChatApplyTemplate(lv.template, cm, true, buf)
	}
	if n <= 0 {
		return RenderChat(msgs)
	}
	return string(buf[:n])
}

// OpenLlamaVocab loads only a GGUF model's vocabulary and hyperparameters
// (no weights), for the router: it tokenizes and counts prompts and knows
// the context the servers enforce.
func OpenLlamaVocab(cfg LlamaConfig) (*LlamaVocab, ModelSpec, error) {
	if err := LoadLlamaLibraries(cfg.LibDir); err != nil {
		return nil, ModelSpec{}, err
	}
	mp := llama.ModelDefaultParams()
	mp.VocabOnly = 1
	model, err := llama.ModelLoadFromFile(cfg.ModelPath, mp)
	if err != nil {
		return nil, ModelSpec{}, err
	}
	lv := newLlamaVocab(model)
	name := cfg.ServedName
	if name == "" {
		name = ServedModelName(cfg.ModelPath)
	}
	// A vocabulary-only model has no layers: llama.cpp aborts on asking
	// for per-layer geometry, so the router's spec has none (it needs the
	// name, block size, context and vocabulary).
	spec := ModelSpec{
		Name: name, BlockTokens: defaultBlockTokens, MaxContextTokens: contextTokens(model, cfg.ContextTokens), Vocab: lv.Size(),
	}
	return lv, spec, nil
}
