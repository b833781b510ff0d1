// Package servercmd is what ctxserver and genserver share on top of cli:
// their common flags and validation, and the process skeleton (engine,
// block pool, transport, listeners, admin HTTP, gRPC with health, graceful
// shutdown). The router does not link it: it never touches KV memory.
package servercmd

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/kvferry/kvferry/cmd/internal/cli"
	"github.com/kvferry/kvferry/pkg/blockpool"
	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/pkg/health"
	"github.com/kvferry/kvferry/pkg/health/gpu"
	"github.com/kvferry/kvferry/pkg/identity"
	"github.com/kvferry/kvferry/pkg/kvtransfer"
	"github.com/kvferry/kvferry/pkg/kvtransfer/shm"
	"github.com/kvferry/kvferry/pkg/kvtransfer/tcp"
	"github.com/kvferry/kvferry/pkg/kvtransfer/ucx"
	"github.com/kvferry/kvferry/pkg/metrics"
	"github.com/kvferry/kvferry/pkg/routine"
	"github.com/kvferry/kvferry/pkg/sched"
	"github.com/kvferry/kvferry/pkg/serving"
	"github.com/kvferry/kvferry/pkg/tracing"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

// Config holds the flags both servers take.
type Config struct {
	cli.EngineFlags
	PoolBlocks              int
	MaxQueue                int
	GRPCAddr                string
	HTTPAddr                string
	DataAddr                string
	Transport               string
	ShmDir                  string
	AdvertiseHost           string
	LogLevel                string
	PrefillTokensPerSecond  float64
	DecodeStepTime          time.Duration
	TransferProgressTimeout time.Duration
	TransferDeadline        time.Duration
	QuarantineDeadline      time.Duration
	ShutdownGrace           time.Duration
	ProgressDeadline        time.Duration
	PoisonBudget            int
	HealthInterval          time.Duration
	ExhaustionGrace         time.Duration
	TLS                     serving.TLSFiles
	EnablePprof             bool
	DataTLS                 bool
	Tracing                 tracing.Config
}

// tracingFlushTimeout bounds the export of the last spans at shutdown.
const tracingFlushTimeout = 2 * time.Second

// Ports are a server's default listeners (the README's Configuration).
type Ports struct{ GRPC, HTTP, Data int }

// Register adds the common flags to fs.
func (c *Config) Register(fs *flag.FlagSet, p Ports) {
	c.EngineFlags.Register(fs)
	fs.IntVar(&c.PoolBlocks, "pool-blocks", 1024, "KV blocks in the pool (block size follows the model)")
	fs.IntVar(&c.MaxQueue, "max-queue", 256, "requests that may wait, in arrival order, for KV blocks to free up; beyond it a request is refused at once (RESOURCE_EXHAUSTED: the router answers 429 with Retry-After)")
	fs.StringVar(&c.GRPCAddr, "grpc-addr", fmt.Sprintf(":%d", p.GRPC), "gRPC listen address")
	fs.StringVar(&c.HTTPAddr, "http-addr", fmt.Sprintf(":%d", p.HTTP), "HTTP listen address for /livez, /readyz, /metrics")
	fs.StringVar(&c.DataAddr, "data-addr", fmt.Sprintf(":%d", p.Data), "transfer data listen address")
	fs.StringVar(&c.Transport, "transport", kvtransfer.TransportTCP, "KV data transport, the same on both servers of a pair (a mismatch answers NOT_READY): tcp (any network), shm (same host: the generation server's pool is shared memory the context server copies into) or ucx (UCX puts into the registered pool; binaries built with TAGS=ucx; UCX_TLS picks UCX's transports)")
	fs.StringVar(&c.ShmDir, "shm-dir", os.TempDir(), "directory of the shm transport's unix socket; context and generation servers must both see it (a shared volume in one pod)")
	fs.StringVar(&c.AdvertiseHost, "advertise-host", "", "host peers use to reach this server (default: the listen host, or 127.0.0.1 for a wildcard listen)")
	fs.StringVar(&c.LogLevel, "log-level", "info", "log level: debug, info, warn, error")
	fs.Float64Var(&c.PrefillTokensPerSecond, "prefill-tokens-per-second", 0, "synthetic engine prefill speed (0 = instant)")
	fs.DurationVar(&c.DecodeStepTime, "decode-step-time", 0, "synthetic engine time per decode step (0 = instant)")
	fs.DurationVar(&c.TransferProgressTimeout, "transfer-progress-timeout", 10*time.Second, "end a transfer that moved no byte for this long")
	fs.DurationVar(&c.TransferDeadline, "transfer-deadline", 60*time.Second, "end a transfer this long after it started")
	fs.DurationVar(&c.QuarantineDeadline, "quarantine-deadline", 120*time.Second, "poison blocks of a transfer whose quiescence is not proven this long after it ended")
	fs.DurationVar(&c.ProgressDeadline, "progress-deadline", 60*time.Second, "liveness fails after no global progress this long with work pending, or a session this long past its transfer deadline")
	fs.IntVar(&c.PoisonBudget, "poison-budget", 16, "liveness fails when more blocks than this are poisoned")
	fs.DurationVar(&c.HealthInterval, "health-interval", time.Second, "how often health is evaluated")
	fs.DurationVar(&c.ExhaustionGrace, "exhaustion-grace", 5*time.Second, "readiness fails when no block could be allocated for longer than this")
	cli.RegisterTLS(fs, &c.TLS)
	fs.BoolVar(&c.DataTLS, "data-tls", false, "tcp transport: mutual TLS on every data connection (generation servers accept only context servers' certificates, context servers write only to generation servers'); needs --tls-cert, --tls-key and --tls-ca, and the same setting on both servers of a pair (a mismatch answers NOT_READY)")
	cli.RegisterPprof(fs, &c.EnablePprof)
	cli.RegisterTracing(fs, &c.Tracing)
	fs.DurationVar(&c.ShutdownGrace, "shutdown-grace", 10*time.Second, "how long shutdown waits for running requests")
}

