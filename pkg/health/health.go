// Package health answers liveness and readiness: grpc.health.v1 for the
// services "liveness", "readiness" and "", HTTP /livez and /readyz, the
// kvferry.v1.HealthService snapshot and the kvferry_health_* gauges.
//
// This is the spine's health: a process that runs is live, and it is ready
// until it starts draining or an owner-supplied readiness check fails. The
// evaluator of DESIGN §6 (progress deadline, stuck sessions, poison budget,
// pair canary, GPU) builds on this surface.
package health

import (
	"context"
	"encoding/json"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	grpchealth "google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/kvferry/kvferry/pkg/blockpool"
	"github.com/kvferry/kvferry/pkg/metrics"
	"github.com/kvferry/kvferry/pkg/serving"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

// gRPC health service names.
const (
	ServiceLiveness  = "liveness"
	ServiceReadiness = "readiness"
)

// Reasons (machine-readable).
const (
	ReasonOK       = "ok"
	ReasonDraining = "draining"
)

// Status is one evaluation.
type Status struct {
	Live    bool   `json:"live"`
	Ready   bool   `json:"ready"`
	Reason  string `json:"reason"`
	Message string `json:"message"`
}

// ReadyCheck is an owner's extra readiness condition; it returns ok, or a
// reason and a sentence.
type ReadyCheck func(ctx context.Context) (ok bool, reason, message string)

// Checker holds a server's health state. Safe for concurrent use.
type Checker struct {
	kvferryv1.UnimplementedHealthServiceServer

	pool       *blockpool.Pool // nil for the router
	readyCheck ReadyCheck
	grpc       *grpchealth.Server
	gauges     *metrics.Health

	mu       sync.Mutex
	draining bool
}

var _ kvferryv1.HealthServiceServer = (*Checker)(nil)

// New returns a checker. pool and check may be nil.
func New(reg prometheus.Registerer, pool *blockpool.Pool, check ReadyCheck) *Checker {
	c := &Checker{
		pool:       pool,
		readyCheck: check,
		grpc:       grpchealth.NewServer(),
		gauges:     metrics.NewHealth(reg),
	}
	c.set(Status{Live: true, Ready: true, Reason: ReasonOK})
	return c
}

// Register adds grpc.health.v1 and kvferry.v1.HealthService to s.
func (c *Checker) Register(s *grpc.Server) {
	healthpb.RegisterHealthServer(s, c.grpc)
	kvferryv1.RegisterHealthServiceServer(s, c)
}

// SetDraining marks the server as draining: readiness fails from now on.
func (c *Checker) SetDraining() {
	c.mu.Lock()
	c.draining = true
	c.mu.Unlock()
	c.set(Status{Live: true, Ready: false, Reason: ReasonDraining, Message: "the server is shutting down"})
}

// Evaluate computes the current status and publishes it to gRPC health and
// the gauges.
func (c *Checker) Evaluate(ctx context.Context) Status {
	c.mu.Lock()
	draining := c.draining
	c.mu.Unlock()
	st := Status{Live: true, Ready: true, Reason: ReasonOK, Message: "serving"}
	switch {
	case draining:
		st = Status{Live: true, Ready: false, Reason: ReasonDraining, Message: "the server is shutting down"}
	case c.readyCheck != nil:
		if ok, reason, msg := c.readyCheck(ctx); !ok {
			st = Status{Live: true, Ready: false, Reason: reason, Message: msg}
		}
	}
	c.set(st)
	return st
}

func (c *Checker) set(st Status) {
	serving := func(ok bool) healthpb.HealthCheckResponse_ServingStatus {
		if ok {
			return healthpb.HealthCheckResponse_SERVING
		}
		return healthpb.HealthCheckResponse_NOT_SERVING
	}
	c.grpc.SetServingStatus(ServiceLiveness, serving(st.Live))
	c.grpc.SetServingStatus(ServiceReadiness, serving(st.Ready))
	c.grpc.SetServingStatus("", serving(st.Live && st.Ready))
	// Global progress tracking arrives with the health evaluator; until
	// then nothing is ever reported stuck.
	c.gauges.RecordHealth(st.Live, st.Ready, 0)
}

// Run re-evaluates every interval until ctx is done, so gRPC health
// watchers see changes without being asked.
func (c *Checker) Run(ctx context.Context, interval time.Duration) {
	c.Evaluate(ctx)
	serving.Every(ctx, interval, func(time.Time) { c.Evaluate(ctx) })
}

// Shutdown sets every gRPC health service NOT_SERVING for good.
func (c *Checker) Shutdown() { c.grpc.Shutdown() }

// GetHealth implements kvferry.v1.HealthService.
func (c *Checker) GetHealth(ctx context.Context, _ *kvferryv1.GetHealthRequest) (*kvferryv1.GetHealthResponse, error) {
	st := c.Evaluate(ctx)
	resp := &kvferryv1.GetHealthResponse{
		Healthy: st.Live && st.Ready, Live: st.Live, Ready: st.Ready,
		Reason: st.Reason, Message: st.Message,
	}
	if c.pool != nil {
		n := c.pool.Counts()
		resp.Pool = &kvferryv1.PoolCounts{
			Capacity: uint64(n.Capacity), Free: uint64(n.Free), Owned: uint64(n.Owned),
			InFlight: uint64(n.InFlight), Quarantined: uint64(n.Quarantined), Poisoned: uint64(n.Poisoned),
		}
		resp.QuarantinedBlocks = uint64(n.Quarantined)
		resp.PoisonedBlocks = uint64(n.Poisoned)
	}
	return resp, nil
}

// Routes adds /livez and /readyz to mux: 200 or 503 with the status as JSON.
func (c *Checker) Routes(mux *http.ServeMux) {
	mux.HandleFunc("GET /livez", func(w http.ResponseWriter, r *http.Request) {
		st := c.Evaluate(r.Context())
		writeStatus(w, st, st.Live)
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		st := c.Evaluate(r.Context())
		writeStatus(w, st, st.Ready)
	})
}

func writeStatus(w http.ResponseWriter, st Status, ok bool) {
	w.Header().Set("Content-Type", "application/json")
	if !ok {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	_ = json.NewEncoder(w).Encode(st)
}
