package executor

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hybridgroup/yzma/pkg/llama"

	"github.com/kvferry/kvferry/pkg/grammar"
)

// EngineLlamaCpp and EngineSynthetic name the engines (--engine).
const (
	EngineSynthetic = "synthetic"
	EngineLlamaCpp  = "llamacpp"
)

// LlamaConfig configures the llama.cpp engine.
type LlamaConfig struct {
	// ModelPath is the GGUF file.
	ModelPath string
	// LibDir holds libllama.so, libggml.so, libggml-base.so and the CPU
	// backends (make deps-llama).
	LibDir string
	// ServedName is the model name clients use; empty means the file name
	// without .gguf.
	ServedName string
	// ContextTokens bounds one sequence (prompt plus output); 0 means the
	// model's training context, at most DefaultLlamaContextTokens.
	ContextTokens int
	// Slots is how many sequences the engine holds at once (the generation
	// server's concurrent decodes); 0 means DefaultLlamaSlots.
	Slots int
	// GPULayers is how many layers live on a GPU when the libraries have a
	// GPU backend: -1 every one, 0 none (the CPU only).
	GPULayers int
	// Threads for llama.cpp; 0 means the CPUs this process may use
	// (GOMAXPROCS: a container's CPU limit). llama.cpp's own default (4)
	// oversubscribes small machines, and its threads spin: two servers of
	// 4 threads each on 2 cores ran 2–8× slower under load than 1 each.
	Threads int
	// PrefillChunk is the most prompt tokens one llama_decode of a prefill
	// runs before the engine is let go for others (0: DefaultPrefillChunk).
	PrefillChunk int
	// FlashAttention is "auto" (llama.cpp decides; the default), "on" or
	// "off". It changes the state's V layout (transposed without flash
	// attention); both convert to the same token blocks.
	FlashAttention string
}

// flashAttention maps the configuration to llama.cpp's setting.
func flashAttention(s string) (llama.FlashAttentionType, error) {
	switch s {
	case "", "auto":
		return llama.FlashAttentionTypeAuto, nil
	case "on":
		return llama.FlashAttentionTypeEnabled, nil
	case "off":
		return llama.FlashAttentionTypeDisabled, nil
	}
	return 0, fmt.Errorf("flash attention must be auto, on or off, got %q", s)
}

// Defaults of the llama.cpp engine.
const (
	DefaultLlamaContextTokens = 4096
	DefaultLlamaSlots         = 8
)

var (
	loadOnce sync.Once
	loadErr  error
	loadDir  string
)

// libraries are the files the engine needs in LibDir.
var libraries = []string{"libllama.so", "libggml.so", "libggml-base.so"}

// LoadLlamaLibraries loads the llama.cpp shared libraries once per process.
// A missing or unloadable library is one clear error naming the folder.
func LoadLlamaLibraries(dir string) error {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	for _, lib := range libraries {
		if _, err := os.Stat(filepath.Join(abs, lib)); err != nil {
			return fmt.Errorf("llama.cpp libraries not found in %s: run make deps-llama", abs)
		}
	}
	loadOnce.Do(func() {
		loadDir = abs
		if err := llama.Load(abs); err != nil {
			loadErr = fmt.Errorf("llama.cpp libraries in %s do not load (%v): run make deps-llama", abs, err)
			return
		}
		llama.LogSet(llama.LogSilent())
		llama.Init()
	})
	if loadErr == nil && loadDir != abs {
		return fmt.Errorf("llama.cpp libraries already loaded from %s, not %s", loadDir, abs)
	}
	return loadErr
}

// LlamaBuild names the llama.cpp release of the libraries in dir, from the
// build metadata the package ships beside them.
func LlamaBuild(dir string) string {
	b, err := os.ReadFile(filepath.Join(dir, "_nlcBuildMetadata.json"))
	if err != nil {
		return "llama.cpp unknown"
	}
	var meta struct {
		BuildOptions struct {
			LlamaCpp struct {
				Release string `json:"release"`
			} `json:"llamaCpp"`
		} `json:"buildOptions"`
	}
	if json.Unmarshal(b, &meta) != nil || meta.BuildOptions.LlamaCpp.Release == "" {
		return "llama.cpp unknown"
	}
	return "llama.cpp " + meta.BuildOptions.LlamaCpp.Release
}

