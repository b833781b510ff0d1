package router

import (
	"context"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"

	"github.com/kvferry/kvferry/pkg/connpool"
	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/pkg/metrics"
	"github.com/kvferry/kvferry/pkg/router/discovery"
)

// answers is a discovery source whose answer the test sets.
type answers struct{ addrs []string }

func (a *answers) Resolve(context.Context) ([]string, error) { return a.addrs, nil }
func (a *answers) String() string                            { return "test" }

// TestRemovedServerIsForgotten: when discovery drops a server, its
// per-server metric series is deleted and its cached connection leaves
// the cache (closed after the grace), so churn does not grow state.
func TestRemovedServerIsForgotten(t *testing.T) {
	tiny, _ := executor.Preset("tiny")
	reg := prometheus.NewRegistry()
	ctxs := &answers{addrs: []string{"127.0.0.1:1", "127.0.0.1:3"}}
	ctxConns, genConns := connpool.New(), connpool.New()
	defer ctxConns.Close()
	defer genConns.Close()
	r, err := New(Config{CtxServers: ctxs, GenServers: discovery.Static{"127.0.0.1:2"}, Model: tiny, ServedModel: "tiny",
		MaxBodyBytes: 1 << 16, MaxPromptTokens: 500, MaxOutputTokens: 64, DefaultMaxTokens: 16,
		CtxConns: ctxConns, GenConns: genConns, Metrics: metrics.NewRouter(reg), Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Resolve(context.Background()); err != nil {
		t.Fatal(err)
	}
	cs, gs := r.servers()
	for _, b := range append(cs, gs...) {
		if _, err := r.conn(b); err != nil {
			t.Fatal(err)
		}
	}
	series := func() int { return testutil.CollectAndCount(reg, "kvferry_router_backend_inflight_requests") }
	if n := series(); n != 3 || ctxConns.Len() != 2 {
		t.Fatalf("before: %d series, %d context connections", n, ctxConns.Len())
	}
	ctxs.addrs = ctxs.addrs[:1]
	if err := r.Resolve(context.Background()); err != nil {
		t.Fatal(err)
	}
	if n := series(); n != 2 || ctxConns.Len() != 1 || genConns.Len() != 1 {
		t.Fatalf("after removal: %d series, %d context and %d generation connections", n, ctxConns.Len(), genConns.Len())
	}
}

// TestForgottenServerStaysForgotten: a request still finishing on a
// server discovery dropped (and a late prefix digest) must not bring its
// series back.
func TestForgottenServerStaysForgotten(t *testing.T) {
	tiny, _ := executor.Preset("tiny")
	reg := prometheus.NewRegistry()
	gens := &answers{addrs: []string{"127.0.0.1:2", "127.0.0.1:4"}}
	r, err := New(Config{CtxServers: discovery.Static{"127.0.0.1:1"}, GenServers: gens, Model: tiny, ServedModel: "tiny",
		MaxBodyBytes: 1 << 16, MaxPromptTokens: 500, MaxOutputTokens: 64, DefaultMaxTokens: 16,
		CtxConns: connpool.New(), GenConns: connpool.New(), Metrics: metrics.NewRouter(reg), Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Resolve(context.Background()); err != nil {
		t.Fatal(err)
	}
	_, gs := r.servers()
	leaving := gs[1]
	leaving.add(1) // a request runs on it
	gens.addrs = gens.addrs[:1]
	if err := r.Resolve(context.Background()); err != nil {
		t.Fatal(err)
	}
	series := func() int { return testutil.CollectAndCount(reg, "kvferry_router_backend_inflight_requests") }
	if n := series(); n != 2 {
		t.Fatalf("after removal: %d series, want 2 (one context, one generation server)", n)
	}
	leaving.add(-1) // the request ends after the server was forgotten
	if n := series(); n != 2 {
		t.Fatalf("a finishing request brought a forgotten server's series back: %d series", n)
	}
}
