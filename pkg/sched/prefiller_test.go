package sched

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/kvferry/kvferry/internal/poll"
	"github.com/kvferry/kvferry/pkg/executor"
)

func TestPlanPrefill(t *testing.T) {
	for _, tc := range []struct {
		name          string
		remaining     []int
		chunk, budget int
		want          []int
	}{
		{"one short prompt", []int{5}, 4, 16, []int{4}},
		{"chunks share the budget, oldest first", []int{10, 10, 10, 10, 10}, 4, 16, []int{4, 4, 4, 4, 0}},
		{"a short prompt leaves budget for the next", []int{1, 10, 10}, 4, 6, []int{1, 4, 1}},
		{"budget below a chunk", []int{10, 10}, 8, 5, []int{5, 0}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := PlanPrefill(tc.remaining, tc.chunk, tc.budget); !slices.Equal(got, tc.want) {
				t.Fatalf("plan %v, want %v", got, tc.want)
			}
		})
	}
}

// heldPrefill is the synthetic engine whose prefill steps wait for the
// test's gate (ignoring their context, as llama.cpp does within a step)
// and record each step's prompts.
type heldPrefill struct {
	executor.Engine
	gate    chan struct{}
	entered chan struct{} // cap 1: a step began
	mu      sync.Mutex
	steps   []int
}

func newHeldPrefill(e executor.Engine) *heldPrefill {
	return &heldPrefill{Engine: e, gate: make(chan struct{}), entered: make(chan struct{}, 1)}
}

func (h *heldPrefill) PrefillStep(_ context.Context, batch []*executor.Prompt, counts []int) error {
	select {
	case h.entered <- struct{}{}:
	default:
	}
	<-h.gate
	h.mu.Lock()
	h.steps = append(h.steps, len(batch))
	h.mu.Unlock()
	return h.Engine.PrefillStep(context.Background(), batch, counts)
}

func (h *heldPrefill) largest() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Max(h.steps)
}

// Prompts that wait together are prefilled in the same steps, and each
// one's KV, checksums and first token equal its prefill alone.
func TestPrefillerBatchesPrompts(t *testing.T) {
	spec, _ := executor.Preset("tiny")
	eng := newHeldPrefill(executor.NewSynthetic(spec, executor.Timing{}))
	f := NewPrefiller(eng, 4, 64, nil)
	prompts := []string{"the quiet river carries light past the old mill", "a small bird sings", "stone bridges hold the weight of many years and more"}
	type result struct {
		first  uint32
		sums   []uint64
		blocks [][]byte
		err    error
	}
	results := make([]result, len(prompts))
	var wg sync.WaitGroup
	for i, p := range prompts {
		wg.Go(func() {
			toks := executor.Tokenize(p)
			blocks := newBlocks(spec, len(toks))
			first, sums, err := f.Prefill(context.Background(), toks, executor.Sampling{Seed: uint64(i)}, blocks, 0)
			results[i] = result{first, sums, blocks, err}
		})
	}
	poll.Until(t, 10*time.Second, time.Millisecond, "every prompt waits in the prefill loop", func() bool { return f.Waiting() == len(prompts) })
	close(eng.gate)
	wg.Wait()
	if got := eng.largest(); got != len(prompts) {
		t.Fatalf("the largest prefill step ran %d prompts, want %d", got, len(prompts))
	}
	for i, p := range prompts {
		toks := executor.Tokenize(p)
		blocks := newBlocks(spec, len(toks))
		first, sums, err := executor.Prefill(context.Background(), executor.NewSynthetic(spec, executor.Timing{}), toks, executor.Sampling{Seed: uint64(i)}, blocks, 0)
		if err != nil || results[i].err != nil {
			t.Fatalf("prefill %q: alone %v, batched %v", p, err, results[i].err)
		}
		if first != results[i].first || !slices.Equal(sums, results[i].sums) || !slices.EqualFunc(blocks, results[i].blocks, slices.Equal) {
			t.Fatalf("prompt %q batched differs from alone", p)
		}
	}
}

// A caller that leaves while a step runs its prompt returns only once the
// step has ended: until then the engine may write its blocks.
func TestPrefillerLeaveWaitsForItsStep(t *testing.T) {
	spec, _ := executor.Preset("tiny")
	eng := newHeldPrefill(executor.NewSynthetic(spec, executor.Timing{}))
	f := NewPrefiller(eng, 4, 64, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		toks := executor.Tokenize("the quiet river carries light")
		_, _, err := f.Prefill(ctx, toks, executor.Sampling{}, newBlocks(spec, len(toks)), 0)
		done <- err
	}()
	<-eng.entered // a step runs the prompt
	cancel()
	select {
	case err := <-done:
		t.Fatalf("Prefill returned (%v) while its step may still write its blocks", err)
	case <-time.After(50 * time.Millisecond): // should not happen: short
	}
	close(eng.gate)
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Prefill answered %v, want context.Canceled", err)
	}
	poll.Until(t, 10*time.Second, time.Millisecond, "the loop let the prompt go", func() bool { return f.Waiting() == 0 })
}
