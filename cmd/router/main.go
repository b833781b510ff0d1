// Command router is kvferry's front door: OpenAI HTTP on 8000, gRPC
// RouterService on 8001, admin HTTP (probes, metrics) on 8002.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"go.uber.org/zap"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/kvferry/kvferry/cmd/internal/cli"
	"github.com/kvferry/kvferry/pkg/connpool"
	"github.com/kvferry/kvferry/pkg/health"
	"github.com/kvferry/kvferry/pkg/identity"
	"github.com/kvferry/kvferry/pkg/metrics"
	"github.com/kvferry/kvferry/pkg/router"
	"github.com/kvferry/kvferry/pkg/router/discovery"
	"github.com/kvferry/kvferry/pkg/routine"
	"github.com/kvferry/kvferry/pkg/serving"
	"github.com/kvferry/kvferry/pkg/tracing"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

// Config is the router's configuration.
type Config struct {
	HTTPAddr   string
	GRPCAddr   string
	AdminAddr  string
	CtxServers string
	GenServers string
	Aggregated bool
	cli.EngineFlags
	MaxBodyBytes     int64
	MaxPromptTokens  int
	MaxOutputTokens  int
	DefaultMaxTokens int
	RequestTimeout   time.Duration
	StreamWrite      time.Duration
	BodyRead         time.Duration
	CancelTimeout    time.Duration
	ShutdownGrace    time.Duration
	LogLevel         string
	MaxRetries       int
	MaxInflight      int
	PrefixDigest     time.Duration
	Routing          string
	APIKeysFile      string
	ResolveInterval  time.Duration
	DNSServer        string
	K8sService       string
	K8sNamespace     string
	K8sPortName      string
	TLS              serving.TLSFiles
	EnablePprof      bool
	Tracing          tracing.Config
}

func (c *Config) register(fs *flag.FlagSet) {
	fs.StringVar(&c.HTTPAddr, "http-addr", ":8000", "OpenAI HTTP listen address")
	fs.StringVar(&c.GRPCAddr, "grpc-addr", ":8001", "gRPC RouterService listen address")
	fs.StringVar(&c.AdminAddr, "admin-addr", ":8002", "admin HTTP listen address (/livez, /readyz, /metrics)")
	fs.StringVar(&c.CtxServers, "ctx-servers", "127.0.0.1:9100", "context servers: comma-separated host:port, or dns:NAME:PORT (a headless Service, re-resolved every --resolve-interval)")
	fs.StringVar(&c.GenServers, "gen-servers", "127.0.0.1:9200", "generation servers: comma-separated host:port, or dns:NAME:PORT")
	fs.BoolVar(&c.Aggregated, "aggregated", false, "aggregated serving: no context servers (--ctx-servers is ignored); each generation server, started with --aggregated, prefills its own requests")
	fs.DurationVar(&c.ResolveInterval, "resolve-interval", 10*time.Second, "how often DNS-discovered servers are re-resolved")
	fs.StringVar(&c.DNSServer, "dns-server", "", "host:port of the DNS server to ask instead of the system resolver")
	fs.StringVar(&c.K8sService, "k8s-service", "", "discover servers from Kubernetes EndpointSlices: ctx=SERVICE,gen=SERVICE (overrides --ctx-servers / --gen-servers for the roles named; in-cluster credentials)")
	fs.StringVar(&c.K8sNamespace, "k8s-namespace", "", "namespace of the --k8s-service Services (default: the pod's own)")
	fs.StringVar(&c.K8sPortName, "k8s-port-name", "grpc", "EndpointSlice port name of the servers' gRPC port")
	cli.RegisterTLS(fs, &c.TLS)
	cli.RegisterPprof(fs, &c.EnablePprof)
	cli.RegisterTracing(fs, &c.Tracing)
	c.EngineFlags.RegisterModel(fs) // the router tokenizes with the servers' model (vocabulary only) and runs no engine
	fs.Int64Var(&c.MaxBodyBytes, "max-body-bytes", 1<<20, "largest request body accepted (413 above)")
	fs.DurationVar(&c.BodyRead, "body-read-timeout", 10*time.Second, "answer 408 to a client whose request body has not arrived this long after its headers (the body is read before the request takes an in-flight slot)")
	fs.IntVar(&c.MaxPromptTokens, "max-prompt-tokens", 8000, "largest prompt accepted, in tokens")
	fs.IntVar(&c.MaxOutputTokens, "max-output-tokens", 2048, "largest max_tokens accepted")
	fs.IntVar(&c.DefaultMaxTokens, "default-max-tokens", 16, "max_tokens when the request names none (OpenAI's default for completions)")
	fs.DurationVar(&c.RequestTimeout, "request-timeout", 180*time.Second, "end a request this long after it was accepted")
	fs.DurationVar(&c.StreamWrite, "stream-write-timeout", 30*time.Second, "drop a streaming client whose next chunk cannot be written for this long (it stopped reading), cancelling its request")
	fs.DurationVar(&c.CancelTimeout, "cancel-timeout", 2*time.Second, "bound on each Cancel / Release call to a server")
	fs.DurationVar(&c.ShutdownGrace, "shutdown-grace", 10*time.Second, "how long shutdown waits for running requests")
	fs.StringVar(&c.LogLevel, "log-level", "info", "log level: debug, info, warn, error")
	fs.IntVar(&c.MaxRetries, "max-retries", 1, "attempts after a server failure, only before the first token reached the client")
	fs.IntVar(&c.MaxInflight, "max-inflight", 512, "requests in flight before the router answers 429 with Retry-After (0: no bound)")
	fs.StringVar(&c.Routing, "routing", router.DefaultRouting, "routing chain, comma-separated: filters (ready), scorers as NAME[:WEIGHT] (least-inflight, prefix-affinity, precise-prefix), at most one picker (max-score)")
	fs.DurationVar(&c.PrefixDigest, "prefix-digest-interval", time.Second, "how often to ask each context server what its prefix cache holds, for the precise-prefix scorer and kvferry_prefix_blocks_total (0: never)")
	fs.StringVar(&c.APIKeysFile, "api-keys-file", "", "file of accepted API keys, one per line; when set, the OpenAI API requires Authorization: Bearer <key>")
}

