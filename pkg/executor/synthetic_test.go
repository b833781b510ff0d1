package executor

import (
	"context"
	"runtime"
	"testing"
	"time"
)

func blocksFor(spec ModelSpec, n int) [][]byte {
	bs := make([][]byte, spec.BlocksFor(n))
	for i := range bs {
		bs[i] = make([]byte, spec.BlockBytes())
	}
	return bs
}

func TestPresetGeometry(t *testing.T) {
	for _, tc := range []struct {
		name          string
		bytesPerToken int
	}{
		{"tiny", 256},
		{"llama3-8b", 128 << 10},
		{"llama3-70b", 320 << 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := Preset(tc.name)
			if err != nil {
				t.Fatal(err)
			}
			if got := m.BytesPerToken(); got != tc.bytesPerToken {
				t.Fatalf("bytes per token %d, want %d", got, tc.bytesPerToken)
			}
		})
	}
	// The yardstick: 4k tokens of llama3-8b is 512 MiB.
	m, _ := Preset("llama3-8b")
	if got := m.BlocksFor(4096) * m.BlockBytes(); got != 512<<20 {
		t.Fatalf("4k tokens of llama3-8b = %d bytes, want 512 MiB", got)
	}
	if _, err := Preset("gpt-5"); err == nil {
		t.Fatal("unknown preset: want error")
	}
}

func TestTokenizer(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []uint32
	}{
		{"the cache", []uint32{wordIDs["the"], wordIDs["cache"]}},
		{"Hi", []uint32{'H', 'i', TokenSeparator}},
		{"  ", []uint32{}},
		{"é", []uint32{0xc3, 0xa9, TokenSeparator}},
	} {
		got := Tokenize(tc.in)
		if len(got) != len(tc.want) {
			t.Fatalf("Tokenize(%q) = %v, want %v", tc.in, got, tc.want)
		}
		for i := range got {
			if got[i] != tc.want[i] {
				t.Fatalf("Tokenize(%q) = %v, want %v", tc.in, got, tc.want)
			}
		}
	}
	words := Tokenize("the river carry light")
	if got := Detokenize(words); got != "the river carry light" {
		t.Fatalf("Detokenize = %q", got)
	}
}

func TestPrefillDecodeMatchesReference(t *testing.T) {
	spec, _ := Preset("tiny")
	e := NewSynthetic(spec, Timing{})
	for _, prompt := range []string{"the quiet river", "Hello, kvferry! " + longPrompt(100)} {
		for _, s := range []Sampling{{MaxTokens: 1}, {MaxTokens: 16, Seed: 7}, {MaxTokens: 64, Temperature: 0.7, TopP: 0.9}} {
			toks := Tokenize(prompt)
			blocks := blocksFor(spec, len(toks))
			first, sums, err := e.Prefill(context.Background(), toks, s, blocks, 0)
			if err != nil {
				t.Fatal(err)
			}
			got := Checksums(blocks)
			sq, err := e.StartDecode(context.Background(), blocks, got, len(toks), first, s)
			if err != nil {
				t.Fatal(err)
			}
			for i := range sums {
				if sums[i] != got[i] {
					t.Fatalf("block %d checksum differs after no transfer", i)
				}
			}
			for sq.Finish() == FinishNone {
				if err := e.Step(context.Background(), []*Sequence{sq}); err != nil {
					t.Fatal(err)
				}
			}
			ref := Reference(spec, prompt, s)
			if Detokenize(sq.Tokens()) != ref.Text || sq.Finish() != ref.Finish {
				t.Fatalf("decode %q/%v, reference %q/%v", Detokenize(sq.Tokens()), sq.Finish(), ref.Text, ref.Finish)
			}
			if len(ref.Tokens) > s.MaxTokens {
				t.Fatalf("%d tokens, max %d", len(ref.Tokens), s.MaxTokens)
			}
		}
	}
}

