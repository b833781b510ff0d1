package sched

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/kvferry/kvferry/pkg/blockpool"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

// The scheduler simulation drives a context and a generation server's
// scheduling — their request tables, admission queues, real block pools,
// the prefill plan and the decode batch pick, the very types and functions
// the servers run — on a virtual clock, from a seeded random workload
// with client cancels in every stage and the handoff lease as backstop.
// Replay a failure with
//
//	go test ./pkg/executor -run TestSchedulerSimulation -sched-seed N -v
var (
	schedSeeds = flag.Int("sched-seeds", 500, "number of scheduler simulation seeds to run")
	schedSeed  = flag.Uint64("sched-seed", 0, "run only this scheduler simulation seed (0: run -sched-seeds seeds)")
)

// Simulated time: one step is a millisecond.
const (
	schedArrivals  = 200  // ms during which requests arrive
	schedHorizon   = 5000 // ms by which every request must have ended and every block come back
	schedLease     = 400  // ms an advertisement waits for the generation server
	blockTokensSim = 4
)

// raceSchedSeeds caps the seeds under -race (see raceEnabled).
const raceSchedSeeds = 50

type outcome int

const (
	outNone      outcome = iota
	outCompleted         // every token decoded
	outCancelled         // the client cancelled
	outRejected          // a full queue (429) or a prompt larger than a pool
	outExpired           // the handoff lease ran out while the generation side queued
)

func (o outcome) String() string {
	return [...]string{"none", "completed", "cancelled", "rejected", "expired"}[o]
}

// schedReq is one request on one server.
type schedReq struct {
	Request
	q       *schedServer
	blocks  []blockpool.ID
	arrived int // ms it joined this server's queue
}

type schedServer struct {
	name  string
	pool  *blockpool.Pool
	table *Table[*schedReq]
	queue *Queue[*schedReq]
	order []*schedReq // admissions, in order
}

type schedJob struct {
	id                 string
	arriveAt, cancelAt int // cancelAt -1: never
	blocks             int
	prompt, maxTokens  int

	ctx, gen  *schedReq
	prefilled int // prompt tokens run
	decoded   int
	out       outcome
	lastStep  int // decode step index it was last stepped at
}

type schedWorld struct {
	rng           *rand.Rand
	ms            int
	now           time.Time
	ctx, gen      *schedServer
	chunk, budget int
	maxSeqs       int
	peak          int // most sequences decoding at once
	jobs          []*schedJob
	prefilling    []*schedJob // arrival order
	decoding      []*schedJob // join order
	decodeSteps   int
	lease         int // ms an advertisement waits for the generation server
	leaseUntil    map[*schedJob]int
	t             *testing.T
	failed        bool
}

func (w *schedWorld) fatalf(format string, args ...any) {
	if !w.failed {
		w.t.Errorf("ms %d: "+format, append([]any{w.ms}, args...)...)
		w.failed = true
	}
}

func newSchedServer(name string, blocks, maxQueue int) *schedServer {
	pool, _ := blockpool.New(blocks, 8)
	return &schedServer{name: name, pool: pool, table: NewTable[*schedReq](), queue: NewQueue[*schedReq](maxQueue)}
}

func newSchedWorld(t *testing.T, seed uint64) *schedWorld {
	rng := rand.New(rand.NewPCG(seed, seed^0x5eed))
	w := &schedWorld{rng: rng, t: t, now: time.Unix(0, 0), leaseUntil: map[*schedJob]int{}}
	w.ctx = newSchedServer("ctx", 8+rng.IntN(24), rng.IntN(24))
	w.gen = newSchedServer("gen", 8+rng.IntN(24), rng.IntN(24))
	w.lease = 20 + rng.IntN(400)
	w.chunk = 1 + rng.IntN(8)
	w.budget = w.chunk * (1 + rng.IntN(3))
	w.maxSeqs = rng.IntN(5)
	for i := range 5 + rng.IntN(36) {
		prompt := 1 + rng.IntN(12*blockTokensSim) // now and then more than a pool holds
		j := &schedJob{id: fmt.Sprintf("%032x", i+1), arriveAt: rng.IntN(schedArrivals), cancelAt: -1, prompt: prompt,
			blocks: (prompt + blockTokensSim - 1) / blockTokensSim, maxTokens: 1 + rng.IntN(120)}
		if rng.IntN(10) < 4 {
			j.cancelAt = j.arriveAt + rng.IntN(300)
		}
		w.jobs = append(w.jobs, j)
	}
	return w
}