// FileSHA256 is the hex sha256 of a file.
func FileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// ServedModelName is the name a model file is served under by default.
func ServedModelName(path string) string {
	return strings.TrimSuffix(filepath.Base(path), ".gguf")
}

// Llama is the llama.cpp engine. One llama.cpp context serves every
// sequence of the server; calls into it are serialised by mu. KV leaves and
// enters llama.cpp as a sequence state, converted to and from token blocks.
type Llama struct {
	spec   ModelSpec
	vocab  *LlamaVocab
	layout stateLayout
	blocks blockLayout
	ctxLen int // tokens one sequence may hold
	chunk  int // prefill tokens per llama_decode
	// gpuLayers is LlamaConfig.GPULayers: 0 keeps the engine off any GPU.
	gpuLayers int

	mu    sync.Mutex // guards the llama.cpp context, the batch and mem
	model llama.Model
	lctx  llama.Context
	mem   llama.Memory
	batch llama.Batch

	slots *seqSlots // free sequence ids
}

var _ Engine = (*Llama)(nil)

// NewLlama loads the model and learns the KV state layout of this build by
// exporting a one-token sequence.
func NewLlama(cfg LlamaConfig) (*Llama, error) {
	if err := LoadLlamaLibraries(cfg.LibDir); err != nil {
		return nil, err
	}
	sum, err := FileSHA256(cfg.ModelPath)
	if err != nil {
		return nil, fmt.Errorf("model: %w", err)
	}
	mp := llama.ModelDefaultParams()
	mp.NGpuLayers = int32(cfg.GPULayers)
	if cfg.GPULayers == 0 {
		mp.SetCPUOnly()
	}
	model, err := llama.ModelLoadFromFile(cfg.ModelPath, mp)
	if err != nil {
		return nil, fmt.Errorf("load model %s: %w", cfg.ModelPath, err)
	}
	e := &Llama{model: model, gpuLayers: cfg.GPULayers}
	ok := false
	defer func() {
		if !ok {
			e.Close()
		}
	}()
	e.ctxLen = contextTokens(model, cfg.ContextTokens)
	e.chunk = cfg.PrefillChunk
	if e.chunk <= 0 {
		e.chunk = DefaultPrefillChunk
	}
	slots := cfg.Slots
	if slots <= 0 {
		slots = DefaultLlamaSlots
	}
	cp := llama.ContextDefaultParams()
	cp.NCtx = uint32(e.ctxLen * slots)
	cp.NBatch = uint32(max(e.ctxLen, slots))
	cp.NUbatch = 512
	cp.NSeqMax = uint32(slots)
	// One KV stream per sequence (not unified): a sequence always occupies
	// cells 0..n-1 of its own stream, so attention runs over the same cells
	// in the same order whether the KV was computed here or imported — the
	// condition for disaggregated output to equal the in-process run bit
	// for bit (a unified cache places imported cells wherever it finds
	// room, which changes floating-point accumulation).
	cp.KVUnified = 0
	cp.TypeK, cp.TypeV = llama.GGMLTypeF16, llama.GGMLTypeF16
	threads := cfg.Threads
	if threads <= 0 {
		threads = runtime.GOMAXPROCS(0)
	}
	cp.NThreads, cp.NThreadsBatch = int32(threads), int32(threads)
	if cp.FlashAttentionType, err = flashAttention(cfg.FlashAttention); err != nil {
		return nil, err
	}
	e.lctx, err = llama.InitFromModel(model, cp)
	if err != nil {
		return nil, fmt.Errorf("llama.cpp context: %w", err)
	}
	if e.mem, err = llama.GetMemory(e.lctx); err != nil {
		return nil, fmt.Errorf("llama.cpp memory: %w", err)
	}
	e.batch = llama.BatchInit(int32(cp.NBatch), 0, 1)
	e.vocab = newLlamaVocab(model)
	e.slots = newSeqSlots(slots)
	if e.layout, err = e.probe(); err != nil {
		return nil, err
	}
	kvHeads := int(llama.ModelNHeadKV(model))
	if e.layout.kRow != e.layout.vRow || kvHeads == 0 || e.layout.kRow%(kvHeads*2) != 0 {
		return nil, fmt.Errorf("model %s: K rows of %d bytes and V rows of %d bytes over %d KV heads are not supported", cfg.ModelPath, e.layout.kRow, e.layout.vRow, kvHeads)
	}
	name := cfg.ServedName
	if name == "" {
		name = ServedModelName(cfg.ModelPath)
	}
	e.spec = ModelSpec{
		Name: name, Layers: e.layout.layers, KVHeads: kvHeads, HeadDim: e.layout.kRow / (kvHeads * 2), DTypeBytes: 2,
		BlockTokens: defaultBlockTokens, MaxContextTokens: e.ctxLen,
		Engine: EngineLlamaCpp + " " + LlamaBuild(cfg.LibDir), ModelSHA256: sum, KVType: "f16",
		Vocab: e.vocab.Size(),
	}
	e.blocks = e.layout.blocks(e.spec.BlockTokens)
	ok = true
	return e, nil
}

