// Package health tells the truth about a kvferry process: liveness fails
// only on sustained evidence that it is wedged (so Kubernetes restarts it),
// readiness fails whenever it should not get traffic (draining, pool
// exhausted, pair path broken, GPU fault) — and one slow transfer never
// restarts a pod.
//
// The evaluator runs on its own goroutine and reads lock-free or briefly
// locked snapshots; probes and GetHealth only read its last result, so a
// wedged executor cannot stall health. Outputs: grpc.health.v1 for the
// services "liveness", "readiness" and "", HTTP /livez and /readyz, the
// kvferry.v1.HealthService snapshot and the kvferry_health_* gauges.
package health

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	grpchealth "google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/kvferry/kvferry/pkg/metrics"
	"github.com/kvferry/kvferry/pkg/routine"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

// gRPC health service names.
const (
	ServiceLiveness  = "liveness"
	ServiceReadiness = "readiness"
)

// Reasons (machine-readable), in the order they are checked.
const (
	ReasonOK                   = "ok"
	ReasonStarting             = "starting"
	ReasonNoProgress           = "no_progress"
	ReasonSessionStuck         = "session_stuck"
	ReasonPoisonBudgetExceeded = "poison_budget_exceeded"
	ReasonDraining             = "draining"
	ReasonPoolExhausted        = "pool_exhausted"
	ReasonCanaryFailing        = "pair_canary_failing"
	ReasonGPUFault             = "gpu_fault"
)

// Config holds the health thresholds (defaults: the README's Configuration).
type Config struct {
	// ProgressDeadline: no global progress this long with work pending
	// fails liveness (60 s); so does a session this long past its
	// transfer deadline.
	ProgressDeadline time.Duration
	// TransferDeadline is the sessions' own deadline (60 s).
	TransferDeadline time.Duration
	// PoisonBudget: more poisoned blocks than this fail liveness (16).
	PoisonBudget int
	// ExhaustionGrace: a pool with nothing allocatable for longer fails
	// readiness (5 s).
	ExhaustionGrace time.Duration
}

// ReadyCheck is an owner's extra readiness condition (the router's: a
// ready pair of backends); it returns ok, or a reason and a sentence.
type ReadyCheck func(ctx context.Context) (ok bool, reason, message string)

// Pool is what the evaluator reads of a block pool (blockpool.Pool is
// one): its blocks by state name, its capacity, and how many blocks are
// allocatable now. (An interface, so that health — which the router links
// too — does not link the block pool.)
type Pool interface {
	Capacity() int
	Available() int
	ByState() map[string]int
}

// Sources are what the evaluator reads; any may be nil.
type Sources struct {
	Pool                Pool
	Progress            *Progress
	Sessions            *Sessions
	QuarantinedSessions func() int
	Canary              func() *kvferryv1.CanaryStatus
	GPUs                func() (present bool, gpus []*kvferryv1.GpuStatus)
	// EngineDevices names the devices the model engine runs on.
	EngineDevices []string
	Ready         ReadyCheck
}

// Status is the probe answer.
type Status struct {
	Live    bool   `json:"live"`
	Ready   bool   `json:"ready"`
	Reason  string `json:"reason"`
	Message string `json:"message"`
}

// Checker evaluates and serves a process's health. Safe for concurrent use.
type Checker struct {
	kvferryv1.UnimplementedHealthServiceServer

	cfg    Config
	src    Sources
	grpc   *grpchealth.Server
	gauges *metrics.Health

	draining atomic.Bool
	last     atomic.Pointer[kvferryv1.GetHealthResponse]

	evalMu         sync.Mutex // guards exhaustedSince; never held across a probe (Sources.Ready, GPUs)
	exhaustedSince time.Time

	started   atomic.Uint64 // evaluations begun, numbering them
	pubMu     sync.Mutex    // orders publications
	published uint64        // the number of the last one published
}

var _ kvferryv1.HealthServiceServer = (*Checker)(nil)

// New returns a checker; until its first evaluation it reports live but
// not ready, so no traffic arrives before the sources were looked at.
func New(reg prometheus.Registerer, cfg Config, src Sources) *Checker {
	c := &Checker{cfg: cfg, src: src, grpc: grpchealth.NewServer(), gauges: metrics.NewHealth(reg)}
	c.gauges.RecordPoisonBudget(cfg.PoisonBudget)
	c.publish(&kvferryv1.GetHealthResponse{Live: true, Reason: ReasonStarting, Message: "not evaluated yet"})
	return c
}