// Validate checks the configuration.
func (c *Config) Validate() error {
	var errs []error
	if err := c.EngineFlags.ValidateModel(); err != nil {
		errs = append(errs, err)
	}
	for name, addr := range map[string]string{"--http-addr": c.HTTPAddr, "--grpc-addr": c.GRPCAddr, "--admin-addr": c.AdminAddr} {
		if _, _, err := net.SplitHostPort(addr); err != nil {
			errs = append(errs, fmt.Errorf("%s %q: %w", name, addr, err))
		}
	}
	for name, spec := range map[string]string{"--ctx-servers": c.CtxServers, "--gen-servers": c.GenServers} {
		if name == "--ctx-servers" && c.Aggregated {
			continue // not used
		}
		if _, err := discovery.Parse(spec, nil); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", name, err))
		}
	}
	if err := c.TLS.Validate(); err != nil {
		errs = append(errs, err)
	}
	if err := c.Tracing.Validate(); err != nil {
		errs = append(errs, err)
	}
	if svcs, err := parseK8sService(c.K8sService); err != nil {
		errs = append(errs, fmt.Errorf("--k8s-service: %w", err))
	} else if _, ctx := svcs["ctx"]; ctx && c.Aggregated {
		errs = append(errs, errors.New("--k8s-service names context servers, which --aggregated does not use"))
	}
	if c.ResolveInterval <= 0 {
		errs = append(errs, errors.New("--resolve-interval must be positive"))
	}
	if c.MaxBodyBytes <= 0 || c.MaxPromptTokens <= 0 || c.MaxOutputTokens <= 0 {
		errs = append(errs, errors.New("--max-body-bytes, --max-prompt-tokens and --max-output-tokens must be positive"))
	}
	if c.DefaultMaxTokens <= 0 || c.DefaultMaxTokens > c.MaxOutputTokens {
		errs = append(errs, fmt.Errorf("--default-max-tokens must be between 1 and --max-output-tokens (%d)", c.MaxOutputTokens))
	}
	if _, err := router.ParseRouting(c.Routing); err != nil {
		errs = append(errs, fmt.Errorf("--routing: %w", err))
	}
	if c.MaxRetries < 0 || c.MaxInflight < 0 || c.PrefixDigest < 0 {
		errs = append(errs, errors.New("--max-retries, --max-inflight and --prefix-digest-interval must not be negative"))
	}
	if c.APIKeysFile != "" {
		if _, err := router.ReadKeysFile(c.APIKeysFile); err != nil {
			errs = append(errs, fmt.Errorf("--api-keys-file: %w", err))
		}
	}
	if c.RequestTimeout <= 0 || c.CancelTimeout <= 0 || c.ShutdownGrace <= 0 || c.StreamWrite <= 0 || c.BodyRead <= 0 {
		errs = append(errs, errors.New("--request-timeout, --cancel-timeout, --shutdown-grace, --stream-write-timeout and --body-read-timeout must be positive"))
	}
	return cli.OneLine(errs...)
}

