// Package router is kvferry's front door: it validates and tokenizes a
// request, mints its ticket, runs Prefill on a context server and Generate
// on a generation server, and streams the tokens back. It owns the handoff
// window: if the generation leg fails before the generation server has
// taken the blocks, it releases them on the context server at once.
package router

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/kvferry/kvferry/pkg/connpool"
	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/pkg/health"
	"github.com/kvferry/kvferry/pkg/metrics"
	"github.com/kvferry/kvferry/pkg/router/discovery"
	"github.com/kvferry/kvferry/pkg/routine"
	"github.com/kvferry/kvferry/pkg/serving"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

// Config is what the router needs.
type Config struct {
	// CtxServers and GenServers find the servers (a static list or a DNS
	// name); Discover re-resolves them every ResolveInterval.
	CtxServers      discovery.Source
	GenServers      discovery.Source
	ResolveInterval time.Duration
	// Model is the served model's geometry; ServedModel its public name.
	Model       executor.ModelSpec
	ServedModel string
	// Vocab tokenizes prompts and renders chats for the servers' model
	// (nil: the synthetic engine's).
	Vocab executor.Vocabulary
	// Limits on client input.
	MaxBodyBytes     int64
	MaxPromptTokens  int
	MaxOutputTokens  int
	DefaultMaxTokens int
	RequestTimeout   time.Duration
	// BodyReadTimeout bounds the read of a request body, which happens
	// before the request takes an in-flight slot (0: none).
	BodyReadTimeout time.Duration
	// StreamWriteTimeout bounds the write of each streamed chunk: a client
	// that stops reading is dropped and its request cancelled (0: none).
	StreamWriteTimeout time.Duration
	// CancelTimeout bounds each Cancel / Release call to a server.
	CancelTimeout time.Duration
	// MaxRetries is how many more attempts a request gets after a server
	// failure, only before its first token reached the client.
	MaxRetries int
	// PrefixDigestInterval is how often the router asks each context
	// server what its prefix cache holds (PrefixDigest), for the
	// precise-prefix scorer and the kvferry_prefix_blocks_total counts
	// (0: never; precise-prefix then scores 0).
	PrefixDigestInterval time.Duration
	// MaxInflight bounds requests in flight; beyond it the router answers
	// 429 (0: no bound).
	MaxInflight int
	// APIKeys, when enabled, are the bearer tokens the public surfaces
	// accept (nil: none required).
	APIKeys *Keys
	// Routing is the plugin chain that picks servers (zero: DefaultRouting).
	Routing Routing
	// Aggregated serves without context servers: each generation server
	// prefills its own requests (GenerateRequest.prefill; the servers run
	// with --aggregated) and no KV crosses the network. CtxServers is
	// unused.
	Aggregated bool
	// CtxConns and GenConns reach context and generation servers; with mTLS
	// each checks the server's certificate names that role.
	CtxConns *connpool.Cache
	GenConns *connpool.Cache
	Metrics  *metrics.Router
	Logger   *zap.Logger
}

// Router runs requests across context and generation servers.
type Router struct {
	kvferryv1.UnimplementedRouterServiceServer

	cfg      Config
	lg       *zap.Logger
	bmu      sync.Mutex // guards ctxs and gens (replaced, never mutated)
	ctxs     []*backend
	gens     []*backend
	policy   *policy
	created  int64
	inflight atomic.Int64

	mu     sync.Mutex
	active map[string]*active
}

var _ kvferryv1.RouterServiceServer = (*Router)(nil)

type active struct {
	clientID string
	tenant   string
	ticket   *kvferryv1.Ticket
	ctx      *backend
	gen      *backend
	cancel   context.CancelFunc
}

// New returns a router. Call Discover (or Resolve once) to learn the
// servers.
func New(cfg Config) (*Router, error) {
	if (cfg.CtxServers == nil && !cfg.Aggregated) || cfg.GenServers == nil {
		return nil, errors.New("router: need a source of context and of generation servers")
	}
	if cfg.Vocab == nil {
		cfg.Vocab = executor.SyntheticVocabulary
	}
	routing := cfg.Routing
	if routing.Filters == nil && routing.Scorers == nil && routing.Picker == nil {
		var err error
		if routing, err = ParseRouting(DefaultRouting); err != nil {
			return nil, err
		}
	}
	r := &Router{cfg: cfg, lg: cfg.Logger, active: map[string]*active{}, created: time.Now().Unix(), policy: newPolicy(routing)}
	return r, nil
}

