package executor

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/hybridgroup/yzma/pkg/llama"
	"pgregory.net/rapid"

	"github.com/kvferry/kvferry/pkg/gguf"
)

// The test model and its known output (shared/models/README.md).
const (
	testModelSHA256 = "270cba1bd5109f42d03350f60406024560464db173c0e387d91f0426d3bd256d"
	knownPrompt     = "Once upon a time"
	knownOutput     = ", there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball."
)

// repoRoot is the folder holding go.mod.
func repoRoot(t testing.TB) string {
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("go.mod not found above the test's folder")
		}
		dir = parent
	}
}

// testLlamaConfig points at shared/models/stories260K.gguf (its sha256
// checked) and the libraries of make deps-llama.
func testLlamaConfig(t testing.TB) LlamaConfig {
	root := repoRoot(t)
	model := filepath.Join(root, "..", "shared", "models", "stories260K.gguf")
	sum, err := FileSHA256(model)
	if err != nil {
		t.Fatalf("test model: %v", err)
	}
	if sum != testModelSHA256 {
		t.Fatalf("test model sha256 %s, want %s", sum, testModelSHA256)
	}
	lib := os.Getenv("KVFERRY_LLAMA_LIB_DIR")
	if lib == "" {
		lib = filepath.Join(root, ".llama", "lib")
	}
	return LlamaConfig{ModelPath: model, LibDir: lib, Slots: 4, GPULayers: -1} // a GPU when the libraries have one, as the servers
}

// enginePair is two engines on the test model, made once per process: a
// "context server" and a "generation server", each with its own llama.cpp
// context.
type enginePair struct {
	once sync.Once
	e    [2]*Llama
	err  error
}

func (p *enginePair) get(t testing.TB, configure func(*LlamaConfig)) (*Llama, *Llama) {
	cfg := testLlamaConfig(t)
	configure(&cfg)
	p.once.Do(func() {
		for i := range p.e {
			if p.e[i], p.err = NewLlama(cfg); p.err != nil {
				return
			}
		}
	})
	if p.err != nil {
		t.Fatal(p.err)
	}
	return p.e[0], p.e[1]
}

var sharedPair, noFAPair enginePair

// testEngines returns the default pair (flash attention auto).
func testEngines(t testing.TB) (*Llama, *Llama) {
	return sharedPair.get(t, func(*LlamaConfig) {})
}

func TestLlamaKnownOutput(t *testing.T) {
	ctxE, _ := testEngines(t)
	spec := ctxE.Model()
	if spec.Name != "stories260K" || spec.Layers != 5 || spec.KVHeads != 4 || spec.ModelSHA256 != testModelSHA256 || !strings.HasPrefix(spec.Engine, "llamacpp llama.cpp v0.5.0") {
		t.Fatalf("spec %+v", spec)
	}
	res, err := ctxE.Generate(context.Background(), ctxE.Vocabulary().Encode(knownPrompt), Sampling{MaxTokens: 40})
	if err != nil {
		t.Fatal(err)
	}
	if res.Text != knownOutput {
		t.Fatalf("greedy output\n got %q\nwant %q", res.Text, knownOutput)
	}
}

// disaggregate runs prefill on one engine, moves the blocks as bytes and
// decodes on the other.
func disaggregate(t testing.TB, ctxE, genE Engine, tokens []uint32, s Sampling, blocks [][]byte, reused int) Result {
	t.Helper()
	ctx := context.Background()
	out, err := PrefillAlone(ctx, ctxE, tokens, s, blocks, reused)
	if err != nil {
		t.Fatal(err)
	}
	first, sums := out.First, out.Sums
	moved := make([][]byte, len(blocks))
	for i, b := range blocks {
		moved[i] = bytes.Clone(b)
	}
	got := Checksums(moved)
	for i := range sums {
		if got[i] != sums[i] {
			t.Fatalf("block %d checksum changed in a copy", i)
		}
	}
	sq, err := genE.StartDecode(ctx, moved, got, len(tokens), first, s)
	if err != nil {
		t.Fatal(err)
	}
	defer sq.Close()
	for sq.Finish() == FinishNone {
		if err := genE.Step(ctx, []*Sequence{sq}); err != nil {
			t.Fatal(err)
		}
	}
	res := Result{PromptTokens: len(tokens), Tokens: sq.Tokens(), Text: Text(genE.Vocabulary(), sq.Tokens()), Finish: sq.Finish()}
	if out.Logprob != nil {
		res.Logprobs = append([]Logprob{*out.Logprob}, sq.Logprobs()...)
	}
	return res
}

