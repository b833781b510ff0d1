package sched

import (
	"cmp"
	"context"
	"slices"
	"sync"

	"github.com/kvferry/kvferry/pkg/executor"
)

// Decoder is a server's decode loop: continuous batching. Every sequence
// that joins is stepped together with every other running one — one
// engine Step per iteration over the whole batch (one llama_decode with
// many sequence ids; one step time of the synthetic engine) — and leaves
// when it finishes or its owner leaves. The loop's goroutine runs while
// the decoder has members and ends when the last one is gone; the next
// Join starts it again, so the decoder needs no owner to run or stop it.
//
// A sequence is stepped while fewer than maxPending (8) of its tokens wait for
// its owner: a client that reads slowly stalls only its own sequence (the
// stream's flow control reaches the engine), and an owner that keeps up
// is never left out of a step. (Requiring every token to be taken before
// the next step split the batch in two: the owners that had taken by the
// time the loop looked were stepped alone, the rest a step later, so each
// sequence advanced every other step.) An owner takes whatever is ready
// at once, so a slow moment coalesces tokens into one message.
//
// Only the loop touches a member's executor.Sequence after Join: the owner reads
// the tokens the loop hands over (Take), and Leave hands the executor.Sequence back
// to the decoder, which closes it — at once, or when the step running it
// ends (Leave never waits for a step: a cancel frees the request at once).
type Decoder struct {
	engine  executor.Engine
	maxSeqs int
	onStep  func(batch int)

	mu      sync.Mutex
	members []*Member     // running, in join order
	steps   uint64        // decode steps so far
	running bool          // the loop goroutine exists
	wake    chan struct{} // cap 1: a member became steppable, joined or left
	// batch is the step running now; cancelStep interrupts it when every
	// member of it left (a synthetic step time nobody waits for).
	batch      []*Member
	cancelStep context.CancelFunc
}

// Member is one sequence in the decoder.
type Member struct {
	seq      *executor.Sequence
	ready    chan struct{}      // cap 1: new tokens, an end or an error to Take
	pending  []uint32           // generated, not yet taken
	pendLP   []executor.Logprob // their logprobs (the first token's excepted)
	finish   executor.FinishReason
	err      error
	sent     int    // tokens of seq handed over so far
	lastStep uint64 // the step it was last stepped at, or joined at
	inStep   bool   // the loop is stepping it now
	left     bool
}

// NewDecoder returns a decoder over engine stepping at most maxSeqs
// sequences at a time (0: all). onStep, when set, is called after each
// step with the batch size (progress and metrics).
func NewDecoder(engine executor.Engine, maxSeqs int, onStep func(batch int)) *Decoder {
	return &Decoder{engine: engine, maxSeqs: maxSeqs, onStep: onStep, wake: make(chan struct{}, 1)}
}

// Join adds a sequence. Its tokens so far (the first token) are ready to
// Take at once.
func (d *Decoder) Join(seq *executor.Sequence) *Member {
	m := &Member{seq: seq, ready: make(chan struct{}, 1)}
	d.mu.Lock()
	defer d.mu.Unlock()
	m.lastStep = d.steps
	m.collectLocked(nil)
	if m.finish != executor.FinishNone {
		return m // nothing to step
	}
	d.members = append(d.members, m)
	if !d.running {
		d.running = true
		go d.loop()
	}
	d.signal()
	return m
}

// signal wakes a loop that found nothing to step.
func (d *Decoder) signal() {
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

// Ready is signalled when Take has something new.
func (m *Member) Ready() <-chan struct{} { return m.ready }

// Taken is what Take hands over.
type Taken struct {
	Tokens []uint32
	// Logprobs are the logprobs of Tokens when the sampling asked for
	// them — the sequence's first token excepted: its logprob is the
	// prefill's (executor.Prefilled.Logprob).
	Logprobs []executor.Logprob
	Finish   executor.FinishReason
}

// Take returns the tokens generated since the last Take, why the sequence
// ended (executor.FinishNone while it runs) and the engine's error, if a step failed.
func (d *Decoder) Take(m *Member) (Taken, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	t := Taken{Tokens: m.pending, Logprobs: m.pendLP, Finish: m.finish}
	m.pending, m.pendLP = nil, nil
	if len(t.Tokens) > 0 {
		d.signal() // the member may be stepped again
	}
	return t, m.err
}

// Leave removes the member and closes its executor.Sequence: now, or when the
// step running it ends. It does not wait.
func (d *Decoder) Leave(m *Member) {
	d.mu.Lock()
	m.left = true
	d.removeLocked(m) // never picked again
	inStep := m.inStep
	if inStep && d.allLeftLocked() {
		d.cancelStep() // nobody waits for this step any more
	}
	d.signal()
	d.mu.Unlock()
	if !inStep {
		m.seq.Close()
	}
}

func (d *Decoder) allLeftLocked() bool {
	for _, m := range d.batch {
		if !m.left {
			return false
		}
	}
	return true
}

func (d *Decoder) removeLocked(m *Member) {
	if i := slices.Index(d.members, m); i >= 0 {
		d.members = slices.Delete(d.members, i, i+1)
	}
}

// Running is the number of sequences in the decoder.
func (d *Decoder) Running() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.members)
}

