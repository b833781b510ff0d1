// Package ctxserver is the context (prefill) server: ContextService computes
// a prompt's KV into pool blocks and advertises them; TransferService pushes
// them to a generation server's destination blocks over the data transport.
//
// One mutex guards the request table; no I/O, RPC or block copy happens
// under it. A request's blocks are dropped exactly once (dropRefsLocked);
// transfer pins keep them IN_FLIGHT until the push has returned, so a
// cancel, release or lease expiry during a transfer can never free memory
// the transport still reads.
package ctxserver

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/kvferry/kvferry/internal/loglock"
	"github.com/kvferry/kvferry/pkg/blockpool"
	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/pkg/health"
	"github.com/kvferry/kvferry/pkg/kvtransfer"
	"github.com/kvferry/kvferry/pkg/kvtransfer/fault"
	"github.com/kvferry/kvferry/pkg/metrics"
	"github.com/kvferry/kvferry/pkg/routine"
	"github.com/kvferry/kvferry/pkg/sched"
	"github.com/kvferry/kvferry/pkg/ticket"
	"github.com/kvferry/kvferry/pkg/tracing"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

// Config is what a context server needs.
type Config struct {
	Engine executor.Engine
	Pool   *blockpool.Pool
	// Writer writes transfers into generation servers' pools; its Name is
	// the transport this server offers.
	Writer kvtransfer.Writer
	// Fault is the writer's injected fault (nil: none); lose-abort-ack
	// also mutes AbortTransfer.
	Fault *fault.Fault
	// TransferEndpoint is the host:port generation servers dial for
	// TransferService (this server's gRPC address as they see it).
	TransferEndpoint string
	HandoffLease     time.Duration
	TransferDeadline time.Duration
	// QuarantineDeadline poisons the blocks of a push whose writer did not
	// return this long after its session timed out (0: TransferDeadline).
	QuarantineDeadline time.Duration
	// BackendHealthy tells Cancel whether an in-flight cancel can be
	// trusted to take effect (nil: always). Health evaluation supplies it.
	BackendHealthy func() bool
	// Progress is told of admissions, finished requests and progress, for
	// the health evaluator (nil: not tracked).
	Progress *health.Progress
	// PrefixReuse serves full blocks of a known prompt prefix from the
	// pool's reuse cache instead of recomputing them.
	PrefixReuse bool
	// Admission, when set, queues a prompt that cannot get its blocks
	// until they free up (nil: a full pool answers RESOURCE_EXHAUSTED).
	Admission *sched.Admission
	// PrefillChunk and MaxBatchTokens bound one prompt's and all prompts'
	// tokens in a prefill step (≤ 0: executor's defaults); Scheduler, when
	// set, records the steps.
	PrefillChunk   int
	MaxBatchTokens int
	Scheduler      *metrics.Scheduler
	// CheckEndpoint, when set, must admit a TransferRequest's data
	// endpoint before anything is pinned or dialled (with mTLS:
	// identity.CheckEndpoint, so KV goes only to an address the calling
	// generation server's certificate names).
	CheckEndpoint func(ctx context.Context, endpoint string) error
	Transfers     *metrics.Transfer
	Quarantines   *metrics.Quarantine // nil: not recorded
	Cancels       *metrics.Cancel
	Logger        *zap.Logger
}

// request is a request on the context server: the shared lifecycle
// (sched.Request: attempt, stage, holds, cancel and end times) and what
// this server keeps beside it. Its holds are the request's references on
// its blocks (one) and a transfer's pin (one).
type request struct {
	sched.Request
	blocks []blockpool.ID

	refsHeld      bool            // the request's one reference on each block
	hold          kvtransfer.Hold // a transfer's pin on each block
	engineRunning bool            // the engine is writing the blocks; its caller drops the refs

	// prefillCancel stops the wait for blocks and the prefill; prefillDone
	// is closed when Prefill has returned.
	prefillCancel context.CancelFunc
	prefillDone   chan struct{}
	resp          *kvferryv1.PrefillResponse

	leaseUntil time.Time

	session        uint64
	send           *kvtransfer.Session // the push's lifecycle, ticked by the sweep
	transferCancel context.CancelFunc
	transferDone   chan struct{}
}

