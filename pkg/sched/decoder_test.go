package sched

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/kvferry/kvferry/pkg/executor"
)

// gatedEngine steps the synthetic engine only when the test says so, and
// records each batch's size.
type gatedEngine struct {
	*executor.Synthetic
	gate    chan struct{}
	mu      sync.Mutex
	batches []int
}

func (g *gatedEngine) Step(ctx context.Context, batch []*executor.Sequence) error {
	select {
	case <-g.gate:
	case <-ctx.Done():
		return ctx.Err()
	}
	g.mu.Lock()
	g.batches = append(g.batches, len(batch))
	g.mu.Unlock()
	return g.Synthetic.Step(ctx, batch)
}

// drive takes a member's tokens until it ends.
func drive(t *testing.T, d *Decoder, m *Member) ([]uint32, executor.FinishReason) {
	return driveNotify(t, d, m, func() {})
}

// driveNotify is drive, calling first after the first Take.
func driveNotify(t *testing.T, d *Decoder, m *Member, first func()) ([]uint32, executor.FinishReason) {
	var out []uint32
	once := sync.OnceFunc(first)
	deadline := time.After(60 * time.Second) // generous: CI machines are loaded
	for {
		select {
		case <-m.Ready():
		case <-deadline:
			t.Error("member never finished")
			return out, executor.FinishNone
		}
		got, err := d.Take(m)
		if err != nil {
			t.Error(err)
		}
		once()
		out = append(out, got.Tokens...)
		if finish := got.Finish; finish != executor.FinishNone {
			return out, finish
		}
	}
}

func startSeq(t *testing.T, e executor.Engine, prompt string, s executor.Sampling) *executor.Sequence {
	toks := executor.Tokenize(prompt)
	blocks := newBlocks(e.Model(), len(toks))
	first, sums, err := executor.Prefill(context.Background(), e, toks, s, blocks, 0)
	if err != nil {
		t.Fatal(err)
	}
	sq, err := e.StartDecode(context.Background(), blocks, sums, len(toks), first, s)
	if err != nil {
		t.Fatal(err)
	}
	return sq
}