// contextTokens is the per-sequence context: the flag, else the model's
// training context capped at DefaultLlamaContextTokens.
func contextTokens(model llama.Model, flag int) int {
	if flag > 0 {
		return flag
	}
	n := int(llama.ModelNCtxTrain(model))
	if n <= 0 {
		// A vocabulary-only model (the router's) has no hyperparameters
		// loaded; the GGUF metadata has the same number.
		if arch, ok := llama.ModelMetaValStr(model, "general.architecture"); ok {
			if v, ok := llama.ModelMetaValStr(model, arch+".context_length"); ok {
				n, _ = strconv.Atoi(v)
			}
		}
	}
	if n <= 0 || n > DefaultLlamaContextTokens {
		n = DefaultLlamaContextTokens
	}
	return n
}

// probe decodes one token on sequence 0, exports it and learns the layout.
func (e *Llama) probe() (stateLayout, error) {
	tok := llama.VocabBOS(e.vocab.v)
	if tok < 0 {
		tok = 0
	}
	if err := e.decode([]llama.Token{tok}, 0, 0, false); err != nil {
		return stateLayout{}, err
	}
	defer e.forget(0)
	st := make([]byte, llama.StateSeqGetSize(e.lctx, 0))
	n := llama.StateSeqGetData(e.lctx, st, 0)
	return probeLayout(st[:n], 1)
}

// Devices names the compute devices the loaded libraries offer (the CPU,
// and each GPU of a GPU backend), as "name (description)".
func (e *Llama) Devices() []string {
	var out []string
	for i := range llama.GGMLBackendDeviceCount() {
		d := llama.GGMLBackendDeviceGet(i)
		out = append(out, fmt.Sprintf("%s (%s)", llama.GGMLBackendDeviceName(d), llama.GGMLBackendDeviceDescription(d)))
	}
	return out
}

// GPUs names the GPUs the engine computes on (each GPU device's
// description, e.g. "NVIDIA H200"), in the backend's order; none when the
// libraries have no GPU backend or GPULayers is 0.
func (e *Llama) GPUs() []string {
	if e.gpuLayers == 0 {
		return nil
	}
	var out []string
	for i := range llama.GGMLBackendDeviceCount() {
		if d := llama.GGMLBackendDeviceGet(i); llama.GGMLBackendDevType(d) == llama.GGMLBackendDeviceTypeGPU {
			out = append(out, llama.GGMLBackendDeviceDescription(d))
		}
	}
	return out
}

// Close frees llama.cpp's resources.
func (e *Llama) Close() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.batch.Token != nil {
		_ = llama.BatchFree(e.batch)
		e.batch = llama.Batch{}
	}
	if e.lctx != 0 {
		_ = llama.Free(e.lctx)
		e.lctx = 0
	}
	if e.model != 0 {
		_ = llama.ModelFree(e.model)
		e.model = 0
	}
}

// Model implements Engine.
func (e *Llama) Model() ModelSpec { return e.spec }

// Vocabulary implements Engine.
func (e *Llama) Vocabulary() Vocabulary { return e.vocab }

