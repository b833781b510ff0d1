// Command ctxserver is a kvferry context (prefill) server.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	"go.uber.org/zap"

	"github.com/kvferry/kvferry/cmd/internal/cli"
	"github.com/kvferry/kvferry/cmd/internal/servercmd"
	"github.com/kvferry/kvferry/pkg/ctxserver"
	"github.com/kvferry/kvferry/pkg/health"
	"github.com/kvferry/kvferry/pkg/identity"
	"github.com/kvferry/kvferry/pkg/kvtransfer"
	"github.com/kvferry/kvferry/pkg/kvtransfer/fault"
	"github.com/kvferry/kvferry/pkg/kvtransfer/tcp"
	"github.com/kvferry/kvferry/pkg/kvtransfer/transports"
	"github.com/kvferry/kvferry/pkg/metrics"
	"github.com/kvferry/kvferry/pkg/sched"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

// Config is the context server's configuration.
type Config struct {
	servercmd.Config
	HandoffLease   time.Duration
	PrefixReuse    bool
	TransportFault string
	MaxBatchTokens int
}

// Validate checks the configuration.
func (c *Config) Validate() error {
	var leaseErr, batchErr error
	if c.HandoffLease <= 0 {
		leaseErr = fmt.Errorf("--handoff-lease must be positive, got %s", c.HandoffLease)
	}
	if c.MaxBatchTokens < c.PrefillChunk {
		batchErr = fmt.Errorf("--max-batch-tokens (%d) must be at least --prefill-chunk-tokens (%d)", c.MaxBatchTokens, c.PrefillChunk)
	}
	_, faultErr := fault.Parse(c.TransportFault, time.Now())
	return cli.OneLine(c.Config.Validate(), leaseErr, batchErr, faultErr)
}

func main() {
	var cfg Config
	fs := flag.NewFlagSet("ctxserver", flag.ContinueOnError)
	cfg.Register(fs, servercmd.Ports{GRPC: 9100, HTTP: 9101, Data: 9102})
	fs.DurationVar(&cfg.HandoffLease, "handoff-lease", 30*time.Second, "release prefilled blocks no generation server took within this long (a backstop: the router releases at once)")
	fs.BoolVar(&cfg.PrefixReuse, "prefix-reuse", true, "serve full KV blocks of a known prompt prefix from the reuse cache (evicted least recently used when the pool needs room)")
	fs.IntVar(&cfg.MaxBatchTokens, "max-batch-tokens", sched.DefaultMaxBatchTokens, "most prompt tokens one prefill step runs, every prompt of the batch together (prompts that arrive together are prefilled together)")
	fs.StringVar(&cfg.TransportFault, "transport-fault", "", "inject a transport fault, for tests and drills: stall|delay|error|partial|corrupt|lose-notify|lose-abort-ack[:after=N,for=DURATION,rate=F,delay=DURATION]")
	os.Exit(cli.Main(fs, "ctxserver: the kvferry context (prefill) server.", os.Args[1:], cfg.Validate, &cfg.LogLevel,
		func(ctx context.Context, lg *zap.Logger) error { return run(ctx, cfg, lg) }))
}

// sweepInterval is how often handoff leases are checked: a lease overstays
// by at most this much, which is small against its 30 s default.
const sweepInterval = time.Second

// newWriter is the writer of --transport, a TLS tcp writer with --data-tls.
func newWriter(cfg Config, hooks kvtransfer.Hooks) (kvtransfer.Writer, error) {
	if !cfg.DataTLS {
		return transports.NewWriter(cfg.Transport, cfg.TransferProgressTimeout, hooks)
	}
	_, clientTLS, err := cfg.TLS.DataConfigs()
	if err != nil {
		return nil, err
	}
	s := tcp.NewTLSWriter(cfg.TransferProgressTimeout, clientTLS)
	s.Hooks = hooks
	return s, nil
}

func run(ctx context.Context, cfg Config, lg *zap.Logger) error {
	// The context server pushes: it dials the generation server's data
	// port and needs no data listener of its own (--data-addr is kept for
	// transports where the sender is dialled).
	p, err := servercmd.Build(cfg.Config, identity.CtxServer, lg)
	if err != nil {
		return err
	}
	defer p.Close()
	injected, err := fault.Parse(cfg.TransportFault, time.Now())
	if err != nil {
		return err
	}
	hooks := kvtransfer.Hooks{OnBlock: p.Progress.Touch}
	if injected != nil {
		lg.Warn("transport fault injected", zap.String("fault", cfg.TransportFault))
		hooks.Fault = injected
	}
	writer, err := newWriter(cfg, hooks)
	if err != nil {
		return err
	}
	defer writer.Close()
	var checkEndpoint func(context.Context, string) error
	if cfg.TLS.CA != "" {
		checkEndpoint = identity.CheckEndpoint // KV goes only where the caller's certificate says it lives
	}
	var checker *health.Checker
	srv := ctxserver.New(ctxserver.Config{
		Engine:           p.Engine,
		Admission:        p.Admission,
		PrefillChunk:     cfg.PrefillChunk,
		MaxBatchTokens:   cfg.MaxBatchTokens,
		Scheduler:        p.Scheduler,
		Pool:             p.Pool,
		Writer:           writer,
		Fault:            injected,
		TransferEndpoint: servercmd.Advertised(cfg.AdvertiseHost, p.GRPCLn),
		HandoffLease:     cfg.HandoffLease,
		TransferDeadline: cfg.TransferDeadline,
		// A writer stuck past the deadline gets as long as a receiver's
		// unproven session before its blocks are poisoned.
		QuarantineDeadline: cfg.QuarantineDeadline,
		PrefixReuse:        cfg.PrefixReuse,
		Progress:           p.Progress,
		BackendHealthy:     func() bool { return checker.Healthy() },
		CheckEndpoint:      checkEndpoint,
		Transfers:          metrics.NewTransfer(p.Registry),
		Quarantines:        metrics.NewQuarantine(p.Registry),
		Cancels:            metrics.NewCancel(p.Registry),
		Logger:             lg,
	})
	checker = p.StartHealth(cfg.Config, health.Sources{})
	kvferryv1.RegisterContextServiceServer(p.GRPC, srv)
	kvferryv1.RegisterTransferServiceServer(p.GRPC, srv)
	return servercmd.Serve(ctx, cfg.Config, p,
		map[string]func(context.Context) error{"leases": func(ctx context.Context) error { srv.Run(ctx, sweepInterval); return nil }},
		srv.Drain)
}
