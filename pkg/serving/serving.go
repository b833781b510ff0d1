// Package serving is the server side of the three binaries: the gRPC server
// with its interceptor chain (recovery, logging, request ids) and graceful
// stop, the HTTP servers, TLS files and the logger. Client connections are
// package connpool's, owned goroutines package routine's.
package serving

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"runtime/debug"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// MaxMessageBytes bounds gRPC messages both ways. Control messages are small;
// the largest is a prompt (its text to the router, up to 5 bytes a token to
// a server), so 4 MiB — the router's HTTP body limit too — allows prompts
// far beyond any context length while a client cannot make a server buffer
// more.
const MaxMessageBytes = 4 << 20

// MaxConcurrentStreams bounds the streams one client connection may hold
// open on a server (the router multiplexes every request to a server over
// one connection: above its --max-inflight default of 512 twice over).
const MaxConcurrentStreams = 2048

// KeepaliveTime is how often an idle client pings; the server's enforcement
// minimum is below it so that the two policies match.
const KeepaliveTime = 30 * time.Second

// RequestIDKey is the gRPC metadata key that carries a request id.
const RequestIDKey = "x-request-id"

// NewLogger returns a JSON zap logger at level ("debug", "info", ...).
func NewLogger(level string) (*zap.Logger, error) {
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		return nil, fmt.Errorf("log level: %w", err)
	}
	cfg := zap.NewProductionConfig()
	cfg.Level = zap.NewAtomicLevelAt(lvl)
	cfg.Sampling = nil
	cfg.EncoderConfig.TimeKey = "ts"
	cfg.EncoderConfig.EncodeTime = zapcore.ISO8601TimeEncoder
	return cfg.Build()
}

// NewGRPCServer returns a server with explicit message limits, a keepalive
// policy matching NewClientConn's, and the interceptor chain recovery →
// request id → logging.
func NewGRPCServer(lg *zap.Logger, extra ...grpc.ServerOption) *grpc.Server {
	return grpc.NewServer(append([]grpc.ServerOption{
		grpc.MaxRecvMsgSize(MaxMessageBytes),
		grpc.MaxSendMsgSize(MaxMessageBytes),
		grpc.MaxConcurrentStreams(MaxConcurrentStreams),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: KeepaliveTime / 2, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 2 * KeepaliveTime, Timeout: 10 * time.Second}),
		grpc.ChainUnaryInterceptor(unaryRecovery(lg), unaryLogging(lg)),
		grpc.ChainStreamInterceptor(streamRecovery(lg), streamLogging(lg)),
	}, extra...)...)
}

// RequestID returns the request id carried in ctx's incoming metadata.
func RequestID(ctx context.Context) string {
	md, _ := metadata.FromIncomingContext(ctx)
	if v := md.Get(RequestIDKey); len(v) > 0 {
		return v[0]
	}
	return ""
}

// WithRequestID adds the request id to outgoing metadata.
func WithRequestID(ctx context.Context, id string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, RequestIDKey, id)
}

func recovered(lg *zap.Logger, method string, p any) error {
	lg.Error("rpc panic", zap.String("method", method), zap.Any("panic", p), zap.ByteString("stack", debug.Stack()))
	return status.Error(codes.Internal, "internal error")
}

func unaryRecovery(lg *zap.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (resp any, err error) {
		defer func() {
			if p := recover(); p != nil {
				err = recovered(lg, info.FullMethod, p)
			}
		}()
		return h(ctx, req)
	}
}

func streamRecovery(lg *zap.Logger) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) (err error) {
		defer func() {
			if p := recover(); p != nil {
				err = recovered(lg, info.FullMethod, p)
			}
		}()
		return h(srv, ss)
	}
}

func logRPC(lg *zap.Logger, ctx context.Context, method string, start time.Time, err error) {
	code := status.Code(err)
	fields := []zap.Field{zap.String("method", method), zap.String("code", code.String()), zap.Duration("duration", time.Since(start))}
	if id := RequestID(ctx); id != "" {
		fields = append(fields, zap.String("request_id", id))
	}
	switch code {
	case codes.OK, codes.Canceled, codes.NotFound, codes.InvalidArgument, codes.FailedPrecondition, codes.AlreadyExists:
		lg.Debug("rpc", fields...)
	default:
		lg.Info("rpc", append(fields, zap.Error(err))...)
	}
}

func unaryLogging(lg *zap.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		start := time.Now()
		resp, err := h(ctx, req)
		logRPC(lg, ctx, info.FullMethod, start, err)
		return resp, err
	}
}

func streamLogging(lg *zap.Logger) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		start := time.Now()
		err := h(srv, ss)
		logRPC(lg, ss.Context(), info.FullMethod, start, err)
		return err
	}
}

// ServeGRPC serves s on ln until ctx is done, then stops gracefully:
// beforeStop runs first (health turns NOT_SERVING), then it waits up to
// grace for running RPCs, then stops hard.
func ServeGRPC(ctx context.Context, s *grpc.Server, ln net.Listener, grace time.Duration, beforeStop func()) error {
	errc := make(chan error, 1)
	go func() { errc <- s.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("grpc serve: %w", err)
	case <-ctx.Done():
	}
	if beforeStop != nil {
		beforeStop()
	}
	stopped := make(chan struct{})
	go func() { s.GracefulStop(); close(stopped) }()
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-stopped:
	case <-t.C:
		s.Stop()
		<-stopped
	}
	<-errc
	return nil
}

// ServeHTTP serves h on ln until ctx is done, then shuts down within grace.
// A non-nil tlsCfg serves HTTPS.
func ServeHTTP(ctx context.Context, h http.Handler, ln net.Listener, grace time.Duration, tlsCfg ...*tls.Config) error {
	// Slow clients cannot hold a connection: headers within 10 s, idle
	// keep-alives closed after two minutes. No ReadTimeout or WriteTimeout:
	// both would cut long streams (the read deadline also ends the
	// background read that watches for a client going away); the router
	// bounds each streamed chunk's write instead.
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute}
	if len(tlsCfg) > 0 && tlsCfg[0] != nil {
		srv.TLSConfig = tlsCfg[0]
		ln = tls.NewListener(ln, tlsCfg[0])
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("http serve: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), grace)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		_ = srv.Close()
	}
	if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("http serve: %w", err)
	}
	return nil
}
