// Package genserver is the generation (decode) server: GenerationService
// allocates destination blocks, asks the context server named in the
// advertisement to push the KV into them, verifies every block's checksum,
// decodes and streams tokens. Started aggregated, it also prefills the
// requests that ask for it (no context server, no transfer) into its own
// blocks and decodes from them.
//
// The handler of a request is its single cleanup owner: it drops the
// request's block references exactly once when it returns. The transfer's
// pin is dropped by the receiver once it proves no byte can land any more
// (kvtransfer.Receiver.Finish), so a cancel mid-transfer never frees a block
// the data connection may still write.
package genserver

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/kvferry/kvferry/internal/loglock"
	"github.com/kvferry/kvferry/pkg/blockpool"
	"github.com/kvferry/kvferry/pkg/connpool"
	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/pkg/health"
	"github.com/kvferry/kvferry/pkg/kvtransfer"
	"github.com/kvferry/kvferry/pkg/metrics"
	"github.com/kvferry/kvferry/pkg/routine"
	"github.com/kvferry/kvferry/pkg/sched"
	"github.com/kvferry/kvferry/pkg/ticket"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

// Config is what a generation server needs.
type Config struct {
	Engine   executor.Engine
	Pool     *blockpool.Pool
	Receiver *kvtransfer.Receiver
	// Transport is the receiver's transport (tcp, shm) and DataEndpoint
	// what writers dial: host:port for tcp, a unix socket path for shm.
	Transport    string
	DataEndpoint string
	Conns        *connpool.Cache
	// Timeouts are the receive sessions' progress timeout, deadline from
	// transfer start, and quarantine deadline.
	Timeouts kvtransfer.Timeouts
	// AbortTimeout bounds the AbortTransfer call to the sender.
	AbortTimeout time.Duration
	Transfers    *metrics.Transfer
	Cancels      *metrics.Cancel
	Quarantines  *metrics.Quarantine
	// BackendHealthy tells Cancel whether an in-flight cancel can be
	// trusted to take effect (nil: always).
	BackendHealthy func() bool
	// CanaryInterval is how often the pair canary probes recent context
	// servers (0 disables); Canaries counts its results.
	CanaryInterval time.Duration
	Canaries       *metrics.Canary
	// MaxBatchSeqs bounds the sequences of one decode step (0: every
	// running one); Scheduler, when set, records the batches.
	MaxBatchSeqs int
	Scheduler    *metrics.Scheduler
	// Aggregated lets requests ask this server to prefill their prompts
	// itself (GenerateRequest.prefill), one prefill loop beside the decode
	// loop on the same engine; PrefillChunk and MaxBatchTokens bound its
	// steps as on a context server (0: executor defaults).
	Aggregated     bool
	PrefillChunk   int
	MaxBatchTokens int
	// Admission, when set, queues a request that cannot get its blocks
	// until they free up (nil: a full pool answers RESOURCE_EXHAUSTED).
	Admission *sched.Admission
	// Progress and Sessions feed the health evaluator (nil: not tracked).
	Progress *health.Progress
	Sessions *health.Sessions
	Logger   *zap.Logger
}

// request is a request on the generation server: the shared lifecycle
// (sched.Request) and its handler's cancel and end. Its holds are its
// references on the destination blocks (one) and the transfer's pin (one).
type request struct {
	sched.Request
	cancel context.CancelFunc
	done   chan struct{} // closed when the handler has returned
}

// Server implements GenerationService.
type Server struct {
	kvferryv1.UnimplementedGenerationServiceServer

	cfg  Config
	spec executor.ModelSpec
	// canaryPrompt is executor.CanaryText in the engine's tokens.
	canaryPrompt []uint32
	// decoder steps every decoding request's sequence in one batch;
	// prefiller, when aggregated, batches the prompts this server prefills.
	decoder *sched.Decoder
	// multi is held (cap 1) by a request of several choices while it takes
	// its engine sequences (startChoices).
	multi     chan struct{}
	prefiller *sched.Prefiller
	lg        *zap.Logger

	// mu guards the table and the transfers; a line logged under it is
	// written after the unlock (mu.Later).
	mu         loglock.Mutex
	reqs       *sched.Table[*request]
	quarantine map[*transfer]struct{} // receive sessions in doubt, for the reaper

	canary canary // its own lock
}