// The roles as metrics and cancel outcomes name them.
const (
	roleContext    = "context"
	roleGeneration = "generation"
)

// Resolve asks both sources for the current servers and applies what they
// answer; a source that fails keeps its last known set.
func (r *Router) Resolve(ctx context.Context) error {
	var errs []error
	for _, role := range []struct {
		name string
		src  discovery.Source
		set  *[]*backend
	}{{roleContext, r.cfg.CtxServers, &r.ctxs}, {roleGeneration, r.cfg.GenServers, &r.gens}} {
		if role.src == nil {
			continue // aggregated: no context servers
		}
		addrs, err := role.src.Resolve(ctx)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		r.setServers(role.name, role.set, addrs)
	}
	return errors.Join(errs...)
}

// setServers replaces a role's servers with addrs, keeping the backend
// (breaker, counts) of every address that stays. Requests in flight hold
// their backend and finish undisturbed when it is removed.
func (r *Router) setServers(role string, set *[]*backend, addrs []string) {
	r.bmu.Lock()
	defer r.bmu.Unlock()
	old := map[string]*backend{}
	for _, b := range *set {
		old[b.addr] = b
	}
	next := make([]*backend, 0, len(addrs))
	for _, a := range addrs {
		b, ok := old[a]
		if !ok {
			b = &backend{addr: a, role: role, record: func(n int64) { r.cfg.Metrics.RecordBackendInflight(role, a, n) }}
			b.add(0)            // the series exists from the server's discovery on
			b.ready.Store(true) // until the health loop says otherwise
			r.lg.Info("server added", zap.String("role", role), zap.String("peer", a))
		}
		delete(old, a)
		next = append(next, b)
	}
	for a, b := range old {
		r.lg.Info("server removed", zap.String("role", role), zap.String("peer", a))
		b.forget(func() { r.cfg.Metrics.ForgetBackend(role, a) })
		// Requests running on it hold their backend and may use the
		// connection until their timeout; then it is closed.
		r.cache(role).Forget(a, r.cfg.RequestTimeout+r.cfg.CancelTimeout)
	}
	*set = next
}

// conn is the client connection to b, from its role's cache.
func (r *Router) conn(b *backend) (*grpc.ClientConn, error) { return r.cache(b.role).Get(b.addr) }

// cache is the connection cache of a role.
func (r *Router) cache(role string) *connpool.Cache {
	if role == roleContext {
		return r.cfg.CtxConns
	}
	return r.cfg.GenConns
}

// servers returns the current servers of both roles.
func (r *Router) servers() (ctxs, gens []*backend) {
	r.bmu.Lock()
	defer r.bmu.Unlock()
	return r.ctxs, r.gens
}

// Discover re-resolves the servers every ResolveInterval until ctx is done.
func (r *Router) Discover(ctx context.Context) {
	if r.cfg.ResolveInterval <= 0 {
		return
	}
	routine.Every(ctx, r.cfg.ResolveInterval, func(time.Time) {
		if err := r.Resolve(ctx); err != nil {
			r.lg.Warn("discovery failed; keeping the last known servers", zap.Error(err))
		}
	})
}

// Job is one request as the router runs it.
type Job struct {
	// ID is the request's ticket id, always minted by the router (NewJobID):
	// never a client's value, so no two requests share a ticket.
	ID string
	// ClientID is the client's own request id (X-Request-Id, or the gRPC
	// request_id): for correlation in logs and Cancel, never a ticket.
	ClientID string
	// Tenant is the API key's tenant ("" without keys): it salts the
	// prefix cache and only it may cancel the request.
	Tenant   string
	Prompt   []uint32
	Sampling *kvferryv1.SamplingParams
	// Stop sequences end the output before them (never sent).
	Stop []string
}

// Chunk is a piece of the output sent to the client.
type Chunk struct {
	// Index is the choice (sampling.n > 1); each ends with its Finish.
	Index  int
	Text   string
	Tokens []uint32
	Finish executor.FinishReason
	// Logprobs are Tokens', when the sampling asked for them.
	Logprobs []*kvferryv1.TokenLogprob
}

