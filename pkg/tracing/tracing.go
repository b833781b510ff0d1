// Package tracing is kvferry's OpenTelemetry tracing: off unless an OTLP
// endpoint is configured, and then one trace per request across the
// processes — the router's span (from the client's W3C traceparent, when
// it sends one), the context server's Prefill, the Transfer that pushes
// the KV (bytes and transport as attributes) and the generation server's
// Generate — carried in W3C trace context over gRPC metadata.
//
// Off, it installs nothing: no stats handler, no propagation, so the plain
// path pays nothing for it.
package tracing

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.opentelemetry.io/contrib/instrumentation/net/http/otelhttp"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.37.0"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/stats"
)

// Config is the --otlp-* flags.
type Config struct {
	// Endpoint is the OTLP/gRPC collector's host:port ("": tracing off).
	Endpoint string
	// Insecure sends spans in plaintext (a collector on the node or in
	// the pod); otherwise TLS with the system's roots.
	Insecure bool
	// SampleRatio is the share of new traces recorded; a request that
	// arrives with a sampled traceparent is always recorded.
	SampleRatio float64
	// BatchTimeout bounds how long a finished span waits before export.
	BatchTimeout time.Duration
}

// Validate checks the ratio and timeout.
func (c Config) Validate() error {
	var errs []error
	if c.SampleRatio < 0 || c.SampleRatio > 1 {
		errs = append(errs, fmt.Errorf("--trace-sample-ratio must be in [0, 1], got %g", c.SampleRatio))
	}
	if c.Endpoint != "" && c.BatchTimeout <= 0 {
		errs = append(errs, errors.New("--otlp-batch-timeout must be positive"))
	}
	return errors.Join(errs...)
}

// Tracing is a process's tracer provider and propagator; a nil *Tracing
// is tracing off, and every method is safe on it.
type Tracing struct {
	tp   *sdktrace.TracerProvider
	prop propagation.TextMapPropagator
}

// Start sets tracing up for service (router, ctxserver, genserver); nil
// when cfg has no endpoint. Shutdown flushes and stops it.
func Start(ctx context.Context, cfg Config, service string) (*Tracing, error) {
	if cfg.Endpoint == "" {
		return nil, nil
	}
	opts := []otlptracegrpc.Option{otlptracegrpc.WithEndpoint(cfg.Endpoint)}
	if cfg.Insecure {
		opts = append(opts, otlptracegrpc.WithInsecure())
	}
	// The exporter connects lazily: a collector that is down costs
	// dropped spans, never a failed start.
	exp, err := otlptracegrpc.New(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("tracing: otlp exporter: %w", err)
	}
	res := resource.NewSchemaless(semconv.ServiceName(service), semconv.ServiceNamespace("kvferry"))
	tp := sdktrace.NewTracerProvider(
		sdktrace.WithBatcher(exp, sdktrace.WithBatchTimeout(cfg.BatchTimeout)),
		sdktrace.WithResource(res),
		sdktrace.WithSampler(sdktrace.ParentBased(sdktrace.TraceIDRatioBased(cfg.SampleRatio))),
	)
	return &Tracing{tp: tp, prop: propagation.TraceContext{}}, nil
}

// Shutdown exports what is buffered and stops, within ctx.
func (t *Tracing) Shutdown(ctx context.Context) error {
	if t == nil {
		return nil
	}
	return t.tp.Shutdown(ctx)
}

// ServerOptions trace every RPC a gRPC server serves, continuing the
// caller's trace from its metadata.
func (t *Tracing) ServerOptions() []grpc.ServerOption {
	if t == nil {
		return nil
	}
	return []grpc.ServerOption{grpc.StatsHandler(otelgrpc.NewServerHandler(t.grpcOptions()...))}
}

// DialOptions trace every RPC a client makes, passing the trace on in its
// metadata.
func (t *Tracing) DialOptions() []grpc.DialOption {
	if t == nil {
		return nil
	}
	return []grpc.DialOption{grpc.WithStatsHandler(otelgrpc.NewClientHandler(t.grpcOptions()...))}
}

func (t *Tracing) grpcOptions() []otelgrpc.Option {
	return []otelgrpc.Option{otelgrpc.WithTracerProvider(t.tp), otelgrpc.WithPropagators(t.prop), otelgrpc.WithFilter(notHealth)}
}

// notHealth leaves health checks untraced: routers probe every server's
// readiness continually, and a trace each would bury the requests'.
func notHealth(info *stats.RPCTagInfo) bool {
	return !strings.HasPrefix(info.FullMethodName, "/"+healthpb.Health_ServiceDesc.ServiceName+"/")
}

// HTTP wraps an HTTP handler in a server span named name and the path,
// continuing the
// client's traceparent when it sends one.
func (t *Tracing) HTTP(h http.Handler, name string) http.Handler {
	if t == nil {
		return h
	}
	return otelhttp.NewHandler(h, name, otelhttp.WithTracerProvider(t.tp), otelhttp.WithPropagators(t.prop),
		otelhttp.WithSpanNameFormatter(func(op string, r *http.Request) string { return op + " " + r.URL.Path }))
}

// Attribute keys kvferry adds to its spans.
const (
	KeyTransferBytes     = attribute.Key("kvferry.transfer.bytes")
	KeyTransferTransport = attribute.Key("kvferry.transfer.transport")
	KeyRequestID         = attribute.Key("kvferry.request_id")
)

// Annotate adds attributes to the span in ctx (none when tracing is off:
// the span is then a no-op).
func Annotate(ctx context.Context, kv ...attribute.KeyValue) {
	trace.SpanFromContext(ctx).SetAttributes(kv...)
}