// DataTransport is the transport named in transfer requests: --transport,
// or tcp+tls with --data-tls.
func (c *Config) DataTransport() string {
	if c.DataTLS {
		return kvtransfer.TransportTCPTLS
	}
	return c.Transport
}

// Validate checks the common flags.
func (c *Config) Validate() error {
	var errs []error
	if err := c.EngineFlags.Validate(); err != nil {
		errs = append(errs, err)
	}
	if err := c.Tracing.Validate(); err != nil {
		errs = append(errs, err)
	}
	switch c.Transport {
	case kvtransfer.TransportTCP, kvtransfer.TransportShm:
	case kvtransfer.TransportUCX:
		if !ucx.Built {
			errs = append(errs, errors.New("--transport=ucx: this binary is built without ucx (make build TAGS=ucx, with libucx-dev)"))
		}
	default:
		errs = append(errs, fmt.Errorf("--transport must be %s, %s or %s, got %q", kvtransfer.TransportTCP, kvtransfer.TransportShm, kvtransfer.TransportUCX, c.Transport))
	}
	if c.PoolBlocks <= 0 {
		errs = append(errs, fmt.Errorf("--pool-blocks must be positive, got %d", c.PoolBlocks))
	}
	if c.MaxQueue < 0 {
		errs = append(errs, fmt.Errorf("--max-queue must not be negative, got %d", c.MaxQueue))
	}
	for name, addr := range map[string]string{"--grpc-addr": c.GRPCAddr, "--http-addr": c.HTTPAddr, "--data-addr": c.DataAddr} {
		if _, _, err := net.SplitHostPort(addr); err != nil {
			errs = append(errs, fmt.Errorf("%s %q: %w", name, addr, err))
		}
	}
	if err := c.TLS.Validate(); err != nil {
		errs = append(errs, err)
	}
	if c.DataTLS {
		if c.Transport != kvtransfer.TransportTCP {
			errs = append(errs, fmt.Errorf("--data-tls is for --transport=tcp, not %s", c.Transport))
		}
		if _, _, err := c.TLS.DataConfigs(); err != nil {
			errs = append(errs, err)
		}
	}
	if c.PoisonBudget < 0 {
		errs = append(errs, fmt.Errorf("--poison-budget must not be negative, got %d", c.PoisonBudget))
	}
	if c.PrefillTokensPerSecond < 0 || c.DecodeStepTime < 0 {
		errs = append(errs, errors.New("--prefill-tokens-per-second and --decode-step-time must not be negative"))
	}
	for name, d := range map[string]time.Duration{"--transfer-progress-timeout": c.TransferProgressTimeout, "--transfer-deadline": c.TransferDeadline, "--quarantine-deadline": c.QuarantineDeadline, "--shutdown-grace": c.ShutdownGrace,
		"--progress-deadline": c.ProgressDeadline, "--health-interval": c.HealthInterval, "--exhaustion-grace": c.ExhaustionGrace} {
		if d <= 0 {
			errs = append(errs, fmt.Errorf("%s must be positive, got %s", name, d))
		}
	}
	return cli.OneLine(errs...)
}