// Usage counts a request's tokens.
type Usage struct {
	PromptTokens     int
	CompletionTokens int
}

// Error is a request failure with the gRPC code that classifies it.
type Error struct {
	Code codes.Code
	Msg  string
}

func (e *Error) Error() string { return e.Msg }

func fail(code codes.Code, format string, args ...any) error {
	return &Error{Code: code, Msg: fmt.Sprintf(format, args...)}
}

// CodeOf returns the gRPC code of a router error.
func CodeOf(err error) codes.Code {
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return status.Code(err)
}

// Admit takes an in-flight slot once a request's body is in and before any
// work on it (decoding, tokenizing): beyond MaxInflight it answers ErrOverloaded at
// once. release gives the slot back; call it when the request is done.
func (r *Router) Admit() (release func(), err error) {
	if n := r.inflight.Add(1); r.cfg.MaxInflight > 0 && n > int64(r.cfg.MaxInflight) {
		r.inflight.Add(-1)
		r.cfg.Metrics.RecordRequest(metrics.RequestRejected, 0)
		return nil, ErrOverloaded
	}
	r.cfg.Metrics.AddInflight(1)
	return func() { r.inflight.Add(-1); r.cfg.Metrics.AddInflight(-1) }, nil
}

// RunPrefixDigests asks every context server for its PrefixDigest each
// PrefixDigestInterval until ctx is done; a server that does not answer
// within the interval keeps its last digest.
func (r *Router) RunPrefixDigests(ctx context.Context) {
	if r.cfg.PrefixDigestInterval <= 0 || r.cfg.Aggregated {
		return
	}
	routine.Every(ctx, r.cfg.PrefixDigestInterval, func(time.Time) {
		ctxs, _ := r.servers()
		var wg sync.WaitGroup
		for _, b := range ctxs {
			wg.Go(func() { r.fetchDigest(ctx, b) })
		}
		wg.Wait()
	})
}

func (r *Router) fetchDigest(ctx context.Context, b *backend) {
	ctx, cancel := context.WithTimeout(ctx, r.cfg.PrefixDigestInterval)
	defer cancel()
	cc, err := r.conn(b)
	if err != nil {
		return
	}
	resp, err := kvferryv1.NewContextServiceClient(cc).PrefixDigest(ctx, &kvferryv1.PrefixDigestRequest{})
	if err != nil {
		r.lg.Debug("prefix digest", zap.String("peer", b.addr), zap.Error(err))
		return
	}
	set := make(map[uint64]struct{}, len(resp.GetBlockHashes()))
	for _, h := range resp.GetBlockHashes() {
		set[h] = struct{}{}
	}
	b.digest.Store(&set)
	b.gauge(func() { r.cfg.Metrics.RecordPrefixDigest(b.addr, len(set)) })
}

// Public is err as a client may see it. The router's own answers about
// the request (bad argument, unknown model, duplicate id, full queues, the
// client's cancel) pass as they are; a server-side failure becomes a fixed
// sentence for its code and the request id, under which the router logs
// the detail (which can name internal hosts, addresses and sockets: the
// servers' own text never reaches a client).
func Public(err error, requestID string) *Error {
	code := CodeOf(err)
	switch code {
	case codes.InvalidArgument, codes.NotFound, codes.AlreadyExists, codes.ResourceExhausted, codes.Canceled, codes.Unauthenticated, codes.PermissionDenied:
		return &Error{Code: code, Msg: err.Error()}
	}
	msg, ok := publicSentences[code]
	if !ok {
		msg = "the servers failed the request"
	}
	if requestID != "" {
		msg += " (request id " + requestID + ")"
	}
	return &Error{Code: code, Msg: msg}
}

// publicSentences are what clients read for a server-side failure.
var publicSentences = map[codes.Code]string{
	codes.Unavailable:        "no server could take the request; retry later",
	codes.DeadlineExceeded:   "the request did not finish in time",
	codes.FailedPrecondition: "the context and generation servers are configured differently (model, KV layout or transport); the router's log has the detail",
	codes.DataLoss:           "the request's KV cache did not arrive intact",
	codes.Aborted:            "the request was aborted by the servers; retry",
}

// ErrOverloaded is returned when MaxInflight requests are running.
var ErrOverloaded = &Error{Code: codes.ResourceExhausted, Msg: "too many requests in flight"}

