// Package genserver is the generation (decode) server: GenerationService
// allocates destination blocks, asks the context server named in the
// advertisement to push the KV into them, verifies every block's checksum,
// decodes and streams tokens.
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
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/kvferry/kvferry/pkg/blockpool"
	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/pkg/health"
	"github.com/kvferry/kvferry/pkg/kvtransfer"
	"github.com/kvferry/kvferry/pkg/metrics"
	"github.com/kvferry/kvferry/pkg/serving"
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
	Conns        *serving.ConnCache
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
	// Admission, when set, queues a request that cannot get its blocks
	// until they free up (nil: a full pool answers RESOURCE_EXHAUSTED).
	Admission *executor.Admission
	// Progress and Sessions feed the health evaluator (nil: not tracked).
	Progress *health.Progress
	Sessions *health.Sessions
	Logger   *zap.Logger
}

// request is a request on the generation server: the shared lifecycle
// (executor.Request) and its handler's cancel and end. Its holds are its
// references on the destination blocks (one) and the transfer's pin (one).
type request struct {
	executor.Request
	cancel context.CancelFunc
	done   chan struct{} // closed when the handler has returned
}

// Server implements GenerationService.
type Server struct {
	kvferryv1.UnimplementedGenerationServiceServer

	cfg  Config
	spec executor.ModelSpec
	// canaryPrompt is canaryText in the engine's tokens.
	canaryPrompt []uint32
	// decoder steps every decoding request's sequence in one batch.
	decoder *executor.Decoder
	lg      *zap.Logger

	mu         sync.Mutex
	reqs       *executor.Table[*request]
	quarantine map[*transfer]struct{} // receive sessions in doubt, for the reaper

	canary canary // its own lock
}

var _ kvferryv1.GenerationServiceServer = (*Server)(nil)

// New returns a generation server.
func New(cfg Config) *Server {
	s := &Server{cfg: cfg, spec: cfg.Engine.Model(), canaryPrompt: cfg.Engine.Vocabulary().Encode(canaryText), lg: cfg.Logger, reqs: executor.NewTable[*request](), quarantine: map[*transfer]struct{}{}, canary: canary{peers: map[string]*canaryPeer{}}}
	s.decoder = executor.NewDecoder(cfg.Engine, cfg.MaxBatchSeqs, func(n int) {
		if cfg.Progress != nil {
			cfg.Progress.Touch(time.Now())
		}
		if cfg.Scheduler != nil {
			cfg.Scheduler.RecordBatch(n, s.decoder.Running())
		}
	})
	return s
}