var _ kvferryv1.GenerationServiceServer = (*Server)(nil)

// New returns a generation server.
func New(cfg Config) *Server {
	s := &Server{cfg: cfg, spec: cfg.Engine.Model(), canaryPrompt: cfg.Engine.Vocabulary().Encode(executor.CanaryText), lg: cfg.Logger, reqs: sched.NewTable[*request](), quarantine: map[*transfer]struct{}{}, canary: canary{peers: map[string]*canaryPeer{}}, multi: make(chan struct{}, 1)}
	s.decoder = sched.NewDecoder(cfg.Engine, cfg.MaxBatchSeqs, func(n int) {
		if cfg.Progress != nil {
			cfg.Progress.Touch(time.Now())
		}
		if cfg.Scheduler != nil {
			cfg.Scheduler.RecordBatch(n, s.decoder.Running())
		}
	})
	if cfg.Aggregated {
		s.prefiller = sched.NewPrefiller(cfg.Engine, cfg.PrefillChunk, cfg.MaxBatchTokens, func(prompts, tokens int) {
			cfg.Progress.Touch(time.Now()) // nil-safe
			if cfg.Scheduler != nil {
				cfg.Scheduler.RecordPrefillBatch(prompts, tokens)
			}
		})
	}
	return s
}

func (s *Server) validate(req *kvferryv1.GenerateRequest) error {
	if err := ticket.Validate(req.GetTicket()); err != nil {
		return err
	}
	if err := s.spec.ValidatePrompt(req.GetPromptTokens(), req.GetSampling().GetMaxTokens()); err != nil {
		return err
	}
	sampling, err := executor.ToSampling(req.GetSampling())
	if err != nil {
		return err // compiled again where the decode starts: a schema is small next to a decode
	}
	if c, ok := s.cfg.Engine.(interface{ Capacity() int }); ok && sampling.N > c.Capacity() {
		return fmt.Errorf("n %d is over the %d sequences this engine holds", sampling.N, c.Capacity())
	}
	adv := req.GetAdvertisement()
	if req.GetPrefill() {
		if adv != nil || req.GetFirstToken() != 0 || len(req.GetOtherFirstTokens()) != 0 {
			return errors.New("a request to prefill here carries no advertisement and no first token")
		}
		return nil
	}
	if n := len(req.GetOtherFirstTokens()); n != sampling.N-1 {
		return fmt.Errorf("%d other first tokens for n = %d", n, sampling.N)
	}
	if n := len(req.GetOtherFirstLogprobs()); n != 0 && n != sampling.N-1 {
		return fmt.Errorf("%d other first logprobs for n = %d", n, sampling.N)
	}
	switch {
	case adv == nil:
		return errors.New("missing advertisement")
	case !proto.Equal(adv.GetTicket(), req.GetTicket()):
		return errors.New("advertisement is for another ticket")
	case adv.GetTransferEndpoint() == "":
		return errors.New("advertisement has no transfer endpoint")
	case int(adv.GetBlockCount()) != s.spec.BlocksFor(len(req.GetPromptTokens())):
		return fmt.Errorf("advertisement has %d blocks, prompt needs %d", adv.GetBlockCount(), s.spec.BlocksFor(len(req.GetPromptTokens())))
	case len(adv.GetBlockChecksums()) != int(adv.GetBlockCount()):
		return fmt.Errorf("advertisement has %d checksums for %d blocks", len(adv.GetBlockChecksums()), adv.GetBlockCount())
	}
	return nil
}