// arrive puts a job's request on a server: queued, admitted at once, or
// refused (a full queue, or more blocks than the pool holds).
func (w *schedWorld) arrive(s *schedServer, j *schedJob, advertised bool) (*schedReq, bool) {
	if _, a, err := s.table.Arrive(j.id, 1, Fingerprint{}); err != nil || a != ArriveNew {
		w.fatalf("%s: arrival of a new request: %v %v", s.name, a, err)
		return nil, false
	}
	r := &schedReq{q: s, arrived: w.ms}
	s.table.Add(j.id, 1, Fingerprint{}, advertised, r)
	if s == w.ctx {
		j.ctx = r
	} else {
		j.gen = r
	}
	if j.blocks > s.pool.Capacity() {
		r.End(w.now)
		return r, false
	}
	admitted, err := s.queue.Arrive(r, j.blocks, s.pool.Available())
	if err != nil {
		if !errors.Is(err, ErrQueueFull) {
			w.fatalf("%s: queue: %v", s.name, err)
		}
		r.End(w.now)
		return r, false
	}
	if admitted {
		w.allocate(s, r, j)
	}
	return r, true
}

// allocate gives an admitted request its blocks and ends its turn.
func (w *schedWorld) allocate(s *schedServer, r *schedReq, j *schedJob) {
	blocks, err := s.pool.Allocate(context.Background(), j.blocks)
	s.queue.Done()
	if err != nil {
		w.fatalf("%s: an admitted request could not allocate %d blocks: %v", s.name, j.blocks, err)
		return
	}
	r.blocks = blocks
	r.Hold()
	s.order = append(s.order, r)
	if s == w.ctx {
		w.advance(r, StagePrefilling)
		w.prefilling = append(w.prefilling, j)
	} else {
		w.handoff(j)
	}
}

func (w *schedWorld) advance(r *schedReq, to Stage) {
	if err := r.Advance(to, w.now); err != nil {
		w.fatalf("%s: %v", r.q.name, err)
	}
}

// release gives a request's blocks back and ends it.
func (w *schedWorld) release(r *schedReq) {
	if r == nil {
		return
	}
	if r.blocks != nil {
		if err := r.q.pool.Release(r.blocks); err != nil {
			w.fatalf("%s: release: %v", r.q.name, err)
		}
		r.blocks = nil
		r.Drop(w.now)
	}
	r.End(w.now)
}

// handoff: the generation side has its blocks; the KV moves (instantly
// here: the transfer simulation covers the data path) if the advertisement
// still stands, and the sequence joins the decode batch.
func (w *schedWorld) handoff(j *schedJob) {
	w.advance(j.gen, StageTransferring)
	if j.ctx.Stage() != StageAdvertised {
		w.finish(j, outExpired)
		return
	}
	w.advance(j.ctx, StageTransferring)
	w.advance(j.ctx, StageHandedOff)
	w.release(j.ctx)
	delete(w.leaseUntil, j)
	w.advance(j.gen, StageDecoding)
	j.lastStep = w.decodeSteps
	w.decoding = append(w.decoding, j)
}

func (w *schedWorld) finish(j *schedJob, o outcome) {
	if j.out != outNone {
		w.fatalf("job %s: second outcome %s after %s", j.id, o, j.out)
		return
	}
	j.out = o
	for _, r := range []*schedReq{j.ctx, j.gen} {
		if r != nil && r.Stage() == StageQueued {
			r.q.queue.Leave(r)
		}
		if r != nil && !r.Done() {
			w.release(r)
		}
	}
	w.prefilling = remove(w.prefilling, j)
	w.decoding = remove(w.decoding, j)
	delete(w.leaseUntil, j)
}

func remove(js []*schedJob, j *schedJob) []*schedJob {
	for i, x := range js {
		if x == j {
			return append(js[:i:i], js[i+1:]...)
		}
	}
	return js
}

