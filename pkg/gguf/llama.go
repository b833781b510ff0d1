package gguf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"strings"
)

// LlamaShape is the geometry of a Llama-architecture model.
type LlamaShape struct {
	Layers, Dim, Heads, KVHeads, FF, Context int
	Type                                     uint32 // F16 or F32 weights
}

// Validate checks that the shape is one llama.cpp builds.
func (s LlamaShape) Validate() error {
	switch {
	case s.Layers < 1 || s.Dim < 1 || s.Heads < 1 || s.KVHeads < 1 || s.FF < 1 || s.Context < 1:
		return errors.New("gguf: every dimension must be positive")
	case s.Dim%s.Heads != 0:
		return fmt.Errorf("gguf: dim %d is not a multiple of %d heads", s.Dim, s.Heads)
	case s.Heads%s.KVHeads != 0:
		return fmt.Errorf("gguf: %d heads are not a multiple of %d KV heads", s.Heads, s.KVHeads)
	case (s.Dim/s.Heads)%2 != 0:
		return fmt.Errorf("gguf: head dimension %d is odd (RoPE rotates pairs)", s.Dim/s.Heads)
	case s.Type != F16 && s.Type != F32:
		return errors.New("gguf: weights are F16 or F32")
	}
	return nil
}

// KVBytesPerToken is the KV cache one token takes with f16 K and V.
func (s LlamaShape) KVBytesPerToken() int { return 2 * s.Layers * s.KVHeads * (s.Dim / s.Heads) * 2 }

// Params is the number of weights.
func (s LlamaShape) Params(vocab int) int64 {
	kv := int64(s.KVHeads * (s.Dim / s.Heads))
	d, ff := int64(s.Dim), int64(s.FF)
	layer := 2*d*d + 2*d*kv + 3*d*ff + 2*d
	return int64(s.Layers)*layer + 2*d*int64(vocab) + d
}

// VocabSize is the length of a donor's tokenizer.ggml.tokens.
func VocabSize(donor []KV) (int, error) {
	for _, kv := range donor {
		if kv.Key == "tokenizer.ggml.tokens" && kv.Type == typeArray && len(kv.Raw) >= 12 {
			return int(binary.LittleEndian.Uint64(kv.Raw[4:12])), nil
		}
	}
	return 0, errors.New("gguf: the donor has no tokenizer.ggml.tokens")
}

// weightStd is the spread of random weights: small enough that RMS-normed
// activations stay finite through every layer (a trained model's scale).
const weightStd = 0.02

// WriteRandomLlama writes a Llama model of shape s whose weights are drawn
// from seed, with the tokenizer (every tokenizer.* entry) of donor.
func WriteRandomLlama(w io.Writer, donor []KV, s LlamaShape, seed uint64) error {
	if err := s.Validate(); err != nil {
		return err
	}
	vocab, err := VocabSize(donor)
	if err != nil {
		return err
	}
	headDim := s.Dim / s.Heads
	fileType := uint32(0)
	if s.Type == F16 {
		fileType = 1
	}
	kvs := []KV{
		String("general.architecture", "llama"),
		String("general.name", fmt.Sprintf("random-llama-%dL-%dd", s.Layers, s.Dim)),
		Uint32("general.file_type", fileType),
		Uint32("llama.context_length", uint32(s.Context)),
		Uint32("llama.embedding_length", uint32(s.Dim)),
		Uint32("llama.block_count", uint32(s.Layers)),
		Uint32("llama.feed_forward_length", uint32(s.FF)),
		Uint32("llama.attention.head_count", uint32(s.Heads)),
		Uint32("llama.attention.head_count_kv", uint32(s.KVHeads)),
		Uint32("llama.rope.dimension_count", uint32(headDim)),
		Float32("llama.attention.layer_norm_rms_epsilon", 1e-5),
		Uint32("llama.vocab_size", uint32(vocab)),
	}
	for _, kv := range donor {
		if strings.HasPrefix(kv.Key, "tokenizer.") {
			kvs = append(kvs, kv)
		}
	}
	d, kvDim, v, ff := uint64(s.Dim), uint64(s.KVHeads*headDim), uint64(vocab), uint64(s.FF)
	var tensors []Tensor
	add := func(name string, norm bool, dims ...uint64) {
		typ, idx := s.Type, uint64(len(tensors))
		if norm {
			typ = F32 // llama.cpp keeps norms in F32
		}
		tensors = append(tensors, Tensor{Name: name, Dims: dims, Type: typ, Fill: func(b []byte) {
			rng := rand.New(rand.NewPCG(seed, idx))
			fill(b, typ, func() float32 {
				if norm {
					return 1
				}
				return float32(rng.NormFloat64() * weightStd)
			})
		}})
	}
	add("token_embd.weight", false, d, v)
	add("output_norm.weight", true, d)
	add("output.weight", false, d, v)
	for i := range s.Layers {
		p := fmt.Sprintf("blk.%d.", i)
		add(p+"attn_norm.weight", true, d)
		add(p+"attn_q.weight", false, d, d)
		add(p+"attn_k.weight", false, d, kvDim)
		add(p+"attn_v.weight", false, d, kvDim)
		add(p+"attn_output.weight", false, d, d)
		add(p+"ffn_norm.weight", true, d)
		add(p+"ffn_gate.weight", false, d, ff)
		add(p+"ffn_up.weight", false, d, ff)
		add(p+"ffn_down.weight", false, ff, d)
	}
	return Write(w, kvs, tensors)
}

func fill(b []byte, typ uint32, next func() float32) {
	if typ == F16 {
		for i := 0; i+2 <= len(b); i += 2 {
			binary.LittleEndian.PutUint16(b[i:], Float16(next()))
		}
		return
	}
	for i := 0; i+4 <= len(b); i += 4 {
		binary.LittleEndian.PutUint32(b[i:], math.Float32bits(next()))
	}
}
