package health

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/kvferry/kvferry/internal/leakcheck"
	"github.com/kvferry/kvferry/pkg/blockpool"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

func TestMain(m *testing.M) { leakcheck.VerifyTestMain(m) }

var cfg = Config{ProgressDeadline: 60 * time.Second, TransferDeadline: 60 * time.Second, PoisonBudget: 2, ExhaustionGrace: 5 * time.Second}

var t0 = time.Unix(1_800_000_000, 0)

func at(d time.Duration) time.Time { return t0.Add(d) }

type fixture struct {
	c        *Checker
	pool     *blockpool.Pool
	progress *Progress
	sessions *Sessions
	canary   *kvferryv1.CanaryStatus
	gpus     []*kvferryv1.GpuStatus
	reg      *prometheus.Registry
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	pool, _ := blockpool.New(8, 16)
	f := &fixture{pool: pool, progress: NewProgress(t0), sessions: NewSessions(), reg: prometheus.NewRegistry()}
	f.c = New(f.reg, cfg, Sources{
		Pool: pool, Progress: f.progress, Sessions: f.sessions,
		Canary:        func() *kvferryv1.CanaryStatus { return f.canary },
		GPUs:          func() (bool, []*kvferryv1.GpuStatus) { return len(f.gpus) > 0, f.gpus },
		EngineDevices: []string{"CUDA0 (NVIDIA H200)", "CPU (test)"},
	})
	return f
}

// The snapshot names the devices the engine runs on.
func TestSnapshotNamesEngineDevices(t *testing.T) {
	f := newFixture(t)
	h := f.expect(t, at(0), true, true, ReasonOK)
	if got := h.GetEngineDevices(); len(got) != 2 || got[0] != "CUDA0 (NVIDIA H200)" {
		t.Fatalf("engine devices %v, want the engine's CUDA0 and CPU", got)
	}
}

func (f *fixture) expect(t *testing.T, now time.Time, live, ready bool, reason string) *kvferryv1.GetHealthResponse {
	t.Helper()
	h := f.c.Evaluate(context.Background(), now)
	if h.GetLive() != live || h.GetReady() != ready || h.GetReason() != reason {
		t.Fatalf("at %s: live %v ready %v reason %q (%s), want %v %v %q",
			now.Sub(t0), h.GetLive(), h.GetReady(), h.GetReason(), h.GetMessage(), live, ready, reason)
	}
	return h
}

func TestNoProgressWithWorkPendingFailsLiveness(t *testing.T) {
	f := newFixture(t)
	f.expect(t, at(10*time.Minute), true, true, ReasonOK) // idle: never a failure
	f.progress.Begin(at(10 * time.Minute))
	f.expect(t, at(10*time.Minute+59*time.Second), true, true, ReasonOK)
	h := f.expect(t, at(11*time.Minute), false, false, ReasonNoProgress)
	if h.GetSecondsSinceProgress() != 60 || h.GetPendingWork() != 1 {
		t.Fatalf("snapshot: %v s since progress, %d pending", h.GetSecondsSinceProgress(), h.GetPendingWork())
	}
	f.progress.Touch(at(11*time.Minute + time.Second))
	f.expect(t, at(11*time.Minute+2*time.Second), true, true, ReasonOK)
}

// TestSlowButMovingNeverFailsLiveness: a transfer that takes longer than
// the progress deadline (here nearly twice as long) but moves bytes
// throughout stays live the whole time.
func TestSlowButMovingNeverFailsLiveness(t *testing.T) {
	f := newFixture(t)
	f.progress.Begin(t0)
	id := f.sessions.Add(t0)
	for s := time.Duration(0); s <= 110*time.Second; s += 10 * time.Second {
		f.progress.Touch(at(s))
		f.sessions.Touch(id, at(s))
		f.expect(t, at(s+5*time.Second), true, true, ReasonOK)
	}
}