func newBlocks(spec ModelSpec, n int) [][]byte {
	blocks := make([][]byte, spec.BlocksFor(n))
	for i := range blocks {
		blocks[i] = make([]byte, spec.BlockBytes())
	}
	return blocks
}

var testPrompts = []string{
	"Once upon a time", "The little dog", "Lily and Ben went to the park", "One day, a big bird",
	"Tom had a red ball. He liked to play with it every day in the garden behind his house.",
	"There was a girl", "The sun was hot", "Mom said", "Once upon a time, there was a cat named Tim who loved fish.",
	"A boy found a box",
}

func TestLlamaDisaggregatedEqualsReference(t *testing.T) {
	ctxE, genE := testEngines(t)
	for _, s := range []Sampling{{MaxTokens: 24}, {MaxTokens: 24, Temperature: 0.8, TopP: 0.95, Seed: 42}} {
		for _, p := range testPrompts {
			toks := ctxE.Vocabulary().Encode(p)
			ref, err := genE.Generate(context.Background(), toks, s)
			if err != nil {
				t.Fatal(err)
			}
			got := disaggregate(t, ctxE, genE, toks, s, newBlocks(ctxE.Model(), len(toks)), 0)
			if got.Text != ref.Text || got.Finish != ref.Finish {
				t.Fatalf("%q %+v: disaggregated %q (%v), reference %q (%v)", p, s, got.Text, got.Finish, ref.Text, ref.Finish)
			}
			if len(ref.Tokens) == 0 {
				t.Fatalf("%q: no tokens", p)
			}
		}
	}
}

func TestLlamaSeedChangesSampledText(t *testing.T) {
	e, _ := testEngines(t)
	toks := e.Vocabulary().Encode("The little dog")
	texts := map[string]bool{}
	for seed := range uint64(4) {
		r, err := e.Generate(context.Background(), toks, Sampling{MaxTokens: 24, Temperature: 0.8, TopP: 1, Seed: seed})
		if err != nil {
			t.Fatal(err)
		}
		texts[r.Text] = true
	}
	if len(texts) < 2 {
		t.Fatalf("four seeds at temperature 0.8 gave one text: %v", texts)
	}
}

// Prefix reuse with real KV: the second prompt imports the first's full
// blocks and prefills only the rest; its output equals a run without the
// cache, and the rows it computed equal those of a full prefill.
func TestLlamaPrefixReuse(t *testing.T) {
	ctxE, genE := testEngines(t)
	spec := ctxE.Model()
	base := "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her friends."
	a := ctxE.Vocabulary().Encode(base + " One day")
	b := ctxE.Vocabulary().Encode(base + " Her mom")
	shared := 0
	for shared < min(len(a), len(b)) && a[shared] == b[shared] {
		shared++
	}
	k := shared / spec.BlockTokens
	if k < 1 {
		t.Fatalf("prompts share %d tokens, less than a block", shared)
	}
	s := Sampling{MaxTokens: 20}
	blocksA := newBlocks(spec, len(a))
	disaggregate(t, ctxE, genE, a, s, blocksA, 0)

	cold := newBlocks(spec, len(b))
	want := disaggregate(t, ctxE, genE, b, s, cold, 0)
	warm := newBlocks(spec, len(b))
	for i := range k {
		copy(warm[i], blocksA[i])
	}
	got := disaggregate(t, ctxE, genE, b, s, warm, k)
	if got.Text != want.Text {
		t.Fatalf("with %d reused blocks %q, without %q", k, got.Text, want.Text)
	}
	for i := range warm {
		if !bytes.Equal(warm[i], cold[i]) {
			t.Logf("block %d differs between the warm and cold prefill (floating-point batch shape); output equal", i)
		}
	}
}

// Every prompt length around block boundaries, with every block reused
// that can be.
func TestLlamaReuseEveryFullBlock(t *testing.T) {
	ctxE, genE := testEngines(t)
	spec := ctxE.Model()
	text := "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her friends every day."
	all := ctxE.Vocabulary().Encode(text)
	for _, n := range []int{spec.BlockTokens, spec.BlockTokens + 1, 2 * spec.BlockTokens} {
		toks := all[:n]
		blocks := newBlocks(spec, n)
		want := disaggregate(t, ctxE, genE, toks, Sampling{MaxTokens: 12}, blocks, 0)
		full := n / spec.BlockTokens
		got := disaggregate(t, ctxE, genE, toks, Sampling{MaxTokens: 12}, blocks, full)
		if got.Text != want.Text {
			t.Fatalf("%d tokens, %d reused: %q, want %q", n, full, got.Text, want.Text)
		}
	}
}