// Run executes a job and calls emit for each chunk. It returns when the
// generation finished, the client went away (emit failed or ctx is done),
// or the servers failed. A server failure before the first chunk reached
// the client is retried up to MaxRetries times, each with attempt+1 and a
// fresh pair that excludes the failed server; never on a client error.
//
// The caller holds an in-flight slot from Admit.
func (r *Router) Run(ctx context.Context, job Job, emit func(Chunk) error) (Usage, error) {
	start := time.Now()
	a := &active{clientID: job.ClientID, tenant: job.Tenant}
	if err := r.track(job.ID, a); err != nil {
		return Usage{}, err
	}
	defer r.untrack(job.ID)

	ctx, cancel := context.WithTimeout(ctx, r.cfg.RequestTimeout)
	defer cancel()
	ctx = serving.WithRequestID(ctx, job.ID)
	exclude := map[*backend]bool{}
	var usage Usage
	var err, prev error
	for attempt := uint32(1); ; attempt++ {
		r.cfg.Metrics.RecordAttempt(attempt > 1)
		var emitted bool
		var failed *backend
		usage, emitted, failed, err = r.attempt(ctx, job, attempt, a, exclude, start, emit)
		if prev != nil && failed == nil && CodeOf(err) == codes.Unavailable && ctx.Err() == nil {
			// The retry found no other server: the first failure is the
			// one worth telling the client.
			err = prev
			break
		}
		if err == nil || emitted || int(attempt) > r.cfg.MaxRetries || !retryable(err) || ctx.Err() != nil {
			break
		}
		prev = err
		if failed != nil {
			exclude[failed] = true
		}
		r.lg.Info("retrying", zap.String("request_id", job.ID), zap.Uint32("attempt", attempt+1), zap.Error(err))
	}
	outcome := metrics.RequestOK
	switch {
	case err == nil:
	case ctx.Err() != nil || CodeOf(err) == codes.Canceled:
		outcome = metrics.RequestCancelled
	case CodeOf(err) == codes.InvalidArgument || CodeOf(err) == codes.ResourceExhausted:
		outcome = metrics.RequestRejected
	default:
		outcome = metrics.RequestError
	}
	r.cfg.Metrics.RecordRequest(outcome, time.Since(start))
	return usage, err
}

// retryable: a server failure another pair may not have; never the
// client's own error, a cancel or the request's deadline.
func retryable(err error) bool {
	switch CodeOf(err) {
	case codes.Unavailable, codes.ResourceExhausted, codes.Internal, codes.DataLoss, codes.Aborted, codes.FailedPrecondition, codes.Unknown:
		return true
	}
	return false
}

// serverFault: the failure counts against the server's breaker.
func serverFault(err error) bool {
	switch CodeOf(err) {
	case codes.Unavailable, codes.Internal, codes.DataLoss, codes.Unknown:
		return true
	}
	return false
}