func TestStuckSession(t *testing.T) {
	f := newFixture(t)
	id := f.sessions.Add(t0)
	f.progress.Begin(t0)
	// Progress elsewhere keeps global progress alive; the session is stuck.
	f.progress.Touch(at(90 * time.Second))
	h := f.expect(t, at(90*time.Second), true, true, ReasonOK)
	if h.GetOldestStuckSessionAgeSeconds() != 90 || h.GetInFlightSessions() != 1 {
		t.Fatalf("stuck age %v, in flight %d", h.GetOldestStuckSessionAgeSeconds(), h.GetInFlightSessions())
	}
	f.progress.Touch(at(2 * time.Minute))
	h = f.expect(t, at(2*time.Minute), false, false, ReasonSessionStuck)
	if h.GetOldestStuckSessionAgeSeconds() != 120 {
		t.Fatalf("stuck age %v", h.GetOldestStuckSessionAgeSeconds())
	}
	f.sessions.Remove(id)
	f.expect(t, at(2*time.Minute), true, true, ReasonOK)
}

func TestPoisonBudget(t *testing.T) {
	f := newFixture(t)
	ids, _ := f.pool.Allocate(context.Background(), 3)
	_ = f.pool.Pin(ids)
	_ = f.pool.Quarantine(ids)
	h := f.expect(t, t0, true, true, ReasonOK)
	if h.GetQuarantinedBlocks() != 3 {
		t.Fatalf("quarantined %d", h.GetQuarantinedBlocks())
	}
	_ = f.pool.Poison(ids[:2])
	f.expect(t, t0, true, true, ReasonOK) // at the budget
	_ = f.pool.Poison(ids[2:])
	f.expect(t, t0, false, false, ReasonPoisonBudgetExceeded)
}

func TestExhaustionCanaryGPUAndDraining(t *testing.T) {
	f := newFixture(t)
	ids, _ := f.pool.Allocate(context.Background(), 8)
	f.expect(t, t0, true, true, ReasonOK)
	f.expect(t, at(5*time.Second), true, true, ReasonOK)
	f.expect(t, at(6*time.Second), true, false, ReasonPoolExhausted)
	_ = f.pool.Release(ids)
	f.expect(t, at(7*time.Second), true, true, ReasonOK)

	f.canary = &kvferryv1.CanaryStatus{Enabled: true, Failing: true}
	f.expect(t, at(8*time.Second), true, false, ReasonCanaryFailing)
	f.canary = &kvferryv1.CanaryStatus{Enabled: true}

	f.gpus = []*kvferryv1.GpuStatus{{Index: 0, Name: "H100", Healthy: false, Reason: "uncorrected ECC errors: 2"}}
	h := f.expect(t, at(9*time.Second), true, false, ReasonGPUFault)
	if !h.GetGpuPresent() || !strings.Contains(h.GetMessage(), "ECC") {
		t.Fatalf("gpu snapshot: %+v", h)
	}
	// A fault on a GPU the engine does not compute on is shown, not acted
	// on; on the engine's GPU it fails readiness.
	f.gpus = []*kvferryv1.GpuStatus{
		{Index: 0, Name: "H100", Healthy: false, Reason: "uncorrected ECC errors: 2"},
		{Index: 1, Name: "H100", Healthy: true, Engine: true},
	}
	f.expect(t, at(10*time.Second), true, true, ReasonOK)
	f.gpus[1].Healthy, f.gpus[1].Reason = false, "1 critical XID events"
	if h := f.expect(t, at(11*time.Second), true, false, ReasonGPUFault); !strings.Contains(h.GetMessage(), "GPU 1") {
		t.Fatalf("engine GPU fault: %q", h.GetMessage())
	}
	f.gpus = nil

	f.c.SetDraining()
	if h := f.c.Current(); !h.GetLive() || h.GetReady() || h.GetReason() != ReasonDraining {
		t.Fatalf("draining published: %+v", h)
	}
}