// cancel is the router cancelling both sides for a client that left.
func (w *schedWorld) cancel(j *schedJob) {
	if j.out != outNone {
		return
	}
	for _, r := range []*schedReq{j.ctx, j.gen} {
		if r == nil {
			continue
		}
		c := r.Cancel(w.now, true)
		want := kvferryv1.CancelOutcome_CANCEL_OUTCOME_CANCEL_REQUESTED_IN_FLIGHT
		switch {
		case r.Done():
			want = kvferryv1.CancelOutcome_CANCEL_OUTCOME_ALREADY_COMPLETE
		case r.q == w.ctx && (r.Stage() == StageQueued || r.Stage() == StagePrefilling):
			want = kvferryv1.CancelOutcome_CANCEL_OUTCOME_CANCELLED_BEFORE_ADVERTISE
		}
		if c.Outcome != want {
			w.fatalf("%s: cancel in %s answered %v, want %v", r.q.name, r.Stage(), c.Outcome, want)
		}
	}
	w.finish(j, outCancelled)
}

// admit lets each server's queue head in while its blocks are available.
func (w *schedWorld) admit(s *schedServer) {
	for {
		r, ok := s.queue.Head()
		if !ok {
			return
		}
		j := w.jobOf(s, r)
		if s.pool.Available() < j.blocks {
			return
		}
		// Arrival order: nobody who joined this queue earlier still waits.
		for _, x := range s.queue.waiting[1:] {
			if x.arrived < r.arrived {
				w.fatalf("%s: admitted a request that arrived at %d before one from %d", s.name, r.arrived, x.arrived)
			}
		}
		s.queue.Admit()
		w.allocate(s, r, j)
	}
}

func (w *schedWorld) jobOf(s *schedServer, r *schedReq) *schedJob {
	for _, j := range w.jobs {
		if (s == w.ctx && j.ctx == r) || (s == w.gen && j.gen == r) {
			return j
		}
	}
	w.fatalf("%s: a request of no job", s.name)
	return &schedJob{}
}

// prefillStep runs one step of the prefill plan.
func (w *schedWorld) prefillStep() {
	if len(w.prefilling) == 0 {
		return
	}
	remaining := make([]int, len(w.prefilling))
	for i, j := range w.prefilling {
		remaining[i] = j.prompt - j.prefilled
	}
	plan := PlanPrefill(remaining, w.chunk, w.budget)
	total := 0
	for i, n := range plan {
		total += n
		if n > w.chunk || n > remaining[i] {
			w.fatalf("prefill plan gives %d tokens to a prompt with %d left (chunk %d)", n, remaining[i], w.chunk)
		}
	}
	if total > w.budget || plan[0] != min(w.chunk, remaining[0]) {
		w.fatalf("prefill plan %v: %d tokens of a %d budget, the oldest prompt given %d", plan, total, w.budget, plan[0])
	}
	for i, j := range append([]*schedJob(nil), w.prefilling...) {
		j.prefilled += plan[i]
		if j.prefilled == j.prompt {
			w.prefilling = remove(w.prefilling, j)
			w.advance(j.ctx, StageAdvertised)
			w.leaseUntil[j] = w.ms + w.lease
			if _, ok := w.arrive(w.gen, j, true); !ok {
				w.finish(j, outRejected) // the router answers the client; it releases the advertisement
			}
		}
	}
}

// decodeStep runs one decode step over the pick.
func (w *schedWorld) decodeStep() {
	n := len(w.decoding)
	if n == 0 {
		return
	}
	last := make([]uint64, n)
	for i, j := range w.decoding {
		last[i] = uint64(j.lastStep)
	}
	picked := PickBatch(last, w.maxSeqs)
	if w.maxSeqs > 0 && len(picked) > w.maxSeqs {
		w.fatalf("decode step of %d sequences, at most %d", len(picked), w.maxSeqs)
	}
	w.decodeSteps++
	w.peak = max(w.peak, n)
	batch := make([]*schedJob, len(picked))
	for i, k := range picked {
		batch[i] = w.decoding[k]
	}
	for _, j := range batch {
		if j.out != outNone {
			w.fatalf("job %s (%s) stepped after its end", j.id, j.out)
		}
		j.decoded++
		j.lastStep = w.decodeSteps
		if j.decoded == j.maxTokens {
			w.finish(j, outCompleted)
		}
	}
	// No sequence waits for ever: each is stepped at least once every
	// ⌈n/maxSeqs⌉ steps with at most n running.
	bound := 1
	if w.maxSeqs > 0 {
		bound = (w.peak + w.maxSeqs - 1) / w.maxSeqs
	}
	for _, j := range w.decoding {
		if w.decodeSteps-j.lastStep > bound {
			w.fatalf("job %s not stepped for %d steps (%d running, at most %d a step)", j.id, w.decodeSteps-j.lastStep, len(w.decoding), w.maxSeqs)
		}
	}
}