// Server implements ContextService and TransferService.
type Server struct {
	kvferryv1.UnimplementedContextServiceServer
	kvferryv1.UnimplementedTransferServiceServer

	cfg  Config
	spec executor.ModelSpec
	// prefiller batches the prompts being prefilled into engine steps.
	prefiller *sched.Prefiller
	// prefixKeys keys the reuse cache (keyed SHA-256: uncraftable).
	prefixKeys *executor.PrefixKeys
	// cachedTokens holds, by block id, the tokens a published block was
	// computed from: a cache hit must match them, so even a key collision
	// cannot serve one prompt another prompt's KV. Bounded by the pool.
	cachedTokens [][]uint32
	// cachedRoute holds, by block id, a published block's routing hash
	// (executor.RouteHashes), for PrefixDigest.
	cachedRoute []uint64
	lg          *zap.Logger

	// mu guards the request table; a line logged under it is written
	// after the unlock (mu.Later): no I/O under the lock, logs included.
	mu       loglock.Mutex
	reqs     *sched.Table[*request]
	canaries canaries // guarded by mu
	// canaryPrompt is executor.CanaryText in the engine's tokens.
	canaryPrompt []uint32
}

var (
	_ kvferryv1.ContextServiceServer  = (*Server)(nil)
	_ kvferryv1.TransferServiceServer = (*Server)(nil)
)

// New returns a context server.
func New(cfg Config) *Server {
	onStep := func(prompts, tokens int) {
		cfg.Progress.Touch(time.Now())
		if cfg.Scheduler != nil {
			cfg.Scheduler.RecordPrefillBatch(prompts, tokens)
		}
	}
	return &Server{cfg: cfg, spec: cfg.Engine.Model(), prefiller: sched.NewPrefiller(cfg.Engine, cfg.PrefillChunk, cfg.MaxBatchTokens, onStep),
		prefixKeys: executor.NewPrefixKeys(cfg.Engine.Model()), cachedTokens: make([][]uint32, cfg.Pool.Capacity()), cachedRoute: make([]uint64, cfg.Pool.Capacity()),
		lg: cfg.Logger, reqs: sched.NewTable[*request](), canaryPrompt: cfg.Engine.Vocabulary().Encode(executor.CanaryText)}
}

func reqFields(t *kvferryv1.Ticket) []zap.Field {
	return []zap.Field{zap.String("request_id", t.GetRequestId()), zap.Uint32("attempt", t.GetAttempt())}
}

// Prefill implements ContextService.
func (s *Server) Prefill(ctx context.Context, req *kvferryv1.PrefillRequest) (*kvferryv1.PrefillResponse, error) {
	if err := ticket.Validate(req.GetTicket()); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if err := s.spec.ValidatePrompt(req.GetPromptTokens(), req.GetSampling().GetMaxTokens()); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	sampling, err := executor.ToSampling(req.GetSampling())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	id, attempt := req.GetTicket().GetRequestId(), req.GetTicket().GetAttempt()
	fp := fingerprint(req)

	pctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s.mu.Lock()
	prev, arrival, err := s.reqs.Arrive(id, attempt, fp)
	if err != nil {
		s.mu.Unlock()
		return nil, sched.ArriveStatus(err)
	}
	switch arrival {
	case sched.ArriveDuplicate:
		s.mu.Unlock()
		return s.duplicatePrefill(ctx, prev)
	case sched.ArriveSupersedes:
		s.endLocked(prev)
	}
	r := &request{prefillCancel: cancel, prefillDone: make(chan struct{})}
	s.reqs.Add(id, attempt, fp, false, r)
	s.mu.Unlock()
	defer close(r.prefillDone) // after every change to r below

	// Wait for the blocks in arrival order, holding nothing (a Cancel by
	// ticket ends the wait through pctx); once admitted, allocate and let
	// the next one in.
	admitted := func() {}
	if s.cfg.Admission != nil {
		done, err := s.cfg.Admission.Admit(pctx, s.spec.BlocksFor(len(req.GetPromptTokens())))
		if err != nil {
			s.mu.Lock()
			r.End(time.Now())
			s.mu.Unlock()
			if ctx.Err() == nil && pctx.Err() != nil {
				err = context.Canceled // cancelled by ticket while it waited
			}
			return nil, sched.AdmitStatus(err)
		}
		admitted = sync.OnceFunc(done)
		defer admitted()
	}

	s.mu.Lock()
	if r.Done() { // cancelled or superseded as it was admitted
		s.mu.Unlock()
		return nil, status.Error(codes.Canceled, "prefill: cancelled")
	}
	blocks, hashes, reused, err := s.allocateLocked(pctx, req.GetCacheSalt(), req.GetPromptTokens())
	admitted()
	if err != nil {
		r.End(time.Now())
		s.mu.Unlock()
		if errors.Is(err, blockpool.ErrExhausted) {
			return nil, status.Error(codes.ResourceExhausted, err.Error())
		}
		return nil, status.FromContextError(err).Err()
	}
	r.blocks, r.refsHeld, r.engineRunning = blocks, true, true
	r.Hold()
	s.advanceLocked(r, sched.StagePrefilling)
	s.cfg.Progress.Begin(time.Now())
	s.mu.Unlock()

	mem := make([][]byte, len(blocks))
	for i, b := range blocks {
		mem[i] = s.cfg.Pool.Bytes(b)
	}
	out, err := s.prefiller.Run(pctx, req.GetPromptTokens(), sampling, mem, reused)

	s.mu.Lock()
	resp, err := s.advertiseLocked(pctx, r, req, blocks, hashes, reused, out, err)
	s.mu.Unlock()
	if err == nil {
		s.lg.Debug("prefill advertised", append(reqFields(req.GetTicket()), zap.Int("blocks", len(blocks)))...)
	}
	return resp, err
}