// decode runs tokens at positions from pos on sequence seq, in batches of
// at most NBatch; logits only for the last token when last is set. The
// caller holds mu (or is the constructor).
func (e *Llama) decode(tokens []llama.Token, pos int, seq llama.SeqId, last bool) error {
	capTokens := int(llama.NBatch(e.lctx))
	for start := 0; start < len(tokens); start += capTokens {
		end := min(start+capTokens, len(tokens))
		_ = e.batch.Clear()
		for i := start; i < end; i++ {
			if err := e.batch.Add(tokens[i], llama.Pos(pos+i), []llama.SeqId{seq}, last && i == len(tokens)-1); err != nil {
				return err
			}
		}
		if rc, err := llama.Decode(e.lctx, e.batch); err != nil || rc != 0 {
			return fmt.Errorf("llama_decode: rc %d: %v", rc, err)
		}
	}
	return nil
}

// forget drops every cell of seq.
func (e *Llama) forget(seq llama.SeqId) {
	_, _ = llama.MemorySeqRm(e.mem, seq, -1, -1)
}

// acquire takes a free sequence id, waiting for one while ctx lives.
func (e *Llama) acquire(ctx context.Context) (llama.SeqId, error) {
	return e.slots.acquire(ctx)
}

func (e *Llama) releaseSlot(seq llama.SeqId) {
	e.mu.Lock()
	e.forget(seq)
	e.mu.Unlock()
	e.slots.release(seq)
}

// seqSlots hands out llama.cpp sequence ids, the lowest free one first.
// With a sequence-split KV cache (KVUnified off) llama.cpp runs in one
// micro-batch only sequences whose ids follow each other in the batch
// (llama_batch_allocr::split_equal, sequential): running sequences on
// dense low ids, added in id order, make one llama_decode one
// micro-batch instead of one per sequence — a step of 32 sequences cost 32
// steps of one before.
type seqSlots struct {
	mu    sync.Mutex
	free  []bool
	freed chan struct{} // closed when an id is released
}

func newSeqSlots(n int) *seqSlots {
	free := make([]bool, n)
	for i := range free {
		free[i] = true
	}
	return &seqSlots{free: free, freed: make(chan struct{})}
}