// TestOutputs: gRPC health, HTTP probes, GetHealth and the gauges all show
// the last evaluation.
func TestOutputs(t *testing.T) {
	f := newFixture(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	f.c.Register(gs)
	go func() { _ = gs.Serve(ln) }()
	defer gs.Stop()
	cc, err := grpc.NewClient(ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	hc := healthpb.NewHealthClient(cc)
	mux := http.NewServeMux()
	f.c.Routes(mux)

	check := func(name string, live, ready bool, reason string) {
		t.Helper()
		ctx := context.Background()
		for svc, want := range map[string]bool{ServiceLiveness: live, ServiceReadiness: ready, "": live && ready} {
			resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
			if err != nil {
				t.Fatal(err)
			}
			if got := resp.GetStatus() == healthpb.HealthCheckResponse_SERVING; got != want {
				t.Fatalf("%s: grpc %q serving %v, want %v", name, svc, got, want)
			}
		}
		for path, want := range map[string]bool{"/livez": live, "/readyz": ready} {
			rec := httptest.NewRecorder()
			mux.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
			if (rec.Code == http.StatusOK) != want {
				t.Fatalf("%s: %s answered %d", name, path, rec.Code)
			}
			var body Status
			if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil || body.Reason != reason || body.Message == "" {
				t.Fatalf("%s: %s body %s", name, path, rec.Body)
			}
		}
		for gauge, v := range map[string]bool{"kvferry_health_live": live, "kvferry_health_ready": ready} {
			if got := testutil.ToFloat64(gaugeOf(t, f.reg, gauge)); got != map[bool]float64{true: 1}[v] {
				t.Fatalf("%s: %s = %v", name, gauge, got)
			}
		}
		snap, err := kvferryv1.NewHealthServiceClient(cc).GetHealth(ctx, &kvferryv1.GetHealthRequest{})
		if err != nil || snap.GetLive() != live || snap.GetReady() != ready || snap.GetReason() != reason || snap.GetPool().GetCapacity() != 8 {
			t.Fatalf("%s: GetHealth %+v %v", name, snap, err)
		}
	}
	f.c.Evaluate(context.Background(), t0)
	check("serving", true, true, ReasonOK)
	f.progress.Begin(t0)
	f.c.Evaluate(context.Background(), at(time.Hour))
	check("wedged", false, false, ReasonNoProgress)
	f.progress.End()
	f.c.SetDraining()
	check("draining", true, false, ReasonDraining)
}

// gaugeOf gathers one gauge family as a collector for testutil.
func gaugeOf(t *testing.T, reg *prometheus.Registry, name string) prometheus.Collector {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			g := prometheus.NewGauge(prometheus.GaugeOpts{Name: name, Help: "copy"})
			g.Set(mf.GetMetric()[0].GetGauge().GetValue())
			return g
		}
	}
	t.Fatalf("no %s", name)
	return nil
}

// TestSlowReadinessProbeBlocksNoOne: while one evaluation waits on a slow
// readiness probe (the router probing its backends), another — draining,
// at shutdown — evaluates and publishes at once, and the slow one's later
// answer does not overwrite it.
func TestSlowReadinessProbeBlocksNoOne(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	var calls atomic.Int32
	c := New(prometheus.NewRegistry(), Config{}, Sources{Ready: func(ctx context.Context) (bool, string, string) {
		if calls.Add(1) == 1 {
			close(entered)
			<-release
		}
		return true, "", ""
	}})
	slow := make(chan *kvferryv1.GetHealthResponse)
	go func() { slow <- c.Evaluate(context.Background(), t0) }()
	<-entered
	done := make(chan struct{})
	go func() { c.SetDraining(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("SetDraining waited for another evaluation's readiness probe")
	}
	if h := c.Current(); h.GetReason() != ReasonDraining {
		t.Fatalf("published %q, want draining", h.GetReason())
	}
	close(release)
	if h := <-slow; h.GetReason() != ReasonOK {
		t.Fatalf("the slow evaluation: %q", h.GetReason())
	}
	if h := c.Current(); h.GetReason() != ReasonDraining {
		t.Fatalf("the slow evaluation overwrote draining: %q", h.GetReason())
	}
}