// negotiate is checked before any block is allocated: a mismatch is
// FAILED_PRECONDITION and nothing moves.
func (s *Server) negotiate(adv *kvferryv1.KVAdvertisement) error {
	switch {
	case adv.GetProtocolVersion() != kvtransfer.ProtocolVersion:
		return fmt.Errorf("protocol version %d, want %d", adv.GetProtocolVersion(), kvtransfer.ProtocolVersion)
	case adv.GetTransport() != s.cfg.Transport:
		return fmt.Errorf("the context server writes with transport %q, this generation server receives with %q", adv.GetTransport(), s.cfg.Transport)
	}
	return executor.LayoutMismatch(adv.GetLayout(), s.spec.Layout())
}

// admit records the request, rejecting stale attempts and duplicates; a
// newer attempt supersedes (cancels) the one running.
func (s *Server) admit(t *kvferryv1.Ticket, advertised bool, cancel context.CancelFunc) (*request, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	// Every attempt is one request here: the same attempt twice is a
	// duplicate whatever it asks.
	prev, arrival, err := s.reqs.Arrive(t.GetRequestId(), t.GetAttempt(), sched.Fingerprint{})
	switch {
	case err != nil:
		return nil, sched.ArriveStatus(err)
	case arrival == sched.ArriveDuplicate:
		return nil, status.Errorf(codes.AlreadyExists, "attempt %d is already %s", t.GetAttempt(), prev.Stage())
	case arrival == sched.ArriveSupersedes:
		prev.cancel() // its handler ends it
	}
	r := &request{cancel: cancel, done: make(chan struct{})}
	s.reqs.Add(t.GetRequestId(), t.GetAttempt(), sched.Fingerprint{}, advertised, r)
	return r, nil
}

// advance moves r along the lifecycle; a move it does not allow is a
// bookkeeping bug, logged (the request's state is unchanged).
func (s *Server) advance(r *request, to sched.Stage) {
	s.mu.Lock()
	err := r.Advance(to, time.Now())
	s.mu.Unlock()
	if err != nil {
		s.lg.Error("request stage", zap.Error(err))
	}
}

// hold records one more hold on the request's blocks.
func (s *Server) hold(r *request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r.Hold()
}

// dropHold records that the request let go of its references or its pin;
// when both are gone after a cancel, it observes cancel-to-free.
func (s *Server) dropHold(r *request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dropHoldLocked(r)
}

func (s *Server) dropHoldLocked(r *request) {
	if d, ok := r.Drop(time.Now()); ok {
		s.cfg.Cancels.RecordCancelToFree(d)
	}
}

// Generate implements GenerationService.
func (s *Server) Generate(req *kvferryv1.GenerateRequest, stream kvferryv1.GenerationService_GenerateServer) error {
	if err := s.validate(req); err != nil {
		return status.Error(codes.InvalidArgument, err.Error())
	}
	if req.GetPrefill() {
		if s.prefiller == nil {
			return status.Error(codes.FailedPrecondition, "this generation server does not prefill (start it with --aggregated)")
		}
	} else {
		if err := s.negotiate(req.GetAdvertisement()); err != nil {
			return status.Error(codes.FailedPrecondition, err.Error())
		}
	}
	ctx, cancel := context.WithCancel(stream.Context())
	defer cancel()
	r, err := s.admit(req.GetTicket(), !req.GetPrefill(), cancel)
	if err != nil {
		return err
	}
	s.cfg.Progress.Begin(time.Now())
	defer s.cfg.Progress.End()
	defer func() {
		s.mu.Lock()
		r.End(time.Now())
		close(r.done)
		s.mu.Unlock()
	}()

	n := s.spec.BlocksFor(len(req.GetPromptTokens())) // what validate checked the advertisement against
	admitted := func() {}
	if s.cfg.Admission != nil {
		// Wait in arrival order holding nothing; a cancel ends the wait.
		done, err := s.cfg.Admission.Admit(ctx, n)
		if err != nil {
			return sched.AdmitStatus(err)
		}
		admitted = sync.OnceFunc(done)
		defer admitted()
	}
	blocks, err := s.cfg.Pool.Allocate(ctx, n)
	admitted()
	if err != nil {
		if errors.Is(err, blockpool.ErrExhausted) {
			return status.Error(codes.ResourceExhausted, err.Error())
		}
		return status.FromContextError(err).Err()
	}
	s.hold(r)
	defer func() {
		if err := s.cfg.Pool.Release(blocks); err != nil {
			s.lg.Error("release blocks", zap.Error(err))
		}
		s.dropHold(r)
	}()
	mem := make([][]byte, len(blocks))
	for i, b := range blocks {
		mem[i] = s.cfg.Pool.Bytes(b)
	}
	var seqs []*executor.Sequence
	// The context server's first logprobs, streamed with each choice's first token.
	firsts := []*executor.Logprob{executor.LogprobOf(req.GetFirstLogprob())}
	for _, lp := range req.GetOtherFirstLogprobs() {
		firsts = append(firsts, executor.LogprobOf(lp))
	}
	if req.GetPrefill() {
		s.advance(r, sched.StagePrefilling)
		seqs, firsts, err = s.prefill(ctx, req, mem)
	} else {
		s.advance(r, sched.StageTransferring)
		seqs, err = s.receive(ctx, req, r, blocks, mem)
	}
	if err != nil {
		return err
	}
	s.advance(r, sched.StageDecoding)
	return s.decodeChoices(ctx, stream, seqs, firsts)
}

