package e2e

import (
	"context"
	"encoding/hex"
	"net"
	"strings"
	"sync"
	"testing"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/grpc"

	"github.com/kvferry/kvferry/test/stack"
)

// collector is an OTLP/gRPC trace receiver on loopback: the processes
// export to it as they would to an OpenTelemetry Collector.
type collector struct {
	coltracepb.UnimplementedTraceServiceServer
	mu    sync.Mutex
	spans []span
}

type span struct {
	service, name string
	traceID       string
	parent        bool
	attrs         map[string]string
}

func (c *collector) Export(_ context.Context, req *coltracepb.ExportTraceServiceRequest) (*coltracepb.ExportTraceServiceResponse, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, rs := range req.GetResourceSpans() {
		service := ""
		for _, kv := range rs.GetResource().GetAttributes() {
			if kv.GetKey() == "service.name" {
				service = kv.GetValue().GetStringValue()
			}
		}
		for _, ss := range rs.GetScopeSpans() {
			for _, sp := range ss.GetSpans() {
				c.spans = append(c.spans, span{service: service, name: sp.GetName(), traceID: hex.EncodeToString(sp.GetTraceId()),
					parent: len(sp.GetParentSpanId()) > 0, attrs: attrs(sp)})
			}
		}
	}
	return &coltracepb.ExportTraceServiceResponse{}, nil
}

func attrs(sp *tracepb.Span) map[string]string {
	out := map[string]string{}
	for _, kv := range sp.GetAttributes() {
		v := kv.GetValue()
		switch {
		case v.GetStringValue() != "":
			out[kv.GetKey()] = v.GetStringValue()
		default:
			out[kv.GetKey()] = strings.TrimSpace(v.String())
		}
	}
	return out
}

// legs returns, for a trace, the span of each leg of a request.
func (c *collector) legs(traceID string) map[string]span {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[string]span{}
	for _, s := range c.spans {
		if s.traceID != traceID {
			continue
		}
		switch {
		case s.service == "router" && s.name == "router /v1/completions":
			out["router"] = s
		case s.service == "ctxserver" && s.name == "kvferry.v1.ContextService/Prefill":
			out["prefill"] = s
		case s.service == "ctxserver" && s.name == "kvferry.v1.TransferService/Transfer":
			out["transfer"] = s
		case s.service == "genserver" && s.name == "kvferry.v1.GenerationService/Generate":
			out["decode"] = s
		}
	}
	return out
}

// routerRoots are the trace ids of the router's HTTP spans without a
// parent (requests that came without a traceparent).
func (c *collector) routerRoots() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
	for _, s := range c.spans {
		if s.service == "router" && s.name == "router /v1/completions" && !s.parent {
			out = append(out, s.traceID)
		}
	}
	return out
}

// TestTracing: with --otlp-endpoint on all three processes, a request
// that carries the client's traceparent is one trace with four legs —
// the router's span (a child of the client's), the context server's
// Prefill, the Transfer that pushed the KV (bytes and transport recorded)
// and the generation server's Generate; a request without one starts its
// own trace, with the same four legs.
func TestTracing(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	col := &collector{}
	gs := grpc.NewServer()
	coltracepb.RegisterTraceServiceServer(gs, col)
	go func() { _ = gs.Serve(ln) }()
	t.Cleanup(gs.Stop)
	otlp := []string{"--otlp-endpoint=" + ln.Addr().String(), "--otlp-insecure", "--otlp-batch-timeout=100ms"}
	s := stack.Up(t, binDir, stack.Options{CtxArgs: otlp, GenArgs: append([]string{"--canary-interval=0"}, otlp...), ExtraRouterArgs: otlp})
	c := client(s)
	const traceID = "4bf92f3577b34da6a3ce929d0e0e4736"
	if _, err := c.Completions.New(testCtx(t), openai.CompletionNewParams{Model: "tiny",
		Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String("the river")}, MaxTokens: openai.Int(4)},
		option.WithHeader("traceparent", "00-"+traceID+"-00f067aa0ba902b7-01")); err != nil {
		t.Fatal(err)
	}
	var legs map[string]span
	t.Cleanup(func() {
		if t.Failed() {
			col.mu.Lock()
			defer col.mu.Unlock()
			for _, s := range col.spans {
				t.Logf("span %s %q trace %s parent %v", s.service, s.name, s.traceID, s.parent)
			}
		}
	})
	stack.Eventually(t, "four legs of the client's trace", func() bool {
		legs = col.legs(traceID)
		return len(legs) == 4
	})
	if !legs["router"].parent {
		t.Error("the router's span is not a child of the client's")
	}
	if tr := legs["transfer"]; tr.attrs["kvferry.transfer.transport"] != "tcp" || tr.attrs["kvferry.transfer.bytes"] == "" || strings.Contains(tr.attrs["kvferry.transfer.bytes"], ":0") {
		t.Errorf("transfer span attributes %v, want the transport and the bytes moved", tr.attrs)
	}
	if err := completeOnce(t, s); err != nil {
		t.Fatal(err)
	}
	stack.Eventually(t, "a trace of its own for a request without traceparent", func() bool {
		roots := col.routerRoots()
		return len(roots) == 1 && roots[0] != traceID && len(col.legs(roots[0])) == 4
	})
	col.mu.Lock()
	defer col.mu.Unlock()
	for _, s := range col.spans {
		if strings.Contains(s.name, "grpc.health") {
			t.Fatalf("a health check was traced: %+v", s)
		}
	}
}
