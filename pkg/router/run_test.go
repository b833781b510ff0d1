package router

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kvferry/kvferry/pkg/connpool"
	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/pkg/metrics"
	"github.com/kvferry/kvferry/pkg/router/discovery"
	"github.com/kvferry/kvferry/pkg/ticket"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

const shouldHappen = 10 * time.Second

// stubCtx is a context server that advertises at once and reports the
// Release and Cancel calls it gets.
type stubCtx struct {
	kvferryv1.UnimplementedContextServiceServer
	released, cancelled chan *kvferryv1.Ticket
}

func (s *stubCtx) Prefill(_ context.Context, req *kvferryv1.PrefillRequest) (*kvferryv1.PrefillResponse, error) {
	return &kvferryv1.PrefillResponse{FirstToken: 7, Advertisement: &kvferryv1.KVAdvertisement{Ticket: req.GetTicket()}}, nil
}

func (s *stubCtx) Release(_ context.Context, req *kvferryv1.ReleaseRequest) (*kvferryv1.ReleaseResponse, error) {
	s.released <- req.GetTicket()
	return &kvferryv1.ReleaseResponse{Released: true}, nil
}

func (s *stubCtx) Cancel(_ context.Context, req *kvferryv1.ContextServiceCancelRequest) (*kvferryv1.ContextServiceCancelResponse, error) {
	s.cancelled <- req.GetTicket()
	return &kvferryv1.ContextServiceCancelResponse{Outcome: kvferryv1.CancelOutcome_CANCEL_OUTCOME_ALREADY_COMPLETE, ResourcesFreeNow: true}, nil
}

// stubGen is a generation server that either refuses the request or
// sends one token (the KV taken) and then holds the stream until the
// caller goes; it reports the Cancel calls it gets.
type stubGen struct {
	kvferryv1.UnimplementedGenerationServiceServer
	refuse    error
	cancelled chan *kvferryv1.Ticket
	got       chan *kvferryv1.GenerateRequest // when set, each request
}

func (s *stubGen) Generate(req *kvferryv1.GenerateRequest, stream kvferryv1.GenerationService_GenerateServer) error {
	if s.got != nil {
		s.got <- req
	}
	if s.refuse != nil {
		return s.refuse
	}
	if err := stream.Send(&kvferryv1.GenerateResponse{Tokens: []uint32{7}, Text: "x", KvReady: true}); err != nil {
		return err
	}
	<-stream.Context().Done()
	return status.FromContextError(stream.Context().Err()).Err()
}

func (s *stubGen) Cancel(_ context.Context, req *kvferryv1.GenerationServiceCancelRequest) (*kvferryv1.GenerationServiceCancelResponse, error) {
	s.cancelled <- req.GetTicket()
	return &kvferryv1.GenerationServiceCancelResponse{Outcome: kvferryv1.CancelOutcome_CANCEL_OUTCOME_CANCEL_REQUESTED_IN_FLIGHT}, nil
}

// serve runs a gRPC server on a loopback port until the test ends.
func serve(t *testing.T, register func(*grpc.Server)) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	register(srv)
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(ln) }()
	t.Cleanup(func() { srv.Stop(); <-done })
	return ln.Addr().String()
}

