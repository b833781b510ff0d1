package genserver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/kvferry/kvferry/internal/leakcheck"
	"github.com/kvferry/kvferry/pkg/blockpool"
	"github.com/kvferry/kvferry/pkg/connpool"
	"github.com/kvferry/kvferry/pkg/ctxserver"
	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/pkg/kvtransfer"
	"github.com/kvferry/kvferry/pkg/kvtransfer/tcp"
	"github.com/kvferry/kvferry/pkg/metrics"
	"github.com/kvferry/kvferry/pkg/ticket"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

func TestMain(m *testing.M) { leakcheck.VerifyTestMain(m) }

const shouldHappen = 10 * time.Second

// newGenServer serves a generation server of spec over pool (tcp receiver,
// synthetic engine with timing) on a loopback socket; more sets what a
// test needs beyond the defaults. It returns the server, its address and
// its quarantine metrics.
func newGenServer(t *testing.T, spec executor.ModelSpec, pool *blockpool.Pool, timing executor.Timing, to kvtransfer.Timeouts, more func(*Config)) (*Server, string, *metrics.Quarantine) {
	t.Helper()
	recv, err := tcp.Listen("127.0.0.1:0", spec.BlockBytes(), zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = recv.Close() })
	conns := connpool.New()
	t.Cleanup(conns.Close)
	reg := prometheus.NewRegistry()
	quarantines := metrics.NewQuarantine(reg)
	cfg := Config{
		Engine: executor.NewSynthetic(spec, timing), Pool: pool, Receiver: recv,
		Transport: kvtransfer.TransportTCP, DataEndpoint: recv.Endpoint(), Conns: conns,
		Timeouts:     to,
		AbortTimeout: time.Second, Transfers: metrics.NewTransfer(reg), Cancels: metrics.NewCancel(reg),
		Quarantines: quarantines, Canaries: metrics.NewCanary(reg), Logger: zap.NewNop(),
	}
	more(&cfg)
	srv := New(cfg)
	return srv, serve(t, func(gs *grpc.Server) { kvferryv1.RegisterGenerationServiceServer(gs, srv) }), quarantines
}

// pair is a context server and a generation server on real loopback
// sockets, in this process.
type pair struct {
	spec             executor.ModelSpec
	ctxPool, genPool *blockpool.Pool
	ctxSrv           *ctxserver.Server
	ctxClient        kvferryv1.ContextServiceClient
	genClient        kvferryv1.GenerationServiceClient
	advertise        string // the context server's TransferService address
	genSrv           *Server
	quarantined      prometheus.Collector
}

func serve(t *testing.T, register func(*grpc.Server)) string {
	t.Helper()
	return serveOn(t, listen(t), register)
}