func main() {
	var cfg Config
	fs := flag.NewFlagSet("router", flag.ContinueOnError)
	cfg.register(fs)
	os.Exit(cli.Main(fs, "router: the kvferry front door (OpenAI HTTP, gRPC RouterService).", os.Args[1:], cfg.Validate, &cfg.LogLevel,
		func(ctx context.Context, lg *zap.Logger) error { return run(ctx, cfg, lg) }))
}

// keyReloadInterval is how often the API key file is checked for changes.
const keyReloadInterval = 2 * time.Second

// healthInterval is how often the router re-checks its backends' readiness.
const healthInterval = 2 * time.Second

// tracingFlushTimeout bounds the export of the last spans at shutdown.
const tracingFlushTimeout = 2 * time.Second

func run(ctx context.Context, cfg Config, lg *zap.Logger) error {
	vocab, spec, err := cfg.Vocabulary()
	if err != nil {
		return err
	}
	served := cfg.ServedName
	if served == "" {
		served = spec.Name
	}
	var keys *router.Keys
	if cfg.APIKeysFile != "" {
		list, err := router.ReadKeysFile(cfg.APIKeysFile)
		if err != nil {
			return err
		}
		keys = router.NewKeys(list)
	}
	reg := metrics.NewRegistry(cfg.TLS.Enabled())
	ctxCreds, err := cfg.TLS.DialOption(identity.CtxServer)
	if err != nil {
		return err
	}
	genCreds, err := cfg.TLS.DialOption(identity.GenServer)
	if err != nil {
		return err
	}
	tr, err := tracing.Start(ctx, cfg.Tracing, "router")
	if err != nil {
		return err
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), tracingFlushTimeout)
		defer cancel()
		_ = tr.Shutdown(sctx) // best effort: spans a collector never took are lost
	}()
	ctxConns, genConns := connpool.New(ctxCreds).With(tr.DialOptions()...), connpool.New(genCreds).With(tr.DialOptions()...)
	defer ctxConns.Close()
	defer genConns.Close()
	resolver := discovery.Resolver(cfg.DNSServer)
	var ctxSrc discovery.Source
	if !cfg.Aggregated {
		if ctxSrc, err = discovery.Parse(cfg.CtxServers, resolver); err != nil {
			return err
		}
	}
	genSrc, err := discovery.Parse(cfg.GenServers, resolver)
	if err != nil {
		return err
	}
	if cfg.K8sService != "" {
		k8s, err := k8sSources(ctx, cfg)
		if err != nil {
			return err
		}
		for role, src := range k8s {
			defer src.Shutdown()
			if role == "ctx" {
				ctxSrc = src
			} else {
				genSrc = src
			}
		}
	}
	routing, err := router.ParseRouting(cfg.Routing)
	if err != nil {
		return err
	}
	rt, err := router.New(router.Config{
		CtxServers: ctxSrc, GenServers: genSrc, ResolveInterval: cfg.ResolveInterval, Aggregated: cfg.Aggregated,
		Model: spec, Vocab: vocab, ServedModel: served,
		MaxBodyBytes: cfg.MaxBodyBytes, MaxPromptTokens: cfg.MaxPromptTokens, MaxOutputTokens: cfg.MaxOutputTokens,
		DefaultMaxTokens: cfg.DefaultMaxTokens, RequestTimeout: cfg.RequestTimeout, StreamWriteTimeout: cfg.StreamWrite, BodyReadTimeout: cfg.BodyRead, CancelTimeout: cfg.CancelTimeout,
		MaxRetries: cfg.MaxRetries, MaxInflight: cfg.MaxInflight, PrefixDigestInterval: cfg.PrefixDigest, APIKeys: keys, Routing: routing,
		CtxConns: ctxConns, GenConns: genConns, Metrics: metrics.NewRouter(reg), Logger: lg,
	})
	if err != nil {
		return err
	}
	if err := rt.Resolve(ctx); err != nil {
		lg.Warn("initial discovery failed; retrying every --resolve-interval", zap.Error(err))
	}
	checker := health.New(reg, health.Config{}, health.Sources{Ready: rt.ReadyCheck})
	// The public ports present the certificate but ask clients for none:
	// OpenAI and RouterService clients authenticate with API keys.
	grpcCreds, err := cfg.TLS.ServerOption(false)
	if err != nil {
		return err
	}
	httpTLS, err := cfg.TLS.ServerConfig(false)
	if err != nil {
		return err
	}
	if keys != nil {
		grpcCreds = append(grpcCreds, keys.GRPCOptions()...) // RouterService takes the same keys as HTTP
	}
	grpcCreds = append(grpcCreds, tr.ServerOptions()...)
	gs := serving.NewGRPCServer(lg, grpcCreds...)
	checker.Register(gs)
	kvferryv1.RegisterRouterServiceServer(gs, rt)

	var lns []net.Listener
	listen := func(addr string) (net.Listener, error) {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			for _, l := range lns {
				_ = l.Close()
			}
			return nil, fmt.Errorf("listen %s: %w", addr, err)
		}
		lns = append(lns, ln)
		return ln, nil
	}
	httpLn, err := listen(cfg.HTTPAddr)
	if err != nil {
		return err
	}
	grpcLn, err := listen(cfg.GRPCAddr)
	if err != nil {
		return err
	}
	adminLn, err := listen(cfg.AdminAddr)
	if err != nil {
		return err
	}

	g, gctx := routine.NewGroup(ctx)
	g.Go("openai", func(ctx context.Context) error {
		return serving.ServeHTTP(ctx, tr.HTTP(rt.Handler(), "router"), httpLn, cfg.ShutdownGrace, httpTLS)
	})
	g.Go("grpc", func(ctx context.Context) error {
		return serving.ServeGRPC(ctx, gs, grpcLn, cfg.ShutdownGrace, checker.SetDraining)
	})
	g.Go("admin", func(ctx context.Context) error {
		return serving.ServeHTTP(ctx, cli.AdminHandler(checker, reg, cfg.EnablePprof), adminLn, cfg.ShutdownGrace)
	})
	g.Go("health", func(ctx context.Context) error { checker.Run(ctx, healthInterval); return nil })
	g.Go("discovery", func(ctx context.Context) error { rt.Discover(ctx); return nil })
	g.Go("prefix digests", func(ctx context.Context) error { rt.RunPrefixDigests(ctx); return nil })
	if keys != nil {
		g.Go("api-keys", func(ctx context.Context) error {
			keys.WatchFile(ctx, cfg.APIKeysFile, keyReloadInterval, lg)
			return nil
		})
	}
	cli.WarnPlaintext(lg, cfg.TLS.Enabled(), httpLn, grpcLn)
	ctxServers := "none (aggregated)"
	if ctxSrc != nil {
		ctxServers = ctxSrc.String()
	}
	lg.Info("serving", zap.String("openai", httpLn.Addr().String()), zap.String("grpc", grpcLn.Addr().String()),
		zap.String("admin", adminLn.Addr().String()), zap.String("model", served),
		zap.String("ctx_servers", ctxServers), zap.String("gen_servers", genSrc.String()))
	<-gctx.Done()
	err = g.Wait()
	checker.Shutdown()
	lg.Info("stopped")
	return err
}