// startChoices starts the decode of every choice from the same verified
// blocks: one transfer, one engine sequence per choice. A request of
// several choices takes its sequences while no other such request takes
// any (s.multi), so two of them never each hold part of what both need;
// a request of one choice needs one and always gets it in the end.
func (s *Server) startChoices(ctx context.Context, mem [][]byte, sums []uint64, promptTokens int, firsts []uint32, sampling executor.Sampling) ([]*executor.Sequence, error) {
	if len(firsts) > 1 {
		select {
		case s.multi <- struct{}{}:
			defer func() { <-s.multi }()
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	seqs := make([]*executor.Sequence, 0, len(firsts))
	for i, first := range firsts {
		sq, err := s.cfg.Engine.StartDecode(ctx, mem, sums, promptTokens, first, sampling.Choice(i))
		if err != nil {
			for _, q := range seqs {
				q.Close()
			}
			return nil, err
		}
		seqs = append(seqs, sq)
	}
	return seqs, nil
}

// decodeChoices streams every choice's tokens, each message tagged with
// its choice; one choice decodes on this goroutine, several on one each
// (their messages serialised onto the stream).
func (s *Server) decodeChoices(ctx context.Context, stream kvferryv1.GenerationService_GenerateServer, seqs []*executor.Sequence, firsts []*executor.Logprob) error {
	if len(seqs) == 1 {
		return s.decode(ctx, stream.Send, 0, seqs[0], firsts[0])
	}
	var mu sync.Mutex
	ready := false
	send := func(m *kvferryv1.GenerateResponse) error {
		mu.Lock()
		defer mu.Unlock()
		m.KvReady, ready = !ready, true // on the stream's first message only
		return stream.Send(m)
	}
	g, gctx := errgroup.WithContext(ctx)
	for i, sq := range seqs {
		var first *executor.Logprob
		if i < len(firsts) {
			first = firsts[i]
		}
		g.Go(func() error { return s.decode(gctx, send, i, sq, first) })
	}
	return g.Wait()
}

// prefill is aggregated serving's first phase: the engine writes the
// prompt's KV into this server's own blocks, which the decode then reads —
// the same blocks and checksums a transfer would have delivered, so the
// decode that follows is the disaggregated one.
func (s *Server) prefill(ctx context.Context, req *kvferryv1.GenerateRequest, mem [][]byte) ([]*executor.Sequence, []*executor.Logprob, error) {
	sampling, err := executor.ToSampling(req.GetSampling())
	if err != nil {
		return nil, nil, status.Error(codes.InvalidArgument, err.Error())
	}
	out, err := s.prefiller.Run(ctx, req.GetPromptTokens(), sampling, mem, 0)
	if err == nil {
		s.cfg.Progress.Touch(time.Now())
		var seqs []*executor.Sequence
		if seqs, err = s.startChoices(ctx, mem, out.Sums, len(req.GetPromptTokens()), append([]uint32{out.First}, out.Others...), sampling); err == nil {
			return seqs, append([]*executor.Logprob{out.Logprob}, out.OtherLogprobs...), nil
		}
	}
	if ctx.Err() != nil {
		return nil, nil, status.FromContextError(ctx.Err()).Err()
	}
	return nil, nil, status.Errorf(codes.Internal, "prefill: %v", err)
}

// decode streams choice index's tokens through send; first is its first
// token's logprob (the prefill's), when the sampling asked for logprobs.
func (s *Server) decode(ctx context.Context, send func(*kvferryv1.GenerateResponse) error, index int, seq *executor.Sequence, first *executor.Logprob) error {
	m := s.decoder.Join(seq)
	defer s.decoder.Leave(m) // and the decoder closes seq
	vocab := s.cfg.Engine.Vocabulary()
	var text executor.TextStream // never splits a UTF-8 character across messages
	sent := 0
	for {
		select {
		case <-m.Ready():
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		}
		got, err := s.decoder.Take(m)
		if err != nil {
			return status.Errorf(codes.Internal, "decode: %v", err)
		}
		toks, finish := got.Tokens, got.Finish
		if len(toks) == 0 && finish == executor.FinishNone {
			continue
		}
		msg := &kvferryv1.GenerateResponse{Tokens: toks, KvReady: sent == 0, Index: uint32(index)}
		if sent == 0 && len(toks) > 0 && first != nil {
			msg.Logprobs = append(msg.Logprobs, first.Proto())
		}
		for i := range got.Logprobs {
			msg.Logprobs = append(msg.Logprobs, got.Logprobs[i].Proto())
		}
		for i, t := range toks {
			msg.Text += text.Push(vocab.Piece(t, sent == 0 && i == 0))
		}
		switch finish {
		case executor.FinishStop:
			msg.FinishReason = kvferryv1.FinishReason_FINISH_REASON_STOP
		case executor.FinishLength:
			msg.FinishReason = kvferryv1.FinishReason_FINISH_REASON_LENGTH
		}
		if finish != executor.FinishNone {
			msg.Text += text.Flush()
		}
		if err := send(msg); err != nil {
			return err
		}
		sent += len(toks)
		if finish != executor.FinishNone {
			return nil
		}
	}
}

// transfer is one receive session as the server owns it: the lifecycle
// state machine and the destination blocks' hold. Only touched under
// Server.mu.
type transfer struct {
	sess      *kvtransfer.Session
	hold      kvtransfer.Hold
	r         *request
	requestID string
}

// stepLocked carries out one event's actions on the pool and keeps the
// reaper's set and the metrics in step.
func (s *Server) stepLocked(tr *transfer, as kvtransfer.Actions) {
	eff, err := tr.hold.Apply(s.cfg.Pool, as)
	if err != nil {
		s.mu.Later(func() { s.lg.Error("apply session actions", zap.String("request_id", tr.requestID), zap.Error(err)) })
	}
	if eff.Quarantined {
		s.quarantine[tr] = struct{}{}
		s.cfg.Quarantines.RecordQuarantine(metrics.SideReceiver)
	}
	if eff.Released {
		delete(s.quarantine, tr)
		s.dropHoldLocked(tr.r)
	}
	if eff.Poisoned {
		delete(s.quarantine, tr)
		s.cfg.Quarantines.RecordPoison(metrics.SideReceiver, len(tr.hold.Blocks))
		id, n := tr.requestID, len(tr.hold.Blocks)
		s.mu.Later(func() {
			s.lg.Error("blocks poisoned: quiescence never proven before the quarantine deadline", zap.String("request_id", id), zap.Int("blocks", n))
		})
	}
}

// step runs one event on the session under the lock, with the current time.
func (s *Server) step(tr *transfer, event func(*kvtransfer.Session, time.Time) kvtransfer.Actions) kvtransfer.Actions {
	s.mu.Lock()
	defer s.mu.Unlock()
	as := event(tr.sess, time.Now())
	s.stepLocked(tr, as)
	return as
}

// tickInterval is how often a receive checks its timers: an eighth of the
// shorter timeout, so a timeout fires at most 12.5% late, and never more
// often than every 5 ms.
func tickInterval(t kvtransfer.Timeouts) time.Duration {
	return max(min(t.Progress, t.Deadline)/8, 5*time.Millisecond)
}

// abort asks the sender to stop writing (best effort, bounded by
// AbortTimeout). For tcp its answer is not the proof: bytes already in the
// socket may still arrive, so quiescence comes from the receiver's reader.
func (s *Server) abort(ctx context.Context, client kvferryv1.TransferServiceClient, t *kvferryv1.Ticket, session uint64) {
	actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.cfg.AbortTimeout)
	defer cancel()
	if _, err := client.AbortTransfer(actx, &kvferryv1.AbortTransferRequest{Ticket: t, SessionId: session}); err != nil {
		s.lg.Debug("abort transfer", zap.String("request_id", t.GetRequestId()), zap.Uint32("attempt", t.GetAttempt()), zap.Error(err))
	}
}

// Reap advances every quarantined session's timers: one whose quarantine
// deadline passed without proof is poisoned. It never blocks.
func (s *Server) Reap(now time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for tr := range s.quarantine {
		s.stepLocked(tr, tr.sess.Tick(now))
	}
}

// QuarantinedSessions returns how many receive sessions wait for proof.
func (s *Server) QuarantinedSessions() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.quarantine)
}

