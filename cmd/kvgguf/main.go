// Command kvgguf writes a Llama-architecture GGUF model of a chosen shape
// with random weights and a donor model's tokenizer (package gguf): a
// model whose KV cache and compute are real in size, for measuring
// transfers and batching (make bench-serve on a GPU) where no such model
// can be downloaded. Its text is noise; run it with ignore_eos.
//
//	kvgguf --donor ../shared/models/stories260K.gguf --out .models/llama-1b-shape.gguf \
//	  --layers 16 --dim 2048 --heads 32 --kv-heads 8 --ff 8192
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"

	"github.com/kvferry/kvferry/pkg/gguf"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "kvgguf:", err)
		os.Exit(2)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("kvgguf", flag.ContinueOnError)
	donor := fs.String("donor", "../shared/models/stories260K.gguf", "GGUF model whose tokenizer the new model takes")
	out := fs.String("out", "", "file to write")
	var s gguf.LlamaShape
	fs.IntVar(&s.Layers, "layers", 16, "transformer blocks")
	fs.IntVar(&s.Dim, "dim", 2048, "embedding width")
	fs.IntVar(&s.Heads, "heads", 32, "attention heads")
	fs.IntVar(&s.KVHeads, "kv-heads", 8, "KV heads (grouped-query attention)")
	fs.IntVar(&s.FF, "ff", 8192, "feed-forward width")
	fs.IntVar(&s.Context, "context", 4096, "trained context length")
	f32 := fs.Bool("f32", false, "F32 weights (default F16)")
	seed := fs.Uint64("seed", 1, "seed of the random weights")
	if err := fs.Parse(args); err != nil {
		return err
	}
	s.Type = gguf.F16
	if *f32 {
		s.Type = gguf.F32
	}
	if *out == "" {
		return errors.New("--out is required")
	}
	if err := s.Validate(); err != nil {
		return err
	}
	df, err := os.Open(*donor)
	if err != nil {
		return err
	}
	kvs, err := gguf.ReadMetadata(df)
	df.Close()
	if err != nil {
		return err
	}
	vocab, err := gguf.VocabSize(kvs)
	if err != nil {
		return err
	}
	f, err := os.Create(*out)
	if err != nil {
		return err
	}
	if err := gguf.WriteRandomLlama(f, kvs, s, *seed); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	fmt.Printf("%s: %d layers, dim %d, %d heads over %d KV heads, ff %d, vocabulary %d: %.2f B parameters, KV %d bytes a token (f16)\n",
		*out, s.Layers, s.Dim, s.Heads, s.KVHeads, s.FF, vocab, float64(s.Params(vocab))/1e9, s.KVBytesPerToken())
	return nil
}
