package sched

import (
	"testing"

	"github.com/kvferry/kvferry/internal/leakcheck"
	"github.com/kvferry/kvferry/pkg/executor"
)

// The loops start goroutines: none may outlive its test.
func TestMain(m *testing.M) { leakcheck.VerifyTestMain(m) }

func newBlocks(spec executor.ModelSpec, n int) [][]byte {
	blocks := make([][]byte, spec.BlocksFor(n))
	for i := range blocks {
		blocks[i] = make([]byte, spec.BlockBytes())
	}
	return blocks
}