// TestOneFlippedByteChangesOutput: decode depends on every KV byte.
func TestOneFlippedByteChangesOutput(t *testing.T) {
	spec, _ := Preset("tiny")
	e := NewSynthetic(spec, Timing{})
	prompt := longPrompt(40)
	s := Sampling{MaxTokens: 32, Seed: 1}
	toks := Tokenize(prompt)
	ref := Reference(spec, prompt, s)
	for _, pos := range []int{0, spec.BlockBytes() - 1, spec.BlockBytes() + 17} {
		blocks := blocksFor(spec, len(toks))
		first, sums, _ := e.Prefill(context.Background(), toks, s, blocks, 0)
		blocks[pos/spec.BlockBytes()][pos%spec.BlockBytes()] ^= 1
		got := Checksums(blocks)
		sq, err := e.StartDecode(context.Background(), blocks, got, len(toks), first, s)
		if err != nil {
			t.Fatal(err)
		}
		if got[pos/spec.BlockBytes()] == sums[pos/spec.BlockBytes()] {
			t.Fatalf("byte %d flipped, checksum unchanged", pos)
		}
		for sq.Finish() == FinishNone {
			sq.step()
		}
		if Detokenize(sq.Tokens()) == ref.Text {
			t.Fatalf("byte %d flipped, output unchanged", pos)
		}
	}
}

func TestKVDependsOnPrefix(t *testing.T) {
	spec, _ := Preset("tiny")
	a, b := Tokenize("the river "+longPrompt(20)), Tokenize("a river "+longPrompt(20))
	ba, bb := blocksFor(spec, len(a)), blocksFor(spec, len(b))
	writeKV(spec, a, ba, 0)
	writeKV(spec, b, bb, 0)
	last := len(ba) - 1
	if Checksum(ba[last]) == Checksum(bb[last]) {
		t.Fatal("last block equal although the first token differs")
	}
}

func TestPrefillRejectsWrongBlocks(t *testing.T) {
	spec, _ := Preset("tiny")
	e := NewSynthetic(spec, Timing{})
	if _, _, err := e.Prefill(context.Background(), Tokenize("the"), Sampling{}, nil, 0); err == nil {
		t.Fatal("want error")
	}
}

func TestTimingHonoursCancel(t *testing.T) {
	spec, _ := Preset("tiny")
	e := NewSynthetic(spec, Timing{PrefillTokensPerSecond: 1e-6})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	toks := Tokenize("the")
	if _, _, err := e.Prefill(ctx, toks, Sampling{}, blocksFor(spec, 1), 0); err != context.Canceled {
		t.Fatalf("err %v, want context.Canceled", err)
	}
}

// TestOneDevice: an engine's prefill and decode steps take turns on its one
// device (an aggregated server's engine): a prefill step that comes while
// a decode step runs ends after it, however short it is.
func TestOneDevice(t *testing.T) {
	spec, _ := Preset("tiny")
	e := NewSynthetic(spec, Timing{PrefillTokensPerSecond: 1e9, DecodeStepTime: 50 * time.Millisecond})
	ctx := context.Background()
	toks := Tokenize("the river")
	blocks := blocksFor(spec, len(toks))
	first, sums, err := e.Prefill(ctx, toks, Sampling{}, blocks, 0)
	if err != nil {
		t.Fatal(err)
	}
	seq, err := e.StartDecode(ctx, blocks, sums, len(toks), first, Sampling{MaxTokens: 4})
	if err != nil {
		t.Fatal(err)
	}
	// The decode step holds the device for its whole DecodeStepTime from
	// some moment after decodeStart; a prefill step that waits for the
	// device therefore ends at least that long after decodeStart, on the
	// monotonic clock. (The order of two goroutines' sends after their
	// steps proved nothing: the prefill could send first once it had the
	// device.)
	decodeStart := time.Now()
	decoded := make(chan struct{})
	go func() {
		defer close(decoded)
		if err := e.Step(ctx, []*Sequence{seq}); err != nil {
			t.Error(err)
		}
	}()
	deadline := time.Now().Add(10 * time.Second)
wait:
	for len(e.device) == 0 { // the decode step holds the device
		select {
		case <-decoded: // a scheduler that slept through the whole step: nothing to race
			break wait
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("the decode step never took the device")
		}
		runtime.Gosched()
	}
	p, err := e.BeginPrefill(ctx, toks, Sampling{}, blocksFor(spec, len(toks)), 0)
	if err == nil {
		err = e.PrefillStep(ctx, []*Prompt{p}, []int{len(toks)})
	}
	if err != nil {
		t.Fatal(err)
	}
	if waited := time.Since(decodeStart); waited < 50*time.Millisecond {
		t.Fatalf("the prefill step ended %v after the decode step began, inside its 50 ms: it did not wait for the device", waited)
	}
	<-decoded
}

func longPrompt(n int) string {
	s := ""
	for i := range n {
		s += vocabulary[i%len(vocabulary)] + " "
	}
	return s
}