func listen(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

func serveOn(t *testing.T, ln net.Listener, register func(*grpc.Server)) string {
	t.Helper()
	gs := grpc.NewServer()
	register(gs)
	done := make(chan struct{})
	go func() { _ = gs.Serve(ln); close(done) }()
	t.Cleanup(func() { gs.Stop(); <-done })
	return ln.Addr().String()
}

func dial(t *testing.T, addr string) *grpc.ClientConn {
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	return cc
}

func newPair(t *testing.T, genModel string, genBlocks int, genTiming executor.Timing) *pair {
	t.Helper()
	return newPairWith(t, genModel, genBlocks, genTiming, kvtransfer.Timeouts{Progress: shouldHappen, Deadline: shouldHappen, Quarantine: 2 * shouldHappen})
}

func newPairTimeouts(t *testing.T, genBlocks int, to kvtransfer.Timeouts) *pair {
	t.Helper()
	return newPairWith(t, "tiny", genBlocks, executor.Timing{}, to)
}

func newPairWith(t *testing.T, genModel string, genBlocks int, genTiming executor.Timing, to kvtransfer.Timeouts) *pair {
	t.Helper()
	spec, _ := executor.Preset("tiny")
	genSpec, _ := executor.Preset(genModel)
	ctxPool, _ := blockpool.New(64, spec.BlockBytes())
	genPool, _ := blockpool.New(genBlocks, genSpec.BlockBytes())
	sender := tcp.NewWriter(0)
	t.Cleanup(sender.Close)
	reg := prometheus.NewRegistry()
	ctxLn := listen(t)
	ctxSrv := ctxserver.New(ctxserver.Config{
		Engine: executor.NewSynthetic(spec, executor.Timing{}), Pool: ctxPool, Writer: sender, TransferEndpoint: ctxLn.Addr().String(),
		HandoffLease: time.Minute, TransferDeadline: shouldHappen,
		Transfers: metrics.NewTransfer(reg), Cancels: metrics.NewCancel(reg), Logger: zap.NewNop(),
	})
	// The listen address is known only after serving, so the test writes
	// it into each advertisement (p.advertise) as the real server would.
	ctxAddr := serveOn(t, ctxLn, func(gs *grpc.Server) {
		kvferryv1.RegisterTransferServiceServer(gs, ctxSrv)
		kvferryv1.RegisterContextServiceServer(gs, ctxSrv)
	})
	genSrv, genAddr, quarantines := newGenServer(t, genSpec, genPool, genTiming, to, func(c *Config) { c.CanaryInterval = time.Hour })
	t.Cleanup(func() {
		for _, p := range []*blockpool.Pool{ctxPool, genPool} {
			if err := p.CheckInvariant(); err != nil {
				t.Error(err)
			}
		}
	})
	p := &pair{genSrv: genSrv, quarantined: quarantines.QuarantinedCounter(metrics.SideReceiver), spec: spec, ctxPool: ctxPool, genPool: genPool, ctxSrv: ctxSrv,
		ctxClient: kvferryv1.NewContextServiceClient(dial(t, ctxAddr)), genClient: kvferryv1.NewGenerationServiceClient(dial(t, genAddr))}
	// Prefill advertises the endpoint the test dialled.
	p.advertise = ctxAddr
	return p
}

// run does what the router does: Prefill, then Generate with the
// advertisement; it returns the streamed text.
func (p *pair) run(ctx context.Context, prompt string, s *kvferryv1.SamplingParams, mutate func(*kvferryv1.GenerateRequest)) (string, error) {
	tk := ticket.New(ticket.NewID())
	toks := executor.Tokenize(prompt)
	pre, err := p.ctxClient.Prefill(ctx, &kvferryv1.PrefillRequest{Ticket: tk, PromptTokens: toks, Sampling: s})
	if err != nil {
		return "", err
	}
	pre.Advertisement.TransferEndpoint = p.advertise
	req := &kvferryv1.GenerateRequest{Ticket: tk, PromptTokens: toks, FirstToken: pre.GetFirstToken(), Sampling: s, Advertisement: pre.GetAdvertisement()}
	if mutate != nil {
		mutate(req)
	}
	text, err := generate(ctx, p.genClient, req)
	// As the router does: release whether the generation leg finished or
	// failed.
	if _, rerr := p.ctxClient.Release(context.WithoutCancel(ctx), &kvferryv1.ReleaseRequest{Ticket: tk}); err == nil {
		err = rerr
	}
	return text, err
}

func (p *pair) waitIdle(t *testing.T) {
	t.Helper()
	waitFree(t, p.ctxPool, p.genPool)
}

// waitFree polls until every block of the pools is free.
func waitFree(t *testing.T, pools ...*blockpool.Pool) {
	t.Helper()
	deadline := time.After(shouldHappen)
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for _, p := range pools {
		for p.Counts().Free != p.Capacity() {
			select {
			case <-tick.C:
			case <-deadline:
				t.Fatalf("pool not idle: %+v", p.Counts())
			}
		}
	}
}

func TestGenerateMatchesReference(t *testing.T) {
	p := newPair(t, "tiny", 64, executor.Timing{})
	for _, prompt := range []string{"the river", strings.Repeat("the quiet harbour ", 100)} {
		s := &kvferryv1.SamplingParams{MaxTokens: 32, Seed: 11, Temperature: 1, TopP: 1}
		got, err := p.run(context.Background(), prompt, s, nil)
		if err != nil {
			t.Fatal(err)
		}
		sampling, err := executor.ToSampling(s)
		if err != nil {
			t.Fatal(err)
		}
		if want := executor.Reference(p.spec, prompt, sampling); got != want.Text {
			t.Fatalf("got %q, reference %q", got, want.Text)
		}
		p.waitIdle(t)
	}
}

func TestGenerateRejects(t *testing.T) {
	s := &kvferryv1.SamplingParams{MaxTokens: 4}
	t.Run("layout mismatch", func(t *testing.T) {
		p := newPair(t, "llama3-8b", 8, executor.Timing{})
		_, err := p.run(context.Background(), "the river", s, nil)
		if status.Code(err) != codes.InvalidArgument && status.Code(err) != codes.FailedPrecondition {
			t.Fatalf("err %v, want a precondition failure", err)
		}
		p.waitIdle(t)
	})
	p := newPair(t, "tiny", 4, executor.Timing{})
	for _, tc := range []struct {
		name   string
		prompt string
		mutate func(*kvferryv1.GenerateRequest)
		code   codes.Code
	}{
		{"corrupt checksum", "the river", func(r *kvferryv1.GenerateRequest) { r.Advertisement.BlockChecksums[0] ^= 1 }, codes.DataLoss},
		{"missing advertisement", "the river", func(r *kvferryv1.GenerateRequest) { r.Advertisement = nil }, codes.InvalidArgument},
		{"wrong block count", "the river", func(r *kvferryv1.GenerateRequest) { r.Advertisement.BlockCount = 3 }, codes.InvalidArgument},
		{"protocol version", "the river", func(r *kvferryv1.GenerateRequest) { r.Advertisement.ProtocolVersion = 7 }, codes.FailedPrecondition},
		{"pool exhausted", strings.Repeat("the ", 80), nil, codes.ResourceExhausted},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := p.run(context.Background(), tc.prompt, s, tc.mutate)
			if status.Code(err) != tc.code {
				t.Fatalf("err %v, want %s", err, tc.code)
			}
			p.waitIdle(t)
		})
	}
}