// Parts are what a server's run builds from the common config.
type Parts struct {
	Spec   executor.ModelSpec
	Engine executor.Engine
	Pool   *blockpool.Pool
	// Admission is the waiting queue in front of the pool (--max-queue);
	// Scheduler its metrics and the decode loop's.
	Admission *sched.Admission
	Scheduler *metrics.Scheduler
	Registry  *prometheus.Registry
	Progress  *health.Progress
	Sessions  *health.Sessions
	Health    *health.Checker // set by StartHealth
	GPU       *gpu.Monitor
	GRPC      *grpc.Server
	GRPCLn    net.Listener
	HTTPLn    net.Listener
	DataLn    net.Listener
	Logger    *zap.Logger
	// Receiver and DataEndpoint (host:port for tcp, a socket path for shm)
	// exist on the receiving side only (withData).
	Receiver     *kvtransfer.Receiver
	DataEndpoint string
	// Tracing is nil unless --otlp-endpoint is set; its DialOptions go on
	// the server's own clients.
	Tracing  *tracing.Tracing
	shm      *shm.Memory
	closeEng func()
}

// Build creates the engine, pool, registry, health, gRPC server and the
// listeners (the data listener only when withData is set: in the push
// model only the receiving side listens). On error everything opened is
// closed.
func Build(cfg Config, role identity.Role, lg *zap.Logger) (*Parts, error) {
	withData := role == identity.GenServer
	engine, closeEngine, err := cfg.NewEngine(executor.Timing{PrefillTokensPerSecond: cfg.PrefillTokensPerSecond, DecodeStepTime: cfg.DecodeStepTime}, lg)
	if err != nil {
		return nil, err
	}
	spec := engine.Model()
	useShm := withData && cfg.Transport == kvtransfer.TransportShm
	useUCX := cfg.Transport == kvtransfer.TransportUCX
	var mem *shm.Memory
	var pool *blockpool.Pool
	var recv *kvtransfer.Receiver
	switch {
	case withData && useUCX:
		// UCX allocates and registers the receiving pool itself, in memory
		// its transports reach fastest.
		var slab []byte
		if recv, slab, err = ucx.Listen(cfg.PoolBlocks*spec.BlockBytes(), spec.BlockBytes(), lg); err == nil {
			pool, err = blockpool.NewWithMemory(cfg.PoolBlocks, spec.BlockBytes(), slab)
		}
	case useShm || useUCX:
		// The shm transport's pool is shared memory the writers map; a ucx
		// writer's sources live outside the Go heap, which UCX may retain.
		if mem, err = shm.NewMemory(cfg.PoolBlocks * spec.BlockBytes()); err == nil {
			pool, err = blockpool.NewWithMemory(cfg.PoolBlocks, spec.BlockBytes(), mem.Bytes())
		}
	default:
		pool, err = blockpool.New(cfg.PoolBlocks, spec.BlockBytes())
	}
	if err != nil {
		closeEngine()
		if recv != nil {
			_ = recv.Close()
		}
		if mem != nil {
			_ = mem.Close()
		}
		return nil, err
	}
	reg := metrics.NewRegistry(cfg.TLS.Enabled())
	metrics.RegisterPool(reg, pool)
	schedMetrics := metrics.NewScheduler(reg)
	p := &Parts{
		Spec:      spec,
		Engine:    engine,
		closeEng:  closeEngine,
		Admission: sched.NewAdmission(pool, cfg.MaxQueue, schedMetrics.RecordQueue),
		Scheduler: schedMetrics,
		Pool:      pool,
		Registry:  reg,
		Progress:  health.NewProgress(time.Now()),
		GPU:       gpu.New(nvml.New(), reg, lg),
		Sessions:  health.NewSessions(),
		Logger:    lg,
		shm:       mem,
		Receiver:  recv,
	}
	creds, err := cfg.TLS.ServerOption(true)
	if err != nil {
		p.Close()
		return nil, err
	}
	creds = append(creds, cfg.TLS.Policy(callers[role])...)
	if p.Tracing, err = tracing.Start(context.Background(), cfg.Tracing, string(role)); err != nil {
		p.Close()
		return nil, err
	}
	creds = append(creds, p.Tracing.ServerOptions()...)
	p.GRPC = serving.NewGRPCServer(lg, creds...)
	for _, l := range []struct {
		addr string
		ln   *net.Listener
	}{{cfg.GRPCAddr, &p.GRPCLn}, {cfg.HTTPAddr, &p.HTTPLn}, {cfg.DataAddr, &p.DataLn}} {
		if l.ln == &p.DataLn && (!withData || useShm || useUCX) {
			continue
		}
		ln, err := net.Listen("tcp", l.addr)
		if err != nil {
			p.Close()
			return nil, fmt.Errorf("listen %s: %w", l.addr, err)
		}
		*l.ln = ln
	}
	switch {
	case useShm:
		path := filepath.Join(cfg.ShmDir, fmt.Sprintf("kvferry-%d-%x.sock", os.Getpid(), rand.Uint32()))
		if p.Receiver, err = shm.Listen(path, mem, spec.BlockBytes(), lg); err != nil {
			p.Close()
			return nil, err
		}
		p.DataEndpoint = path
	case withData && useUCX:
		p.DataEndpoint = p.Receiver.Endpoint()
	case withData:
		p.DataEndpoint = Advertised(cfg.AdvertiseHost, p.DataLn)
		ln := p.DataLn
		if cfg.DataTLS {
			srvTLS, _, err := cfg.TLS.DataConfigs()
			if err != nil {
				p.Close()
				return nil, err
			}
			ln = tls.NewListener(ln, srvTLS)
		}
		p.Receiver = tcp.Serve(ln, spec.BlockBytes(), lg)
	}
	return p, nil
}

