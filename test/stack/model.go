package stack

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/kvferry/kvferry/pkg/executor"
)

// The test model (shared/models/README.md): a real 260K-parameter Llama,
// its sha256, and what llama.cpp prints for it.
const (
	TestModelSHA256 = "270cba1bd5109f42d03350f60406024560464db173c0e387d91f0426d3bd256d"
	TestModelName   = "stories260K"
	KnownPrompt     = "Once upon a time"
	// KnownOutput is the greedy 40-token continuation of KnownPrompt.
	KnownOutput = ", there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball."
)

// TestModelPath is shared/models/stories260K.gguf beside the repository,
// checked against its sha256. A missing or different file fails the test:
// CI has it.
func TestModelPath(t testing.TB) string {
	t.Helper()
	root, err := moduleRoot()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(root, "..", "shared", "models", TestModelName+".gguf")
	sum, err := executor.FileSHA256(path)
	if err != nil {
		t.Fatalf("test model: %v", err)
	}
	if sum != TestModelSHA256 {
		t.Fatalf("test model %s has sha256 %s, want %s", path, sum, TestModelSHA256)
	}
	return path
}

// LlamaLibDir is where make deps-llama put the llama.cpp libraries
// (KVFERRY_LLAMA_LIB_DIR, else .llama/lib in the repository).
func LlamaLibDir(t testing.TB) string {
	t.Helper()
	if dir := os.Getenv("KVFERRY_LLAMA_LIB_DIR"); dir != "" {
		return dir
	}
	root, err := moduleRoot()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(root, ".llama", "lib")
}