func TestGenerateStaleAndDuplicate(t *testing.T) {
	p := newPair(t, "tiny", 64, executor.Timing{})
	ctx := context.Background()
	tk := &kvferryv1.Ticket{RequestId: ticket.NewID(), Attempt: 2}
	toks := executor.Tokenize("the river")
	s := &kvferryv1.SamplingParams{MaxTokens: 3}
	pre, err := p.ctxClient.Prefill(ctx, &kvferryv1.PrefillRequest{Ticket: tk, PromptTokens: toks, Sampling: s})
	if err != nil {
		t.Fatal(err)
	}
	pre.Advertisement.TransferEndpoint = p.advertise
	gen := func(attempt uint32) error {
		adv := pre.GetAdvertisement()
		req := &kvferryv1.GenerateRequest{Ticket: &kvferryv1.Ticket{RequestId: tk.GetRequestId(), Attempt: attempt}, PromptTokens: toks, FirstToken: pre.GetFirstToken(), Sampling: s, Advertisement: adv}
		adv.Ticket = req.Ticket
		st, err := p.genClient.Generate(ctx, req)
		if err != nil {
			return err
		}
		for {
			if _, err := st.Recv(); err != nil {
				if errors.Is(err, io.EOF) {
					return nil
				}
				return err
			}
		}
	}
	if err := gen(2); err != nil {
		t.Fatal(err)
	}
	if err := gen(2); status.Code(err) != codes.AlreadyExists {
		t.Fatalf("duplicate: %v, want AlreadyExists", err)
	}
	if err := gen(1); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("stale: %v, want FailedPrecondition", err)
	}
	p.waitIdle(t)
}