// Close closes what Build opened that Serve does not: the listeners, the
// receiver and the shared pool memory. Call it after Serve returned; the
// pool must not be used after.
func (p *Parts) Close() {
	if p.Tracing != nil {
		ctx, cancel := context.WithTimeout(context.Background(), tracingFlushTimeout)
		_ = p.Tracing.Shutdown(ctx) // best effort: spans a collector never took are lost
		cancel()
	}
	if p.Receiver != nil {
		_ = p.Receiver.Close()
	}
	for _, ln := range []net.Listener{p.GRPCLn, p.HTTPLn, p.DataLn} {
		if ln != nil {
			_ = ln.Close()
		}
	}
	if p.shm != nil {
		_ = p.shm.Close()
	}
	if p.closeEng != nil {
		p.closeEng() // after Serve: no request uses the engine any more
	}
}

// Advertised returns host:port for a listener as peers should dial it.
func Advertised(advertiseHost string, ln net.Listener) string {
	host, port, _ := net.SplitHostPort(ln.Addr().String())
	if advertiseHost != "" {
		host = advertiseHost
	} else if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port)
}

// StartHealth builds the health checker from the common sources (pool,
// progress, sessions) plus the server's own, and registers it on the gRPC
// server. Call it once, before Serve.
func (p *Parts) StartHealth(cfg Config, extra health.Sources) *health.Checker {
	extra.Pool, extra.Progress, extra.Sessions, extra.GPUs = p.Pool, p.Progress, p.Sessions, p.GPU.Snapshot
	if d, ok := p.Engine.(interface{ Devices() []string }); ok {
		extra.EngineDevices = d.Devices() // the llama.cpp engine's CPU and GPUs
	}
	if d, ok := p.Engine.(interface{ GPUs() []string }); ok {
		p.GPU.UseByEngine(d.GPUs()) // NVML's view of them: gauges and readiness
	}
	p.Health = health.New(p.Registry, health.Config{
		ProgressDeadline: cfg.ProgressDeadline, TransferDeadline: cfg.TransferDeadline,
		PoisonBudget: cfg.PoisonBudget, ExhaustionGrace: cfg.ExhaustionGrace,
	}, extra)
	p.Health.Register(p.GRPC)
	return p.Health
}