// parseK8sService reads --k8s-service: ctx=NAME,gen=NAME (either or both).
func parseK8sService(v string) (map[string]string, error) {
	out := map[string]string{}
	if v == "" {
		return out, nil
	}
	for _, kv := range strings.Split(v, ",") {
		role, name, ok := strings.Cut(strings.TrimSpace(kv), "=")
		if !ok || (role != "ctx" && role != "gen") || name == "" {
			return nil, fmt.Errorf("%q: want ctx=SERVICE,gen=SERVICE", kv)
		}
		out[role] = name
	}
	return out, nil
}

// k8sSyncTimeout bounds the first EndpointSlice sync at start.
const k8sSyncTimeout = 30 * time.Second

// k8sSources starts one EndpointSlice informer per role named.
func k8sSources(ctx context.Context, cfg Config) (map[string]*discovery.EndpointSlices, error) {
	services, err := parseK8sService(cfg.K8sService)
	if err != nil {
		return nil, err
	}
	rc, err := rest.InClusterConfig()
	if err != nil {
		return nil, fmt.Errorf("kubernetes: %w", err)
	}
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("kubernetes: %w", err)
	}
	ns := cfg.K8sNamespace
	if ns == "" {
		ns = "default"
		if b, err := os.ReadFile("/var/run/secrets/kubernetes.io/serviceaccount/namespace"); err == nil {
			ns = strings.TrimSpace(string(b))
		}
	}
	out := map[string]*discovery.EndpointSlices{}
	for role, svc := range services {
		// The informer lives as long as the process: its stop is ctx, the
		// run's context, and Shutdown waits for it.
		src, err := discovery.NewEndpointSlices(ctx, client, ns, svc, cfg.K8sPortName, k8sSyncTimeout)
		if err != nil {
			for _, s := range out {
				s.Shutdown()
			}
			return nil, err
		}
		out[role] = src
	}
	return out, nil
}