func TestCancelMidDecode(t *testing.T) {
	p := newPair(t, "tiny", 64, executor.Timing{DecodeStepTime: time.Hour}) // decode waits for the cancel
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	tk := ticket.New(ticket.NewID())
	toks := executor.Tokenize(strings.Repeat("the river ", 20))
	s := &kvferryv1.SamplingParams{MaxTokens: 100}
	pre, err := p.ctxClient.Prefill(ctx, &kvferryv1.PrefillRequest{Ticket: tk, PromptTokens: toks, Sampling: s})
	if err != nil {
		t.Fatal(err)
	}
	pre.Advertisement.TransferEndpoint = p.advertise
	st, err := p.genClient.Generate(ctx, &kvferryv1.GenerateRequest{Ticket: tk, PromptTokens: toks, FirstToken: pre.GetFirstToken(),
		Sampling: s, Advertisement: pre.GetAdvertisement()})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); err != nil {
		t.Fatal(err)
	}
	resp, err := p.genClient.Cancel(ctx, &kvferryv1.GenerationServiceCancelRequest{Ticket: tk})
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetOutcome() != kvferryv1.CancelOutcome_CANCEL_OUTCOME_CANCEL_REQUESTED_IN_FLIGHT {
		t.Fatalf("outcome %v, want CANCEL_REQUESTED_IN_FLIGHT", resp.GetOutcome())
	}
	unknown, _ := p.genClient.Cancel(ctx, &kvferryv1.GenerationServiceCancelRequest{Ticket: ticket.New(ticket.NewID())})
	if unknown.GetOutcome() != kvferryv1.CancelOutcome_CANCEL_OUTCOME_NOT_FOUND {
		t.Fatalf("unknown: %v", unknown.GetOutcome())
	}
	for {
		if _, err := st.Recv(); err != nil {
			break
		}
	}
	p.waitIdle(t)
}

// fakeSender is a TransferService whose behaviour a test scripts: it
// answers NOT_READY, or READY and then writes half of block 0 and stalls
// until wake is closed (a stopped process), then tries to write the rest.
type fakeSender struct {
	kvferryv1.UnimplementedTransferServiceServer
	notReady bool
	stalled  chan struct{} // closed once the half block is written
	wake     chan struct{}
	woke     chan error // what the woken writer's write returned
}

func (f *fakeSender) Transfer(req *kvferryv1.TransferRequest, st kvferryv1.TransferService_TransferServer) error {
	if f.notReady {
		return st.Send(&kvferryv1.TransferResponse{Event: kvferryv1.TransferEvent_TRANSFER_EVENT_NOT_READY, Reason: "scripted"})
	}
	if err := st.Send(&kvferryv1.TransferResponse{Event: kvferryv1.TransferEvent_TRANSFER_EVENT_READY}); err != nil {
		return err
	}
	c, err := net.Dial("tcp", req.GetDataEndpoint())
	if err != nil {
		return err
	}
	defer c.Close()
	size := int(req.GetDestinations()[0].GetLength())
	var hdr [kvtransfer.HeaderSize]byte
	kvtransfer.Header{Kind: kvtransfer.FrameData, Session: req.GetSessionId(), Index: 0, Length: uint32(size)}.Encode(hdr[:])
	if _, err := c.Write(append(hdr[:], make([]byte, size/2)...)); err != nil {
		return err
	}
	close(f.stalled)
	<-f.wake
	junk := make([]byte, size)
	for i := range junk {
		junk[i] = 0xee
	}
	_, err = c.Write(junk)
	if err == nil {
		// The write may sit in a socket buffer; a second one surfaces a reset.
		_, err = c.Write(junk)
	}
	f.woke <- err
	return nil
}

func (f *fakeSender) AbortTransfer(context.Context, *kvferryv1.AbortTransferRequest) (*kvferryv1.AbortTransferResponse, error) {
	return &kvferryv1.AbortTransferResponse{NoMoreWrites: true, Found: true}, nil
}