// Cancel implements GenerationService.
func (s *Server) Cancel(_ context.Context, req *kvferryv1.GenerationServiceCancelRequest) (*kvferryv1.GenerationServiceCancelResponse, error) {
	if err := ticket.Validate(req.GetTicket()); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	healthy := s.cfg.BackendHealthy == nil || s.cfg.BackendHealthy()
	s.mu.Lock()
	resp := &kvferryv1.GenerationServiceCancelResponse{Outcome: kvferryv1.CancelOutcome_CANCEL_OUTCOME_NOT_FOUND, ResourcesFreeNow: true}
	if r, ok := s.reqs.Get(req.GetTicket().GetRequestId(), req.GetTicket().GetAttempt()); ok {
		c := r.Cancel(time.Now(), healthy)
		if c.HasFreed {
			s.cfg.Cancels.RecordCancelToFree(c.Freed)
		}
		if c.Stop {
			r.cancel() // its handler ends it and gives its holds back
		}
		resp = &kvferryv1.GenerationServiceCancelResponse{Outcome: c.Outcome, ResourcesFreeNow: r.Holds() == 0}
	}
	s.mu.Unlock()
	s.cfg.Cancels.RecordOutcome(resp.Outcome.String())
	s.lg.Info("cancel", zap.String("request_id", req.GetTicket().GetRequestId()), zap.Uint32("attempt", req.GetTicket().GetAttempt()), zap.String("outcome", resp.Outcome.String()))
	return resp, nil
}

// Run reaps quarantined sessions and forgets old finished requests every
// interval until ctx is done.
func (s *Server) Run(ctx context.Context, interval time.Duration) {
	routine.Every(ctx, interval, s.sweep)
}

func (s *Server) sweep(now time.Time) {
	// Ask silent writers again (shm): a proof that comes returns blocks
	// before the reaper would poison them.
	s.cfg.Receiver.Reask()
	s.Reap(now)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.reqs.Sweep(now)
}

// Drain refuses new requests and waits, until ctx is done, for the running
// ones to finish.
func (s *Server) Drain(ctx context.Context) error {
	s.mu.Lock()
	var waits []chan struct{}
	for _, r := range s.reqs.Drain() {
		waits = append(waits, r.done)
	}
	s.mu.Unlock()
	if err := routine.WaitAll(ctx, waits); err != nil {
		return fmt.Errorf("drain: %w", err)
	}
	return nil
}