// Sequences whose owners keep up are stepped in one batch, and each one's
// tokens equal its own unbatched executor.Reference.
func TestDecoderBatchesAndMatchesReference(t *testing.T) {
	spec, _ := executor.Preset("tiny")
	g := &gatedEngine{Synthetic: executor.NewSynthetic(spec, executor.Timing{}), gate: make(chan struct{})}
	d := NewDecoder(g, 0, nil)
	prompts := []string{"the river", "the quiet harbour at night", "a ferry", "light on the water", "north wind", "the bridge", "stone tower", "open door"}
	s := executor.Sampling{MaxTokens: 20, Temperature: 1, TopP: 1, Seed: 3}
	var firstTaken, owners sync.WaitGroup
	texts := make([]string, len(prompts))
	finishes := make([]executor.FinishReason, len(prompts))
	for i, p := range prompts {
		m := d.Join(startSeq(t, g, p, s))
		firstTaken.Add(1)
		owners.Go(func() {
			toks, finish := driveNotify(t, d, m, firstTaken.Done)
			texts[i], finishes[i] = executor.Detokenize(toks), finish
			d.Leave(m)
		})
	}
	// Every owner took its first token before the first step may end: from
	// the second step on, every one of them is steppable together.
	firstTaken.Wait()
	close(g.gate)
	owners.Wait()
	for i, p := range prompts {
		want := executor.Reference(spec, p, s)
		if texts[i] != want.Text || finishes[i] != want.Finish {
			t.Fatalf("%q: %q (%v), reference %q (%v)", p, texts[i], finishes[i], want.Text, want.Finish)
		}
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	most := 0
	for _, n := range g.batches {
		most = max(most, n)
	}
	if most < len(prompts)/2 {
		t.Fatalf("batches %v: some step should run at least %d sequences", g.batches, len(prompts)/2)
	}
}

// A sequence whose owner does not take its tokens is stepped until
// maxPending of them wait, then no more: the others go on without it.
func TestDecoderWaitsForSlowOwner(t *testing.T) {
	spec, _ := executor.Preset("tiny")
	e := executor.NewSynthetic(spec, executor.Timing{})
	d := NewDecoder(e, 0, nil)
	slow := d.Join(startSeq(t, e, "the river", executor.Sampling{MaxTokens: 3 * maxPending, IgnoreEOS: true}))
	fast := d.Join(startSeq(t, e, "the bridge", executor.Sampling{MaxTokens: 3 * maxPending}))
	if toks, _ := drive(t, d, fast); len(toks) == 0 {
		t.Fatal("the fast sequence produced nothing")
	}
	d.Leave(fast)
	got, err := d.Take(slow) // maxPending tokens, the first one included
	if err != nil || len(got.Tokens) != maxPending || got.Finish != executor.FinishNone {
		t.Fatalf("slow owner: %v %v %v, want its first %d tokens only", got.Tokens, got.Finish, err, maxPending)
	}
	d.Leave(slow)
}

// Owners that keep up stay in one batch: 8 sequences of 30 tokens take
// about 30 steps, not 60 (the batch splitting in two cohorts that step by
// turns). Measured by steps counted, not by time.
func TestDecoderKeepsOneBatch(t *testing.T) {
	spec, _ := executor.Preset("tiny")
	e := executor.NewSynthetic(spec, executor.Timing{DecodeStepTime: 2 * time.Millisecond})
	var mu sync.Mutex
	steps := 0
	d := NewDecoder(e, 0, func(int) { mu.Lock(); steps++; mu.Unlock() })
	const n, tokens = 8, 30
	var members []*Member
	for i := range n {
		members = append(members, d.Join(startSeq(t, e, fmt.Sprintf("river %d", i), executor.Sampling{MaxTokens: tokens, IgnoreEOS: true})))
	}
	var owners sync.WaitGroup
	for _, m := range members {
		owners.Go(func() {
			if toks, _ := drive(t, d, m); len(toks) != tokens {
				t.Errorf("%d tokens, want %d", len(toks), tokens)
			}
			d.Leave(m)
		})
	}
	owners.Wait()
	mu.Lock()
	defer mu.Unlock()
	// tokens-1 steps after the first token; a few more while the members
	// join one by one and the loop starts before the last one is in.
	if steps > tokens+n {
		t.Fatalf("%d steps for %d sequences of %d tokens: the batch split", steps, n, tokens)
	}
}

// With more sequences than maxSeqs, each step runs maxSeqs of them in
// turn, and every one finishes.
func TestDecoderMaxSeqsRoundRobin(t *testing.T) {
	spec, _ := executor.Preset("tiny")
	g := &gatedEngine{Synthetic: executor.NewSynthetic(spec, executor.Timing{}), gate: make(chan struct{})}
	d := NewDecoder(g, 2, nil)
	var members []*Member
	for _, p := range []string{"a", "b", "c", "d", "e"} {
		members = append(members, d.Join(startSeq(t, g, p, executor.Sampling{MaxTokens: 6})))
	}
	close(g.gate)
	var owners sync.WaitGroup
	for _, m := range members {
		owners.Go(func() {
			drive(t, d, m)
			d.Leave(m)
		})
	}
	owners.Wait()
	for _, n := range g.batches {
		if n > 2 {
			t.Fatalf("batch of %d with maxSeqs 2: %v", n, g.batches)
		}
	}
}

// Leave never waits for a running step: a request that is cancelled in
// the middle of an hour-long step is free at once, and when nobody is
// left the step is abandoned and the loop ends.
func TestDecoderLeaveDoesNotWaitForTheStep(t *testing.T) {
	spec, _ := executor.Preset("tiny")
	e := executor.NewSynthetic(spec, executor.Timing{DecodeStepTime: time.Hour})
	stepped := make(chan int, 16)
	d := NewDecoder(e, 0, func(n int) { stepped <- n })
	closed := make(chan struct{})
	sq := startSeq(t, e, "the river", executor.Sampling{MaxTokens: 50})
	sq.OnClose(func() { close(closed) })
	m := d.Join(sq)
	d.Leave(m)
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("the sequence was not closed after Leave")
	}
	waitFor(t, "the decode loop to end with no members", func() bool { return d.Running() == 0 && !d.loopRunning() })
}

func (d *Decoder) loopRunning() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.running
}