// generateFrom runs Generate against a scripted sender's advertisement.
func generateFrom(ctx context.Context, p *pair, senderAddr string) error {
	tk := ticket.New(ticket.NewID())
	toks := executor.Tokenize("the river carries light")
	adv := &kvferryv1.KVAdvertisement{
		Ticket: tk, TransferEndpoint: senderAddr, Layout: p.spec.Layout(), BlockCount: 1, PromptTokens: uint32(len(toks)),
		BlockChecksums: []uint64{1}, ProtocolVersion: kvtransfer.ProtocolVersion, Transport: kvtransfer.TransportTCP,
	}
	st, err := p.genClient.Generate(ctx, &kvferryv1.GenerateRequest{Ticket: tk, PromptTokens: toks, Sampling: &kvferryv1.SamplingParams{MaxTokens: 2}, Advertisement: adv})
	if err != nil {
		return err
	}
	for {
		if _, err := st.Recv(); err != nil {
			return err
		}
	}
}

// TestNotReadyReleasesReceiveBlocks: a NOT_READY answer returns the
// destination blocks, and the next transfer still gets blocks (a pool of
// exactly one request's worth proves it).
func TestNotReadyReleasesReceiveBlocks(t *testing.T) {
	p := newPairTimeouts(t, 1, kvtransfer.Timeouts{Progress: shouldHappen, Deadline: shouldHappen, Quarantine: shouldHappen})
	addr := serve(t, func(gs *grpc.Server) { kvferryv1.RegisterTransferServiceServer(gs, &fakeSender{notReady: true}) })
	for range 3 {
		if err := generateFrom(context.Background(), p, addr); status.Code(err) != codes.FailedPrecondition {
			t.Fatalf("err %v, want FailedPrecondition", err)
		}
		p.waitIdle(t)
	}
	if _, err := p.run(context.Background(), "the river", &kvferryv1.SamplingParams{MaxTokens: 3}, nil); err != nil {
		t.Fatalf("next transfer: %v", err)
	}
}

// TestTimedOutTransferLateWriteDoesNotCorruptReusedBlock: a sender stalls
// mid-block; the receive times out on progress and its blocks are
// quarantined, not freed; the reader's connection is cut, which proves
// quiescence and returns them. When the sender wakes, its bytes land
// nowhere, and the next request on the same single block decodes exactly
// the Reference.
func TestTimedOutTransferLateWriteDoesNotCorruptReusedBlock(t *testing.T) {
	p := newPairTimeouts(t, 1, kvtransfer.Timeouts{Progress: 100 * time.Millisecond, Deadline: shouldHappen, Quarantine: shouldHappen})
	f := &fakeSender{stalled: make(chan struct{}), wake: make(chan struct{}), woke: make(chan error, 1)}
	addr := serve(t, func(gs *grpc.Server) { kvferryv1.RegisterTransferServiceServer(gs, f) })
	if err := generateFrom(context.Background(), p, addr); status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("err %v, want DeadlineExceeded", err)
	}
	<-f.stalled
	p.waitIdle(t)
	if got := p.genSrv.QuarantinedSessions(); got != 0 {
		t.Fatalf("%d sessions still quarantined", got)
	}
	close(f.wake)
	if err := <-f.woke; err == nil {
		t.Fatal("the woken sender could still write into its old session")
	}
	s := &kvferryv1.SamplingParams{MaxTokens: 16, Seed: 5, Temperature: 1, TopP: 1}
	got, err := p.run(context.Background(), "the river", s, nil)
	if err != nil {
		t.Fatal(err)
	}
	if want := executor.Reference(p.spec, "the river", plainSampling(s)).Text; got != want {
		t.Fatalf("after the late write: %q, reference %q", got, want)
	}
	if q := testutil.ToFloat64(p.quarantined); q != 1 {
		t.Fatalf("quarantined sessions counted %v, want 1", q)
	}
}