// A real export of llama.cpp converts to blocks and back byte for byte,
// V row-major (flash attention) or transposed (TestLlamaTransposedV).
func TestLlamaStateRoundTrip(t *testing.T) {
	e, _ := testEngines(t)
	stateRoundTrip(t, e)
}

func stateRoundTrip(t *testing.T, e *Llama) {
	toks := toLlama(e.Vocabulary().Encode("Lily and Ben went to the park to play with a big red ball"))
	e.mu.Lock()
	defer e.mu.Unlock()
	// Sequence 0, as the probe: the word after the state's magic names the
	// exporting sequence, which blocks do not carry (states are rebuilt as
	// exported from sequence 0, and llama.cpp loads them into any).
	seq, err := e.acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer e.slots.release(seq)
	if err := e.decode(toks, 0, 0, false); err != nil {
		t.Fatal(err)
	}
	defer e.forget(0)
	st := make([]byte, llama.StateSeqGetSize(e.lctx, 0))
	st = st[:llama.StateSeqGetData(e.lctx, st, 0)]
	blocks := newBlocks(e.Model(), len(toks))
	if err := e.layout.decodeState(st, blocks, e.blocks, len(toks), 0); err != nil {
		t.Fatal(err)
	}
	back := e.layout.encodeState(blocks, e.blocks, len(toks))
	if !bytes.Equal(back, st) {
		for i := range st {
			if st[i] != back[i] {
				t.Fatalf("state of %d bytes came back as %d bytes, first difference at byte %d: % x vs % x (prefix % x)", len(st), len(back), i, st[max(0, i-8):i+8], back[max(0, i-8):i+8], e.layout.prefix)
			}
		}
	}
	if llama.StateSeqSetData(e.lctx, back, seq) == 0 {
		t.Fatal("llama.cpp refused the rebuilt state")
	}
	e.forget(seq)
}

// genState writes a state of n tokens in layout l with the given rows,
// its cells in stream slot (the others empty).
func genState(l stateLayout, n, slot int, rows []byte) []byte {
	le := binary.LittleEndian
	out := append([]byte(nil), l.prefix...)
	out = le.AppendUint32(out, l.nStream)
	for range slot {
		out = le.AppendUint32(out, 0)
	}
	out = le.AppendUint32(out, uint32(n))
	for i := range n {
		out = le.AppendUint32(out, uint32(i))
		out = le.AppendUint32(out, 1)
		out = le.AppendUint32(out, 0)
	}
	vt := uint32(0)
	if l.vTrans {
		vt = 1
	}
	out = le.AppendUint32(out, vt)
	out = le.AppendUint32(out, uint32(l.layers))
	for range l.layers {
		out = le.AppendUint32(out, uint32(l.kType))
		out = le.AppendUint64(out, uint64(l.kRow))
		out, rows = append(out, rows[:n*l.kRow]...), rows[n*l.kRow:]
	}
	for range l.layers {
		out = le.AppendUint32(out, uint32(l.vType))
		if l.vTrans {
			out = le.AppendUint32(out, uint32(l.vEl))
			out = le.AppendUint32(out, uint32(l.vRow/l.vEl))
		} else {
			out = le.AppendUint64(out, uint64(l.vRow))
		}
		out, rows = append(out, rows[:n*l.vRow]...), rows[n*l.vRow:]
	}
	for range int(l.nStream) - 1 - slot {
		out = le.AppendUint32(out, 0)
	}
	return out
}

