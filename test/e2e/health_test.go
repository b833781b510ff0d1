package e2e

import (
	"context"
	"net/http"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/pkg/router"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
	"github.com/kvferry/kvferry/test/stack"
)

func probe(url string) int {
	code, _, err := stack.Get(url)
	if err != nil {
		return 0
	}
	return code
}

func grpcConn(t *testing.T, addr string) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	return cc
}

// healthFlags make health react in about a second.
var healthFlags = []string{"--progress-deadline=1s", "--health-interval=100ms", "--transfer-progress-timeout=30s"}

// TestHealthStalledTransport: a context server whose transport stalls with
// a request pending makes the generation server's liveness fail within the
// progress deadline plus an evaluation; GetHealth names the stuck
// session's age; when the stall ends the transfer completes, liveness
// returns, and the text is exactly the Reference.
func TestHealthStalledTransport(t *testing.T) {
	s := stack.Up(t, binDir, stack.Options{
		CtxArgs: append([]string{"--transport-fault=stall:after=1,for=6s"}, healthFlags...),
		GenArgs: healthFlags,
	})
	prompt := longPrompt(60) // 4 blocks: one moves, then the stall
	seed := int64(4)
	want := executor.Reference(tiny, prompt, router.SamplingFor(8, nil, nil, &seed))
	c := client(s)
	done := completeAsync(t, c, prompt, 8, seed)
	stack.Eventually(t, "generation server not live", func() bool { return probe(s.GenHTTP+"/livez") == http.StatusServiceUnavailable })
	hc := kvferryv1.NewHealthServiceClient(grpcConn(t, s.GenGRPC))
	h, err := hc.GetHealth(testCtx(t), &kvferryv1.GetHealthRequest{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("GetHealth during the stall: %s", protojson.Format(h))
	if h.GetLive() || h.GetReason() != "no_progress" || h.GetOldestStuckSessionAgeSeconds() < 1 || h.GetInFlightSessions() != 1 || h.GetPool().GetInFlight() == 0 {
		t.Fatalf("GetHealth during the stall: %v", h)
	}
	if code := probe(s.GenHTTP + "/readyz"); code != http.StatusServiceUnavailable {
		t.Fatalf("readyz %d while not live", code)
	}
	r := <-done
	if r.err != nil || r.text != want.Text {
		t.Fatalf("after the stall: %q %v, reference %q", r.text, r.err, want.Text)
	}
	stack.Eventually(t, "generation server live again", func() bool { return probe(s.GenHTTP+"/livez") == http.StatusOK })
	checkIdle(t, s)
	s.StopAll(t)
}

// TestHealthSlowButMoving: a transfer slower than the progress deadline
// that keeps moving never fails liveness.
func TestHealthSlowButMoving(t *testing.T) {
	s := stack.Up(t, binDir, stack.Options{
		CtxArgs: []string{"--transport-fault=delay:delay=300ms"},
		GenArgs: []string{"--progress-deadline=1500ms", "--health-interval=100ms", "--transfer-progress-timeout=30s"},
	})
	prompt := longPrompt(120) // 8 blocks at 300 ms each: 2.4 s against a 1.5 s deadline
	c := client(s)
	done := make(chan error, 1)
	go func() {
		_, err := c.Completions.New(testCtx(t), openai.CompletionNewParams{
			Model: "tiny", Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String(prompt)}, MaxTokens: openai.Int(4),
		})
		done <- err
	}()
	var probes, failures atomic.Int64
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for finished := false; !finished; {
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
			finished = true
		case <-tick.C:
			probes.Add(1)
			if probe(s.GenHTTP+"/livez") != http.StatusOK {
				failures.Add(1)
			}
		}
	}
	if probes.Load() < 20 || failures.Load() != 0 {
		t.Fatalf("%d of %d liveness probes failed during a slow but moving transfer", failures.Load(), probes.Load())
	}
	s.StopAll(t)
}

// TestHealthProbesAndDraining: real gRPC health clients see liveness and
// readiness SERVING on all three binaries; on SIGTERM a generation server
// with a request running turns not ready at once and stays live until it
// exits.
func TestHealthProbesAndDraining(t *testing.T) {
	s := stack.Up(t, binDir, stack.Options{DecodeStepTime: 100 * time.Millisecond, GenArgs: []string{"--health-interval=100ms"}})
	for _, addr := range []string{s.CtxGRPC, s.GenGRPC, s.RouterGRPC} {
		hc := healthpb.NewHealthClient(grpcConn(t, addr))
		for _, svc := range []string{"liveness", "readiness", ""} {
			resp, err := hc.Check(testCtx(t), &healthpb.HealthCheckRequest{Service: svc})
			if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
				t.Fatalf("%s %q: %v %v", addr, svc, resp, err)
			}
		}
	}
	for _, base := range []string{s.CtxHTTP, s.GenHTTP, s.RouterAdmin} {
		for _, path := range []string{"/livez", "/readyz"} {
			if code := probe(base + path); code != http.StatusOK {
				t.Fatalf("%s%s: %d", base, path, code)
			}
		}
	}

	ctx, cancel := context.WithCancel(testCtx(t))
	defer cancel()
	c := client(s)
	st := c.Completions.NewStreaming(ctx, openai.CompletionNewParams{
		Model: "tiny", Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String("the river")}, MaxTokens: openai.Int(200),
	})
	if !st.Next() {
		t.Fatalf("no first chunk: %v", st.Err())
	}
	if err := s.Gen.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	stack.Eventually(t, "not ready after SIGTERM", func() bool { return probe(s.GenHTTP+"/readyz") == http.StatusServiceUnavailable })
	live := 0
	for exited := false; !exited; {
		select {
		case <-s.Gen.Done():
			exited = true
		default:
			switch code := probe(s.GenHTTP + "/livez"); code {
			case http.StatusOK:
				live++
			case 0: // the admin server closed: the process is exiting
			default:
				t.Fatalf("liveness %d while draining", code)
			}
		}
	}
	if live == 0 {
		t.Fatal("liveness never answered while draining")
	}
	cancel()
	_ = st.Close()
	if err := s.Gen.Stop(); err != nil {
		t.Fatalf("genserver exit: %v", err)
	}
}

