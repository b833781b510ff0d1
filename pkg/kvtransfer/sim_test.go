package kvtransfer

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/kvferry/kvferry/pkg/blockpool"
)

// The deterministic simulation drives sender and receiver Sessions, two
// real block pools and a simulated transport on a virtual clock, from a
// seeded random workload with faults. Replay a failure with
//
//	go test ./pkg/kvtransfer -run TestSimulation -seed N -v
var (
	simSeeds = flag.Int("seeds", 2000, "number of simulation seeds to run")
	simSeed  = flag.Uint64("seed", 0, "run only this simulation seed (0: run -seeds seeds)")
)

// Simulated time: one step is a millisecond.
const (
	simArrivals   = 1500 // ms during which requests arrive
	simFaultsEnd  = 2500 // ms after which every fault is over (stalls wake, links heal)
	simHorizon    = 6000 // ms by which every request must have ended and every block come back
	simPoolBlocks = 24
)

// raceSeeds caps the seeds under -race (see raceEnabled).
const raceSeeds = 100

var simTimeouts = Timeouts{Progress: 60 * time.Millisecond, Deadline: 400 * time.Millisecond, Quarantine: 1500 * time.Millisecond}

type simFault uint8

const (
	faultNone simFault = iota
	faultDelay
	faultStall        // no progress until the stall ends; writes already issued land late
	faultStallForever // stalled past the quarantine deadline: quiescence unprovable
	faultError
	faultPartial
	faultCorrupt
	faultLoseNotify
	faultLoseAbortAck
	faultSenderDeath
	numFaults
)

func (f simFault) String() string {
	return [...]string{"none", "delay", "stall", "stall-forever", "error", "partial", "corrupt", "lose-notify", "lose-abort-ack", "sender-death"}[f]
}

// side is one end of a request's transfer: its pool, blocks, session and
// what the owner holds.
type side struct {
	name     string
	pool     *blockpool.Pool
	hold     Hold // the transfer's pin, through the same Apply the servers use
	sess     *Session
	refs     bool // the request's references
	notified int
	quarAt   int
}

type simReq struct {
	id       int
	startAt  int
	cancelAt int // -1: never
	fault    simFault
	snd, rcv *side

	// transport operation
	writes     []int // ms at which block i lands, -1 once landed or dropped
	landed     int
	corrupted  bool
	stallUntil int // ms; writes and aborts wait until then
	failAt     int // ms of an error / partial failure (-1: none)
	deadAt     int // ms of the sender's death (-1: none)
	abortAt    int // ms when an abort was requested (-1: none)
	terminal   bool
	terminalAt int
	notifyAt   int // ms the DONE notification reaches the receiver (-1: not yet / lost)
	decodeEnd  int
	done       bool
}

type world struct {
	t          *testing.T
	seed       uint64
	rng        *rand.Rand
	ms         int
	base       time.Time
	ctxPool    *blockpool.Pool
	genPool    *blockpool.Pool
	reqs       []*simReq
	owner      map[*blockpool.Pool]map[blockpool.ID]int
	longestQ   int // longest quarantine that ended with proof, ms
	violations []string

	poisonedSessions int
}

func (w *world) now() time.Time { return w.base.Add(time.Duration(w.ms) * time.Millisecond) }

func (w *world) failf(format string, args ...any) {
	w.violations = append(w.violations, fmt.Sprintf("t=%dms: ", w.ms)+fmt.Sprintf(format, args...))
}

func newWorld(t *testing.T, seed uint64) *world {
	ctxPool, _ := blockpool.New(simPoolBlocks, 8)
	genPool, _ := blockpool.New(simPoolBlocks, 8)
	return &world{
		t: t, seed: seed, rng: rand.New(rand.NewPCG(seed, seed^0x5eed)), base: time.Unix(1_700_000_000, 0),
		ctxPool: ctxPool, genPool: genPool,
		owner: map[*blockpool.Pool]map[blockpool.ID]int{ctxPool: {}, genPool: {}},
	}
}

