package gguf

import (
	"bytes"
	"math"
	"os"
	"path/filepath"
	"testing"
)

func TestFloat16(t *testing.T) {
	for _, c := range []struct {
		in   float32
		want uint16
	}{
		{0, 0x0000}, {1, 0x3c00}, {-2, 0xc000}, {0.5, 0x3800}, {65504, 0x7bff}, {1e6, 0x7c00},
		{float32(math.Inf(-1)), 0xfc00}, {6.1035156e-05, 0x0400}, {5.9604645e-08, 0x0001}, {1e-9, 0},
		{0.1, 0x2e66}, {0.02, 0x251f}, {1.0009766, 0x3c01}, {1.00048828125, 0x3c00}, // a tie rounds to even
	} {
		if got := Float16(c.in); got != c.want {
			t.Errorf("Float16(%g) = %#04x, want %#04x", c.in, got, c.want)
		}
	}
}

// donor is the test model's metadata (its tokenizer).
func donor(t testing.TB) []KV {
	t.Helper()
	f, err := os.Open(filepath.Join("..", "..", "..", "shared", "models", "stories260K.gguf"))
	if err != nil {
		t.Skipf("test model: %v", err)
	}
	defer f.Close()
	kvs, err := ReadMetadata(f)
	if err != nil {
		t.Fatal(err)
	}
	return kvs
}

// TestRandomLlamaRoundTrip: a written model reads back with the donor's
// tokenizer, the shape's hyperparameters, and the exact size its tensors
// make (aligned), and the same seed writes the same bytes.
func TestRandomLlamaRoundTrip(t *testing.T) {
	d := donor(t)
	vocab, err := VocabSize(d)
	if err != nil || vocab != 512 {
		t.Fatalf("donor vocabulary %d, %v", vocab, err)
	}
	shape := LlamaShape{Layers: 2, Dim: 64, Heads: 4, KVHeads: 2, FF: 96, Context: 256, Type: F16}
	var a, b bytes.Buffer
	if err := WriteRandomLlama(&a, d, shape, 7); err != nil {
		t.Fatal(err)
	}
	if err := WriteRandomLlama(&b, d, shape, 7); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a.Bytes(), b.Bytes()) {
		t.Fatal("one seed wrote two models")
	}
	kvs, err := ReadMetadata(bytes.NewReader(a.Bytes()))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]KV{}
	for _, kv := range kvs {
		got[kv.Key] = kv
	}
	for _, want := range []KV{Uint32("llama.block_count", 2), Uint32("llama.attention.head_count_kv", 2), String("general.architecture", "llama")} {
		if kv, ok := got[want.Key]; !ok || !bytes.Equal(kv.Raw, want.Raw) {
			t.Errorf("%s: %v, want %v", want.Key, kv.Raw, want.Raw)
		}
	}
	if n, _ := VocabSize(kvs); n != vocab {
		t.Errorf("vocabulary %d after the round trip, want %d", n, vocab)
	}
	if shape.Params(vocab) < int64(a.Len())/2-1<<16 || shape.Params(vocab) > int64(a.Len())/2 {
		t.Errorf("%d bytes for %d F16 parameters", a.Len(), shape.Params(vocab))
	}
}

func TestShapeValidate(t *testing.T) {
	for _, s := range []LlamaShape{
		{Layers: 1, Dim: 60, Heads: 8, KVHeads: 8, FF: 1, Context: 1, Type: F16}, // dim not a multiple of heads
		{Layers: 1, Dim: 64, Heads: 8, KVHeads: 3, FF: 1, Context: 1, Type: F16}, // heads not a multiple of KV heads
		{Layers: 1, Dim: 24, Heads: 8, KVHeads: 8, FF: 1, Context: 1, Type: F16}, // odd head dimension
		{Layers: 0, Dim: 64, Heads: 8, KVHeads: 8, FF: 1, Context: 1, Type: F16}, // no layer
		{Layers: 1, Dim: 64, Heads: 8, KVHeads: 8, FF: 1, Context: 1, Type: 2},   // quantized
	} {
		if s.Validate() == nil {
			t.Errorf("%+v validated", s)
		}
	}
}

// FuzzReadMetadata: any bytes either parse or fail with an error, within
// the reader's bounds; nothing panics or allocates without end.
func FuzzReadMetadata(f *testing.F) {
	var buf bytes.Buffer
	if err := Write(&buf, []KV{String("a", "b"), Uint32("c", 3)}, nil); err == nil {
		f.Add(buf.Bytes())
	}
	f.Add([]byte("GGUF"))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = ReadMetadata(bytes.NewReader(b))
	})
}
