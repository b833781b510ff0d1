package cli

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"

	"go.uber.org/zap"

	"github.com/kvferry/kvferry/pkg/executor"
)

// EngineFlags pick the model engine; the router and both servers take
// them, so all three agree on the model, its vocabulary and its context.
type EngineFlags struct {
	Engine        string
	Model         string // synthetic preset
	ModelPath     string // llamacpp GGUF file
	ModelSHA256   string // when set, the GGUF file must have this sha256
	LibDir        string
	ServedName    string
	ContextTokens int
	Slots         int
	Threads       int
	GPULayers     int
	FlashAttn     string
	PrefillChunk  int
}

// RegisterModel adds the flags that name the model: the router's, which
// tokenizes with the servers' model and runs no engine.
func (e *EngineFlags) RegisterModel(fs *flag.FlagSet) {
	fs.StringVar(&e.Engine, "engine", executor.EngineSynthetic, "model engine: synthetic (embedded, no model file) or llamacpp (a GGUF model through llama.cpp)")
	fs.StringVar(&e.Model, "model", "tiny", "synthetic engine: model preset: "+fmt.Sprint(executor.PresetNames()))
	fs.StringVar(&e.ModelPath, "model-path", "", "llamacpp engine: the GGUF model file (the same file on the router and every server)")
	fs.StringVar(&e.ModelSHA256, "model-sha256", "", "llamacpp engine: the GGUF file's expected sha256 (hex); a file that differs stops the process at start (a model volume that changed under a fleet)")
	fs.StringVar(&e.LibDir, "llama-lib-dir", ".llama/lib", "llamacpp engine: folder of the llama.cpp shared libraries (make deps-llama)")
	fs.StringVar(&e.ServedName, "served-model-name", "", "the model name clients use (default: the synthetic preset's name, or the GGUF file's name without .gguf)")
	fs.IntVar(&e.ContextTokens, "context-tokens", 0, fmt.Sprintf("llamacpp engine: tokens one sequence holds, prompt plus output (0: the model's training context, at most %d); the same on the router and every server", executor.DefaultLlamaContextTokens))
}

// Register adds every engine flag: the model's and how the engine runs it
// (the servers').
func (e *EngineFlags) Register(fs *flag.FlagSet) {
	e.RegisterModel(fs)
	fs.IntVar(&e.Slots, "llama-slots", executor.DefaultLlamaSlots, "llamacpp engine: sequences the engine holds at once (concurrent decodes on a generation server)")
	fs.IntVar(&e.GPULayers, "gpu-layers", -1, "llamacpp engine: model layers on the GPU when the libraries have a GPU backend (--llama-lib-dir of a CUDA build): -1 all, 0 none")
	fs.IntVar(&e.Threads, "llama-threads", 0, "llamacpp engine: CPU threads (0: the CPUs this process may use, GOMAXPROCS; give each server its share when several share a host)")
	fs.IntVar(&e.PrefillChunk, "prefill-chunk-tokens", executor.DefaultPrefillChunk, "context server (and an --aggregated generation server): most tokens of one prompt in a prefill step; a long prompt runs in such chunks, batched with other prompts, so it does not stall them (chunked prefill)")
	fs.StringVar(&e.FlashAttn, "llama-flash-attn", "auto", "llamacpp engine: flash attention auto, on or off (the same on context and generation servers is not required: the blocks are the same)")
}

// Validate checks every engine flag (Register's).
func (e *EngineFlags) Validate() error {
	if e.PrefillChunk <= 0 {
		return fmt.Errorf("--prefill-chunk-tokens must be positive, got %d", e.PrefillChunk)
	}
	if err := e.ValidateModel(); err != nil {
		return err
	}
	if e.Engine == executor.EngineLlamaCpp {
		switch e.FlashAttn {
		case "auto", "on", "off":
		default:
			return fmt.Errorf("--llama-flash-attn must be auto, on or off, got %q", e.FlashAttn)
		}
		if e.Slots <= 0 || e.Threads < 0 || e.GPULayers < -1 {
			return errors.New("--llama-threads must not be negative, --llama-slots must be positive, --gpu-layers at least -1")
		}
	}
	return nil
}

// ValidateModel checks the model flags (RegisterModel's).
func (e *EngineFlags) ValidateModel() error {
	switch e.Engine {
	case executor.EngineSynthetic:
		if _, err := executor.Preset(e.Model); err != nil {
			return fmt.Errorf("--model: %w", err)
		}
	case executor.EngineLlamaCpp:
		if e.ModelPath == "" {
			return errors.New("--engine=llamacpp needs --model-path=FILE.gguf")
		}
		if _, err := os.Stat(e.ModelPath); err != nil {
			return fmt.Errorf("--model-path: %w", err)
		}
		if e.ModelSHA256 != "" {
			sum, err := executor.FileSHA256(e.ModelPath)
			if err != nil {
				return fmt.Errorf("--model-path: %w", err)
			}
			if !strings.EqualFold(sum, e.ModelSHA256) {
				return fmt.Errorf("--model-path %s has sha256 %s, --model-sha256 says %s", e.ModelPath, sum, e.ModelSHA256)
			}
		}
		if e.ContextTokens < 0 {
			return errors.New("--context-tokens must not be negative")
		}
	default:
		return fmt.Errorf("--engine must be %s or %s, got %q", executor.EngineSynthetic, executor.EngineLlamaCpp, e.Engine)
	}
	return nil
}

// LlamaConfig is the llama.cpp engine's configuration.
func (e *EngineFlags) LlamaConfig() executor.LlamaConfig {
	return executor.LlamaConfig{ModelPath: e.ModelPath, LibDir: e.LibDir, ServedName: e.ServedName, ContextTokens: e.ContextTokens, Slots: e.Slots, Threads: e.Threads, GPULayers: e.GPULayers, FlashAttention: e.FlashAttn, PrefillChunk: e.PrefillChunk}
}

// NewEngine builds the engine the flags name; the synthetic one with the
// given timing. close frees what it holds.
func (e *EngineFlags) NewEngine(timing executor.Timing, lg *zap.Logger) (engine executor.Engine, close func(), err error) {
	if e.Engine == executor.EngineLlamaCpp {
		l, err := executor.NewLlama(e.LlamaConfig())
		if err != nil {
			return nil, nil, err
		}
		lg.Info("llama.cpp engine", zap.String("lib_dir", e.LibDir), zap.Strings("devices", l.Devices()), zap.Int("gpu_layers", e.GPULayers))
		return l, l.Close, nil
	}
	spec, err := executor.Preset(e.Model)
	if err != nil {
		return nil, nil, err
	}
	return executor.NewSynthetic(spec, timing), func() {}, nil
}

// Vocabulary is what the router needs of the model: its tokenizer and KV
// geometry, without its weights.
func (e *EngineFlags) Vocabulary() (executor.Vocabulary, executor.ModelSpec, error) {
	if e.Engine == executor.EngineLlamaCpp {
		v, spec, err := executor.OpenLlamaVocab(e.LlamaConfig())
		return v, spec, err
	}
	spec, err := executor.Preset(e.Model)
	return executor.SyntheticVocabulary, spec, err
}
