// Package executor holds the seam for model execution (Engine, Prompt,
// Sequence, Sampling, Vocabulary, the KV layout) and the two engines: the
// embedded synthetic one — real KV geometry, KV bytes that are a
// deterministic function of the token prefix, and decode driven by a
// digest of every KV byte it was given, so a disaggregated run's output
// equals the aggregated Reference exactly when every KV byte arrived
// intact — and llama.cpp's. The loops that drive an engine for a server
// (batching, admission, the request table) are pkg/sched's.
package executor

import (
	"errors"
	"fmt"
	"sort"
	"strings"

	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
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
	// Engine names the engine and its build ("synthetic", "llamacpp
	// llama.cpp v0.5.0"); ModelSHA256 the model file; KVType the K and V
	// element type. With the geometry they say what the KV bytes mean: a
	// generation server refuses KV whose layout differs from its own.
	Engine      string
	ModelSHA256 string
	KVType      string
	// Vocab is the number of token ids.
	Vocab int
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
	"tiny": {Name: "tiny", Layers: 2, KVHeads: 2, HeadDim: 16, DTypeBytes: 2, BlockTokens: defaultBlockTokens, MaxContextTokens: 8192, Engine: EngineSynthetic, Vocab: VocabSize()},
	// llama3-8b: 128 KiB a token, 2 MiB a block (GQA, bf16).
	"llama3-8b": {Name: "llama3-8b", Layers: 32, KVHeads: 8, HeadDim: 128, DTypeBytes: 2, BlockTokens: defaultBlockTokens, MaxContextTokens: 8192, Engine: EngineSynthetic, Vocab: VocabSize()},
	// llama3-70b: 320 KiB a token, 5 MiB a block.
	"llama3-70b": {Name: "llama3-70b", Layers: 80, KVHeads: 8, HeadDim: 128, DTypeBytes: 2, BlockTokens: defaultBlockTokens, MaxContextTokens: 8192, Engine: EngineSynthetic, Vocab: VocabSize()},
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
		Engine: m.Engine, ModelSha256: m.ModelSHA256, KvType: m.KVType,
	}
}

// LayoutMismatch names the first field in which an advertised layout
// differs from ours, or returns nil when they agree.
func LayoutMismatch(adv, have *kvferryv1.KVLayout) error {
	fields := []struct {
		name      string
		got, want any
	}{
		{"engine", adv.GetEngine(), have.GetEngine()},
		{"model sha256", adv.GetModelSha256(), have.GetModelSha256()},
		{"model", adv.GetModel(), have.GetModel()},
		{"kv type", adv.GetKvType(), have.GetKvType()},
		{"layers", adv.GetLayers(), have.GetLayers()},
		{"kv heads", adv.GetKvHeads(), have.GetKvHeads()},
		{"head dim", adv.GetHeadDim(), have.GetHeadDim()},
		{"dtype bytes", adv.GetDtypeBytes(), have.GetDtypeBytes()},
		{"block tokens", adv.GetBlockTokens(), have.GetBlockTokens()},
		{"block bytes", adv.GetBlockBytes(), have.GetBlockBytes()},
	}
	for _, f := range fields {
		if f.got != f.want {
			return fmt.Errorf("kv layout mismatch: %s is %q in the advertisement, %q here", f.name, fmt.Sprint(f.got), fmt.Sprint(f.want))
		}
	}
	return nil
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
		if int(t) >= m.Vocab {
			return fmt.Errorf("token %d at position %d outside the vocabulary of %d", t, i, m.Vocab)
		}
	}
	return nil
}