// advertiseLocked ends a prefill the engine returned from: the request's
// advertisement, its full blocks published to the reuse cache; or, when
// the engine failed or the request was cancelled meanwhile, its end.
func (s *Server) advertiseLocked(pctx context.Context, r *request, req *kvferryv1.PrefillRequest, blocks []blockpool.ID, hashes []uint64, reused int,
	out executor.Prefilled, err error) (*kvferryv1.PrefillResponse, error) {
	r.engineRunning = false
	switch {
	case err == nil && r.Stage() != sched.StagePrefilling:
		err = context.Canceled // cancelled or superseded while the engine finished
	case err == nil && pctx.Err() != nil:
		// The caller gave up (its deadline passed, or it went away) while the
		// engine finished: nobody will take or release the advertisement, so
		// it must not hold blocks until the handoff lease runs out.
		err = pctx.Err()
	}
	if err != nil {
		s.endLocked(r)
		if ctxErr := pctx.Err(); ctxErr != nil {
			return nil, status.FromContextError(ctxErr).Err()
		}
		return nil, status.Errorf(codes.Internal, "prefill: %v", err)
	}
	// The freshly computed full blocks become reusable by later prompts
	// with the same prefix; from now on nothing writes them.
	var routes []uint64 // PrefixDigest's hashes of the blocks published here
	for j := reused; j < len(hashes); j++ {
		ok, err := s.cfg.Pool.Publish(blocks[j], hashes[j])
		if err != nil {
			s.mu.Later(func() { s.lg.Error("publish block", zap.Error(err)) })
		}
		if ok {
			if routes == nil {
				routes = executor.RouteHashes(s.spec, req.GetCacheSalt(), req.GetPromptTokens())
			}
			s.cachedTokens[blocks[j]] = slices.Clone(s.blockTokens(req.GetPromptTokens(), j))
			s.cachedRoute[blocks[j]] = routes[j]
		}
	}
	s.advanceLocked(r, sched.StageAdvertised)
	s.cfg.Progress.Touch(time.Now())
	var otherLPs []*kvferryv1.TokenLogprob
	for _, lp := range out.OtherLogprobs {
		if lp != nil {
			otherLPs = append(otherLPs, lp.Proto())
		}
	}
	r.leaseUntil = time.Now().Add(s.cfg.HandoffLease)
	r.resp = &kvferryv1.PrefillResponse{
		ReusedBlocks: uint32(reused),
		FirstToken:   out.First,
		FirstLogprob: out.Logprob.Proto(),
		// Choices 1 to n-1 (sampling.n > 1): one prefill, one transfer.
		OtherFirstTokens:   out.Others,
		OtherFirstLogprobs: otherLPs,
		Advertisement: &kvferryv1.KVAdvertisement{
			Ticket:           req.GetTicket(),
			TransferEndpoint: s.cfg.TransferEndpoint,
			Layout:           s.spec.Layout(),
			BlockCount:       uint32(len(blocks)),
			PromptTokens:     uint32(len(req.GetPromptTokens())),
			BlockChecksums:   out.Sums,
			ProtocolVersion:  kvtransfer.ProtocolVersion,
			Transport:        s.cfg.Writer.Name(), // what this server writes with
		},
	}
	return r.resp, nil
}