// State → blocks → state is byte-identical for any geometry, V transposed
// or not, and the layout probe learns a layout that reproduces it.
func TestStateBlocksRoundTripRapid(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		el := rapid.SampledFrom([]int{1, 2, 4}).Draw(t, "el")
		row := el * rapid.IntRange(1, 24).Draw(t, "dims")
		l := stateLayout{
			prefix:  rapid.SliceOfN(rapid.Byte(), 0, 3).Draw(t, "prefix4"),
			nStream: uint32(rapid.IntRange(1, 4).Draw(t, "streams")),
			vTrans:  rapid.Bool().Draw(t, "vtrans"),
			layers:  rapid.IntRange(1, 6).Draw(t, "layers"),
			kType:   1, vType: 1, kRow: row, vRow: row, vEl: el,
		}
		l.prefix = bytes.Repeat(l.prefix, 4) // a multiple of 4 bytes, as llama.cpp writes
		if !l.vTrans {
			l.vEl = 0
		}
		n := rapid.IntRange(1, 70).Draw(t, "tokens")
		bt := rapid.IntRange(1, 17).Draw(t, "blockTokens")
		rows := rapid.SliceOfN(rapid.Byte(), l.layers*n*(l.kRow+l.vRow), l.layers*n*(l.kRow+l.vRow)).Draw(t, "rows")
		slot := rapid.IntRange(0, int(l.nStream)-1).Draw(t, "slot")
		st := genState(l, n, slot, rows)
		if got := l.stateSize(n); got != len(st) {
			t.Fatalf("stateSize %d, state %d", got, len(st))
		}
		bl := l.blocks(bt)
		blocks := make([][]byte, (n+bt-1)/bt)
		for i := range blocks {
			blocks[i] = bytes.Repeat([]byte{0xee}, bl.blockBytes())
		}
		if err := l.decodeState(st, blocks, bl, n, 0); err != nil {
			t.Fatal(err)
		}
		// Rebuilt states carry the cells in the first stream.
		if back := l.encodeState(blocks, bl, n); !bytes.Equal(back, genState(l, n, 0, rows)) {
			t.Fatal("round trip changed the state")
		}
		if rem := n % bt; rem != 0 {
			for l2 := range l.layers {
				tail := blocks[len(blocks)-1][bl.kOff(l2, rem) : bl.kOff(l2, 0)+bt*l.kRow]
				if !bytes.Equal(tail, make([]byte, len(tail))) {
					t.Fatal("tail of the last block not zeroed")
				}
			}
		}
		if len(l.prefix) > 0 && l.prefix[len(l.prefix)-4] == 0 {
			return // a probe cannot tell a prefix ending in a zero word from a stream count
		}
		probed, err := probeLayout(st, n)
		if err != nil {
			t.Fatal(err)
		}
		if fmt.Sprint(probed) != fmt.Sprint(l) {
			t.Fatalf("probe learned %+v, want %+v", probed, l)
		}
	})
}

func TestLlamaStateRejectsForeignBytes(t *testing.T) {
	e, _ := testEngines(t)
	blocks := newBlocks(e.Model(), 3)
	st := e.layout.encodeState(blocks, e.blocks, 3)
	st[len(e.layout.prefix)+4] = 9 // the cell count
	if err := e.layout.decodeState(st, blocks, e.blocks, 3, 0); err == nil {
		t.Fatal("a state with a wrong cell count decoded")
	}
}

func TestLlamaMissingLibraries(t *testing.T) {
	cfg := testLlamaConfig(t)
	cfg.LibDir = t.TempDir()
	_, err := NewLlama(cfg)
	if err == nil || !strings.Contains(err.Error(), "llama.cpp libraries not found in "+cfg.LibDir+": run make deps-llama") {
		t.Fatalf("err = %v", err)
	}
}

func TestTextStreamHoldsSplitCharacters(t *testing.T) {
	var ts TextStream
	word := "héllo 世界 🙂"
	var out strings.Builder
	for i := 0; i < len(word); i++ {
		chunk := ts.Push(word[i : i+1])
		if !utf8ValidString(chunk) {
			t.Fatalf("chunk %q after byte %d is not valid UTF-8", chunk, i)
		}
		out.WriteString(chunk)
	}
	out.WriteString(ts.Flush())
	if out.String() != word {
		t.Fatalf("got %q", out.String())
	}
}

func utf8ValidString(s string) bool { return strings.ToValidUTF8(s, "\uFFFD") == s }