// TestReapPoisonsUnprovenQuarantine: a session in doubt with no proof by
// the quarantine deadline is poisoned by the reaper, not before, and its
// blocks never come back.
func TestReapPoisonsUnprovenQuarantine(t *testing.T) {
	p := newPairTimeouts(t, 4, kvtransfer.Timeouts{Progress: time.Second, Deadline: time.Second, Quarantine: time.Minute})
	s := p.genSrv
	blocks, err := s.cfg.Pool.Allocate(context.Background(), 2)
	if err != nil {
		t.Fatal(err)
	}
	r := &request{}
	r.Hold() // the references
	r.Hold() // the pin
	tr := &transfer{sess: kvtransfer.NewSession(s.cfg.Timeouts), hold: kvtransfer.Hold{Blocks: blocks}, r: r, requestID: "test"}
	if err := tr.hold.Pin(s.cfg.Pool); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	s.mu.Lock()
	tr.sess.Start(t0)
	s.stepLocked(tr, tr.sess.Cancel(t0))
	s.mu.Unlock()
	_ = s.cfg.Pool.Release(blocks)
	if c := s.cfg.Pool.Counts(); c.Quarantined != 2 {
		t.Fatalf("after cancel without proof: %+v", c)
	}
	s.Reap(t0.Add(59 * time.Second))
	if c := s.cfg.Pool.Counts(); c.Quarantined != 2 {
		t.Fatalf("poisoned before the deadline: %+v", c)
	}
	s.Reap(t0.Add(time.Minute))
	if c := s.cfg.Pool.Counts(); c.Poisoned != 2 || c.Free != 2 {
		t.Fatalf("after the deadline: %+v", c)
	}
	if _, err := s.cfg.Pool.Allocate(context.Background(), 3); err == nil {
		t.Fatal("poisoned blocks handed out again")
	}
}

// TestReapDoesNotBlockOnUnfinishedTransfer: the reaper's poll returns
// while a transfer is stuck mid-block (the transfer is released only after
// the check, so a Reap that waited for it would never return).
func TestReapDoesNotBlockOnUnfinishedTransfer(t *testing.T) {
	p := newPairTimeouts(t, 4, kvtransfer.Timeouts{Progress: shouldHappen, Deadline: shouldHappen, Quarantine: shouldHappen})
	f := &fakeSender{stalled: make(chan struct{}), wake: make(chan struct{}), woke: make(chan error, 1)}
	addr := serve(t, func(gs *grpc.Server) { kvferryv1.RegisterTransferServiceServer(gs, f) })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- generateFrom(ctx, p, addr) }()
	<-f.stalled
	reaped := make(chan struct{})
	go func() {
		p.genSrv.Reap(time.Now().Add(time.Hour))
		close(reaped)
	}()
	select {
	case <-reaped:
	case <-time.After(shouldHappen): // the transfer stays stuck until the test wakes it: a blocking Reap never returns
		t.Fatal("Reap blocked on an unfinished transfer")
	}
	cancel()
	if err := <-done; status.Code(err) != codes.Canceled {
		t.Fatalf("err %v, want Canceled", err)
	}
	close(f.wake)
	<-f.woke
	p.waitIdle(t)
}