// admit allocates both sides' blocks, or rejects the request.
func (w *world) admit() {
	n := 1 + w.rng.IntN(4)
	cb, err := w.ctxPool.Allocate(context.Background(), n)
	if err != nil {
		return
	}
	gb, err := w.genPool.Allocate(context.Background(), n)
	if err != nil {
		_ = w.ctxPool.Release(cb)
		return
	}
	r := &simReq{
		id: len(w.reqs), startAt: w.ms + w.rng.IntN(30), cancelAt: -1, fault: w.drawFault(),
		failAt: -1, deadAt: -1, abortAt: -1, notifyAt: -1, terminalAt: -1,
		snd: &side{name: "sender", pool: w.ctxPool, hold: Hold{Blocks: cb}, sess: NewSession(simTimeouts), refs: true},
		rcv: &side{name: "receiver", pool: w.genPool, hold: Hold{Blocks: gb}, sess: NewSession(simTimeouts), refs: true},
	}
	if w.rng.IntN(3) == 0 { // a third of the requests are cancelled at a random moment
		r.cancelAt = r.startAt - 10 + w.rng.IntN(200)
	}
	for _, id := range cb {
		w.owner[w.ctxPool][id] = r.id
	}
	for _, id := range gb {
		w.owner[w.genPool][id] = r.id
	}
	w.reqs = append(w.reqs, r)
}

// drawFault: about half the transfers are healthy; an unprovable stall is
// rare, since each one takes its blocks out of circulation for good.
func (w *world) drawFault() simFault {
	if w.rng.IntN(100) < 45 {
		return faultNone
	}
	f := simFault(1 + w.rng.IntN(int(numFaults)-1))
	if f == faultStallForever && w.rng.IntN(4) != 0 {
		f = faultStall
	}
	return f
}

// start posts the transfer: both sides pin and start their sessions.
func (w *world) start(r *simReq) {
	for _, s := range []*side{r.snd, r.rcv} {
		if s.sess.Outcome() != OutcomeNone {
			continue
		}
		if err := s.hold.Pin(s.pool); err != nil {
			w.failf("req %d %s pin: %v", r.id, s.name, err)
		}
		w.apply(r, s, s.sess.Start(w.now()))
	}
	if r.snd.sess.Outcome() != OutcomeNone || r.rcv.sess.Outcome() != OutcomeNone {
		// One side was cancelled while queued: nothing is posted. The other
		// side learns it from the router's cancel, which comes with it.
		r.terminal, r.terminalAt = true, w.ms
		return
	}
	gap := 1 + w.rng.IntN(5)
	if r.fault == faultDelay {
		gap += 20
	}
	r.writes = make([]int, len(r.snd.hold.Blocks))
	for i := range r.writes {
		r.writes[i] = w.ms + gap*(i+1)
	}
	r.stallUntil = -1
	switch r.fault {
	case faultStall:
		r.stallUntil = w.ms + 100 + w.rng.IntN(500)
	case faultStallForever:
		r.stallUntil = simHorizon + 10_000
	case faultError:
		r.failAt = w.ms + 1
	case faultPartial:
		r.failAt = r.writes[len(r.writes)/2]
	case faultSenderDeath:
		r.deadAt = w.ms + w.rng.IntN(gap*len(r.writes)+1)
	}
}

// stalled reports whether the sender can do nothing at w.ms.
func (w *world) stalled(r *simReq) bool {
	return r.stallUntil > w.ms && w.ms < simFaultsEnd+r.stallBeyond()
}

func (r *simReq) stallBeyond() int {
	if r.fault == faultStallForever {
		return simHorizon + 10_000
	}
	return 0
}

// apply carries out a session's actions as the owner would.
func (w *world) apply(r *simReq, s *side, as Actions) {
	if as.Has(ActNotify) {
		s.notified++
		if s.notified > 1 {
			w.failf("req %d %s notified twice", r.id, s.name)
		}
		// The request's termination drops its references exactly once; a
		// completed receiver keeps them while it decodes.
		if !(s == r.rcv && s.sess.Outcome() == OutcomeCompleted) {
			w.release(r, s)
		} else {
			r.decodeEnd = w.ms + 1 + w.rng.IntN(50)
		}
		// The router fans a failure out to the other side.
		if s.sess.Outcome() != OutcomeCompleted {
			o := r.other(s)
			w.apply(r, o, o.sess.Cancel(w.now()))
		}
	}
	if as.Has(ActAbort) && r.abortAt < 0 {
		r.abortAt = w.ms
	}
	quarantinedBefore := s.hold.Quarantined
	eff, err := s.hold.Apply(s.pool, as)
	if err != nil {
		w.failf("req %d %s apply %08b: %v", r.id, s.name, as, err)
	}
	if eff.Quarantined {
		s.quarAt = w.ms
	}
	if eff.Released && quarantinedBefore {
		w.longestQ = max(w.longestQ, w.ms-s.quarAt)
	}
	if eff.Poisoned {
		w.poisonedSessions++
		if r.terminal && r.terminalAt <= s.quarAt+int(simTimeouts.Quarantine/time.Millisecond) {
			w.failf("req %d %s poisoned although the transport was terminal at %dms", r.id, s.name, r.terminalAt)
		}
	}
	w.disown(r, s)
}

