// Package serving is the process plumbing the three binaries share: the gRPC
// server with its interceptor chain and graceful stop, the HTTP servers, a
// cache of client connections, the run group and the logger.
package serving

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"runtime/debug"
	"sync"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
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

// keepaliveTime is how often an idle client pings; the server's enforcement
// minimum is below it so that the two policies match.
const keepaliveTime = 30 * time.Second

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
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: keepaliveTime / 2, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 2 * keepaliveTime, Timeout: 10 * time.Second}),
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

// Group runs named runnables; the first to fail cancels the others, and
// Wait returns that error prefixed with the runnable's name.
type Group struct {
	g   *errgroup.Group
	ctx context.Context
}

// NewGroup returns a group whose context is derived from ctx.
func NewGroup(ctx context.Context) (*Group, context.Context) {
	g, gctx := errgroup.WithContext(ctx)
	return &Group{g: g, ctx: gctx}, gctx
}

// Go starts fn under name.
func (g *Group) Go(name string, fn func(ctx context.Context) error) {
	g.g.Go(func() error {
		if err := fn(g.ctx); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		return nil
	})
}

// Wait waits for every runnable.
func (g *Group) Wait() error { return g.g.Wait() }

// ConnCache holds one client connection per address, created on first use.
type ConnCache struct {
	creds grpc.DialOption

	mu       sync.Mutex
	conns    map[string]*grpc.ClientConn
	retiring map[*grpc.ClientConn]*time.Timer
	closed   bool
}

// NewConnCache returns an empty cache dialling in plaintext, or with creds
// when given (TLSFiles.DialOption).
func NewConnCache(creds ...grpc.DialOption) *ConnCache {
	c := &ConnCache{conns: map[string]*grpc.ClientConn{}, retiring: map[*grpc.ClientConn]*time.Timer{}, creds: grpc.WithTransportCredentials(insecure.NewCredentials())}
	if len(creds) > 0 {
		c.creds = creds[0]
	}
	return c
}

// Get returns the connection to addr. grpc.NewClient does not dial, so this
// never blocks.
func (c *ConnCache) Get(addr string) (*grpc.ClientConn, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, errors.New("serving: connection cache closed")
	}
	if cc, ok := c.conns[addr]; ok {
		return cc, nil
	}
	cc, err := grpc.NewClient(addr,
		c.creds,
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(MaxMessageBytes), grpc.MaxCallSendMsgSize(MaxMessageBytes)),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: keepaliveTime, Timeout: 10 * time.Second, PermitWithoutStream: true}),
	)
	if err != nil {
		return nil, fmt.Errorf("serving: client for %s: %w", addr, err)
	}
	c.conns[addr] = cc
	return cc, nil
}

// Forget drops the connection to addr (a server discovery removed) and
// closes it after grace, so that requests still running on it finish.
// A later Get dials afresh.
func (c *ConnCache) Forget(addr string, grace time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	cc, ok := c.conns[addr]
	if !ok || c.closed {
		return
	}
	delete(c.conns, addr)
	c.retiring[cc] = time.AfterFunc(grace, func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		if _, ok := c.retiring[cc]; ok {
			delete(c.retiring, cc)
			_ = cc.Close()
		}
	})
}

// Len is the number of cached connections (not counting retiring ones).
func (c *ConnCache) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.conns)
}

// Close closes every connection, retiring ones included. Safe to call
// twice.
func (c *ConnCache) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	for cc, t := range c.retiring {
		t.Stop()
		_ = cc.Close()
		delete(c.retiring, cc)
	}
	for addr, cc := range c.conns {
		_ = cc.Close()
		delete(c.conns, addr)
	}
}

// Every calls fn with the tick time every interval until ctx is done. It is
// the body of the periodic runnables (lease sweep, reaper, health).
func Every(ctx context.Context, interval time.Duration, fn func(now time.Time)) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			fn(now)
		}
	}
}

// WaitAll waits until every channel is closed or ctx is done.
func WaitAll(ctx context.Context, chans []chan struct{}) error {
	for _, c := range chans {
		select {
		case <-c:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}