// attempt runs one attempt of a job on a fresh pair. emitted reports
// whether any chunk reached the client; failed names the server to exclude
// from a retry.
func (r *Router) attempt(ctx context.Context, job Job, attempt uint32, a *active, exclude map[*backend]bool, start time.Time, emit func(Chunk) error) (usage Usage, emitted bool, failed *backend, err error) {
	usage = Usage{PromptTokens: len(job.Prompt)}
	t := &kvferryv1.Ticket{RequestId: job.ID, Attempt: attempt}
	fields := []zap.Field{zap.String("request_id", t.GetRequestId()), zap.Uint32("attempt", t.GetAttempt())}
	req := &Request{PrefixHash: prefixHash(r.cfg.Model, job.Prompt), Now: time.Now(), exclude: exclude}
	ctxs, gens := r.servers()
	var c *backend
	if !r.cfg.Aggregated {
		if r.cfg.PrefixDigestInterval > 0 {
			req.BlockHashes = executor.RouteHashes(r.cfg.Model, job.Tenant, job.Prompt)
		}
		if c = r.policy.pick(req, ctxs); c == nil {
			return usage, false, nil, fail(codes.Unavailable, "no context server available")
		}
		defer c.add(-1)
		if req.BlockHashes != nil {
			available := 0
			for _, b := range ctxs {
				available = max(available, b.CachedPrefix(req.BlockHashes))
			}
			r.cfg.Metrics.RecordPrefix(len(req.BlockHashes), available, c.CachedPrefix(req.BlockHashes))
		}
		req.PrefixHash, req.BlockHashes = 0, nil // affinity is for the reuse cache, which lives on context servers
	}
	g := r.policy.pick(req, gens)
	if g == nil {
		if c != nil {
			c.abandon() // its half-open probe slot, if it took one, goes unused
		}
		return usage, false, nil, fail(codes.Unavailable, "no generation server available")
	}
	defer g.add(-1)
	actx, acancel := context.WithCancel(ctx)
	defer acancel()
	r.setActive(a, t, c, g, acancel)

	gc, err := r.conn(g)
	if err != nil {
		return usage, false, g, fail(codes.Unavailable, "generation server: %v", err)
	}
	greq := &kvferryv1.GenerateRequest{Ticket: t, PromptTokens: job.Prompt, Sampling: job.Sampling, DeadlineUnixNanos: deadlineOf(actx), Prefill: r.cfg.Aggregated}
	handedOff := r.cfg.Aggregated // no context server holds anything
	if !r.cfg.Aggregated {
		cc, err := r.conn(c)
		if err != nil {
			return usage, false, c, fail(codes.Unavailable, "context server: %v", err)
		}
		ctxClient := kvferryv1.NewContextServiceClient(cc)
		pre, err := ctxClient.Prefill(actx, &kvferryv1.PrefillRequest{
			Ticket: t, PromptTokens: job.Prompt, Sampling: job.Sampling, DeadlineUnixNanos: deadlineOf(actx), CacheSalt: job.Tenant,
		})
		if err != nil {
			if ctx.Err() != nil {
				r.cancelBoth(ctx, a)
			}
			err = r.rpcError(ctx, "prefill", err)
			c.result(!serverFault(err), time.Now())
			return usage, false, c, err
		}
		c.result(true, time.Now())
		r.cfg.Metrics.RecordPrefixReused(int(pre.GetReusedBlocks()))
		greq.FirstToken, greq.FirstLogprob, greq.Advertisement = pre.GetFirstToken(), pre.GetFirstLogprob(), pre.GetAdvertisement()
		greq.OtherFirstTokens, greq.OtherFirstLogprobs = pre.GetOtherFirstTokens(), pre.GetOtherFirstLogprobs()
		defer func() {
			if !handedOff {
				// The generation side never took the blocks: release them
				// now; the lease is only the backstop.
				r.release(ctx, ctxClient, t, fields)
			}
		}()
	}

	gstream, err := kvferryv1.NewGenerationServiceClient(gc).Generate(actx, greq)
	if err != nil {
		err = r.rpcError(ctx, "generate", err)
		g.result(!serverFault(err), time.Now())
		return usage, false, g, err
	}
	// Each choice (sampling.n) has its own stop sequences' state, its own
	// held-back tokens and its own end; the stream ends after the last.
	n := max(int(job.Sampling.GetN()), 1)
	stops, held, done := make([]*stopper, n), make([]Chunk, n), make([]bool, n)
	for i := range stops {
		stops[i] = newStopper(job.Stop)
	}
	left := n
	last := time.Time{}
	for {
		msg, err := gstream.Recv()
		if err != nil {
			if ctx.Err() != nil {
				r.cancelBoth(ctx, a)
			}
			err = r.rpcError(ctx, "generate", err)
			g.result(!serverFault(err), time.Now())
			return usage, emitted, g, err
		}
		if msg.GetKvReady() {
			handedOff = true
		}
		i := int(msg.GetIndex())
		if i >= n {
			g.result(false, time.Now())
			return usage, emitted, g, fail(codes.Internal, "generation server sent choice %d of %d", i, n)
		}
		usage.CompletionTokens += len(msg.GetTokens())
		if done[i] {
			continue // a stop sequence ended this choice; the others go on
		}
		text, stopped := stops[i].feed(msg.GetText())
		finish := finishOf(msg.GetFinishReason())
		switch {
		case stopped:
			finish = executor.FinishStop
		case finish != executor.FinishNone:
			text += stops[i].flush()
		}
		held[i].Tokens = append(held[i].Tokens, msg.GetTokens()...)
		held[i].Logprobs = append(held[i].Logprobs, msg.GetLogprobs()...)
		if text == "" && finish == executor.FinishNone {
			continue // held back: it may be the start of a stop sequence
		}
		now := time.Now()
		if last.IsZero() {
			r.cfg.Metrics.RecordTTFT(now.Sub(start))
		} else {
			r.cfg.Metrics.RecordInterToken(now.Sub(last))
		}
		last = now
		c := Chunk{Index: i, Text: text, Tokens: held[i].Tokens, Finish: finish, Logprobs: held[i].Logprobs}
		held[i] = Chunk{}
		if err := emit(c); err != nil {
			acancel()
			r.cancelBoth(ctx, a)
			return usage, true, nil, fail(codes.Canceled, "client went away: %v", err)
		}
		emitted = true
		if finish != executor.FinishNone {
			done[i] = true
			if left--; left == 0 {
				g.result(true, time.Now())
				// A stop sequence ends the request early: the generation
				// stream is cancelled by acancel when this returns.
				return usage, true, nil, nil
			}
		}
	}
}