// TestPairCanary: after a request, the canary pulls a block from that
// context server and verifies it; a dead peer fails; the canary counts as
// failing only when every recent peer fails twice in a row.
func TestPairCanary(t *testing.T) {
	p := newPair(t, "tiny", 64, executor.Timing{})
	if _, err := p.run(context.Background(), "the river", &kvferryv1.SamplingParams{MaxTokens: 2}, nil); err != nil {
		t.Fatal(err)
	}
	s := p.genSrv
	s.CanaryRound(context.Background(), time.Now())
	st := s.CanaryStatus()
	if !st.GetEnabled() || st.GetFailing() || len(st.GetPeers()) != 1 || !st.GetPeers()[0].GetOk() {
		t.Fatalf("after one round: %v", st)
	}
	p.waitIdle(t)

	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := ln.Addr().String()
	_ = ln.Close()
	s.canary.notePeer(dead, time.Now())
	for range canaryFailThreshold {
		s.CanaryRound(context.Background(), time.Now())
	}
	st = s.CanaryStatus()
	if st.GetFailing() || len(st.GetPeers()) != 2 {
		t.Fatalf("one good peer, one dead: %v", st)
	}
	s.canary.mu.Lock()
	delete(s.canary.peers, p.advertise)
	s.canary.mu.Unlock()
	if st = s.CanaryStatus(); !st.GetFailing() {
		t.Fatalf("only a dead peer: %v", st)
	}
	// A peer not seen for the TTL is no longer probed.
	if due := s.canary.due(time.Now().Add(canaryPeerTTL + time.Second)); len(due) != 0 {
		t.Fatalf("stale peers still due: %v", due)
	}
	p.waitIdle(t)
}

// aggregated is a generation server started with Aggregated (it prefills
// its own requests), alone on a loopback socket.
type aggregated struct {
	pool   *blockpool.Pool
	client kvferryv1.GenerationServiceClient
}

func newAggregated(t *testing.T, blocks int, timing executor.Timing) *aggregated {
	t.Helper()
	spec, _ := executor.Preset("tiny")
	pool, _ := blockpool.New(blocks, spec.BlockBytes())
	_, addr, _ := newGenServer(t, spec, pool, timing, kvtransfer.Timeouts{Progress: shouldHappen, Deadline: shouldHappen, Quarantine: 2 * shouldHappen}, func(c *Config) {
		c.Aggregated, c.PrefillChunk, c.MaxBatchTokens = true, 64, 128 // long prompts run in chunks
	})
	t.Cleanup(func() {
		if err := pool.CheckInvariant(); err != nil {
			t.Error(err)
		}
	})
	return &aggregated{pool: pool, client: kvferryv1.NewGenerationServiceClient(dial(t, addr))}
}

// generate sends req and returns the streamed text.
func generate(ctx context.Context, c kvferryv1.GenerationServiceClient, req *kvferryv1.GenerateRequest) (string, error) {
	st, err := c.Generate(ctx, req)
	if err != nil {
		return "", err
	}
	var b strings.Builder
	for {
		m, err := st.Recv()
		if errors.Is(err, io.EOF) {
			return b.String(), nil
		}
		if err != nil {
			return b.String(), err
		}
		b.WriteString(m.GetText())
	}
}

func (a *aggregated) waitIdle(t *testing.T) {
	t.Helper()
	waitFree(t, a.pool)
}

func prefillHere(prompt string, s *kvferryv1.SamplingParams) *kvferryv1.GenerateRequest {
	return &kvferryv1.GenerateRequest{Ticket: ticket.New(ticket.NewID()), PromptTokens: executor.Tokenize(prompt), Sampling: s, Prefill: true}
}