// blockTokens is the tokens of full block i of a prompt.
func (s *Server) blockTokens(tokens []uint32, i int) []uint32 {
	bt := s.spec.BlockTokens
	return tokens[i*bt : (i+1)*bt]
}

// allocateLocked gives a prompt its blocks: the longest cached prefix from
// the reuse cache, then fresh blocks for the rest. It returns the blocks,
// the reuse keys of the full blocks, and how many blocks were reused.
func (s *Server) allocateLocked(ctx context.Context, salt string, tokens []uint32) ([]blockpool.ID, []uint64, int, error) {
	n := s.spec.BlocksFor(len(tokens))
	var hashes []uint64
	var blocks []blockpool.ID
	if s.cfg.PrefixReuse {
		hashes = s.prefixKeys.Keys(salt, tokens)
		blocks = s.cfg.Pool.Lookup(hashes)
		for i, id := range blocks {
			if !slices.Equal(s.cachedTokens[id], s.blockTokens(tokens, i)) {
				s.mu.Later(func() { s.lg.Warn("prefix cache hit with other tokens: not reused", zap.Int("block", i)) })
				_ = s.cfg.Pool.Release(blocks[i:])
				blocks = blocks[:i]
				break
			}
		}
	}
	reused := len(blocks)
	if n > reused {
		fresh, err := s.cfg.Pool.Allocate(ctx, n-reused)
		if err != nil {
			if reused > 0 {
				_ = s.cfg.Pool.Release(blocks)
			}
			return nil, nil, 0, err
		}
		blocks = append(blocks, fresh...)
	}
	return blocks, hashes, reused, nil
}

// advanceLocked moves r along the lifecycle; a move it does not allow is
// a bookkeeping bug, logged after the lock (the request's state is
// unchanged).
func (s *Server) advanceLocked(r *request, to sched.Stage) {
	if err := r.Advance(to, time.Now()); err != nil {
		s.mu.Later(func() { s.lg.Error("request stage", zap.Error(err)) })
	}
}

// fingerprint is a collision-resistant digest of a Prefill's prompt and
// sampling.
func fingerprint(req *kvferryv1.PrefillRequest) sched.Fingerprint {
	h := sha256.New()
	var b [4]byte
	for _, t := range req.GetPromptTokens() {
		binary.LittleEndian.PutUint32(b[:], t)
		h.Write(b[:])
	}
	sp := req.GetSampling()
	fmt.Fprintf(h, "|%d|%g|%g|%d|%t|%d|%d|%t|%d|", sp.GetMaxTokens(), sp.GetTemperature(), sp.GetTopP(), sp.GetSeed(),
		sp.GetIgnoreEos(), len(req.GetCacheSalt()), sp.GetTopLogprobs(), sp.GetLogprobs(), sp.GetN())
	h.Write([]byte(req.GetCacheSalt()))
	h.Write([]byte(sp.GetJsonSchema()))
	var out sched.Fingerprint
	h.Sum(out[:0])
	return out
}