// prefixHash keys a prompt's first full block, for prefix affinity (it
// hashes that block only, not the whole prompt).
func prefixHash(spec executor.ModelSpec, prompt []uint32) uint64 {
	if hs := executor.BlockHashes(spec, prompt[:min(len(prompt), spec.BlockTokens)]); len(hs) > 0 {
		return hs[0]
	}
	return 0
}

func finishOf(f kvferryv1.FinishReason) executor.FinishReason {
	switch f {
	case kvferryv1.FinishReason_FINISH_REASON_STOP:
		return executor.FinishStop
	case kvferryv1.FinishReason_FINISH_REASON_LENGTH:
		return executor.FinishLength
	}
	return executor.FinishNone
}

func deadlineOf(ctx context.Context) int64 {
	if d, ok := ctx.Deadline(); ok {
		return d.UnixNano()
	}
	return 0
}

// rpcError classifies a server's error for the client.
func (r *Router) rpcError(ctx context.Context, what string, err error) error {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return fail(codes.DeadlineExceeded, "request timed out after %s", r.cfg.RequestTimeout)
	}
	if ctx.Err() != nil {
		return fail(codes.Canceled, "request cancelled")
	}
	st := status.Convert(err)
	return fail(st.Code(), "%s: %s", what, st.Message())
}

func (r *Router) track(id string, a *active) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, dup := r.active[id]; dup {
		return fail(codes.AlreadyExists, "request id %s is already running", id)
	}
	r.active[id] = a
	return nil
}

func (r *Router) untrack(id string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.active, id)
}

// setActive records the current attempt of a request for CancelByID.
func (r *Router) setActive(a *active, t *kvferryv1.Ticket, c, g *backend, cancel context.CancelFunc) {
	r.mu.Lock()
	defer r.mu.Unlock()
	a.ticket, a.ctx, a.gen, a.cancel = t, c, g, cancel
}

func (r *Router) release(ctx context.Context, c kvferryv1.ContextServiceClient, t *kvferryv1.Ticket, fields []zap.Field) {
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.cfg.CancelTimeout)
	defer cancel()
	resp, err := c.Release(rctx, &kvferryv1.ReleaseRequest{Ticket: t})
	if err != nil {
		r.lg.Warn("release failed; the handoff lease will free the blocks", append(fields, zap.Error(err))...)
		return
	}
	r.lg.Debug("released handoff", append(fields, zap.Bool("released", resp.GetReleased()))...)
}