// TestPairCanaryFeedsReadiness: the generation server's canary proves the
// pair path after a request; when the context server goes away, readiness
// fails with pair_canary_failing while liveness stays true.
func TestPairCanaryFeedsReadiness(t *testing.T) {
	s := stack.Up(t, binDir, stack.Options{GenArgs: []string{"--canary-interval=200ms", "--health-interval=100ms"}})
	c := client(s)
	if _, err := c.Completions.New(testCtx(t), openai.CompletionNewParams{
		Model: "tiny", Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String("the river")}, MaxTokens: openai.Int(2),
	}); err != nil {
		t.Fatal(err)
	}
	hc := kvferryv1.NewHealthServiceClient(grpcConn(t, s.GenGRPC))
	stack.Eventually(t, "a successful canary", func() bool {
		h, err := hc.GetHealth(testCtx(t), &kvferryv1.GetHealthRequest{})
		return err == nil && len(h.GetCanary().GetPeers()) == 1 && h.GetCanary().GetPeers()[0].GetOk()
	})
	if got := stack.Metric(t, s.GenHTTP, `kvferry_health_canary_total{result="ok"}`); got < 1 {
		t.Fatalf("canary ok count %v", got)
	}
	if err := s.Ctx.Stop(); err != nil {
		t.Fatal(err)
	}
	stack.Eventually(t, "not ready: canary failing", func() bool {
		h, err := hc.GetHealth(testCtx(t), &kvferryv1.GetHealthRequest{})
		return err == nil && !h.GetReady() && h.GetLive() && h.GetReason() == "pair_canary_failing"
	})
	if code := probe(s.GenHTTP + "/readyz"); code != http.StatusServiceUnavailable {
		t.Fatalf("readyz %d", code)
	}
	if code := probe(s.GenHTTP + "/livez"); code != http.StatusOK {
		t.Fatalf("livez %d", code)
	}
}

// TestMetricsPassPromlint: every binary's /metrics passes Prometheus'
// linter and exposes the contract families.
func TestMetricsPassPromlint(t *testing.T) {
	s := stack.Up(t, binDir, stack.Options{CtxArgs: []string{"--enable-pprof"}})
	c := client(s)
	if _, err := c.Completions.New(testCtx(t), openai.CompletionNewParams{
		Model: "tiny", Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String("the river")}, MaxTokens: openai.Int(3),
	}); err != nil {
		t.Fatal(err)
	}
	contract := map[string][]string{
		s.CtxHTTP:     {"kvferry_blockpool_capacity_blocks", "kvferry_blockpool_blocks", "kvferry_transfer_sessions_total", "kvferry_transfer_bytes_total", "kvferry_transfer_duration_seconds", "kvferry_cancel_outcomes_total", "kvferry_cancel_to_free_seconds", "kvferry_health_live", "kvferry_health_ready", "kvferry_health_seconds_since_progress", "kvferry_build_info"},
		s.GenHTTP:     {"kvferry_blockpool_blocks", "kvferry_transfer_sessions_total", "kvferry_health_canary_total", "kvferry_gpu_devices"},
		s.RouterAdmin: {"kvferry_router_requests_total", "kvferry_router_ttft_seconds", "kvferry_router_inter_token_seconds", "kvferry_router_request_duration_seconds", "kvferry_health_ready", "kvferry_build_info"},
	}
	for base, families := range contract {
		_, body, err := stack.Get(base + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		problems, err := promlint.New(strings.NewReader(body)).Lint()
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range problems {
			if strings.HasPrefix(p.Metric, "kvferry_") {
				t.Errorf("%s: %s: %s", base, p.Metric, p.Text)
			}
		}
		for _, f := range families {
			if !strings.Contains(body, "# TYPE "+f+" ") {
				t.Errorf("%s lacks %s", base, f)
			}
		}
	}
	// Profiles only where --enable-pprof asked for them.
	if code := probe(s.CtxHTTP + "/debug/pprof/"); code != http.StatusOK {
		t.Errorf("%s/debug/pprof/ with --enable-pprof: %d", s.CtxHTTP, code)
	}
	for _, base := range []string{s.GenHTTP, s.RouterAdmin} {
		if code := probe(base + "/debug/pprof/"); code != http.StatusNotFound {
			t.Errorf("%s/debug/pprof/ without --enable-pprof: %d, want 404", base, code)
		}
	}
	if code := probe(s.OpenAIURL[:len(s.OpenAIURL)-len("/v1")] + "/debug/pprof/"); code == http.StatusOK {
		t.Error("profiles served on the public port")
	}
	if got := stack.Metric(t, s.CtxHTTP, `kvferry_transfer_sessions_total{outcome="completed",side="sender"}`); got != 1 {
		t.Errorf("sender completed sessions %v, want 1", got)
	}
	if got := stack.Metric(t, s.RouterAdmin, `kvferry_router_requests_total{outcome="ok"}`); got != 1 {
		t.Errorf("router ok requests %v, want 1", got)
	}
	s.StopAll(t)
}