// The aggregated path (prefill and decode in one server, no transfer)
// answers what the disaggregated pair answers: the reference, token for
// token, concurrently and with prompts longer than one prefill chunk.
func TestAggregatedMatchesReference(t *testing.T) {
	a := newAggregated(t, 64, executor.Timing{})
	spec, _ := executor.Preset("tiny")
	prompts := []string{"the river", strings.Repeat("the quiet harbour ", 100), "a lantern on the hill", strings.Repeat("wind ", 150)}
	errs := make(chan error, len(prompts))
	for i, prompt := range prompts {
		go func() {
			s := &kvferryv1.SamplingParams{MaxTokens: 24, Seed: uint64(11 + i), Temperature: 1, TopP: 1}
			got, err := generate(context.Background(), a.client, prefillHere(prompt, s))
			if want := executor.Reference(spec, prompt, plainSampling(s)).Text; err == nil && got != want {
				err = fmt.Errorf("prompt %d: got %q, reference %q", i, got, want)
			}
			errs <- err
		}()
	}
	for range prompts {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	a.waitIdle(t)
}

func TestAggregatedRejects(t *testing.T) {
	s := &kvferryv1.SamplingParams{MaxTokens: 4}
	t.Run("server not aggregated", func(t *testing.T) {
		p := newPair(t, "tiny", 8, executor.Timing{})
		if _, err := generate(context.Background(), p.genClient, prefillHere("the river", s)); status.Code(err) != codes.FailedPrecondition {
			t.Fatalf("err %v, want FailedPrecondition", err)
		}
		p.waitIdle(t)
	})
	a := newAggregated(t, 4, executor.Timing{})
	for _, tc := range []struct {
		name   string
		req    *kvferryv1.GenerateRequest
		mutate func(*kvferryv1.GenerateRequest)
		code   codes.Code
	}{
		{"with an advertisement", prefillHere("the river", s), func(r *kvferryv1.GenerateRequest) {
			r.Advertisement = &kvferryv1.KVAdvertisement{Ticket: r.GetTicket(), BlockCount: 1}
		}, codes.InvalidArgument},
		{"with a first token", prefillHere("the river", s), func(r *kvferryv1.GenerateRequest) { r.FirstToken = 7 }, codes.InvalidArgument},
		{"pool exhausted", prefillHere(strings.Repeat("the ", 80), s), nil, codes.ResourceExhausted},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.mutate != nil {
				tc.mutate(tc.req)
			}
			if _, err := generate(context.Background(), a.client, tc.req); status.Code(err) != tc.code {
				t.Fatalf("err %v, want %s", err, tc.code)
			}
			a.waitIdle(t)
		})
	}
}

// A cancel while the server prefills, and one while it decodes, each end
// the request with every block back in the pool.
func TestAggregatedCancel(t *testing.T) {
	s := &kvferryv1.SamplingParams{MaxTokens: 100}
	t.Run("prefilling", func(t *testing.T) {
		a := newAggregated(t, 64, executor.Timing{PrefillTokensPerSecond: 1}) // prefill waits for the cancel
		ctx, cancel := context.WithCancel(context.Background())
		req := prefillHere(strings.Repeat("the river ", 20), s)
		st, err := a.client.Generate(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		// The request holds its blocks once it is prefilling.
		deadline := time.After(shouldHappen)
		for a.pool.Counts().Free == a.pool.Capacity() {
			select {
			case <-deadline:
				t.Fatal("the request never took its blocks")
			case <-time.After(time.Millisecond):
			}
		}
		resp, err := a.client.Cancel(context.Background(), &kvferryv1.GenerationServiceCancelRequest{Ticket: req.GetTicket()})
		if err != nil {
			t.Fatal(err)
		}
		if resp.GetOutcome() != kvferryv1.CancelOutcome_CANCEL_OUTCOME_CANCELLED_BEFORE_ADVERTISE {
			t.Fatalf("outcome %v, want CANCELLED_BEFORE_ADVERTISE", resp.GetOutcome())
		}
		if _, err := st.Recv(); status.Code(err) != codes.Canceled {
			t.Fatalf("stream: %v, want Canceled", err)
		}
		cancel()
		a.waitIdle(t)
	})
	t.Run("decoding", func(t *testing.T) {
		a := newAggregated(t, 64, executor.Timing{DecodeStepTime: time.Hour}) // decode waits for the cancel
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		st, err := a.client.Generate(ctx, prefillHere(strings.Repeat("the river ", 20), s))
		if err != nil {
			t.Fatal(err)
		}
		if m, err := st.Recv(); err != nil || len(m.GetTokens()) != 1 {
			t.Fatalf("first message %v, %v: want the prefill's token", m, err)
		}
		cancel() // the client goes away mid-decode
		a.waitIdle(t)
	})
}

// plainSampling converts sampling parameters that carry no schema.
func plainSampling(p *kvferryv1.SamplingParams) executor.Sampling {
	s, err := executor.ToSampling(p)
	if err != nil {
		panic(err)
	}
	return s
}