// Register adds grpc.health.v1 and kvferry.v1.HealthService to s.
func (c *Checker) Register(s *grpc.Server) {
	healthpb.RegisterHealthServer(s, c.grpc)
	kvferryv1.RegisterHealthServiceServer(s, c)
}

// SetDraining fails readiness from now on (liveness stays) and publishes
// at once.
func (c *Checker) SetDraining() {
	c.draining.Store(true)
	c.Evaluate(context.Background(), time.Now())
}

// Run evaluates every interval until ctx is done.
func (c *Checker) Run(ctx context.Context, interval time.Duration) {
	c.Evaluate(ctx, time.Now())
	routine.Every(ctx, interval, func(now time.Time) { c.Evaluate(ctx, now) })
}

// Shutdown sets every gRPC health service NOT_SERVING for good.
func (c *Checker) Shutdown() { c.grpc.Shutdown() }

// Current returns the last evaluation.
func (c *Checker) Current() *kvferryv1.GetHealthResponse { return c.last.Load() }

// Evaluate computes the health at now from the sources and publishes it.
func (c *Checker) Evaluate(ctx context.Context, now time.Time) *kvferryv1.GetHealthResponse {
	n := c.started.Add(1)
	h := c.evaluateLocal(now)
	// fail records the first failing condition as the reason.
	fail := func(live bool, reason, format string, args ...any) {
		if !h.Ready {
			return
		}
		h.Ready, h.Reason, h.Message = false, reason, fmt.Sprintf(format, args...)
		h.Live = live
	}
	// Probes that may block (NVML, the router's backends) run without
	// evalMu: a slow one delays this evaluation, never another.
	if c.src.Canary != nil {
		h.Canary = c.src.Canary()
		if h.Canary.GetFailing() {
			fail(true, ReasonCanaryFailing, "the pair canary fails against every recently seen context server")
		}
	}
	h.EngineDevices = c.src.EngineDevices
	if c.src.GPUs != nil {
		h.GpuPresent, h.Gpus = c.src.GPUs()
		if g := faultyGPU(h.Gpus); g != nil {
			fail(true, ReasonGPUFault, "GPU %d (%s): %s", g.GetIndex(), g.GetName(), g.GetReason())
		}
	}
	if c.src.Ready != nil && h.Ready {
		if ok, reason, msg := c.src.Ready(ctx); !ok {
			fail(true, reason, "%s", msg)
		}
	}
	h.Healthy = h.Live && h.Ready
	c.pubMu.Lock()
	defer c.pubMu.Unlock()
	if n > c.published { // one that began later and finished first stands
		c.published = n
		c.publish(h)
	}
	return h
}

// evaluateLocal is the evaluation of the server's own state, under evalMu:
// progress, sessions, the pool and its exhaustion, draining.
func (c *Checker) evaluateLocal(now time.Time) *kvferryv1.GetHealthResponse {
	c.evalMu.Lock()
	defer c.evalMu.Unlock()
	h := &kvferryv1.GetHealthResponse{
		Live: true, Ready: true, Reason: ReasonOK, Message: "serving",
		ProgressDeadlineSeconds: c.cfg.ProgressDeadline.Seconds(),
		PoisonBudgetBlocks:      uint64(c.cfg.PoisonBudget),
		EvaluatedUnixNanos:      now.UnixNano(),
	}
	// fail records the first failing condition as the reason.
	fail := func(live bool, reason, format string, args ...any) {
		if !h.Ready {
			return
		}
		h.Ready, h.Reason, h.Message = false, reason, fmt.Sprintf(format, args...)
		h.Live = live
	}

	// Liveness: sustained evidence only.
	if p := c.src.Progress; p != nil {
		pending, last := p.Snapshot()
		h.PendingWork = pending
		if pending > 0 {
			since := now.Sub(last)
			h.SecondsSinceProgress = since.Seconds()
			if since >= c.cfg.ProgressDeadline {
				fail(false, ReasonNoProgress, "no progress for %s with %d requests pending (deadline %s)", since.Round(time.Millisecond), pending, c.cfg.ProgressDeadline)
			}
		}
	}
	if s := c.src.Sessions; s != nil {
		ss := s.snapshot(now, c.cfg.ProgressDeadline, c.cfg.TransferDeadline)
		h.InFlightSessions = uint64(ss.InFlight)
		h.OldestSessionAgeSeconds = ss.OldestAge.Seconds()
		h.OldestStuckSessionAgeSeconds = ss.OldestStuckAge.Seconds()
		if ss.LongestPastDeadline >= c.cfg.ProgressDeadline {
			fail(false, ReasonSessionStuck, "a transfer session is %s past its %s deadline", ss.LongestPastDeadline.Round(time.Millisecond), c.cfg.TransferDeadline)
		}
	}
	if c.src.QuarantinedSessions != nil {
		h.QuarantinedSessions = uint64(c.src.QuarantinedSessions())
	}
	if pool := c.src.Pool; pool != nil {
		by := pool.ByState()
		n := &kvferryv1.PoolCounts{Capacity: uint64(pool.Capacity()), Free: uint64(by["free"]), Owned: uint64(by["owned"]),
			InFlight: uint64(by["in_flight"]), Quarantined: uint64(by["quarantined"]), Poisoned: uint64(by["poisoned"])}
		h.Pool = n
		h.QuarantinedBlocks, h.PoisonedBlocks = n.GetQuarantined(), n.GetPoisoned()
		if n.GetPoisoned() > uint64(c.cfg.PoisonBudget) {
			fail(false, ReasonPoisonBudgetExceeded, "%d poisoned blocks, budget %d: a transport never honoured an abort", n.Poisoned, c.cfg.PoisonBudget)
		}
	}

	// Readiness.
	if c.draining.Load() {
		fail(true, ReasonDraining, "the server is shutting down")
	}
	if pool := c.src.Pool; pool != nil {
		if pool.Available() == 0 {
			if c.exhaustedSince.IsZero() {
				c.exhaustedSince = now
			}
			if d := now.Sub(c.exhaustedSince); d > c.cfg.ExhaustionGrace {
				fail(true, ReasonPoolExhausted, "no allocatable block for %s", d.Round(time.Millisecond))
			}
		} else {
			c.exhaustedSince = time.Time{}
		}
	}
	return h
}