func BenchmarkPrefillLlama8B4k(b *testing.B) {
	spec, _ := Preset("llama3-8b")
	e := NewSynthetic(spec, Timing{})
	toks := Tokenize(longPrompt(4096))
	blocks := blocksFor(spec, len(toks))
	b.SetBytes(int64(len(blocks) * spec.BlockBytes()))
	for b.Loop() {
		if _, _, err := e.Prefill(context.Background(), toks, Sampling{}, blocks, 0); err != nil {
			b.Fatal(err)
		}
	}
}

// TestPrefillWithReuse: blocks served from the reuse cache are not written,
// and the output is the same as a full prefill.
func TestPrefillWithReuse(t *testing.T) {
	spec, _ := Preset("tiny")
	e := NewSynthetic(spec, Timing{})
	toks := Tokenize(longPrompt(40)) // 2 full blocks and a partial one
	full := blocksFor(spec, len(toks))
	f1, s1, err := e.Prefill(context.Background(), toks, Sampling{}, full, 0)
	if err != nil {
		t.Fatal(err)
	}
	reused := blocksFor(spec, len(toks))
	copy(reused[0], full[0])
	copy(reused[1], full[1])
	f2, s2, err := e.Prefill(context.Background(), toks, Sampling{}, reused, 2)
	if err != nil || f1 != f2 {
		t.Fatalf("first token %d vs %d, %v", f1, f2, err)
	}
	for i := range s1 {
		if s1[i] != s2[i] {
			t.Fatalf("block %d differs with reuse", i)
		}
	}
	// A reused block is never written: a marker in it survives.
	reused[0][0] ^= 0xff
	if _, s3, _ := e.Prefill(context.Background(), toks, Sampling{}, reused, 1); s3[0] == s1[0] {
		t.Fatal("reused block was rewritten")
	}
	if _, _, err := e.Prefill(context.Background(), toks, Sampling{}, reused, 3); err == nil {
		t.Fatal("reusing the partial block: want error")
	}
	h1, h2 := BlockHashes(spec, toks), BlockHashes(spec, Tokenize("a "+longPrompt(40)))
	if len(h1) != 2 || h1[0] == h2[0] {
		t.Fatalf("hashes %v %v", h1, h2)
	}
}

// Prefix keys depend on every token up to the block's end, on the salt
// (the tenant) and on a secret of the process: two processes key the same
// prompt differently.
func TestPrefixKeys(t *testing.T) {
	spec, _ := Preset("tiny")
	k := NewPrefixKeys(spec)
	a := k.Keys("", Tokenize(longPrompt(40)))
	b := k.Keys("", Tokenize(longPrompt(40)))
	c := k.Keys("", Tokenize("a "+longPrompt(40)))
	if len(a) == 0 || len(a) != len(b) {
		t.Fatalf("keys %v %v", a, b)
	}
	for i := range a {
		if a[i] != b[i] {
			t.Fatal("the same prompt keyed differently in one process")
		}
		if i < len(c) && a[i] == c[i] {
			t.Fatalf("block %d: another prefix, the same key", i)
		}
	}
	if other := NewPrefixKeys(spec).Keys("", Tokenize(longPrompt(40))); other[0] == a[0] {
		t.Fatal("two secrets gave the same key")
	}
	// Tenants: the same prompt under another salt shares no block's key.
	for i, key := range k.Keys("tenant:acme", Tokenize(longPrompt(40))) {
		if key == a[i] {
			t.Fatalf("block %d: another salt, the same key", i)
		}
	}
}

// TestIgnoreEOS: with IgnoreEOS a sequence runs to MaxTokens, and its
// tokens up to where it would have stopped are the same.
func TestIgnoreEOS(t *testing.T) {
	spec, _ := Preset("tiny")
	s := Sampling{MaxTokens: 600, Temperature: 1, TopP: 1, Seed: 5}
	stops := Reference(spec, "the river", s)
	if stops.Finish != FinishStop {
		t.Fatalf("600 tokens without an EOS (odds 1 in %d a step): %v after %d tokens", eosOdds, stops.Finish, len(stops.Tokens))
	}
	s.IgnoreEOS = true
	runs := Reference(spec, "the river", s)
	if runs.Finish != FinishLength || len(runs.Tokens) != 600 {
		t.Fatalf("ignore_eos: %v after %d tokens, want length after 600", runs.Finish, len(runs.Tokens))
	}
	for i, tok := range stops.Tokens {
		if runs.Tokens[i] != tok {
			t.Fatalf("token %d differs: %d vs %d", i, runs.Tokens[i], tok)
		}
	}
}
