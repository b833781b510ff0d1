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
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/pkg/health"
	"github.com/kvferry/kvferry/pkg/metrics"
	"github.com/kvferry/kvferry/pkg/serving"
	"github.com/kvferry/kvferry/pkg/ticket"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

// Config is what the router needs.
type Config struct {
	CtxServers []string
	GenServers []string
	// Model is the served model's geometry; ServedModel its public name.
	Model       executor.ModelSpec
	ServedModel string
	// Limits on client input.
	MaxBodyBytes     int64
	MaxPromptTokens  int
	MaxOutputTokens  int
	DefaultMaxTokens int
	RequestTimeout   time.Duration
	// CancelTimeout bounds each Cancel / Release call to a server.
	CancelTimeout time.Duration
	Conns         *serving.ConnCache
	Metrics       *metrics.Router
	Logger        *zap.Logger
}

type backend struct {
	addr     string
	role     string
	inflight atomic.Int64
}

// Router runs requests across context and generation servers.
type Router struct {
	kvferryv1.UnimplementedRouterServiceServer

	cfg     Config
	lg      *zap.Logger
	ctxs    []*backend
	gens    []*backend
	created int64

	mu     sync.Mutex
	active map[string]*active
}

var _ kvferryv1.RouterServiceServer = (*Router)(nil)

type active struct {
	ticket *kvferryv1.Ticket
	ctx    *backend
	gen    *backend
	cancel context.CancelFunc
}

// New returns a router.
func New(cfg Config) (*Router, error) {
	if len(cfg.CtxServers) == 0 || len(cfg.GenServers) == 0 {
		return nil, errors.New("router: need at least one context and one generation server")
	}
	r := &Router{cfg: cfg, lg: cfg.Logger, active: map[string]*active{}, created: time.Now().Unix()}
	for _, a := range cfg.CtxServers {
		r.ctxs = append(r.ctxs, &backend{addr: a, role: "context"})
	}
	for _, a := range cfg.GenServers {
		r.gens = append(r.gens, &backend{addr: a, role: "generation"})
	}
	return r, nil
}

// pick returns the backend with the least work in flight; the first wins a
// tie, and the counter moves before the call so that concurrent picks
// spread.
func pick(bs []*backend) *backend {
	best := bs[0]
	for _, b := range bs[1:] {
		if b.inflight.Load() < best.inflight.Load() {
			best = b
		}
	}
	best.inflight.Add(1)
	return best
}

// Job is one request as the router runs it.
type Job struct {
	ID       string
	Prompt   []uint32
	Sampling *kvferryv1.SamplingParams
}