// gpuPollInterval is how often NVML is read: ECC and XID faults reach
// readiness within it, and NVML queries stay cheap.
const gpuPollInterval = 5 * time.Second

// Serve runs the gRPC and admin HTTP servers plus the extra runnables until
// ctx is done or one fails. Then health turns NOT_SERVING for readiness at
// once, gRPC stops gracefully within the grace period, drain runs under the
// same grace, and only then does the admin server (probes, metrics) stop:
// liveness answers true until the process exits.
func Serve(ctx context.Context, cfg Config, p *Parts, extra map[string]func(context.Context) error, drain func(context.Context) error) error {
	runCtx, stopRun := context.WithCancel(ctx)
	defer stopRun()
	adminCtx, stopAdmin := context.WithCancel(context.WithoutCancel(ctx))
	defer stopAdmin()
	adminErr := make(chan error, 1)
	go func() {
		err := serving.ServeHTTP(adminCtx, cli.AdminHandler(p.Health, p.Registry, cfg.EnablePprof), p.HTTPLn, cfg.ShutdownGrace)
		if err != nil {
			stopRun() // the admin server failed: stop the process
		}
		adminErr <- err
	}()
	g, gctx := routine.NewGroup(runCtx)
	g.Go("grpc", func(ctx context.Context) error {
		return serving.ServeGRPC(ctx, p.GRPC, p.GRPCLn, cfg.ShutdownGrace, p.Health.SetDraining)
	})
	g.Go("health", func(ctx context.Context) error { p.Health.Run(ctx, cfg.HealthInterval); return nil })
	g.Go("gpu", func(ctx context.Context) error { p.GPU.Run(ctx, gpuPollInterval); return nil })
	for name, fn := range extra {
		g.Go(name, fn)
	}
	data := "none"
	if p.DataEndpoint != "" {
		data = p.DataEndpoint
	}
	cli.WarnPlaintext(p.Logger, cfg.TLS.Enabled(), p.GRPCLn)
	cli.WarnPlaintext(p.Logger, cfg.DataTLS, p.DataLn)
	p.Logger.Info("serving",
		zap.String("grpc", p.GRPCLn.Addr().String()), zap.String("http", p.HTTPLn.Addr().String()),
		zap.String("data", data), zap.String("transport", cfg.Transport), zap.String("model", p.Spec.Name),
		zap.Int("pool_blocks", p.Pool.Capacity()), zap.String("block_bytes", strconv.Itoa(p.Spec.BlockBytes())))
	<-gctx.Done()
	err := g.Wait()
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cfg.ShutdownGrace)
	defer cancel()
	if derr := drain(dctx); derr != nil {
		err = errors.Join(err, derr)
	}
	p.Health.Shutdown()
	p.GPU.Shutdown()
	stopAdmin()
	if aerr := <-adminErr; aerr != nil {
		err = errors.Join(err, fmt.Errorf("http: %w", aerr))
	}
	c := p.Pool.Counts()
	p.Logger.Info("stopped", zap.Int("free", c.Free), zap.Int("owned", c.Owned), zap.Int("in_flight", c.InFlight), zap.Int("quarantined", c.Quarantined), zap.Int("poisoned", c.Poisoned))
	return err
}

// callers maps, per server role, each gRPC service to the roles that call
// it; with mTLS on, any other caller is refused (PERMISSION_DENIED).
var callers = map[identity.Role]map[string][]identity.Role{
	identity.CtxServer: {
		kvferryv1.ContextService_ServiceDesc.ServiceName:  {identity.Router},
		kvferryv1.TransferService_ServiceDesc.ServiceName: {identity.GenServer},
		kvferryv1.HealthService_ServiceDesc.ServiceName:   {identity.Any},
		healthpb.Health_ServiceDesc.ServiceName:           {identity.Any},
	},
	identity.GenServer: {
		kvferryv1.GenerationService_ServiceDesc.ServiceName: {identity.Router},
		kvferryv1.HealthService_ServiceDesc.ServiceName:     {identity.Any},
		healthpb.Health_ServiceDesc.ServiceName:             {identity.Any},
	},
}
