// Command genserver is a kvferry generation (decode) server.
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
	"github.com/kvferry/kvferry/pkg/connpool"
	"github.com/kvferry/kvferry/pkg/genserver"
	"github.com/kvferry/kvferry/pkg/health"
	"github.com/kvferry/kvferry/pkg/identity"
	"github.com/kvferry/kvferry/pkg/kvtransfer"
	"github.com/kvferry/kvferry/pkg/metrics"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

// Config is the generation server's configuration.
type Config struct {
	servercmd.Config
	CanaryInterval time.Duration
	MaxBatchSeqs   int
	Aggregated     bool
}

// Validate checks the configuration.
func (c *Config) Validate() error {
	var canaryErr, batchErr error
	if c.CanaryInterval < 0 {
		canaryErr = fmt.Errorf("--canary-interval must not be negative, got %s", c.CanaryInterval)
	}
	if c.MaxBatchSeqs < 0 {
		batchErr = fmt.Errorf("--max-batch-seqs must not be negative, got %d", c.MaxBatchSeqs)
	}
	return cli.OneLine(c.Config.Validate(), canaryErr, batchErr)
}

func main() {
	var cfg Config
	fs := flag.NewFlagSet("genserver", flag.ContinueOnError)
	cfg.Register(fs, servercmd.Ports{GRPC: 9200, HTTP: 9201, Data: 9202})
	fs.DurationVar(&cfg.CanaryInterval, "canary-interval", 10*time.Second, "how often the pair canary pulls a one-block KV from each recently seen context server (0 disables)")
	fs.IntVar(&cfg.MaxBatchSeqs, "max-batch-seqs", 0, "most sequences one decode step runs (continuous batching; 0: every decoding request)")
	fs.BoolVar(&cfg.Aggregated, "aggregated", false, "also prefill: serve requests a router started with --aggregated sends (prompt in, tokens out, no context server and no KV transfer)")
	os.Exit(cli.Main(fs, "genserver: the kvferry generation (decode) server.", os.Args[1:], cfg.Validate, &cfg.LogLevel,
		func(ctx context.Context, lg *zap.Logger) error { return run(ctx, cfg, lg) }))
}

// abortTimeout bounds the AbortTransfer call to a sender; the receiver's own
// quiescence proof does not depend on its answer.
const abortTimeout = 2 * time.Second

// sweepInterval is how often quarantined sessions are reaped and finished
// requests forgotten: a poison comes at most this late after the
// quarantine deadline (120 s by default).
const sweepInterval = time.Second

func run(ctx context.Context, cfg Config, lg *zap.Logger) error {
	p, err := servercmd.Build(cfg.Config, identity.GenServer, lg)
	if err != nil {
		return err
	}
	defer p.Close()
	creds, err := cfg.TLS.DialOption(identity.CtxServer)
	if err != nil {
		return err
	}
	conns := connpool.New(creds).Bound(genserver.MaxContextServers).With(p.Tracing.DialOptions()...)
	defer conns.Close()
	var checker *health.Checker
	srv := genserver.New(genserver.Config{
		Engine:       p.Engine,
		Admission:    p.Admission,
		Pool:         p.Pool,
		Receiver:     p.Receiver,
		Transport:    cfg.DataTransport(),
		DataEndpoint: p.DataEndpoint,
		Conns:        conns,
		Timeouts: kvtransfer.Timeouts{
			Progress: cfg.TransferProgressTimeout, Deadline: cfg.TransferDeadline, Quarantine: cfg.QuarantineDeadline,
		},
		AbortTimeout:   abortTimeout,
		Transfers:      metrics.NewTransfer(p.Registry),
		Cancels:        metrics.NewCancel(p.Registry),
		Quarantines:    metrics.NewQuarantine(p.Registry),
		BackendHealthy: func() bool { return checker.Healthy() },
		Progress:       p.Progress,
		Sessions:       p.Sessions,
		CanaryInterval: cfg.CanaryInterval,
		Canaries:       metrics.NewCanary(p.Registry),
		MaxBatchSeqs:   cfg.MaxBatchSeqs,
		Scheduler:      p.Scheduler,
		Aggregated:     cfg.Aggregated,
		PrefillChunk:   cfg.PrefillChunk,
		Logger:         lg,
	})
	checker = p.StartHealth(cfg.Config, health.Sources{QuarantinedSessions: srv.QuarantinedSessions, Canary: srv.CanaryStatus})
	kvferryv1.RegisterGenerationServiceServer(p.GRPC, srv)
	return servercmd.Serve(ctx, cfg.Config, p,
		map[string]func(context.Context) error{"reaper": func(ctx context.Context) error { srv.Run(ctx, sweepInterval); return nil },
			"canary": func(ctx context.Context) error { srv.RunCanary(ctx); return nil },
		},
		srv.Drain)
}