// runFixture is a router over one stub context and one stub generation
// server.
func runFixture(t *testing.T, gen *stubGen) (*Router, *stubCtx) {
	c := &stubCtx{released: make(chan *kvferryv1.Ticket, 4), cancelled: make(chan *kvferryv1.Ticket, 4)}
	gen.cancelled = make(chan *kvferryv1.Ticket, 4)
	ctxAddr := serve(t, func(s *grpc.Server) { kvferryv1.RegisterContextServiceServer(s, c) })
	genAddr := serve(t, func(s *grpc.Server) { kvferryv1.RegisterGenerationServiceServer(s, gen) })
	tiny, _ := executor.Preset("tiny")
	ctxConns, genConns := connpool.New(), connpool.New()
	t.Cleanup(func() { ctxConns.Close(); genConns.Close() })
	r, err := New(Config{CtxServers: discovery.Static{ctxAddr}, GenServers: discovery.Static{genAddr}, Model: tiny, ServedModel: "tiny",
		MaxBodyBytes: 1 << 16, MaxPromptTokens: 500, MaxOutputTokens: 64, DefaultMaxTokens: 16,
		RequestTimeout: time.Minute, CancelTimeout: shouldHappen,
		CtxConns: ctxConns, GenConns: genConns, Metrics: metrics.NewRouter(prometheus.NewRegistry()), Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Resolve(context.Background()); err != nil {
		t.Fatal(err)
	}
	return r, c
}

func testJob() Job {
	return Job{ID: ticket.NewID(), Prompt: executor.Tokenize("the quiet river"), Sampling: &kvferryv1.SamplingParams{MaxTokens: 4}}
}

func gotTicket(t *testing.T, ch <-chan *kvferryv1.Ticket, what, id string) {
	t.Helper()
	select {
	case tk := <-ch:
		if tk.GetRequestId() != id || tk.GetAttempt() != 1 {
			t.Fatalf("%s for %v, want %s attempt 1", what, tk, id)
		}
	case <-time.After(shouldHappen):
		t.Fatalf("no %s", what)
	}
}

func none(t *testing.T, ch <-chan *kvferryv1.Ticket, what string) {
	t.Helper()
	select {
	case tk := <-ch:
		t.Fatalf("unexpected %s for %v", what, tk)
	default:
	}
}

// When the generation leg fails before the generation server took the
// KV, Run releases the advertised blocks at once (the lease is only the
// backstop) and cancels nothing.
func TestRunReleasesWhenGenerationFails(t *testing.T) {
	r, c := runFixture(t, &stubGen{refuse: status.Error(codes.FailedPrecondition, "kv layout mismatch")})
	job := testJob()
	_, err := r.Run(context.Background(), job, func(Chunk) error { return nil })
	if CodeOf(err) != codes.FailedPrecondition {
		t.Fatalf("Run: %v, want FAILED_PRECONDITION", err)
	}
	gotTicket(t, c.released, "release", job.ID)
	none(t, c.cancelled, "context cancel")
}

// When the client goes away after the KV was handed off, Run cancels the
// request on both servers and releases nothing (the blocks are no longer
// the context server's).
func TestRunCancelsBothWhenClientLeaves(t *testing.T) {
	gen := &stubGen{}
	r, c := runFixture(t, gen)
	job := testJob()
	ctx, cancel := context.WithCancel(context.Background())
	_, err := r.Run(ctx, job, func(Chunk) error {
		cancel() // the client leaves after its first token
		return nil
	})
	if CodeOf(err) != codes.Canceled {
		t.Fatalf("Run: %v, want cancelled", err)
	}
	gotTicket(t, c.cancelled, "context cancel", job.ID)
	gotTicket(t, gen.cancelled, "generation cancel", job.ID)
	none(t, c.released, "release")
}

// Aggregated, the router asks a generation server alone to prefill and
// decode (no advertisement, no first token), and a client that leaves is
// cancelled there — there is no context server to tell.
func TestRunAggregated(t *testing.T) {
	gen := &stubGen{cancelled: make(chan *kvferryv1.Ticket, 4), got: make(chan *kvferryv1.GenerateRequest, 4)}
	genAddr := serve(t, func(s *grpc.Server) { kvferryv1.RegisterGenerationServiceServer(s, gen) })
	tiny, _ := executor.Preset("tiny")
	genConns := connpool.New()
	t.Cleanup(genConns.Close)
	r, err := New(Config{GenServers: discovery.Static{genAddr}, Aggregated: true, Model: tiny, ServedModel: "tiny",
		RequestTimeout: time.Minute, CancelTimeout: shouldHappen,
		GenConns: genConns, Metrics: metrics.NewRouter(prometheus.NewRegistry()), Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Resolve(context.Background()); err != nil {
		t.Fatal(err)
	}
	job := testJob()
	ctx, cancel := context.WithCancel(context.Background())
	_, err = r.Run(ctx, job, func(Chunk) error {
		cancel() // the client leaves after its first token
		return nil
	})
	if CodeOf(err) != codes.Canceled {
		t.Fatalf("Run: %v, want cancelled", err)
	}
	req := <-gen.got
	if !req.GetPrefill() || req.GetAdvertisement() != nil || req.GetFirstToken() != 0 || len(req.GetPromptTokens()) != len(job.Prompt) {
		t.Fatalf("generate request %v: want prefill, the prompt, no advertisement and no first token", req)
	}
	gotTicket(t, gen.cancelled, "generation cancel", job.ID)
	if ok, reason, _ := r.ReadyCheck(context.Background()); !ok && reason == "no_ready_context_server" {
		t.Fatal("an aggregated router waits for context servers to be ready")
	}
}