func (s *Server) validate(req *kvferryv1.GenerateRequest) error {
	if err := ticket.Validate(req.GetTicket()); err != nil {
		return err
	}
	if err := s.spec.ValidatePrompt(req.GetPromptTokens(), req.GetSampling().GetMaxTokens()); err != nil {
		return err
	}
	adv := req.GetAdvertisement()
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
func (s *Server) admit(t *kvferryv1.Ticket, cancel context.CancelFunc) (*request, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	// Every attempt is one request here: the same attempt twice is a
	// duplicate whatever it asks.
	prev, arrival, err := s.reqs.Arrive(t.GetRequestId(), t.GetAttempt(), executor.Fingerprint{})
	switch {
	case err != nil:
		return nil, executor.ArriveStatus(err)
	case arrival == executor.ArriveDuplicate:
		return nil, status.Errorf(codes.AlreadyExists, "attempt %d is already %s", t.GetAttempt(), prev.Stage())
	case arrival == executor.ArriveSupersedes:
		prev.cancel() // its handler ends it
	}
	r := &request{cancel: cancel, done: make(chan struct{})}
	s.reqs.Add(t.GetRequestId(), t.GetAttempt(), executor.Fingerprint{}, true, r)
	return r, nil
}

// advance moves r along the lifecycle; a move it does not allow is a
// bookkeeping bug, logged (the request's state is unchanged).
func (s *Server) advance(r *request, to executor.Stage) {
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
	if err := s.negotiate(req.GetAdvertisement()); err != nil {
		return status.Error(codes.FailedPrecondition, err.Error())
	}
	s.canary.notePeer(req.GetAdvertisement().GetTransferEndpoint(), time.Now())
	ctx, cancel := context.WithCancel(stream.Context())
	defer cancel()
	r, err := s.admit(req.GetTicket(), cancel)
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

	n := int(req.GetAdvertisement().GetBlockCount())
	admitted := func() {}
	if s.cfg.Admission != nil {
		// Wait in arrival order holding nothing; a cancel ends the wait.
		done, err := s.cfg.Admission.Admit(ctx, n)
		if err != nil {
			return executor.AdmitStatus(err)
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
	s.advance(r, executor.StageTransferring)
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
	seq, err := s.receive(ctx, req, r, blocks, mem)
	if err != nil {
		return err
	}
	s.advance(r, executor.StageDecoding)
	return s.decode(ctx, stream, seq)
}

func (s *Server) decode(ctx context.Context, stream kvferryv1.GenerationService_GenerateServer, seq *executor.Sequence) error {
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
		toks, finish, err := s.decoder.Take(m)
		if err != nil {
			return status.Errorf(codes.Internal, "decode: %v", err)
		}
		if len(toks) == 0 && finish == executor.FinishNone {
			continue
		}
		msg := &kvferryv1.GenerateResponse{Tokens: toks, KvReady: sent == 0}
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
		if err := stream.Send(msg); err != nil {
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
		s.lg.Error("apply session actions", zap.String("request_id", tr.requestID), zap.Error(err))
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
		s.lg.Error("blocks poisoned: quiescence never proven before the quarantine deadline",
			zap.String("request_id", tr.requestID), zap.Int("blocks", len(tr.hold.Blocks)))
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

// receive pins the destination blocks, has the context server push into
// them and waits for the data path's DONE notification, the sender's
// failure, cancellation, no progress for ProgressTimeout or the transfer
// deadline — the session decides which, and when the blocks may leave
// IN_FLIGHT. On every exit the receiver session is finished: its reader
// proves the blocks quiet, which returns quarantined ones.
func (s *Server) receive(ctx context.Context, req *kvferryv1.GenerateRequest, r *request, blocks []blockpool.ID, mem [][]byte) (*executor.Sequence, error) {
	adv := req.GetAdvertisement()
	id := req.GetTicket().GetRequestId()
	fields := []zap.Field{zap.String("request_id", id), zap.Uint32("attempt", req.GetTicket().GetAttempt()), zap.String("peer", adv.GetTransferEndpoint())}
	tr := &transfer{sess: kvtransfer.NewSession(s.cfg.Timeouts), hold: kvtransfer.Hold{Blocks: blocks}, r: r, requestID: id}
	if err := tr.hold.Pin(s.cfg.Pool); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	s.hold(r)
	sid := kvtransfer.NewSessionID() // 128 random bits: the data port cannot be written by guessing
	session := sid.ID
	tracked := s.cfg.Sessions.Add(time.Now())
	defer s.cfg.Sessions.Remove(tracked)
	rs, err := s.cfg.Receiver.Register(sid, mem, func(now time.Time) {
		// Every landed block is progress, for this session and globally.
		s.cfg.Progress.Touch(now)
		s.cfg.Sessions.Touch(tracked, now)
	})
	if err != nil {
		s.step(tr, func(ss *kvtransfer.Session, now time.Time) kvtransfer.Actions { return ss.Cancel(now) })
		return nil, status.Errorf(codes.Internal, "register session: %v", err)
	}
	start := time.Now()
	// end finishes the receiver session (its transport proves quiescence,
	// which returns quarantined blocks) and records the outcome, once: a
	// failure ends it before asking the sender to stop, so that a sender
	// slow to answer never delays the proof.
	end := sync.OnceFunc(func() {
		s.cfg.Receiver.Finish(rs, func() {
			s.step(tr, func(ss *kvtransfer.Session, now time.Time) kvtransfer.Actions {
				return ss.Prove(now, kvtransfer.ProofTransportTerminal)
			})
		})
		moved, _ := s.cfg.Receiver.Progress(rs)
		s.mu.Lock()
		outcome := tr.sess.Outcome()
		s.mu.Unlock()
		s.cfg.Transfers.RecordTransfer(metrics.SideReceiver, outcome.String(), moved, time.Since(start))
		if outcome != kvtransfer.OutcomeCompleted {
			s.lg.Info("transfer ended", append(fields, zap.String("outcome", outcome.String()), zap.Int64("bytes", moved))...)
		}
	})
	defer end()
	// The descriptors leave with the request: from now on the peer may write.
	s.step(tr, func(ss *kvtransfer.Session, now time.Time) kvtransfer.Actions { return ss.Start(now) })

	cc, err := s.cfg.Conns.Get(adv.GetTransferEndpoint())
	if err != nil {
		s.step(tr, func(ss *kvtransfer.Session, now time.Time) kvtransfer.Actions { return ss.Fail(now, 0) })
		return nil, status.Error(codes.Unavailable, err.Error())
	}
	client := kvferryv1.NewTransferServiceClient(cc)
	tctx, tcancel := context.WithCancel(serving.WithRequestID(ctx, id))
	var wg sync.WaitGroup
	defer wg.Wait()
	defer tcancel()
	// fail ends the session with an event, asks the sender to stop and
	// returns cause.
	fail := func(event func(*kvtransfer.Session, time.Time) kvtransfer.Actions, cause error) (*executor.Sequence, error) {
		if as := s.step(tr, event); as.Has(kvtransfer.ActAbort) {
			end()
			s.abort(ctx, client, req.GetTicket(), session)
		}
		return nil, cause
	}
	failNow := func(ss *kvtransfer.Session, now time.Time) kvtransfer.Actions { return ss.Fail(now, 0) }
	cancelNow := func(ss *kvtransfer.Session, now time.Time) kvtransfer.Actions { return ss.Cancel(now) }

	dests := make([]*kvferryv1.BlockDescriptor, len(blocks))
	for i, b := range blocks {
		dests[i] = &kvferryv1.BlockDescriptor{Index: uint32(b), Offset: s.cfg.Pool.Offset(b), Length: uint64(s.cfg.Pool.BlockSize())}
	}
	tstream, err := client.Transfer(tctx, &kvferryv1.TransferRequest{
		Ticket: req.GetTicket(), SessionId: session, SessionKey: sid.Key, ProtocolVersion: kvtransfer.ProtocolVersion,
		Layout: s.spec.Layout(), Transport: s.cfg.Transport, DataEndpoint: s.cfg.DataEndpoint, Destinations: dests,
	})
	if err != nil {
		return fail(failNow, status.Errorf(codes.Unavailable, "transfer: %v", err))
	}
	first, err := tstream.Recv()
	if err != nil {
		if ctx.Err() != nil {
			return fail(cancelNow, status.FromContextError(ctx.Err()).Err())
		}
		return fail(failNow, status.Errorf(status.Code(err), "transfer: %v", err))
	}
	if first.GetEvent() != kvferryv1.TransferEvent_TRANSFER_EVENT_READY {
		// NOT_READY: the sender will not write; the receive blocks are
		// released normally once the reader confirms it.
		return fail(failNow, status.Errorf(codes.FailedPrecondition, "context server not ready: %s", first.GetReason()))
	}

	// The sender's terminal event arrives on the stream; read it off the
	// handler's goroutine. Buffered by one so the reader never blocks; it
	// ends when the stream does (tcancel above), and wg waits for it.
	events := make(chan error, 1)
	wg.Go(func() {
		m, err := tstream.Recv()
		switch {
		case err != nil:
		case m.GetEvent() == kvferryv1.TransferEvent_TRANSFER_EVENT_FAILED:
			err = fmt.Errorf("sender failed: %s", m.GetReason())
		}
		events <- err
	})
	tick := time.NewTicker(tickInterval(s.cfg.Timeouts))
	defer tick.Stop()
	var seen int64
	for {
		select {
		case <-rs.Done():
			if err := s.cfg.Receiver.Err(rs); err != nil {
				code := codes.DataLoss
				if errors.Is(err, kvtransfer.ErrBadDescriptor) {
					code = codes.InvalidArgument // the peer named a block outside this session
				}
				return fail(failNow, status.Errorf(code, "transfer: %v", err))
			}
			// Verify on receipt: every block's checksum, before the engine
			// reads a byte of it.
			sums := executor.Checksums(mem)
			for i, want := range adv.GetBlockChecksums() {
				if sums[i] != want {
					quiet := func(ss *kvtransfer.Session, now time.Time) kvtransfer.Actions {
						return ss.Fail(now, kvtransfer.ProofTransportTerminal) // the reader is done with it
					}
					return fail(quiet, status.Errorf(codes.DataLoss, "block %d checksum %#x, advertised %#x", i, sums[i], want))
				}
			}
			s.step(tr, func(ss *kvtransfer.Session, now time.Time) kvtransfer.Actions { return ss.Complete(now) })
			s.cfg.Progress.Touch(time.Now())
			seq, err := s.cfg.Engine.StartDecode(ctx, mem, sums, len(req.GetPromptTokens()), req.GetFirstToken(), executor.ToSampling(req.GetSampling()))
			if err != nil {
				if ctx.Err() != nil {
					return nil, status.FromContextError(ctx.Err()).Err()
				}
				return nil, status.Errorf(codes.Internal, "decode state: %v", err)
			}
			return seq, nil
		case err := <-events:
			if err != nil {
				if ctx.Err() != nil {
					return fail(cancelNow, status.FromContextError(ctx.Err()).Err())
				}
				return fail(failNow, status.Errorf(codes.Unavailable, "transfer: %v", err))
			}
			events = nil // COMPLETED: the DONE frame follows on the data path
		case <-ctx.Done():
			return fail(cancelNow, status.FromContextError(ctx.Err()).Err())
		case <-tick.C:
			moved, last := s.cfg.Receiver.Progress(rs)
			delta := moved - seen
			seen = moved

			as := s.step(tr, func(ss *kvtransfer.Session, now time.Time) kvtransfer.Actions {
				ss.Progress(last, delta)
				return ss.Tick(now)
			})
			if as.Has(kvtransfer.ActNotify) {
				end()
				s.abort(ctx, client, req.GetTicket(), session)
				return nil, status.Errorf(codes.DeadlineExceeded, "transfer timed out: no progress for %s or past the %s deadline", s.cfg.Timeouts.Progress, s.cfg.Timeouts.Deadline)
			}
		}
	}
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
	serving.Every(ctx, interval, s.sweep)
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
	if err := serving.WaitAll(ctx, waits); err != nil {
		return fmt.Errorf("drain: %w", err)
	}
	return nil
}