func (s *seqSlots) acquire(ctx context.Context) (llama.SeqId, error) {
	for {
		s.mu.Lock()
		if i := slices.Index(s.free, true); i >= 0 {
			s.free[i] = false
			s.mu.Unlock()
			return llama.SeqId(i), nil
		}
		freed := s.freed
		s.mu.Unlock()
		select {
		case <-freed:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
}

func (s *seqSlots) release(seq llama.SeqId) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.free[seq] = true
	close(s.freed)
	s.freed = make(chan struct{})
}

func toLlama(tokens []uint32) []llama.Token {
	out := make([]llama.Token, len(tokens))
	for i, t := range tokens {
		out[i] = llama.Token(t)
	}
	return out
}

// Prefill runs one prompt alone (see the package's Prefill).
func (e *Llama) Prefill(ctx context.Context, tokens []uint32, s Sampling, blocks [][]byte, reused int) (uint32, []uint64, error) {
	return Prefill(ctx, e, tokens, s, blocks, reused)
}

// BeginPrefill implements Engine: wait for a free sequence and import the
// reused prefix blocks into it.
func (e *Llama) BeginPrefill(ctx context.Context, tokens []uint32, s Sampling, blocks [][]byte, reused int) (*Prompt, error) {
	p, err := newPrompt(e.spec, tokens, s, blocks, reused)
	if err != nil {
		return nil, err
	}
	seq, err := e.acquire(ctx)
	if err != nil {
		return nil, err
	}
	e.mu.Lock()
	e.forget(seq)
	if p.pos > 0 {
		err = e.importLocked(seq, blocks, p.pos)
	}
	e.mu.Unlock()
	if err != nil {
		e.releaseSlot(seq)
		return nil, err
	}
	p.slot, p.close = int(seq), func() { e.releaseSlot(seq) }
	return p, nil
}

// PrefillStep implements Engine: the chunks of every prompt of the batch
// in one llama_decode (several when they exceed the context's batch),
// logits only for a prompt's last token; a prompt that finishes samples
// its first token and exports its new rows into its blocks.
func (e *Llama) PrefillStep(ctx context.Context, batch []*Prompt, counts []int) error {
	if _, err := checkStep(batch, counts); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	capTokens := int(llama.NBatch(e.lctx))
	var group []int // indexes of batch in the llama batch now
	flush := func() error {
		if len(group) == 0 {
			return nil
		}
		if rc, err := llama.Decode(e.lctx, e.batch); err != nil || rc != 0 {
			return fmt.Errorf("llama_decode: rc %d: %v", rc, err)
		}
		row := int32(0)
		for _, i := range group {
			p := batch[i]
			row += int32(counts[i])
			p.pos += counts[i]
			if p.Remaining() == 0 {
				if err := e.finishPromptLocked(p, row-1); err != nil {
					return err
				}
			}
		}
		group = group[:0]
		_ = e.batch.Clear()
		return nil
	}
	_ = e.batch.Clear()
	used := 0
	order := make([]int, len(batch)) // in sequence id order (see seqSlots)
	for i := range order {
		order[i] = i
	}
	slices.SortFunc(order, func(a, b int) int { return cmp.Compare(batch[a].slot, batch[b].slot) })
	for _, i := range order {
		p := batch[i]
		n := counts[i]
		if n > capTokens {
			return fmt.Errorf("%w: a chunk of %d tokens exceeds the engine's batch of %d", ErrBlocks, n, capTokens)
		}
		if used+n > capTokens {
			if err := flush(); err != nil {
				return err
			}
			used = 0
		}
		last := p.pos+n == len(p.tokens)
		for k := range n {
			at := p.pos + k
			if err := e.batch.Add(llama.Token(p.tokens[at]), llama.Pos(at), []llama.SeqId{llama.SeqId(p.slot)}, last && k == n-1); err != nil {
				return err
			}
		}
		group = append(group, i)
		used += n
	}
	return flush()
}

// finishPromptLocked samples a finished prompt's first token from batch
// row idx and exports the rows past its reused prefix into its blocks.
func (e *Llama) finishPromptLocked(p *Prompt, idx int32) error {
	seq := llama.SeqId(p.slot)
	first, lp := e.sampleLocked(idx, p.sampling, len(p.tokens), matcherFor(p.sampling), true)
	for i := 1; i < p.sampling.N; i++ { // the same logits, each choice its seed
		tok, lp := e.sampleLocked(idx, p.sampling.Choice(i), len(p.tokens), matcherFor(p.sampling), true)
		p.others, p.otherLPs = append(p.others, tok), append(p.otherLPs, lp)
	}
	st := make([]byte, llama.StateSeqGetSize(e.lctx, seq))
	n := llama.StateSeqGetData(e.lctx, st, seq)
	if err := e.layout.decodeState(st[:n], p.blocks, e.blocks, len(p.tokens), p.reused*e.spec.BlockTokens); err != nil {
		return err
	}
	p.first, p.firstLogprob, p.sums, p.finished = first, lp, Checksums(p.blocks), true
	return nil
}

// prefillSeq fills seq with the prompt's KV and returns the first token;
// when blocks is not nil it also writes the rows of tokens past the reused
// prefix into them.
//
// The prompt runs in chunks of at most PrefillChunk tokens, and the engine
// is let go between chunks: a long prompt does not stall other prompts'
// prefills (chunked prefill), and a cancel takes effect at the next chunk.
func (e *Llama) prefillSeq(ctx context.Context, seq llama.SeqId, tokens []uint32, s Sampling, blocks [][]byte, reused int) (uint32, *Logprob, error) {
	// At least the last prompt token is decoded here, for its logits.
	imported := min(reused*e.spec.BlockTokens, len(tokens)-1)
	e.mu.Lock()
	e.forget(seq)
	if imported > 0 {
		if err := e.importLocked(seq, blocks, imported); err != nil {
			e.mu.Unlock()
			return 0, nil, err
		}
	}
	rest := toLlama(tokens[imported:])
	for start := 0; ; start += e.chunk {
		end := min(start+e.chunk, len(rest))
		if err := e.decode(rest[start:end], imported+start, seq, end == len(rest)); err != nil {
			e.mu.Unlock()
			return 0, nil, err
		}
		if end == len(rest) {
			break // the last chunk's logits are in the context: keep it
		}
		e.mu.Unlock()
		if err := ctx.Err(); err != nil {
			return 0, nil, err
		}
		e.mu.Lock()
	}
	defer e.mu.Unlock()
	first, lp := e.sampleLocked(e.batch.NTokens-1, s, len(tokens), matcherFor(s), true)
	if blocks != nil {
		st := make([]byte, llama.StateSeqGetSize(e.lctx, seq))
		n := llama.StateSeqGetData(e.lctx, st, seq)
		if err := e.layout.decodeState(st[:n], blocks, e.blocks, len(tokens), reused*e.spec.BlockTokens); err != nil {
			return 0, nil, err
		}
	}
	return first, lp, nil
}

// importLocked loads the first n tokens' rows from blocks into seq.
func (e *Llama) importLocked(seq llama.SeqId, blocks [][]byte, n int) error {
	st := e.layout.encodeState(blocks, e.blocks, n)
	if llama.StateSeqSetData(e.lctx, st, seq) == 0 {
		return fmt.Errorf("%w: llama.cpp refused a state of %d tokens", errState, n)
	}
	return nil
}

// sampleLocked samples from the logits of batch row idx. The sampler of
// generated token k (position pos = prompt+k) is seeded by (seed, pos), so
// the first token sampled on the context server and the rest on the
// generation server follow the same sequence as one process would. Under
// a grammar (m, at the text so far; first for the first generated token)
// the tokens it refuses are masked out of the logits first; with logprobs
// asked for, the chosen token's (and the top ones') are read from the
// logits after the mask, before temperature.
func (e *Llama) sampleLocked(idx int32, s Sampling, pos int, m *grammar.Matcher, first bool) (uint32, *Logprob) {
	var logits []float32
	if m != nil || s.Logprobs {
		logits, _ = llama.GetLogitsIth(e.lctx, idx, e.vocab.Size())
	}
	if m != nil && logits != nil && !maskLogits(logits, m, e.vocab, first) {
		return e.endToken(), nil // the grammar allows nothing this vocabulary has
	}
	chain := llama.SamplerChainInit(llama.SamplerChainDefaultParams())
	defer llama.SamplerFree(chain)
	if s.Temperature <= 0 {
		llama.SamplerChainAdd(chain, llama.SamplerInitGreedy())
	} else {
		llama.SamplerChainAdd(chain, llama.SamplerInitTemp(s.Temperature))
		if s.TopP > 0 && s.TopP < 1 {
			llama.SamplerChainAdd(chain, llama.SamplerInitTopP(s.TopP, 1))
		}
		llama.SamplerChainAdd(chain, llama.SamplerInitDist(uint32(mix(s.Seed^uint64(pos)*0x9e3779b97f4a7c15))))
	}
	tok := uint32(llama.SamplerSample(chain, e.lctx, idx))
	if !s.Logprobs || logits == nil {
		return tok, nil
	}
	return tok, logprobOf(logits, tok, s.TopLogprobs)
}

// Capacity is how many sequences the engine holds at once: the most
// choices one request may decode.
func (e *Llama) Capacity() int { return len(e.slots.free) } // fixed at start

// endToken is the vocabulary's end of sequence.
func (e *Llama) endToken() uint32 { return uint32(llama.VocabEOS(e.vocab.v)) }

// StartDecode implements Engine: wait for a free sequence, import the
// received blocks into it.
func (e *Llama) StartDecode(ctx context.Context, blocks [][]byte, sums []uint64, promptTokens int, first uint32, s Sampling) (*Sequence, error) {
	if err := checkBlocks(e.spec, promptTokens, blocks, 0); err != nil {
		return nil, err
	}
	seq, err := e.acquire(ctx)
	if err != nil {
		return nil, err
	}
	e.mu.Lock()
	err = e.importLocked(seq, blocks, promptTokens)
	e.mu.Unlock()
	if err != nil {
		e.releaseSlot(seq)
		return nil, err
	}
	return e.newSequence(seq, promptTokens, first, s)
}

// newSequence starts the decode of seq after its first token; a first
// token the grammar refuses (a peer that sampled without it) is an error
// and seq is released.
func (e *Llama) newSequence(seq llama.SeqId, promptTokens int, first uint32, s Sampling) (*Sequence, error) {
	sq := &Sequence{promptTokens: promptTokens, max: max(s.MaxTokens, 1), ignoreEOS: s.IgnoreEOS, sampling: s, slot: int(seq), matcher: matcherFor(s)}
	sq.close = func() { e.releaseSlot(seq) }
	if err := acceptPiece(sq.matcher, e.vocab, first, true); err != nil {
		sq.Close()
		return nil, err
	}
	e.accept(sq, first, nil)
	return sq, nil
}

// accept appends a sampled token (and its logprob), or ends the sequence.
// Under a grammar the token was allowed (masked sampling) and an end
// token always ends.
func (e *Llama) accept(sq *Sequence, tok uint32, lp *Logprob) {
	if sq.matcher != nil && len(sq.tokens) > 0 && !e.vocab.IsEnd(tok) {
		sq.matcher.Accept(e.vocab.Piece(tok, false))
	}
	if lp != nil && !(e.vocab.IsEnd(tok) && (!sq.ignoreEOS || sq.matcher != nil)) {
		sq.logprobs = append(sq.logprobs, *lp) // with the token, below
	}
	switch {
	case e.vocab.IsEnd(tok) && (!sq.ignoreEOS || sq.matcher != nil):
		sq.finish = FinishStop
	case sq.promptTokens+len(sq.tokens)+1 >= e.ctxLen:
		sq.tokens = append(sq.tokens, tok)
		sq.finish = FinishLength
	default:
		sq.tokens = append(sq.tokens, tok)
		if len(sq.tokens) >= sq.max {
			sq.finish = FinishLength
		}
	}
}

// Step implements Engine: one llama_decode over the last token of every
// running sequence of the batch, then one sample each.
func (e *Llama) Step(ctx context.Context, batch []*Sequence) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	_ = e.batch.Clear()
	var run []*Sequence
	for _, sq := range slices.SortedFunc(slices.Values(batch), bySlot) {
		if sq.finish != FinishNone {
			continue
		}
		pos := sq.promptTokens + len(sq.tokens) - 1
		if err := e.batch.Add(llama.Token(sq.tokens[len(sq.tokens)-1]), llama.Pos(pos), []llama.SeqId{llama.SeqId(sq.slot)}, true); err != nil {
			return err
		}
		run = append(run, sq)
	}
	if len(run) == 0 {
		return nil
	}
	if rc, err := llama.Decode(e.lctx, e.batch); err != nil || rc != 0 {
		return fmt.Errorf("llama_decode: rc %d: %v", rc, err)
	}
	for i, sq := range run {
		tok, lp := e.sampleLocked(int32(i), sq.sampling, sq.promptTokens+len(sq.tokens), sq.matcher, false)
		e.accept(sq, tok, lp)
	}
	return nil
}

