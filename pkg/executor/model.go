// Package executor holds the seam for model execution (Engine) and its
// embedded default, the synthetic engine: real KV geometry, KV bytes that are
// a deterministic function of the token prefix, and decode driven by a
// digest of every KV byte it was given — so a disaggregated run's output
// equals the aggregated Reference exactly when every KV byte arrived intact.
package executor

import (
	"errors"

	"fmt"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
	"sort"
	"strings"
)

// ModelSpec is the KV geometry of a model.
type ModelSpec struct {
	Name        string
	Layers      int
	KVHeads     int
	HeadDim     int
	DTypeBytes  int
	BlockTokens int
	// MaxContextTokens bounds prompt plus output.
	MaxContextTokens int
}

// BytesPerToken is layers × kv heads × head dim × dtype bytes × 2 (K and V).
func (m ModelSpec) BytesPerToken() int {
	return m.Layers * m.KVHeads * m.HeadDim * m.DTypeBytes * 2
}

// BlockBytes is the size of one KV block.
func (m ModelSpec) BlockBytes() int { return m.BytesPerToken() * m.BlockTokens }

// BlocksFor returns the number of blocks that hold n tokens.
func (m ModelSpec) BlocksFor(n int) int { return (n + m.BlockTokens - 1) / m.BlockTokens }

// defaultBlockTokens is the tokens per KV block of every preset: 16 is what
// vLLM and TensorRT-LLM use by default, so block counts read the same.
const defaultBlockTokens = 16

var presets = map[string]ModelSpec{
	// tiny: 256 bytes a token, 4 KiB a block; for laptops, CI and tests.
	"tiny": {Name: "tiny", Layers: 2, KVHeads: 2, HeadDim: 16, DTypeBytes: 2, BlockTokens: defaultBlockTokens, MaxContextTokens: 8192},
	// llama3-8b: 128 KiB a token, 2 MiB a block (GQA, bf16).
	"llama3-8b": {Name: "llama3-8b", Layers: 32, KVHeads: 8, HeadDim: 128, DTypeBytes: 2, BlockTokens: defaultBlockTokens, MaxContextTokens: 8192},
	// llama3-70b: 320 KiB a token, 5 MiB a block.
	"llama3-70b": {Name: "llama3-70b", Layers: 80, KVHeads: 8, HeadDim: 128, DTypeBytes: 2, BlockTokens: defaultBlockTokens, MaxContextTokens: 8192},
}

// Preset returns the named model preset.
func Preset(name string) (ModelSpec, error) {
	m, ok := presets[name]
	if !ok {
		return ModelSpec{}, fmt.Errorf("unknown model %q (presets: %s)", name, strings.Join(PresetNames(), ", "))
	}
	return m, nil
}

// PresetNames lists the presets in sorted order.
func PresetNames() []string {
	names := make([]string, 0, len(presets))
	for n := range presets {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Layout returns the wire form of the model's KV geometry.
func (m ModelSpec) Layout() *kvferryv1.KVLayout {
	return &kvferryv1.KVLayout{
		Model: m.Name, Layers: uint32(m.Layers), KvHeads: uint32(m.KVHeads), HeadDim: uint32(m.HeadDim),
		DtypeBytes: uint32(m.DTypeBytes), BlockTokens: uint32(m.BlockTokens), BlockBytes: uint64(m.BlockBytes()),
	}
}

// ToSampling converts wire sampling parameters.
func ToSampling(p *kvferryv1.SamplingParams) Sampling {
	return Sampling{MaxTokens: int(p.GetMaxTokens()), Temperature: p.GetTemperature(), TopP: p.GetTopP(), Seed: p.GetSeed()}
}

// ValidatePrompt checks prompt tokens from outside: not empty, within the
// model's context and vocabulary.
func (m ModelSpec) ValidatePrompt(tokens []uint32, maxTokens uint32) error {
	if len(tokens) == 0 {
		return errors.New("prompt has no tokens")
	}
	if len(tokens)+int(maxTokens) > m.MaxContextTokens {
		return fmt.Errorf("prompt of %d tokens plus %d output tokens exceeds the context of %d", len(tokens), maxTokens, m.MaxContextTokens)
	}
	for i, t := range tokens {
		if int(t) >= VocabSize() {
			return fmt.Errorf("token %d at position %d outside the vocabulary of %d", t, i, VocabSize())
		}
	}
	return nil
}