// cancelBoth sends Cancel(ticket) to both servers (the generation server
// alone when aggregated) concurrently, each bounded by CancelTimeout, and
// returns their outcomes.
func (r *Router) cancelBoth(ctx context.Context, a *active) []*kvferryv1.ServerCancelOutcome {
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.cfg.CancelTimeout)
	defer cancel()
	// Each server that holds something for the request, context first
	// (none when aggregated), and its Cancel.
	type cancelCall struct {
		b    *backend
		call func(*grpc.ClientConn) (kvferryv1.CancelOutcome, bool, error)
	}
	var calls []cancelCall
	if a.ctx != nil {
		calls = append(calls, cancelCall{a.ctx, func(cc *grpc.ClientConn) (kvferryv1.CancelOutcome, bool, error) {
			resp, err := kvferryv1.NewContextServiceClient(cc).Cancel(cctx, &kvferryv1.ContextServiceCancelRequest{Ticket: a.ticket})
			return resp.GetOutcome(), resp.GetResourcesFreeNow(), err
		}})
	}
	calls = append(calls, cancelCall{a.gen, func(cc *grpc.ClientConn) (kvferryv1.CancelOutcome, bool, error) {
		resp, err := kvferryv1.NewGenerationServiceClient(cc).Cancel(cctx, &kvferryv1.GenerationServiceCancelRequest{Ticket: a.ticket})
		return resp.GetOutcome(), resp.GetResourcesFreeNow(), err
	}})
	out := make([]*kvferryv1.ServerCancelOutcome, len(calls))
	var wg sync.WaitGroup
	for i, c := range calls {
		o := &kvferryv1.ServerCancelOutcome{Server: c.b.addr, Role: c.b.role}
		out[i] = o
		wg.Go(func() {
			cc, err := r.conn(c.b)
			if err == nil {
				o.Outcome, o.ResourcesFreeNow, err = c.call(cc)
			}
			if err != nil {
				o.Error = err.Error() // the outcome stays unspecified
			}
		})
	}
	wg.Wait()
	for _, o := range out {
		outcome := o.GetOutcome().String()
		if o.GetError() != "" {
			outcome = "error"
		}
		r.cfg.Metrics.RecordCancelOutcome(o.GetRole(), outcome)
		r.lg.Info("cancel outcome", zap.String("request_id", a.ticket.GetRequestId()), zap.Uint32("attempt", a.ticket.GetAttempt()),
			zap.String("peer", o.GetServer()), zap.String("role", o.GetRole()), zap.String("outcome", o.GetOutcome().String()), zap.String("error", o.GetError()))
	}
	return out
}

// CancelByID cancels tenant's running requests with this id — the
// router's own or a client's: their streams stop and both servers get
// Cancel(ticket). Another tenant's requests are not found.
// found is false when no running request has it.
func (r *Router) CancelByID(ctx context.Context, tenant, id string) (found bool, outcomes []*kvferryv1.ServerCancelOutcome) {
	r.mu.Lock()
	var snaps []active
	for minted, a := range r.active {
		if a.tenant != tenant {
			continue // another tenant's request: as if it did not exist
		}
		if minted == id || (a.clientID != "" && a.clientID == id) {
			snaps = append(snaps, *a)
		}
	}
	r.mu.Unlock()
	for i := range snaps {
		if snaps[i].ticket == nil {
			continue // not started yet; nothing on a server to cancel
		}
		outcomes = append(outcomes, r.cancelBoth(ctx, &snaps[i])...)
		snaps[i].cancel()
	}
	return len(snaps) > 0, outcomes
}

// backendReadyTimeout bounds one readiness probe of a backend.
const backendReadyTimeout = time.Second

// ReadyCheck is the router's readiness: at least one context server (none
// when aggregated) and one generation server answer SERVING for
// "readiness".
func (r *Router) ReadyCheck(ctx context.Context) (bool, string, string) {
	ctxs, gens := r.servers()
	ctxOK, genOK := r.cfg.Aggregated || r.anyReady(ctx, ctxs), r.anyReady(ctx, gens)
	switch {
	case !ctxOK:
		return false, "no_ready_context_server", "no context server answers ready"
	case !genOK:
		return false, "no_ready_generation_server", "no generation server answers ready"
	}
	return true, "", ""
}

// anyReady probes every backend's readiness at once (one slow backend
// costs its timeout, not its timeout times the backends), records it for
// the routing filter, and reports whether any is ready.
func (r *Router) anyReady(ctx context.Context, bs []*backend) bool {
	var any atomic.Bool
	var wg sync.WaitGroup
	for _, b := range bs {
		wg.Go(func() {
			ok := false
			if cc, err := r.conn(b); err == nil {
				cctx, cancel := context.WithTimeout(ctx, backendReadyTimeout)
				resp, err := healthpb.NewHealthClient(cc).Check(cctx, &healthpb.HealthCheckRequest{Service: health.ServiceReadiness})
				cancel()
				ok = err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING
			}
			b.ready.Store(ok)
			if ok {
				any.Store(true)
			}
		})
	}
	wg.Wait()
	return any.Load()
}