func (w *schedWorld) check() {
	for _, s := range []*schedServer{w.ctx, w.gen} {
		held := 0
		for _, r := range s.table.All() {
			if r.Stage() == StageQueued && (r.Holds() > 0 || r.blocks != nil) {
				w.fatalf("%s: a queued request holds blocks", s.name)
			}
			held += len(r.blocks)
		}
		if c := s.pool.Counts(); c.Owned != held {
			w.fatalf("%s: pool owns %d blocks, requests hold %d", s.name, c.Owned, held)
		}
	}
}

func (w *schedWorld) run() {
	for w.ms = 0; w.ms < schedHorizon && !w.failed; w.ms++ {
		w.now = time.Unix(0, 0).Add(time.Duration(w.ms) * time.Millisecond)
		for _, j := range w.jobs {
			if j.arriveAt == w.ms {
				if _, ok := w.arrive(w.ctx, j, false); !ok {
					w.finish(j, outRejected)
				}
			}
			if j.cancelAt == w.ms {
				w.cancel(j)
			}
		}
		for j, until := range w.leaseUntil {
			if w.ms >= until && j.ctx.Stage() == StageAdvertised {
				w.release(j.ctx) // the lease backstop; the generation side finds it gone
			}
		}
		w.admit(w.ctx)
		w.prefillStep()
		w.admit(w.gen)
		w.decodeStep()
		w.check()
		if w.ms%100 == 0 {
			w.ctx.table.Sweep(w.now)
			w.gen.table.Sweep(w.now)
		}
	}
	// The aftermath: every request ended once, every block back, nothing
	// waiting, and the tables forget everything once the tombstones age.
	for _, j := range w.jobs {
		if j.out == outNone {
			w.fatalf("job %s never ended (ctx %v, gen %v)", j.id, stageOf(j.ctx), stageOf(j.gen))
		}
	}
	for _, s := range []*schedServer{w.ctx, w.gen} {
		if c := s.pool.Counts(); c.Free != s.pool.Capacity() {
			w.fatalf("%s: pool not idle after the run: %+v", s.name, c)
		}
		if s.queue.Len() != 0 {
			w.fatalf("%s: %d still queued", s.name, s.queue.Len())
		}
		s.table.Sweep(w.now.Add(DefaultTombstoneTTL + time.Second))
		if s.table.Len() != 0 {
			w.fatalf("%s: %d requests never forgotten", s.name, s.table.Len())
		}
	}
}

func stageOf(r *schedReq) string {
	if r == nil {
		return "-"
	}
	return r.Stage().String()
}

func TestSchedulerSimulation(t *testing.T) {
	seeds := []uint64{*schedSeed}
	if *schedSeed == 0 {
		n := *schedSeeds
		if raceEnabled && n > raceSchedSeeds {
			n = raceSchedSeeds
		}
		seeds = nil
		for s := range uint64(n) {
			seeds = append(seeds, s+1)
		}
	}
	outcomes := map[outcome]int{}
	for _, seed := range seeds {
		w := newSchedWorld(t, seed)
		w.run()
		if w.failed {
			t.Fatalf("seed %d failed: replay with -sched-seed %d -v", seed, seed)
		}
		for _, j := range w.jobs {
			outcomes[j.out]++
		}
	}
	t.Logf("%d seeds: %v", len(seeds), outcomes)
	if len(seeds) > 1 {
		for _, o := range []outcome{outCompleted, outCancelled, outRejected, outExpired} {
			if outcomes[o] == 0 {
				t.Errorf("no request ended %s: the workload does not reach every path", o)
			}
		}
	}
}