// TestTextStreamReplacesInvalidBytes: byte tokens that never form a
// character (a random model's, or a sampled one's) come out as U+FFFD,
// never as invalid UTF-8 — a protobuf string must be valid (before, the
// generation server's stream failed with "string field contains invalid
// UTF-8" on a generated model, found on the device).
func TestTextStreamReplacesInvalidBytes(t *testing.T) {
	for _, c := range []struct {
		pieces []string
		want   string
	}{
		{[]string{"a", "\xff", "b"}, "a\uFFFDb"},
		{[]string{"\xe4\xb8", "x"}, "\uFFFDx"},            // a character cut short by the next piece
		{[]string{"ok", "\xf0\x9f"}, "ok\uFFFD"},          // cut short by the end
		{[]string{"\x80\x80", "\xe4\xb8\x96"}, "\uFFFD世"}, // a run of stray bytes is one U+FFFD, then a whole character
	} {
		var ts TextStream
		var out strings.Builder
		for _, p := range c.pieces {
			chunk := ts.Push(p)
			if !utf8ValidString(chunk) {
				t.Fatalf("%q: chunk %q is not valid UTF-8", c.pieces, chunk)
			}
			out.WriteString(chunk)
		}
		out.WriteString(ts.Flush())
		if out.String() != c.want {
			t.Errorf("%q: got %q, want %q", c.pieces, out.String(), c.want)
		}
	}
}

// prefilled1000 is the context engine, a ~1,000-token story prompt and its
// blocks, prefilled cold.
func prefilled1000(b *testing.B) (*Llama, []uint32, [][]byte) {
	e := benchEngine(b)
	text := strings.Repeat("Once upon a time there was a little dog who liked to run in the park. ", 60)
	toks := e.Vocabulary().Encode(text)[:1000]
	blocks := newBlocks(e.Model(), len(toks))
	if _, _, err := e.Prefill(context.Background(), toks, Sampling{}, blocks, 0); err != nil {
		b.Fatal(err)
	}
	return e, toks, blocks
}

var benchPair enginePair

// benchEngine is the test model's engine, or with KVFERRY_BENCH_MODEL a
// generated model's (cmd/kvgguf: a model whose KV is real in size).
func benchEngine(b *testing.B) *Llama {
	path := os.Getenv("KVFERRY_BENCH_MODEL")
	if path == "" {
		e, _ := testEngines(b)
		return e
	}
	benchPair.once.Do(func() {
		lib := os.Getenv("KVFERRY_LLAMA_LIB_DIR")
		if lib == "" {
			lib = filepath.Join(repoRoot(b), ".llama", "lib")
		}
		benchPair.e[0], benchPair.err = NewLlama(LlamaConfig{ModelPath: path, LibDir: lib, Slots: 4, GPULayers: -1})
	})
	if benchPair.err != nil {
		b.Fatal(benchPair.err)
	}
	return benchPair.e[0]
}

// BenchmarkLlamaPrefixReuse: prefill of a ~1,000-token prompt on the test
// model cold, and with every full block but the last served from the
// reuse cache (imported as state), same run.
func BenchmarkLlamaPrefixReuse(b *testing.B) {
	e, toks, cached := prefilled1000(b)
	spec := e.Model()
	full := len(toks)/spec.BlockTokens - 1
	for _, reused := range []int{0, full} {
		b.Run(fmt.Sprintf("reused=%d/%d", reused, spec.BlocksFor(len(toks))), func(b *testing.B) {
			blocks := newBlocks(spec, len(toks))
			for i := range reused {
				copy(blocks[i], cached[i])
			}
			for b.Loop() {
				if _, _, err := e.Prefill(context.Background(), toks, Sampling{}, blocks, reused); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(len(toks))*float64(b.N)/b.Elapsed().Seconds(), "prompt-tok/s")
		})
	}
}

