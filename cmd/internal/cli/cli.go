// Package cli is what every kvferry command shares: Main (flags with the
// environment fallback, the logger, signals), the engine flags, TLS and
// pprof flags, the admin HTTP handler and the plaintext warning. It links
// nothing of the data path (no block pool, no transport): the router uses
// it alone; the servers' skeleton is servercmd, on top of it.
package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"

	"github.com/kvferry/kvferry/pkg/flagenv"
	"github.com/kvferry/kvferry/pkg/health"
	"github.com/kvferry/kvferry/pkg/identity"
	"github.com/kvferry/kvferry/pkg/serving"
	"github.com/kvferry/kvferry/pkg/tracing"
)

// Parse parses args into fs (with the environment fallback) and validates
// with validate. The error is one line, fit for a user.
func Parse(fs *flag.FlagSet, args []string, lookup func(string) (string, bool), validate func() error) error {
	fs.SetOutput(io.Discard) // errors are returned, usage is printed by the caller on -help
	if err := fs.Parse(args); err != nil {
		return err // flag.ErrHelp for -help, else one line naming the flag
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	if err := flagenv.Apply(fs, lookup); err != nil {
		return err
	}
	return validate()
}

// AdminHandler serves /livez, /readyz, /health (the full snapshot as JSON)
// and /metrics, and with enablePprof /debug/pprof/.
func AdminHandler(h *health.Checker, reg *prometheus.Registry, enablePprof bool) http.Handler {
	mux := http.NewServeMux()
	h.Routes(mux)
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	if enablePprof {
		// Profiles on the admin port only, never the public one, and only
		// when asked for: they expose memory contents and cost CPU.
		mux.HandleFunc("GET /debug/pprof/", pprof.Index)
		mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	}
	return mux
}

// WarnPlaintext logs a warning when a listener beyond loopback serves
// without TLS: internal surfaces then trust the whole network.
func WarnPlaintext(lg *zap.Logger, tls bool, lns ...net.Listener) {
	if tls {
		return
	}
	for _, ln := range lns {
		if ln == nil {
			continue
		}
		if tcp, ok := ln.Addr().(*net.TCPAddr); ok && !tcp.IP.IsLoopback() {
			lg.Warn("listening beyond loopback without TLS: anyone who reaches this address can call it (set --tls-cert, --tls-key and --tls-ca; --data-tls for the tcp data port)",
				zap.String("addr", ln.Addr().String()))
		}
	}
}

// RegisterTracing adds the OpenTelemetry flags (tracing is off without
// --otlp-endpoint).
func RegisterTracing(fs *flag.FlagSet, c *tracing.Config) {
	fs.StringVar(&c.Endpoint, "otlp-endpoint", "", "OTLP/gRPC collector host:port to send traces to (empty: tracing off, nothing installed)")
	fs.BoolVar(&c.Insecure, "otlp-insecure", false, "send traces to --otlp-endpoint in plaintext (default: TLS with the system's roots)")
	fs.Float64Var(&c.SampleRatio, "trace-sample-ratio", 1, "share of new traces recorded, 0 to 1 (a request whose traceparent is sampled is always recorded)")
	fs.DurationVar(&c.BatchTimeout, "otlp-batch-timeout", 5*time.Second, "longest a finished span waits before it is sent")
}

// RegisterPprof adds --enable-pprof.
func RegisterPprof(fs *flag.FlagSet, enable *bool) {
	fs.BoolVar(enable, "enable-pprof", false, "serve Go profiles on the admin port at /debug/pprof/ (off by default: they expose memory contents)")
}

// RegisterTLS adds --tls-cert, --tls-key, --tls-ca and --tls-trust-domain.
func RegisterTLS(fs *flag.FlagSet, t *serving.TLSFiles) {
	fs.StringVar(&t.Cert, "tls-cert", "", "PEM certificate: serve gRPC (and the router's OpenAI port) over TLS and present it to peers")
	fs.StringVar(&t.Key, "tls-key", "", "PEM private key of --tls-cert")
	fs.StringVar(&t.CA, "tls-ca", "", "PEM CA bundle: verify peers with it; servers then require client certificates (mTLS) naming a role that may call the service (URI SAN spiffe://TRUST-DOMAIN/kvferry/ROLE)")
	fs.StringVar(&t.TrustDomain, "tls-trust-domain", identity.DefaultTrustDomain, "SPIFFE trust domain of the role URIs in certificates (make certs writes them)")
}

// OneLine joins errors into one line for the user.
func OneLine(errs ...error) error {
	var msgs []string
	for _, e := range errs {
		if e != nil {
			msgs = append(msgs, e.Error())
		}
	}
	if len(msgs) == 0 {
		return nil
	}
	return errors.New(strings.Join(msgs, "; "))
}

// Main is the whole main of a command: parse flags (with -help printing
// every flag and its variable), build the logger, run under SIGINT/SIGTERM.
// It returns the exit code: 0, 1 for a failed run, 2 for bad flags.
func Main(fs *flag.FlagSet, what string, args []string, validate func() error, logLevel *string, run func(ctx context.Context, lg *zap.Logger) error) int {
	fs.Usage = flagenv.Usage(fs, what)
	if err := Parse(fs, args, os.LookupEnv, validate); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(os.Stdout)
			fs.Usage()
			return 0
		}
		fmt.Fprintf(os.Stderr, "%s: %v (see --help)\n", fs.Name(), strings.ReplaceAll(err.Error(), "\n", "; "))
		return 2
	}
	lg, err := serving.NewLogger(*logLevel)
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", fs.Name(), err)
		return 2
	}
	lg = lg.With(zap.String("component", fs.Name()))
	defer func() { _ = lg.Sync() }()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, lg); err != nil {
		lg.Error("exit", zap.Error(err))
		return 1
	}
	return 0
}