func (r *simReq) other(s *side) *side {
	if s == r.snd {
		return r.rcv
	}
	return r.snd
}

func (w *world) release(r *simReq, s *side) {
	if !s.refs {
		return
	}
	if err := s.pool.Release(s.hold.Blocks); err != nil {
		w.failf("req %d %s release: %v", r.id, s.name, err)
	}
	s.refs = false
	w.disown(r, s)
}

// disown forgets the request's claim on its blocks once it holds nothing;
// from then on a write into them is a violation.
func (w *world) disown(r *simReq, s *side) {
	if s.refs || s.hold.Pinned || s.hold.Quarantined || s.hold.Poisoned {
		return
	}
	for _, id := range s.hold.Blocks {
		if w.owner[s.pool][id] == r.id {
			delete(w.owner[s.pool], id)
		}
	}
}

// touch checks a transport access to block id on behalf of r.
func (w *world) touch(r *simReq, s *side, i int, what string) {
	id := s.hold.Blocks[i]
	st := s.pool.State(id)
	if owner, ok := w.owner[s.pool][id]; !ok || owner != r.id || (st != blockpool.InFlight && st != blockpool.Quarantined) {
		w.failf("req %d: %s of %s block %d which is %s (owner %d, ok %v)", r.id, what, s.name, id, st, owner, ok)
	}
}

// transport advances r's simulated transfer by one millisecond.
func (w *world) transport(r *simReq) {
	if r.terminal || r.writes == nil {
		return
	}
	if r.deadAt >= 0 && w.ms >= r.deadAt {
		// The sender process died: it writes nothing more, its side is gone,
		// and the receiver is told the peer is proven dead.
		w.setTerminal(r)
		w.apply(r, r.snd, r.snd.sess.Fail(w.now(), ProofPeerDead))
		w.apply(r, r.rcv, r.rcv.sess.Fail(w.now(), ProofPeerDead))
		return
	}
	if w.stalled(r) {
		return
	}
	if r.abortAt >= 0 {
		// The abort takes effect now (after any stall). A write the sender
		// had issued before it stopped lands first — the SIGSTOPped writer
		// that wakes after a cancel — then the pending ones are dropped;
		// the sender's transport is terminal and it acks.
		for i, at := range r.writes {
			if at >= 0 && at <= w.ms {
				w.touch(r, r.snd, i, "late read")
				w.touch(r, r.rcv, i, "late write")
				r.writes[i] = -1
			}
		}
		w.setTerminal(r)
		w.apply(r, r.snd, r.snd.sess.Prove(w.now(), ProofTransportTerminal))
		if r.fault != faultLoseAbortAck {
			w.apply(r, r.rcv, r.rcv.sess.Prove(w.now(), ProofAbortAck))
		}
		return
	}
	if r.failAt >= 0 && w.ms >= r.failAt {
		w.setTerminal(r)
		w.apply(r, r.snd, r.snd.sess.Fail(w.now(), ProofTransportTerminal))
		w.apply(r, r.rcv, r.rcv.sess.Fail(w.now(), ProofTransportTerminal))
		return
	}
	for i, at := range r.writes {
		if at < 0 || at > w.ms {
			continue
		}
		w.touch(r, r.snd, i, "read")
		w.touch(r, r.rcv, i, "write")
		r.writes[i] = -1
		r.landed++
		if r.fault == faultCorrupt && i == 0 {
			r.corrupted = true
		}
		w.apply(r, r.snd, r.snd.sess.Progress(w.now(), 8))
		w.apply(r, r.rcv, r.rcv.sess.Progress(w.now(), 8))
	}
	if r.landed == len(r.writes) {
		w.setTerminal(r)
		w.apply(r, r.snd, r.snd.sess.Complete(w.now()))
		if r.fault != faultLoseNotify {
			r.notifyAt = w.ms + 1
		}
	}
}

func (w *world) setTerminal(r *simReq) {
	if !r.terminal {
		r.terminal, r.terminalAt = true, w.ms
	}
}