func (c *Checker) publish(h *kvferryv1.GetHealthResponse) {
	c.last.Store(h)
	serving := func(ok bool) healthpb.HealthCheckResponse_ServingStatus {
		if ok {
			return healthpb.HealthCheckResponse_SERVING
		}
		return healthpb.HealthCheckResponse_NOT_SERVING
	}
	c.grpc.SetServingStatus(ServiceLiveness, serving(h.GetLive()))
	c.grpc.SetServingStatus(ServiceReadiness, serving(h.GetReady()))
	c.grpc.SetServingStatus("", serving(h.GetLive() && h.GetReady()))
	c.gauges.RecordHealth(h.GetLive(), h.GetReady(), time.Duration(h.GetSecondsSinceProgress()*float64(time.Second)))
}

// Healthy reports whether the last evaluation was live: what an in-flight
// cancel's outcome (CANCEL_REQUESTED_IN_FLIGHT or BACKEND_UNHEALTHY)
// depends on.
func (c *Checker) Healthy() bool { return c.Current().GetLive() }

// GetHealth implements kvferry.v1.HealthService: the last evaluation.
func (c *Checker) GetHealth(context.Context, *kvferryv1.GetHealthRequest) (*kvferryv1.GetHealthResponse, error) {
	return c.Current(), nil
}

// Routes adds /livez and /readyz to mux: 200 or 503 with the status as JSON.
func (c *Checker) Routes(mux *http.ServeMux) {
	mux.HandleFunc("GET /livez", func(w http.ResponseWriter, _ *http.Request) {
		h := c.Current()
		writeStatus(w, h, h.GetLive())
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		h := c.Current()
		writeStatus(w, h, h.GetReady())
	})
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		b, _ := protojson.MarshalOptions{Multiline: true, EmitUnpopulated: true}.Marshal(c.Current())
		_, _ = w.Write(append(b, '\n'))
	})
}

func writeStatus(w http.ResponseWriter, h *kvferryv1.GetHealthResponse, ok bool) {
	w.Header().Set("Content-Type", "application/json")
	if !ok {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	_ = json.NewEncoder(w).Encode(Status{Live: h.GetLive(), Ready: h.GetReady(), Reason: h.GetReason(), Message: h.GetMessage()})
}

// faultyGPU is the first unhealthy GPU that decides readiness: the
// engine's GPUs when any GPU is the engine's (a fault on a GPU this server
// does not compute on is shown, not acted on), else every GPU.
func faultyGPU(gpus []*kvferryv1.GpuStatus) *kvferryv1.GpuStatus {
	engineOnly := slices.ContainsFunc(gpus, (*kvferryv1.GpuStatus).GetEngine)
	for _, g := range gpus {
		if !g.GetHealthy() && (g.GetEngine() || !engineOnly) {
			return g
		}
	}
	return nil
}