// collectLocked hands the sequence's new tokens and end to the owner.
func (m *Member) collectLocked(err error) {
	toks, lps := m.seq.Tokens(), m.seq.Logprobs()
	for i := m.sent; i < len(toks); i++ {
		m.pending = append(m.pending, toks[i])
		if i >= 1 && i-1 < len(lps) {
			m.pendLP = append(m.pendLP, lps[i-1]) // lps are tokens[1:]'s
		}
	}
	m.sent = len(toks)
	m.finish = m.seq.Finish()
	if err != nil {
		m.err = err
	}
	select {
	case m.ready <- struct{}{}:
	default: // already signalled; Take gets everything
	}
}

func (d *Decoder) loop() {
	for {
		d.mu.Lock()
		if len(d.members) == 0 {
			d.running = false
			d.mu.Unlock()
			return
		}
		batch := d.pickLocked()
		if len(batch) == 0 {
			d.mu.Unlock()
			<-d.wake // every member waits for its owner to take its tokens
			continue
		}
		seqs := make([]*executor.Sequence, len(batch))
		for i, m := range batch {
			m.inStep = true
			seqs[i] = m.seq
		}
		ctx, cancel := context.WithCancel(context.Background())
		d.batch, d.cancelStep = batch, cancel
		d.mu.Unlock()

		err := d.engine.Step(ctx, seqs)
		cancel()

		var gone []*Member
		d.mu.Lock()
		d.batch = nil
		for _, m := range batch {
			m.inStep = false
			if m.left {
				gone = append(gone, m)
				continue
			}
			m.collectLocked(err)
			if m.finish != executor.FinishNone || err != nil {
				d.removeLocked(m)
			}
		}
		d.mu.Unlock()
		for _, m := range gone {
			m.seq.Close() // its owner left during the step
		}
		if d.onStep != nil {
			d.onStep(len(batch))
		}
	}
}

// maxPending is how many untaken tokens stop a member from being stepped:
// a client that stops reading stalls only its own sequence, 8 tokens ahead
// of it, and a fast engine's answer still streams (at least one message
// per 8 tokens). (64 was tried on the H200 when steps ran 2.9 sequences on
// average; it changed nothing there — the cause was llama.cpp's
// micro-batching, see seqSlots — and let an instant engine answer 22
// tokens in one message, which the end-to-end streaming test caught.)
const maxPending = 8

// pickLocked chooses this step's batch: every member whose owner keeps
// up (fewer than maxPending tokens untaken), or the maxSeqs of them that
// waited longest.
func (d *Decoder) pickLocked() []*Member {
	var ready []*Member
	for _, m := range d.members {
		if len(m.pending) < maxPending {
			ready = append(ready, m)
		}
	}
	d.steps++
	batch := ready
	if d.maxSeqs > 0 && len(ready) > d.maxSeqs {
		last := make([]uint64, len(ready))
		for i, m := range ready {
			last[i] = m.lastStep
		}
		picked := PickBatch(last, d.maxSeqs)
		batch = make([]*Member, len(picked))
		for i, k := range picked {
			batch[i] = ready[k]
		}
	}
	for _, m := range batch {
		m.lastStep = d.steps
	}
	return batch
}

// PickBatch chooses a decode step from the ready sequences, given the step
// each was last stepped at (or joined at): all of them when they fit in
// maxSeqs (0: no bound), else the maxSeqs that waited longest, the
// earlier joined first on a tie. A sequence therefore waits at most
// ⌈n/maxSeqs⌉ steps with n running, whoever joins or leaves meanwhile (a
// round-robin index into a list that members leave skips some of them).
func PickBatch(last []uint64, maxSeqs int) []int {
	idx := make([]int, len(last))
	for i := range idx {
		idx[i] = i
	}
	if maxSeqs <= 0 || len(last) <= maxSeqs {
		return idx
	}
	slices.SortStableFunc(idx, func(a, b int) int { return cmp.Compare(last[a], last[b]) })
	picked := idx[:maxSeqs]
	slices.Sort(picked) // in join order
	return picked
}