// BenchmarkLlamaKVStaging: what a host-staged transfer pays on each side
// for a ~1,000-token sequence: export (llama.cpp's state out of the
// context — VRAM on a GPU — into kvferry's blocks) and import (blocks into
// a sequence). Reports ms per MiB of block rows and MiB/s.
func BenchmarkLlamaKVStaging(b *testing.B) {
	e, toks, blocks := prefilled1000(b)
	spec := e.Model()
	seq, err := e.acquire(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	defer e.releaseSlot(seq)
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.importLocked(seq, blocks, len(toks)); err != nil {
		b.Fatal(err)
	}
	mib := float64(len(toks)*e.blocks.bytesPerToken()) / (1 << 20)
	report := func(b *testing.B) {
		per := b.Elapsed().Seconds() / float64(b.N)
		b.ReportMetric(per*1000/mib, "ms/MiB")
		b.ReportMetric(mib/per, "MiB/s")
	}
	b.Run("export", func(b *testing.B) {
		out := newBlocks(spec, len(toks))
		for b.Loop() {
			st := make([]byte, llama.StateSeqGetSize(e.lctx, seq))
			n := llama.StateSeqGetData(e.lctx, st, seq)
			if err := e.layout.decodeState(st[:n], out, e.blocks, len(toks), 0); err != nil {
				b.Fatal(err)
			}
		}
		report(b)
		if !slices.Equal(Checksums(out), Checksums(blocks)) {
			b.Fatal("exported blocks differ from the prefill's")
		}
	})
	b.Run("import", func(b *testing.B) {
		for b.Loop() {
			e.forget(seq)
			if err := e.importLocked(seq, blocks, len(toks)); err != nil {
				b.Fatal(err)
			}
		}
		report(b)
	})
}

// Without flash attention llama.cpp keeps V transposed in its state: the
// same token blocks, converted the other way, and the same equality.
func TestLlamaTransposedV(t *testing.T) {
	ctxE, genE := noFAPair.get(t, func(c *LlamaConfig) { c.FlashAttention = "off" })
	if !ctxE.layout.vTrans {
		t.Fatal("flash attention off, but the state's V is not transposed")
	}
	for _, s := range []Sampling{{MaxTokens: 24}, {MaxTokens: 24, Temperature: 0.8, TopP: 0.95, Seed: 7}} {
		for _, p := range testPrompts[:3] {
			toks := ctxE.Vocabulary().Encode(p)
			ref, err := genE.Generate(context.Background(), toks, s)
			if err != nil {
				t.Fatal(err)
			}
			if got := disaggregate(t, ctxE, genE, toks, s, newBlocks(ctxE.Model(), len(toks)), 0); got.Text != ref.Text {
				t.Fatalf("%q: disaggregated %q, reference %q", p, got.Text, ref.Text)
			}
		}
	}
	// The blocks are the same format either way: a V-transposed export
	// and a row-major one of the same KV give the same rows.
	if ctxE.Model().BlockBytes() != testEnginesSpec(t).BlockBytes() {
		t.Fatal("block size depends on flash attention")
	}
	stateRoundTrip(t, ctxE)
}

func testEnginesSpec(t *testing.T) ModelSpec {
	e, _ := testEngines(t)
	return e.Model()
}

// Batched prefill and decode: prompts prefilled together in chunks (three
// tokens of each a step, as the prefill loop plans them) and sequences
// stepped together in one llama_decode give the same tokens as each one
// alone (greedy and seeded). The loops that form such batches are
// pkg/sched's, tested there.
func TestLlamaBatchedDecodeEqualsReference(t *testing.T) {
	ctxE, genE := testEngines(t)
	ctx := context.Background()
	type run struct {
		prompt string
		toks   []uint32
		s      Sampling
		blocks [][]byte
		p      *Prompt
		sq     *Sequence
	}
	runs := make([]*run, 4)
	for i, p := range testPrompts[:4] {
		s := Sampling{MaxTokens: 24}
		if i%2 == 1 {
			s = Sampling{MaxTokens: 24, Temperature: 0.8, TopP: 0.95, Seed: uint64(i)}
		}
		toks := ctxE.Vocabulary().Encode(p)
		r := &run{prompt: p, toks: toks, s: s, blocks: newBlocks(ctxE.Model(), len(toks))}
		var err error
		if r.p, err = ctxE.BeginPrefill(ctx, toks, s, r.blocks, 0); err != nil {
			t.Fatal(err)
		}
		defer r.p.Close()
		runs[i] = r
	}
	for steps := 0; ; steps++ {
		var batch []*Prompt
		var counts []int
		for _, r := range runs {
			if !r.p.Finished() {
				batch, counts = append(batch, r.p), append(counts, min(r.p.Remaining(), 3))
			}
		}
		if len(batch) == 0 {
			break
		}
		if steps == 0 && len(batch) < 2 {
			t.Fatal("nothing to batch")
		}
		if err := ctxE.PrefillStep(ctx, batch, counts); err != nil {
			t.Fatal(err)
		}
	}
	var seqs []*Sequence
	for _, r := range runs {
		out := r.p.Prefilled()
		sq, err := genE.StartDecode(ctx, r.blocks, out.Sums, len(r.toks), out.First, r.s)
		if err != nil {
			t.Fatal(err)
		}
		r.sq, seqs = sq, append(seqs, sq)
	}
	for {
		running := 0
		for _, sq := range seqs {
			if sq.Finish() == FinishNone {
				running++
			}
		}
		if running == 0 {
			break
		}
		if err := genE.Step(ctx, seqs); err != nil {
			t.Fatal(err)
		}
	}
	for _, sq := range seqs {
		sq.Close() // the engine's slots, for the references below
	}
	for _, r := range runs {
		ref, err := genE.Generate(ctx, r.toks, r.s)
		if err != nil {
			t.Fatal(err)
		}
		if got := Text(genE.Vocabulary(), r.sq.Tokens()); got != ref.Text {
			t.Fatalf("%q batched: %q, alone: %q", r.prompt, got, ref.Text)
		}
	}
}

// Chunked prefill: a prompt run two tokens per llama_decode, the engine let
// go between chunks, still gives the known text, and disaggregated output
// equals the reference on the same engines.
func TestLlamaChunkedPrefill(t *testing.T) {
	cfg := testLlamaConfig(t)
	cfg.PrefillChunk = 2
	ctxE, err := NewLlama(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer ctxE.Close()
	genE, err := NewLlama(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer genE.Close()
	res, err := ctxE.Generate(context.Background(), ctxE.Vocabulary().Encode(knownPrompt), Sampling{MaxTokens: 40})
	if err != nil {
		t.Fatal(err)
	}
	if res.Text != knownOutput {
		t.Fatalf("chunked prefill: %q, want %q", res.Text, knownOutput)
	}
	for _, p := range testPrompts[4:6] {
		toks := ctxE.Vocabulary().Encode(p)
		s := Sampling{MaxTokens: 16, Temperature: 0.8, TopP: 0.9, Seed: 5}
		ref, err := genE.Generate(context.Background(), toks, s)
		if err != nil {
			t.Fatal(err)
		}
		if got := disaggregate(t, ctxE, genE, toks, s, newBlocks(ctxE.Model(), len(toks)), 0); got.Text != ref.Text {
			t.Fatalf("%q: %q, reference %q", p, got.Text, ref.Text)
		}
	}
}

// TestLlamaGeneratedModel: a model of another geometry, written by
// pkg/gguf with random F16 weights and the test model's tokenizer (8
// layers, dim 256, 8 heads over 2 KV heads: head dimension 32, grouped
// attention), loads in llama.cpp, and its KV crosses the handoff as the
// test model's does: disaggregated equals one engine, greedy and sampled,
// prompts of one block to several.
func TestLlamaGeneratedModel(t *testing.T) {
	base := testLlamaConfig(t)
	f, err := os.Open(base.ModelPath)
	if err != nil {
		t.Fatal(err)
	}
	donor, err := gguf.ReadMetadata(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	shape := gguf.LlamaShape{Layers: 8, Dim: 256, Heads: 8, KVHeads: 2, FF: 688, Context: 512, Type: gguf.F16}
	path := filepath.Join(t.TempDir(), "random-llama.gguf")
	out, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := gguf.WriteRandomLlama(out, donor, shape, 1); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
	cfg := base
	cfg.ModelPath, cfg.Slots = path, 2
	var engines [2]*Llama
	for i := range engines {
		if engines[i], err = NewLlama(cfg); err != nil {
			t.Fatalf("llama.cpp refused the generated model: %v", err)
		}
		defer engines[i].Close()
	}
	ctxE, genE := engines[0], engines[1]
	if spec := ctxE.Model(); spec.Layers != 8 || spec.KVHeads != 2 {
		t.Fatalf("spec %+v, want 8 layers over 2 KV heads", spec)
	}
	for _, s := range []Sampling{{MaxTokens: 12, IgnoreEOS: true}, {MaxTokens: 12, Temperature: 0.8, TopP: 0.95, Seed: 42, IgnoreEOS: true}} {
		for _, p := range testPrompts[:3] {
			toks := ctxE.Vocabulary().Encode(p)
			ref, err := genE.Generate(context.Background(), toks, s)
			if err != nil {
				t.Fatal(err)
			}
			got := disaggregate(t, ctxE, genE, toks, s, newBlocks(ctxE.Model(), len(toks)), 0)
			if !slices.Equal(got.Tokens, ref.Tokens) || len(ref.Tokens) != 12 {
				t.Fatalf("%q %+v: disaggregated %v, reference %v", p, s, got.Tokens, ref.Tokens)
			}
		}
	}
}