// duplicatePrefill answers a repeated Prefill of the same attempt with the
// request's current state, waiting for a prefill still running.
func (s *Server) duplicatePrefill(ctx context.Context, r *request) (*kvferryv1.PrefillResponse, error) {
	select {
	case <-r.prefillDone:
	case <-ctx.Done():
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if st := r.Stage(); st == sched.StageAdvertised || st == sched.StageTransferring {
		return r.resp, nil
	}
	return nil, status.Errorf(codes.FailedPrecondition, "request already %s", r.Stage())
}

// dropRefsLocked drops the request's references: the single release path.
// While the engine still writes the blocks it does nothing; Prefill drops
// them when the engine returns.
func (s *Server) dropRefsLocked(r *request) {
	if !r.refsHeld || r.engineRunning {
		return
	}
	r.refsHeld = false
	s.cfg.Progress.End()
	if err := s.cfg.Pool.Release(r.blocks); err != nil {
		// A bookkeeping bug; the invariant test catches it.
		s.mu.Later(func() { s.lg.Error("release blocks", zap.Error(err)) })
	}
	s.dropHoldLocked(r)
}

// dropHoldLocked gives one of the request's holds back; the last one after
// a cancel observes cancel-to-free.
func (s *Server) dropHoldLocked(r *request) {
	if d, ok := r.Drop(time.Now()); ok {
		s.cfg.Cancels.RecordCancelToFree(d)
	}
}

// endLocked ends a request wherever it is: stops its wait, prefill or
// transfer and drops its references. Pinned blocks stay IN_FLIGHT until
// the push returns.
func (s *Server) endLocked(r *request) {
	switch r.Stage() {
	case sched.StageQueued, sched.StagePrefilling:
		r.prefillCancel()
	case sched.StageTransferring:
		r.transferCancel()
	}
	r.End(time.Now())
	s.dropRefsLocked(r)
}

// Cancel implements ContextService (the cancel outcomes of docs/architecture.md, Transfers).
func (s *Server) Cancel(_ context.Context, req *kvferryv1.ContextServiceCancelRequest) (*kvferryv1.ContextServiceCancelResponse, error) {
	if err := ticket.Validate(req.GetTicket()); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	s.mu.Lock()
	resp := s.cancelLocked(req.GetTicket())
	s.mu.Unlock()
	s.cfg.Cancels.RecordOutcome(resp.Outcome.String())
	s.lg.Info("cancel", append(reqFields(req.GetTicket()), zap.String("outcome", resp.Outcome.String()), zap.Bool("resources_free_now", resp.ResourcesFreeNow))...)
	return resp, nil
}

func (s *Server) cancelLocked(t *kvferryv1.Ticket) *kvferryv1.ContextServiceCancelResponse {
	r, ok := s.reqs.Get(t.GetRequestId(), t.GetAttempt())
	if !ok {
		return &kvferryv1.ContextServiceCancelResponse{Outcome: kvferryv1.CancelOutcome_CANCEL_OUTCOME_NOT_FOUND, ResourcesFreeNow: true}
	}
	c := r.Cancel(time.Now(), s.cfg.BackendHealthy == nil || s.cfg.BackendHealthy())
	if c.HasFreed {
		s.cfg.Cancels.RecordCancelToFree(c.Freed)
	}
	if c.Stop {
		s.endLocked(r)
	}
	// A queued request holds nothing; a prefill still running frees its
	// blocks when the engine returns; a transfer's pin goes when the push
	// returns.
	return &kvferryv1.ContextServiceCancelResponse{Outcome: c.Outcome, ResourcesFreeNow: r.Holds() == 0}
}

// PrefixDigest implements ContextService: the routing hashes of the
// blocks in the reuse cache now.
func (s *Server) PrefixDigest(context.Context, *kvferryv1.PrefixDigestRequest) (*kvferryv1.PrefixDigestResponse, error) {
	ids := s.cfg.Pool.CachedIDs()
	out := make([]uint64, len(ids))
	s.mu.Lock()
	for i, id := range ids {
		out[i] = s.cachedRoute[id]
	}
	s.mu.Unlock()
	return &kvferryv1.PrefixDigestResponse{BlockHashes: out}, nil
}

// Release implements ContextService: the router gives up the handoff.
func (s *Server) Release(_ context.Context, req *kvferryv1.ReleaseRequest) (*kvferryv1.ReleaseResponse, error) {
	if err := ticket.Validate(req.GetTicket()); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	s.mu.Lock()
	r, ok := s.reqs.Get(req.GetTicket().GetRequestId(), req.GetTicket().GetAttempt())
	if !ok || !r.refsHeld || r.Stage() == sched.StageHandedOff {
		s.mu.Unlock()
		return &kvferryv1.ReleaseResponse{Released: false}, nil
	}
	s.endLocked(r)
	s.mu.Unlock()
	s.lg.Debug("released by router", reqFields(req.GetTicket())...)
	return &kvferryv1.ReleaseResponse{Released: true}, nil
}

// negotiate checks a transfer request against the request's advertisement;
// a non-empty answer is the NOT_READY reason.
func (s *Server) negotiate(req *kvferryv1.TransferRequest, r *request) string {
	switch {
	case req.GetProtocolVersion() != kvtransfer.ProtocolVersion:
		return fmt.Sprintf("protocol version %d, want %d", req.GetProtocolVersion(), kvtransfer.ProtocolVersion)
	case req.GetTransport() != s.cfg.Writer.Name():
		return fmt.Sprintf("transport %q not offered (have %q)", req.GetTransport(), s.cfg.Writer.Name())
	case !proto.Equal(req.GetLayout(), s.spec.Layout()):
		return fmt.Sprintf("kv layout mismatch: have %v", s.spec.Layout())
	case len(req.GetDestinations()) != len(r.blocks):
		return fmt.Sprintf("%d destination blocks for %d source blocks", len(req.GetDestinations()), len(r.blocks))
	case req.GetDataEndpoint() == "":
		return "no data endpoint"
	}
	for i, d := range req.GetDestinations() {
		if d.GetLength() != uint64(s.spec.BlockBytes()) {
			return fmt.Sprintf("destination %d has length %d, block is %d", i, d.GetLength(), s.spec.BlockBytes())
		}
	}
	return ""
}

func notReady(stream kvferryv1.TransferService_TransferServer, reason string) error {
	return stream.Send(&kvferryv1.TransferResponse{Event: kvferryv1.TransferEvent_TRANSFER_EVENT_NOT_READY, Reason: reason})
}

// Transfer implements TransferService: negotiate, pin, push, report.
func (s *Server) Transfer(req *kvferryv1.TransferRequest, stream kvferryv1.TransferService_TransferServer) error {
	if err := ticket.Validate(req.GetTicket()); err != nil {
		return status.Error(codes.InvalidArgument, err.Error())
	}
	ctx := stream.Context()
	if tcp := req.GetTransport() == kvtransfer.TransportTCP || req.GetTransport() == kvtransfer.TransportTCPTLS; s.cfg.CheckEndpoint != nil && tcp {
		if err := s.cfg.CheckEndpoint(ctx, req.GetDataEndpoint()); err != nil {
			s.lg.Warn("transfer to an endpoint the caller does not vouch for refused", append(reqFields(req.GetTicket()), zap.String("endpoint", req.GetDataEndpoint()), zap.Error(err))...)
			return err
		}
	}
	fields := reqFields(req.GetTicket())
	s.mu.Lock()
	r, ok := s.reqs.Current(req.GetTicket().GetRequestId())
	switch {
	case !ok:
		s.mu.Unlock()
		return notReady(stream, "unknown ticket")
	case r.Attempt() != req.GetTicket().GetAttempt():
		s.mu.Unlock()
		return notReady(stream, fmt.Sprintf("attempt %d, current attempt is %d", req.GetTicket().GetAttempt(), r.Attempt()))
	case r.session == req.GetSessionId() && (r.Stage() == sched.StageTransferring || r.Stage() == sched.StageHandedOff):
		// A duplicate of the transfer request (a retried RPC): a no-op that
		// reports the current state.
		s.mu.Unlock()
		return s.duplicateTransfer(stream, r)
	case r.Stage() != sched.StageAdvertised:
		s.mu.Unlock()
		return notReady(stream, "request is "+r.Stage().String())
	}
	if reason := s.negotiate(req, r); reason != "" {
		s.mu.Unlock()
		return notReady(stream, reason)
	}
	r.hold = kvtransfer.Hold{Blocks: r.blocks}
	if err := r.hold.Pin(s.cfg.Pool); err != nil {
		s.mu.Unlock()
		return status.Error(codes.Internal, err.Error())
	}
	r.Hold()
	// The push is synchronous and bounds itself (progress per block, the
	// deadline through tctx); its return proves the blocks are read no
	// more. The session is ticked by the sweep all the same: a writer stuck
	// below us past the deadline ends the session TIMED_OUT in doubt — its
	// blocks quarantined, not reused while it may still read them — and
	// its late return proves them quiet, or the quarantine deadline
	// poisons them, which health counts against its budget.
	r.send = kvtransfer.NewSession(s.sendTimeouts())
	r.send.Start(time.Now())
	tctx, cancel := context.WithTimeout(ctx, s.cfg.TransferDeadline)
	defer cancel()
	s.advanceLocked(r, sched.StageTransferring)
	r.session = req.GetSessionId()
	r.transferCancel, r.transferDone = cancel, make(chan struct{})
	src, dst := make([][]byte, len(r.blocks)), make([]kvtransfer.Desc, len(r.blocks))
	for i, b := range r.blocks {
		src[i] = s.cfg.Pool.Bytes(b)
		d := req.GetDestinations()[i]
		dst[i] = kvtransfer.Desc{Offset: d.GetOffset(), Length: d.GetLength()}
	}
	s.mu.Unlock()

	start := time.Now()
	err := stream.Send(&kvferryv1.TransferResponse{Event: kvferryv1.TransferEvent_TRANSFER_EVENT_READY})
	var sent int64
	if err == nil {
		sent, err = s.cfg.Writer.Write(tctx, req.GetDataEndpoint(), kvtransfer.SessionID{ID: req.GetSessionId(), Key: req.GetSessionKey()}, src, dst)
	}
	// Write has returned: it reads the blocks no more, which is the proof.
	if sent > 0 {
		s.cfg.Progress.Touch(time.Now())
	}
	s.mu.Lock()
	switch {
	case err == nil && r.Stage() == sched.StageTransferring && r.send.Outcome() == kvtransfer.OutcomeNone:
		s.advanceLocked(r, sched.StageHandedOff)
	case err == nil:
		err = context.Canceled // cancelled (or timed out by the sweep) after the last byte; the router decides
	}
	// The first outcome decided stands: the sweep's, when the writer
	// overstayed; then this return only proves the blocks quiet.
	as := r.send.Returned(time.Now(), kvtransfer.WriteOutcome(err))
	outcome := r.send.Outcome()
	s.sendStepLocked(req.GetTicket().GetRequestId(), r, as)
	close(r.transferDone)
	if r.Stage() == sched.StageHandedOff {
		s.dropRefsLocked(r)
	}
	if err != nil && r.Stage() == sched.StageTransferring {
		// The generation side did not take the blocks; they stay advertised
		// for the router to retry or release, under the same lease.
		s.advanceLocked(r, sched.StageAdvertised)
	}
	s.mu.Unlock()
	if as.Has(kvtransfer.ActNotify) {
		s.cfg.Transfers.RecordTransfer(metrics.SideSender, outcome.String(), sent, time.Since(start))
	}
	tracing.Annotate(ctx, tracing.KeyTransferBytes.Int64(sent), tracing.KeyTransferTransport.String(s.cfg.Writer.Name()),
		tracing.KeyRequestID.String(req.GetTicket().GetRequestId()))

	if err != nil {
		s.lg.Info("transfer ended", append(fields, zap.String("outcome", outcome.String()), zap.Int64("bytes", sent), zap.Error(err))...)
		if ctx.Err() != nil {
			return status.FromContextError(ctx.Err()).Err()
		}
		return stream.Send(&kvferryv1.TransferResponse{Event: kvferryv1.TransferEvent_TRANSFER_EVENT_FAILED, Reason: err.Error()})
	}
	s.lg.Debug("transfer completed", append(fields, zap.Int64("bytes", sent))...)
	return stream.Send(&kvferryv1.TransferResponse{Event: kvferryv1.TransferEvent_TRANSFER_EVENT_COMPLETED, BytesSent: uint64(sent)})
}

// duplicateTransfer answers a repeated Transfer of the session in progress
// or done: READY, then the outcome once the original push has ended.
func (s *Server) duplicateTransfer(stream kvferryv1.TransferService_TransferServer, r *request) error {
	if err := stream.Send(&kvferryv1.TransferResponse{Event: kvferryv1.TransferEvent_TRANSFER_EVENT_READY}); err != nil {
		return err
	}
	s.mu.Lock()
	done := r.transferDone
	s.mu.Unlock()
	select {
	case <-done:
	case <-stream.Context().Done():
		return status.FromContextError(stream.Context().Err()).Err()
	}
	s.mu.Lock()
	handedOff := r.Stage() == sched.StageHandedOff
	s.mu.Unlock()
	if handedOff {
		return stream.Send(&kvferryv1.TransferResponse{Event: kvferryv1.TransferEvent_TRANSFER_EVENT_COMPLETED})
	}
	return stream.Send(&kvferryv1.TransferResponse{Event: kvferryv1.TransferEvent_TRANSFER_EVENT_FAILED, Reason: "the original transfer of this session did not complete"})
}

// AbortTransfer implements TransferService: it stops the push and answers
// only once the push has returned, so no_more_writes is a proof.
func (s *Server) AbortTransfer(ctx context.Context, req *kvferryv1.AbortTransferRequest) (*kvferryv1.AbortTransferResponse, error) {
	if err := ticket.Validate(req.GetTicket()); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	s.mu.Lock()
	r, ok := s.reqs.Get(req.GetTicket().GetRequestId(), req.GetTicket().GetAttempt())
	if !ok {
		s.mu.Unlock()
		return &kvferryv1.AbortTransferResponse{NoMoreWrites: true, Found: false}, nil
	}
	var done chan struct{}
	if r.Stage() == sched.StageTransferring && r.session == req.GetSessionId() {
		r.transferCancel()
		done = r.transferDone
	}
	s.mu.Unlock()
	if done != nil {
		select {
		case <-done:
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	}
	if s.cfg.Fault.LosesAbortAck() {
		// Drill: the abort took effect, the acknowledgement is lost.
		<-ctx.Done()
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	return &kvferryv1.AbortTransferResponse{NoMoreWrites: true, Found: true}, nil
}

// Run expires handoff leases and forgets old ended requests every interval
// until ctx is done. The lease is only the backstop; the router releases at
// once when the generation leg fails.
func (s *Server) Run(ctx context.Context, interval time.Duration) {
	routine.Every(ctx, interval, s.sweep)
}

func (s *Server) sweep(now time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for id, r := range s.reqs.All() {
		if r.send != nil {
			if as := r.send.Tick(now); as != 0 {
				if as.Has(kvtransfer.ActAbort) {
					r.transferCancel() // the writer's context: it stops between blocks, if it can
				}
				if as.Has(kvtransfer.ActNotify) {
					s.cfg.Transfers.RecordTransfer(metrics.SideSender, r.send.Outcome().String(), 0, now.Sub(r.send.StartedAt()))
					fields := []zap.Field{zap.String("request_id", id), zap.Uint32("attempt", r.Attempt()), zap.Int("blocks", len(r.blocks))}
					s.mu.Later(func() {
						s.lg.Warn("push timed out with its writer still running: blocks quarantined until it returns", fields...)
					})
				}
				s.sendStepLocked(id, r, as)
			}
		}
		if r.Stage() == sched.StageAdvertised && now.After(r.leaseUntil) {
			fields := []zap.Field{zap.String("request_id", id), zap.Uint32("attempt", r.Attempt()), zap.Int("blocks", len(r.blocks))}
			s.mu.Later(func() { s.lg.Info("handoff lease expired", fields...) })
			s.endLocked(r)
		}
	}
	s.reqs.Sweep(now)
}

// sendTimeouts are a push session's limits: the deadline, a little past
// the writer's own (its context's), so that a writer that honours its
// context returns first and only one stuck below us is timed out here (the
// writer bounds its per-block progress itself); and how long a writer that
// overstayed may take to return before its blocks are poisoned.
func (s *Server) sendTimeouts() kvtransfer.Timeouts {
	q := s.cfg.QuarantineDeadline
	if q <= 0 {
		q = s.cfg.TransferDeadline
	}
	d := s.cfg.TransferDeadline + max(s.cfg.TransferDeadline/10, time.Second)
	return kvtransfer.Timeouts{Progress: d, Deadline: d, Quarantine: q}
}

// sendStepLocked carries out a push session's pool actions and keeps the
// request's holds and the quarantine metrics in step.
func (s *Server) sendStepLocked(id string, r *request, as kvtransfer.Actions) {
	eff, err := r.hold.Apply(s.cfg.Pool, as)
	if err != nil {
		fields := []zap.Field{zap.String("request_id", id), zap.Error(err)}
		s.mu.Later(func() { s.lg.Error("apply session actions", fields...) })
	}
	if eff.Quarantined && s.cfg.Quarantines != nil {
		s.cfg.Quarantines.RecordQuarantine(metrics.SideSender)
	}
	if eff.Released {
		s.dropHoldLocked(r)
	}
	if eff.Poisoned {
		if s.cfg.Quarantines != nil {
			s.cfg.Quarantines.RecordPoison(metrics.SideSender, len(r.blocks))
		}
		fields := []zap.Field{zap.String("request_id", id), zap.Int("blocks", len(r.blocks))}
		s.mu.Later(func() {
			s.lg.Error("blocks poisoned: the push's writer never returned before the quarantine deadline", fields...)
		})
	}
}

// Drain refuses new prefills, ends those still queued for blocks (they
// hold nothing), waits (until ctx is done) for prefills and transfers in
// progress, then releases every advertised request's blocks.
func (s *Server) Drain(ctx context.Context) error {
	s.mu.Lock()
	var waits []chan struct{}
	for _, r := range s.reqs.Drain() {
		switch r.Stage() {
		case sched.StageQueued:
			r.prefillCancel()
			waits = append(waits, r.prefillDone)
		case sched.StagePrefilling:
			waits = append(waits, r.prefillDone)
		case sched.StageTransferring:
			waits = append(waits, r.transferDone)
		}
	}
	s.mu.Unlock()
	if err := routine.WaitAll(ctx, waits); err != nil {
		return fmt.Errorf("drain: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range s.reqs.All() {
		if r.Stage() == sched.StageAdvertised {
			s.endLocked(r)
		}
	}
	return nil
}