// bySlot orders sequences by llama.cpp sequence id (see seqSlots).
func bySlot(a, b *Sequence) int { return cmp.Compare(a.slot, b.slot) }

// Generate is the aggregated run: prefill and decode of one prompt in one
// sequence of this process, no transfer and no state conversion — the
// reference a disaggregated run must equal.
func (e *Llama) Generate(ctx context.Context, tokens []uint32, s Sampling) (Result, error) {
	if len(tokens) == 0 {
		return Result{}, errors.New("prompt has no tokens")
	}
	seq, err := e.acquire(ctx)
	if err != nil {
		return Result{}, err
	}
	start := time.Now()
	first, lp, err := e.prefillSeq(ctx, seq, tokens, s, nil, 0)
	if err != nil {
		e.releaseSlot(seq)
		return Result{}, err
	}
	firstAt := time.Since(start)
	sq, err := e.newSequence(seq, len(tokens), first, s)
	if err != nil {
		return Result{}, err
	}
	defer sq.Close()
	for sq.Finish() == FinishNone {
		if err := e.Step(ctx, []*Sequence{sq}); err != nil {
			return Result{}, err
		}
	}
	res := Result{PromptTokens: len(tokens), Tokens: sq.Tokens(), Text: Text(e.vocab, sq.Tokens()), Finish: sq.Finish(), FirstToken: firstAt, Total: time.Since(start)}
	if lp != nil {
		res.Logprobs = append([]Logprob{*lp}, sq.Logprobs()...)
	}
	return res, nil
}