func (w *world) step() {
	if w.ms < simArrivals && w.rng.IntN(4) == 0 {
		w.admit()
	}
	for _, r := range w.reqs {
		if r.done {
			continue
		}
		if w.ms == r.startAt {
			w.start(r)
		}
		if w.ms == r.cancelAt {
			w.apply(r, r.snd, r.snd.sess.Cancel(w.now()))
			w.apply(r, r.rcv, r.rcv.sess.Cancel(w.now()))
		}
		w.transport(r)
		if r.notifyAt == w.ms {
			// The DONE notification reaches the receiver, which checks every
			// block's checksum: corruption fails the session (the reader is
			// done, so it is quiet).
			if r.corrupted {
				w.apply(r, r.rcv, r.rcv.sess.Fail(w.now(), ProofTransportTerminal))
			} else {
				w.apply(r, r.rcv, r.rcv.sess.Complete(w.now()))
			}
		}
		// The reaper: a non-blocking poll of the transport's status for every
		// in-doubt session.
		for _, s := range []*side{r.snd, r.rcv} {
			if s.hold.Quarantined && r.terminal {
				w.apply(r, s, s.sess.Prove(w.now(), ProofTransportTerminal))
			}
			w.apply(r, s, s.sess.Tick(w.now()))
		}
		if r.rcv.refs && r.rcv.sess.Outcome() == OutcomeCompleted && w.ms >= r.decodeEnd {
			w.release(r, r.rcv)
		}
		r.done = !r.snd.refs && !r.rcv.refs && !r.snd.hold.Pinned && !r.rcv.hold.Pinned && !r.snd.hold.Quarantined && !r.rcv.hold.Quarantined
	}
	for _, p := range []*blockpool.Pool{w.ctxPool, w.genPool} {
		if err := p.CheckInvariant(); err != nil {
			w.failf("%v", err)
		}
	}
}

// check runs the end-of-simulation properties.
func (w *world) check() {
	for _, r := range w.reqs {
		for _, s := range []*side{r.snd, r.rcv} {
			if s.notified != 1 {
				w.failf("req %d %s: %d logical outcomes (fault %s)", r.id, s.name, s.notified, r.fault)
			}
			if s.sess.Started() {
				if d := s.sess.EndedAt().Sub(s.sess.StartedAt()); d > simTimeouts.Deadline {
					w.failf("req %d %s ended %s after start, deadline %s", r.id, s.name, d, simTimeouts.Deadline)
				}
			}
			if s.hold.Poisoned && r.fault != faultStallForever {
				w.failf("req %d %s poisoned with fault %s: quiescence was provable", r.id, s.name, r.fault)
			}
		}
		if !r.done {
			w.failf("req %d (fault %s) never ended: %s / %s", r.id, r.fault, r.snd.sess, r.rcv.sess)
		}
	}
	for _, p := range []*blockpool.Pool{w.ctxPool, w.genPool} {
		c := p.Counts()
		if c.Free+c.Poisoned != c.Capacity || c.Quarantined != 0 || c.InFlight != 0 {
			w.failf("pool not back after the faults ended: %+v", c)
		}
	}
}

func runSeed(t *testing.T, seed uint64) (*world, error) {
	w := newWorld(t, seed)
	for w.ms = 0; w.ms <= simHorizon; w.ms++ {
		w.step()
		if len(w.violations) > 0 {
			break
		}
	}
	if len(w.violations) == 0 {
		w.check()
	}
	if len(w.violations) > 0 {
		return w, errors.New(w.violations[0])
	}
	return w, nil
}

func TestSimulation(t *testing.T) {
	n := *simSeeds
	if raceEnabled && n > raceSeeds {
		n = raceSeeds
	}
	seeds := make([]uint64, 0, n)
	if *simSeed != 0 {
		seeds = append(seeds, *simSeed)
	} else {
		for i := range n {
			seeds = append(seeds, uint64(i+1))
		}
	}
	start := time.Now()
	longest, reqs, poisoned := 0, 0, 0
	for _, seed := range seeds {
		w, err := runSeed(t, seed)
		if err != nil {
			t.Fatalf("seed %d: %v\nreplay: go test ./pkg/kvtransfer -run TestSimulation -seed %d -v", seed, err, seed)
		}
		longest = max(longest, w.longestQ)
		reqs += len(w.reqs)
		poisoned += w.poisonedSessions
	}
	el := time.Since(start)
	t.Logf("%d seeds, %d requests in %s (%.0f seeds/s); longest quarantine ended by proof %dms (deadline %s); %d sessions poisoned, all with quiescence unprovable",
		len(seeds), reqs, el.Round(time.Millisecond), float64(len(seeds))/el.Seconds(), longest, simTimeouts.Quarantine, poisoned)
}