// Chunk is a piece of the output sent to the client.
type Chunk struct {
	Text   string
	Tokens []uint32
	Finish executor.FinishReason
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

// Run executes a job and calls emit for each chunk. It returns when the
// generation finished, the client went away (emit failed or ctx is done),
// or a server failed. Every exit other than success cancels on both servers.
func (r *Router) Run(ctx context.Context, job Job, emit func(Chunk) error) (Usage, error) {
	start := time.Now()
	usage, err := r.run(ctx, job, emit, start)
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

func (r *Router) run(ctx context.Context, job Job, emit func(Chunk) error, start time.Time) (Usage, error) {
	usage := Usage{PromptTokens: len(job.Prompt)}
	t := ticket.New(job.ID)
	fields := []zap.Field{zap.String("request_id", t.GetRequestId()), zap.Uint32("attempt", t.GetAttempt())}
	ctx, cancel := context.WithTimeout(ctx, r.cfg.RequestTimeout)
	defer cancel()
	ctx = serving.WithRequestID(ctx, job.ID)

	c, g := pick(r.ctxs), pick(r.gens)
	defer c.inflight.Add(-1)
	defer g.inflight.Add(-1)
	a := &active{ticket: t, ctx: c, gen: g, cancel: cancel}
	if err := r.track(job.ID, a); err != nil {
		return usage, err
	}
	defer r.untrack(job.ID)

	cc, err := r.cfg.Conns.Get(c.addr)
	if err != nil {
		return usage, fail(codes.Unavailable, "context server: %v", err)
	}
	gc, err := r.cfg.Conns.Get(g.addr)
	if err != nil {
		return usage, fail(codes.Unavailable, "generation server: %v", err)
	}
	ctxClient := kvferryv1.NewContextServiceClient(cc)
	pre, err := ctxClient.Prefill(ctx, &kvferryv1.PrefillRequest{
		Ticket: t, PromptTokens: job.Prompt, Sampling: job.Sampling, DeadlineUnixNanos: deadlineOf(ctx),
	})
	if err != nil {
		if ctx.Err() != nil {
			r.cancelBoth(ctx, a)
		}
		return usage, r.rpcError(ctx, "prefill", err)
	}

	gstream, err := kvferryv1.NewGenerationServiceClient(gc).Generate(ctx, &kvferryv1.GenerateRequest{
		Ticket: t, PromptTokens: job.Prompt, FirstToken: pre.GetFirstToken(), Sampling: job.Sampling,
		Advertisement: pre.GetAdvertisement(), DeadlineUnixNanos: deadlineOf(ctx),
	})
	handedOff := false
	defer func() {
		if !handedOff {
			// The generation side never took the blocks: release them now;
			// the lease is only the backstop.
			r.release(ctx, ctxClient, t, fields)
		}
	}()
	if err != nil {
		return usage, r.rpcError(ctx, "generate", err)
	}
	last := time.Time{}
	for {
		msg, err := gstream.Recv()
		if err != nil {
			if ctx.Err() != nil {
				r.cancelBoth(ctx, a)
			}
			return usage, r.rpcError(ctx, "generate", err)
		}
		if msg.GetKvReady() {
			handedOff = true
		}
		now := time.Now()
		if len(msg.GetTokens()) > 0 {
			if last.IsZero() {
				r.cfg.Metrics.RecordTTFT(now.Sub(start))
			} else {
				r.cfg.Metrics.RecordInterToken(now.Sub(last))
			}
			last = now
		}
		usage.CompletionTokens += len(msg.GetTokens())
		ch := Chunk{Text: msg.GetText(), Tokens: msg.GetTokens(), Finish: finishOf(msg.GetFinishReason())}
		if err := emit(ch); err != nil {
			cancel()
			r.cancelBoth(ctx, a)
			return usage, fail(codes.Canceled, "client went away: %v", err)
		}
		if ch.Finish != executor.FinishNone {
			return usage, nil
		}
	}
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

// cancelBoth sends Cancel(ticket) to both servers concurrently, each bounded
// by CancelTimeout, and returns their outcomes.
func (r *Router) cancelBoth(ctx context.Context, a *active) []*kvferryv1.ServerCancelOutcome {
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.cfg.CancelTimeout)
	defer cancel()
	out := make([]*kvferryv1.ServerCancelOutcome, 2)
	var wg sync.WaitGroup
	wg.Go(func() {
		o := &kvferryv1.ServerCancelOutcome{Server: a.ctx.addr, Role: a.ctx.role}
		out[0] = o
		cc, err := r.cfg.Conns.Get(a.ctx.addr)
		if err == nil {
			var resp *kvferryv1.ContextServiceCancelResponse
			if resp, err = kvferryv1.NewContextServiceClient(cc).Cancel(cctx, &kvferryv1.ContextServiceCancelRequest{Ticket: a.ticket}); err == nil {
				o.Outcome, o.ResourcesFreeNow = resp.GetOutcome(), resp.GetResourcesFreeNow()
			}
		}
		if err != nil {
			o.Error = err.Error()
		}
	})
	wg.Go(func() {
		o := &kvferryv1.ServerCancelOutcome{Server: a.gen.addr, Role: a.gen.role}
		out[1] = o
		cc, err := r.cfg.Conns.Get(a.gen.addr)
		if err == nil {
			var resp *kvferryv1.GenerationServiceCancelResponse
			if resp, err = kvferryv1.NewGenerationServiceClient(cc).Cancel(cctx, &kvferryv1.GenerationServiceCancelRequest{Ticket: a.ticket}); err == nil {
				o.Outcome, o.ResourcesFreeNow = resp.GetOutcome(), resp.GetResourcesFreeNow()
			}
		}
		if err != nil {
			o.Error = err.Error()
		}
	})
	wg.Wait()
	for _, o := range out {
		r.lg.Info("cancel outcome", zap.String("request_id", a.ticket.GetRequestId()), zap.Uint32("attempt", a.ticket.GetAttempt()),
			zap.String("peer", o.GetServer()), zap.String("role", o.GetRole()), zap.String("outcome", o.GetOutcome().String()), zap.String("error", o.GetError()))
	}
	return out
}

// CancelByID cancels a running request: its streams stop and both servers
// get Cancel(ticket). found is false for an unknown id.
func (r *Router) CancelByID(ctx context.Context, id string) (found bool, outcomes []*kvferryv1.ServerCancelOutcome) {
	r.mu.Lock()
	a, ok := r.active[id]
	r.mu.Unlock()
	if !ok {
		return false, nil
	}
	out := r.cancelBoth(ctx, a)
	a.cancel()
	return true, out
}

// backendReadyTimeout bounds one readiness probe of a backend.
const backendReadyTimeout = time.Second

// ReadyCheck is the router's readiness: at least one context server and one
// generation server answer SERVING for "readiness".
func (r *Router) ReadyCheck(ctx context.Context) (bool, string, string) {
	for _, group := range []struct {
		bs     []*backend
		reason string
	}{{r.ctxs, "no_ready_context_server"}, {r.gens, "no_ready_generation_server"}} {
		if !r.anyReady(ctx, group.bs) {
			return false, group.reason, fmt.Sprintf("no %s server answers ready", group.bs[0].role)
		}
	}
	return true, "", ""
}

func (r *Router) anyReady(ctx context.Context, bs []*backend) bool {
	for _, b := range bs {
		cc, err := r.cfg.Conns.Get(b.addr)
		if err != nil {
			continue
		}
		cctx, cancel := context.WithTimeout(ctx, backendReadyTimeout)
		resp, err := healthpb.NewHealthClient(cc).Check(cctx, &healthpb.HealthCheckRequest{Service: health.ServiceReadiness})
		cancel()
		if err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			return true
		}
	}
	return false
}
