package ctxserver

import (
	"context"
	"net"
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
	"github.com/kvferry/kvferry/internal/poll"
	"github.com/kvferry/kvferry/pkg/blockpool"
	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/pkg/kvtransfer"
	"github.com/kvferry/kvferry/pkg/kvtransfer/fault"
	"github.com/kvferry/kvferry/pkg/kvtransfer/tcp"
	"github.com/kvferry/kvferry/pkg/metrics"
	"github.com/kvferry/kvferry/pkg/sched"
	"github.com/kvferry/kvferry/pkg/ticket"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

func TestMain(m *testing.M) { leakcheck.VerifyTestMain(m) }

type fixture struct {
	srv    *Server
	pool   *blockpool.Pool
	spec   executor.ModelSpec
	client kvferryv1.TransferServiceClient
}

// newFixture serves the context server's TransferService on a real
// loopback gRPC server.
func newFixture(t *testing.T, blocks int) *fixture { return newFixtureReuse(t, blocks, false) }

func newFixtureReuse(t *testing.T, blocks int, reuse bool) *fixture {
	return newFixtureModel(t, "tiny", blocks, reuse)
}

func newFixtureModel(t *testing.T, model string, blocks int, reuse bool) *fixture {
	t.Helper()
	spec, _ := executor.Preset(model)
	pool, err := blockpool.New(blocks, spec.BlockBytes())
	if err != nil {
		t.Fatal(err)
	}
	sender := tcp.NewWriter(0)
	t.Cleanup(sender.Close)
	reg := prometheus.NewRegistry()
	srv := New(Config{
		Engine: executor.NewSynthetic(spec, executor.Timing{}), Pool: pool, Writer: sender,
		TransferEndpoint: "unused", HandoffLease: 30 * time.Second, TransferDeadline: 10 * time.Second, PrefixReuse: reuse,
		Admission: sched.NewAdmission(pool, 16, nil),
		Transfers: metrics.NewTransfer(reg), Cancels: metrics.NewCancel(reg), Logger: zap.NewNop(),
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	kvferryv1.RegisterTransferServiceServer(gs, srv)
	go func() { _ = gs.Serve(ln) }()
	t.Cleanup(gs.Stop)
	cc, err := grpc.NewClient(ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	t.Cleanup(func() {
		if err := pool.CheckInvariant(); err != nil {
			t.Error(err)
		}
	})
	return &fixture{srv: srv, pool: pool, spec: spec, client: kvferryv1.NewTransferServiceClient(cc)}
}

func (f *fixture) prefill(t *testing.T, tk *kvferryv1.Ticket, words int) *kvferryv1.PrefillResponse {
	t.Helper()
	prompt := make([]uint32, words)
	for i := range prompt {
		prompt[i] = executor.Tokenize("river")[0]
	}
	resp, err := f.srv.Prefill(context.Background(), &kvferryv1.PrefillRequest{Ticket: tk, PromptTokens: prompt, Sampling: &kvferryv1.SamplingParams{MaxTokens: 4}})
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

func (f *fixture) counts() blockpool.Counts { return f.pool.Counts() }

func TestPrefillIdempotentAndStale(t *testing.T) {
	f := newFixture(t, 16)
	id := ticket.NewID()
	first := f.prefill(t, &kvferryv1.Ticket{RequestId: id, Attempt: 2}, 40)
	again := f.prefill(t, &kvferryv1.Ticket{RequestId: id, Attempt: 2}, 40)
	if again.GetFirstToken() != first.GetFirstToken() || f.counts().Owned != 3 {
		t.Fatalf("duplicate prefill was not a no-op: owned %d", f.counts().Owned)
	}
	_, err := f.srv.Prefill(context.Background(), &kvferryv1.PrefillRequest{Ticket: &kvferryv1.Ticket{RequestId: id, Attempt: 1}, PromptTokens: []uint32{300}})
	if status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("stale attempt: %v, want FailedPrecondition", err)
	}
	// A newer attempt supersedes: the old blocks go, the new ones come.
	f.prefill(t, &kvferryv1.Ticket{RequestId: id, Attempt: 3}, 10)
	if got := f.counts().Owned; got != 1 {
		t.Fatalf("owned %d after newer attempt, want 1", got)
	}
}

// A duplicate of a ticket must be the same request: another prompt on
// the same ticket and attempt is ALREADY_EXISTS, never answered from the
// first one's prefill, and nothing more is held.
func TestDuplicateTicketOtherPrompt(t *testing.T) {
	f := newFixture(t, 16)
	tk := &kvferryv1.Ticket{RequestId: ticket.NewID(), Attempt: 1}
	f.prefill(t, tk, 40)
	owned := f.counts().Owned
	other := executor.Tokenize("the quiet harbour")
	_, err := f.srv.Prefill(context.Background(), &kvferryv1.PrefillRequest{Ticket: tk, PromptTokens: other, Sampling: &kvferryv1.SamplingParams{MaxTokens: 4}})
	if status.Code(err) != codes.AlreadyExists {
		t.Fatalf("another prompt on the same ticket: %v, want AlreadyExists", err)
	}
	sameButSampling := make([]uint32, 40)
	for i := range sameButSampling {
		sameButSampling[i] = executor.Tokenize("river")[0]
	}
	_, err = f.srv.Prefill(context.Background(), &kvferryv1.PrefillRequest{Ticket: tk, PromptTokens: sameButSampling, Sampling: &kvferryv1.SamplingParams{MaxTokens: 4, Seed: 9}})
	if status.Code(err) != codes.AlreadyExists {
		t.Fatalf("other sampling on the same ticket: %v, want AlreadyExists", err)
	}
	if got := f.counts().Owned; got != owned {
		t.Fatalf("owned %d after refused duplicates, want %d", got, owned)
	}
}

// A Prefill queued for blocks is cancelled by ticket with
// CANCELLED_BEFORE_ADVERTISE, holds nothing, and returns Canceled.
func TestCancelWhileWaitingForBlocks(t *testing.T) {
	f := newFixture(t, 4)
	f.prefill(t, &kvferryv1.Ticket{RequestId: ticket.NewID(), Attempt: 1}, 60) // all 4 blocks
	before := f.counts()
	tk := &kvferryv1.Ticket{RequestId: ticket.NewID(), Attempt: 1}
	errs := make(chan error, 1)
	go func() {
		_, err := f.srv.Prefill(context.Background(), &kvferryv1.PrefillRequest{Ticket: tk, PromptTokens: executor.Tokenize("the river"), Sampling: &kvferryv1.SamplingParams{MaxTokens: 4}})
		errs <- err
	}()
	tick := time.NewTicker(time.Millisecond) // polling with a deadline
	defer tick.Stop()
	deadline := time.After(30 * time.Second)
	for f.srv.cfg.Admission.Waiting() == 0 {
		select {
		case <-tick.C:
		case <-deadline:
			t.Fatal("the Prefill never queued")
		}
	}
	resp, err := f.srv.Cancel(context.Background(), &kvferryv1.ContextServiceCancelRequest{Ticket: tk})
	if err != nil || resp.GetOutcome() != kvferryv1.CancelOutcome_CANCEL_OUTCOME_CANCELLED_BEFORE_ADVERTISE || !resp.GetResourcesFreeNow() {
		t.Fatalf("cancel while queued: %v %v", resp, err)
	}
	if err := <-errs; status.Code(err) != codes.Canceled {
		t.Fatalf("queued Prefill after cancel: %v, want Canceled", err)
	}
	if f.counts() != before || f.srv.cfg.Admission.Waiting() != 0 {
		t.Fatalf("pool %+v (was %+v), %d waiting", f.counts(), before, f.srv.cfg.Admission.Waiting())
	}
}

func TestPrefillRejectsBadInput(t *testing.T) {
	f := newFixture(t, 4)
	tk := ticket.New(ticket.NewID())
	for _, tc := range []struct {
		name string
		req  *kvferryv1.PrefillRequest
		code codes.Code
	}{
		{"no ticket", &kvferryv1.PrefillRequest{PromptTokens: []uint32{300}}, codes.InvalidArgument},
		{"empty prompt", &kvferryv1.PrefillRequest{Ticket: tk}, codes.InvalidArgument},
		{"token outside vocabulary", &kvferryv1.PrefillRequest{Ticket: tk, PromptTokens: []uint32{1 << 30}}, codes.InvalidArgument},
		// A prompt no wait can fit is the caller's error (the admission queue).
		{"pool too small", &kvferryv1.PrefillRequest{Ticket: tk, PromptTokens: make([]uint32, 5*16)}, codes.InvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := f.srv.Prefill(context.Background(), tc.req)
			if status.Code(err) != tc.code {
				t.Fatalf("err %v, want %s", err, tc.code)
			}
			if f.counts().Free != 4 {
				t.Fatalf("blocks held after a rejected prefill: %+v", f.counts())
			}
		})
	}
}

func TestCancelOutcomes(t *testing.T) {
	f := newFixture(t, 16)
	unknown := ticket.New(ticket.NewID())
	resp, _ := f.srv.Cancel(context.Background(), &kvferryv1.ContextServiceCancelRequest{Ticket: unknown})
	if resp.GetOutcome() != kvferryv1.CancelOutcome_CANCEL_OUTCOME_NOT_FOUND {
		t.Fatalf("unknown: %v", resp.GetOutcome())
	}
	tk := ticket.New(ticket.NewID())
	f.prefill(t, tk, 20)
	resp, _ = f.srv.Cancel(context.Background(), &kvferryv1.ContextServiceCancelRequest{Ticket: tk})
	if resp.GetOutcome() != kvferryv1.CancelOutcome_CANCEL_OUTCOME_CANCEL_REQUESTED_IN_FLIGHT || !resp.GetResourcesFreeNow() {
		t.Fatalf("advertised: %v free %v", resp.GetOutcome(), resp.GetResourcesFreeNow())
	}
	if f.counts().Free != 16 {
		t.Fatalf("blocks held after cancel: %+v", f.counts())
	}
	resp, _ = f.srv.Cancel(context.Background(), &kvferryv1.ContextServiceCancelRequest{Ticket: tk})
	if resp.GetOutcome() != kvferryv1.CancelOutcome_CANCEL_OUTCOME_ALREADY_COMPLETE {
		t.Fatalf("second cancel: %v", resp.GetOutcome())
	}
}

func TestReleaseAndLease(t *testing.T) {
	f := newFixture(t, 16)
	tk := ticket.New(ticket.NewID())
	f.prefill(t, tk, 20)
	for i, want := range []bool{true, false} {
		resp, err := f.srv.Release(context.Background(), &kvferryv1.ReleaseRequest{Ticket: tk})
		if err != nil || resp.GetReleased() != want {
			t.Fatalf("release %d: %v %v, want %v", i, resp, err, want)
		}
	}
	if f.counts().Free != 16 {
		t.Fatalf("blocks held after release: %+v", f.counts())
	}
	tk2 := ticket.New(ticket.NewID())
	f.prefill(t, tk2, 20)
	f.srv.sweep(time.Now()) // lease not yet due
	if f.counts().Owned != 2 {
		t.Fatalf("lease expired early: %+v", f.counts())
	}
	f.srv.sweep(time.Now().Add(31 * time.Second))
	if f.counts().Free != 16 {
		t.Fatalf("blocks held after lease expiry: %+v", f.counts())
	}
}

// TestTransferNegotiation: any mismatch answers NOT_READY before a byte
// moves, and the advertised blocks stay for the router to release.
func TestTransferNegotiation(t *testing.T) {
	f := newFixture(t, 16)
	tk := ticket.New(ticket.NewID())
	f.prefill(t, tk, 20) // 2 blocks
	dest := func(n int, length uint64) []*kvferryv1.BlockDescriptor {
		out := make([]*kvferryv1.BlockDescriptor, n)
		for i := range out {
			out[i] = &kvferryv1.BlockDescriptor{Index: uint32(i), Length: length}
		}
		return out
	}
	bs := uint64(f.spec.BlockBytes())
	good := func() *kvferryv1.TransferRequest {
		return &kvferryv1.TransferRequest{Ticket: tk, SessionId: 1, ProtocolVersion: kvtransfer.ProtocolVersion, Layout: f.spec.Layout(),
			Transport: kvtransfer.TransportTCP, DataEndpoint: "127.0.0.1:1", Destinations: dest(2, bs)}
	}
	other, _ := executor.Preset("llama3-8b")
	for _, tc := range []struct {
		name   string
		mutate func(*kvferryv1.TransferRequest)
	}{
		{"unknown ticket", func(r *kvferryv1.TransferRequest) { r.Ticket = ticket.New(ticket.NewID()) }},
		{"stale attempt", func(r *kvferryv1.TransferRequest) {
			r.Ticket = &kvferryv1.Ticket{RequestId: tk.GetRequestId(), Attempt: 2}
		}},
		{"protocol", func(r *kvferryv1.TransferRequest) { r.ProtocolVersion = 99 }},
		{"transport", func(r *kvferryv1.TransferRequest) { r.Transport = "ucx" }},
		{"layout", func(r *kvferryv1.TransferRequest) { r.Layout = other.Layout() }},
		{"block count", func(r *kvferryv1.TransferRequest) { r.Destinations = dest(3, bs) }},
		{"block length", func(r *kvferryv1.TransferRequest) { r.Destinations = dest(2, bs+1) }},
		{"no endpoint", func(r *kvferryv1.TransferRequest) { r.DataEndpoint = "" }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req := good()
			tc.mutate(req)
			st, err := f.client.Transfer(context.Background(), req)
			if err != nil {
				t.Fatal(err)
			}
			m, err := st.Recv()
			if err != nil || m.GetEvent() != kvferryv1.TransferEvent_TRANSFER_EVENT_NOT_READY || m.GetReason() == "" {
				t.Fatalf("got %v %v, want NOT_READY with a reason", m, err)
			}
			if c := f.counts(); c.Owned != 2 || c.InFlight != 0 {
				t.Fatalf("blocks moved on NOT_READY: %+v", c)
			}
		})
	}
}

// TestTransferToDeadPeerFails: the data endpoint refuses; the sender answers
// FAILED, unpins, and the blocks stay advertised (not leaked, not freed
// behind the router's back).
func TestTransferToDeadPeerFails(t *testing.T) {
	f := newFixture(t, 16)
	tk := ticket.New(ticket.NewID())
	f.prefill(t, tk, 20)
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := ln.Addr().String()
	_ = ln.Close()
	st, err := f.client.Transfer(context.Background(), &kvferryv1.TransferRequest{Ticket: tk, SessionId: 5, ProtocolVersion: kvtransfer.ProtocolVersion,
		Layout: f.spec.Layout(), Transport: kvtransfer.TransportTCP, DataEndpoint: dead,
		Destinations: []*kvferryv1.BlockDescriptor{{Length: uint64(f.spec.BlockBytes())}, {Length: uint64(f.spec.BlockBytes())}}})
	if err != nil {
		t.Fatal(err)
	}
	var events []kvferryv1.TransferEvent
	for {
		m, err := st.Recv()
		if err != nil {
			break
		}
		events = append(events, m.GetEvent())
	}
	if len(events) != 2 || events[0] != kvferryv1.TransferEvent_TRANSFER_EVENT_READY || events[1] != kvferryv1.TransferEvent_TRANSFER_EVENT_FAILED {
		t.Fatalf("events %v, want READY then FAILED", events)
	}
	if c := f.counts(); c.Owned != 2 || c.InFlight != 0 {
		t.Fatalf("after failed push: %+v", c)
	}
	if err := f.srv.Drain(context.Background()); err != nil {
		t.Fatal(err)
	}
	if c := f.counts(); c.Free != 16 {
		t.Fatalf("drain left blocks held: %+v", c)
	}
}

// TestPrefixHitComparesTokens: a cache entry whose recorded tokens differ
// from the prompt's (what a key collision would look like) is not served:
// the prompt is computed afresh, and every block is accounted for.
func TestPrefixHitComparesTokens(t *testing.T) {
	f := newFixtureReuse(t, 8, true)
	a := ticket.New(ticket.NewID())
	first := f.prefill(t, a, 40) // 2 full blocks + 1 partial
	f.srv.mu.Lock()
	planted := 0
	for id, toks := range f.srv.cachedTokens {
		if toks != nil {
			f.srv.cachedTokens[id] = append([]uint32{toks[0] + 1}, toks[1:]...) // another prompt's block
			planted++
		}
	}
	f.srv.mu.Unlock()
	if planted != 2 {
		t.Fatalf("%d blocks recorded in the cache, want 2", planted)
	}
	b := ticket.New(ticket.NewID())
	second := f.prefill(t, b, 40)
	if second.GetReusedBlocks() != 0 || second.GetFirstToken() != first.GetFirstToken() {
		t.Fatalf("a hit with other tokens reused %d blocks (first token %d vs %d)", second.GetReusedBlocks(), second.GetFirstToken(), first.GetFirstToken())
	}
	if c := f.counts(); c.Owned != 6 {
		t.Fatalf("two requests of 3 blocks each, none shared: %+v", c)
	}
}

// TestPrefixReuse: a second prompt with the same prefix reuses its full
// blocks; after both end only the cache holds them; pool pressure evicts
// them; and a cached block being pushed is never evicted.
func TestPrefixReuse(t *testing.T) {
	f := newFixtureReuse(t, 8, true)
	a := ticket.New(ticket.NewID())
	first := f.prefill(t, a, 40) // 2 full blocks + 1 partial
	if first.GetReusedBlocks() != 0 {
		t.Fatalf("cold prefill reused %d blocks", first.GetReusedBlocks())
	}
	b := ticket.New(ticket.NewID())
	second := f.prefill(t, b, 40)
	if second.GetReusedBlocks() != 2 || second.GetFirstToken() != first.GetFirstToken() {
		t.Fatalf("warm prefill reused %d blocks, first token %d vs %d", second.GetReusedBlocks(), second.GetFirstToken(), first.GetFirstToken())
	}
	for i := range 2 {
		if first.GetAdvertisement().GetBlockChecksums()[i] != second.GetAdvertisement().GetBlockChecksums()[i] {
			t.Fatalf("reused block %d has another checksum", i)
		}
	}
	if c := f.counts(); c.Owned != 4 || f.pool.Cached() != 2 {
		t.Fatalf("two requests sharing 2 blocks: %+v cached %d", c, f.pool.Cached())
	}
	for _, tk := range []*kvferryv1.Ticket{a, b} {
		if _, err := f.srv.Release(context.Background(), &kvferryv1.ReleaseRequest{Ticket: tk}); err != nil {
			t.Fatal(err)
		}
	}
	if c := f.counts(); c.Owned != 2 || c.Free != 6 {
		t.Fatalf("idle with cache: %+v", c)
	}
	// Eight blocks needed: the cached two are evicted to make room.
	big := ticket.New(ticket.NewID())
	prompt := make([]uint32, 8*16)
	for i := range prompt {
		prompt[i] = executor.Tokenize("stone")[0]
	}
	if _, err := f.srv.Prefill(context.Background(), &kvferryv1.PrefillRequest{Ticket: big, PromptTokens: prompt, Sampling: &kvferryv1.SamplingParams{MaxTokens: 4}}); err != nil {
		t.Fatalf("prefill needing eviction: %v", err)
	}
	if f.pool.Cached() != 8 || f.counts().Owned != 8 {
		t.Fatalf("after eviction: %+v cached %d", f.counts(), f.pool.Cached())
	}
}

// stallingReceiver accepts data connections and never reads them, like a
// stopped generation server: a push into it blocks once buffers fill.
func stallingReceiver(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var conns []net.Conn
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns = append(conns, c)
		}
	}()
	t.Cleanup(func() {
		_ = ln.Close()
		<-done
		for _, c := range conns {
			_ = c.Close()
		}
	})
	return ln.Addr().String()
}

func bigPrompt(words int) []uint32 {
	out := make([]uint32, words)
	for i := range out {
		out[i] = executor.Tokenize("harbour")[0] + uint32(i%7)
	}
	return out
}

// TestCancelDuringTransferWithReuseTerminatesOnce: a request cancelled
// while its push is stuck on a stalled peer, with prefix reuse on, is
// terminated exactly once, its push stops, no block stays pinned, and only
// the reuse cache keeps blocks.
func TestCancelDuringTransferWithReuseTerminatesOnce(t *testing.T) {
	// 24 llama3-8b blocks are 48 MiB: far more than loopback socket
	// buffers hold, so the push blocks on the stalled peer.
	const tokens = 24 * 16
	f := newFixtureModel(t, "llama3-8b", 32, true)
	tk := ticket.New(ticket.NewID())
	if _, err := f.srv.Prefill(context.Background(), &kvferryv1.PrefillRequest{Ticket: tk, PromptTokens: bigPrompt(tokens), Sampling: &kvferryv1.SamplingParams{MaxTokens: 4}}); err != nil {
		t.Fatal(err)
	}
	n := f.spec.BlocksFor(tokens)
	st := f.pushToStalledPeer(t, tk, 9, n)
	eventually(t, "push under way", func() bool { return f.counts().InFlight == n })
	resp, _ := f.srv.Cancel(context.Background(), &kvferryv1.ContextServiceCancelRequest{Ticket: tk})
	if resp.GetOutcome() != kvferryv1.CancelOutcome_CANCEL_OUTCOME_CANCEL_REQUESTED_IN_FLIGHT || resp.GetResourcesFreeNow() {
		t.Fatalf("cancel in flight: %v free %v", resp.GetOutcome(), resp.GetResourcesFreeNow())
	}
	// Every waiter is answered: the transfer stream ends with FAILED.
	if m, err := st.Recv(); err != nil || m.GetEvent() != kvferryv1.TransferEvent_TRANSFER_EVENT_FAILED {
		t.Fatalf("after cancel: %v %v", m, err)
	}
	eventually(t, "blocks unpinned", func() bool { return f.counts().InFlight == 0 })
	c := f.counts()
	if c.Owned != f.pool.Cached() || c.Owned != tokens/16 {
		t.Fatalf("after cancel: %+v, cached %d: only the cache may hold blocks", c, f.pool.Cached())
	}
	again, _ := f.srv.Cancel(context.Background(), &kvferryv1.ContextServiceCancelRequest{Ticket: tk})
	if again.GetOutcome() != kvferryv1.CancelOutcome_CANCEL_OUTCOME_ALREADY_COMPLETE || !again.GetResourcesFreeNow() {
		t.Fatalf("second cancel: %v", again)
	}
}

// TestCancelWhileQueuedAnswersEveryWaiter: a prefill still running (queued
// for the transfer, nothing advertised) and a duplicate waiting on it are
// both answered by a cancel, which reports CANCELLED_BEFORE_ADVERTISE.
func TestCancelWhileQueuedAnswersEveryWaiter(t *testing.T) {
	spec, _ := executor.Preset("tiny")
	f := newFixture(t, 16)
	f.setEngine(executor.NewSynthetic(spec, executor.Timing{PrefillTokensPerSecond: 1})) // a prefill that never ends by itself
	tk := ticket.New(ticket.NewID())
	req := &kvferryv1.PrefillRequest{Ticket: tk, PromptTokens: bigPrompt(20), Sampling: &kvferryv1.SamplingParams{MaxTokens: 4}}
	errs := make(chan error, 2)
	go func() { _, err := f.srv.Prefill(context.Background(), req); errs <- err }()
	eventually(t, "prefill admitted", func() bool { return f.counts().Owned == 2 })
	go func() { _, err := f.srv.Prefill(context.Background(), req); errs <- err }()
	resp, _ := f.srv.Cancel(context.Background(), &kvferryv1.ContextServiceCancelRequest{Ticket: tk})
	if resp.GetOutcome() != kvferryv1.CancelOutcome_CANCEL_OUTCOME_CANCELLED_BEFORE_ADVERTISE {
		t.Fatalf("outcome %v", resp.GetOutcome())
	}
	for range 2 {
		select {
		case err := <-errs:
			if c := status.Code(err); c != codes.Canceled && c != codes.FailedPrecondition {
				t.Fatalf("waiter answered %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("a waiter was never answered")
		}
	}
	eventually(t, "blocks freed", func() bool { return f.counts().Free == 16 })
}

// TestDuplicateTransferIsANoOp: the same transfer request twice moves the
// blocks once; the duplicate reports the outcome.
func TestDuplicateTransferIsANoOp(t *testing.T) {
	f := newFixture(t, 16)
	tk := ticket.New(ticket.NewID())
	f.prefill(t, tk, 20)
	recv, err := tcp.Listen("127.0.0.1:0", f.spec.BlockBytes(), zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer recv.Close()
	dst := [][]byte{make([]byte, f.spec.BlockBytes()), make([]byte, f.spec.BlockBytes())}
	rs, _ := recv.Register(kvtransfer.SessionID{ID: 77}, dst, nil)
	req := &kvferryv1.TransferRequest{Ticket: tk, SessionId: 77, ProtocolVersion: kvtransfer.ProtocolVersion, Layout: f.spec.Layout(),
		Transport: kvtransfer.TransportTCP, DataEndpoint: recv.Endpoint(),
		Destinations: []*kvferryv1.BlockDescriptor{{Length: uint64(f.spec.BlockBytes())}, {Index: 1, Length: uint64(f.spec.BlockBytes())}}}
	for i := range 2 {
		st, err := f.client.Transfer(context.Background(), req)
		if err != nil {
			t.Fatal(err)
		}
		var last kvferryv1.TransferEvent
		for {
			m, err := st.Recv()
			if err != nil {
				break
			}
			last = m.GetEvent()
		}
		if last != kvferryv1.TransferEvent_TRANSFER_EVENT_COMPLETED {
			t.Fatalf("transfer %d ended with %v", i, last)
		}
	}
	<-rs.Done()
	if err := recv.Err(rs); err != nil {
		t.Fatal(err)
	}
	if got, _ := recv.Progress(rs); got != int64(2*f.spec.BlockBytes()) {
		t.Fatalf("%d bytes landed, want one copy", got)
	}
	if c := f.counts(); c.Free != 16 {
		t.Fatalf("after handoff: %+v", c)
	}
	recv.Finish(rs, func() {})
}

// setEngine swaps the server's engine (and its prefill loop) for e.
func (f *fixture) setEngine(e executor.Engine) {
	f.srv.cfg.Engine = e
	f.srv.prefiller = sched.NewPrefiller(e, 0, 0, nil)
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	poll.Until(t, 10*time.Second, time.Millisecond, what, cond)
}

// TestCancelOutcomeOrder: still queued answers CANCELLED_BEFORE_ADVERTISE
// even when the backend is unhealthy; tracked and in flight answers
// BACKEND_UNHEALTHY when it is.
func TestCancelOutcomeOrder(t *testing.T) {
	spec, _ := executor.Preset("tiny")
	f := newFixture(t, 16)
	f.srv.cfg.BackendHealthy = func() bool { return false }
	tk := ticket.New(ticket.NewID())
	f.prefill(t, tk, 20)
	resp, _ := f.srv.Cancel(context.Background(), &kvferryv1.ContextServiceCancelRequest{Ticket: tk})
	if resp.GetOutcome() != kvferryv1.CancelOutcome_CANCEL_OUTCOME_BACKEND_UNHEALTHY {
		t.Fatalf("advertised, backend unhealthy: %v", resp.GetOutcome())
	}
	f.setEngine(executor.NewSynthetic(spec, executor.Timing{PrefillTokensPerSecond: 1}))
	queued := ticket.New(ticket.NewID())
	errs := make(chan error, 1)
	go func() {
		_, err := f.srv.Prefill(context.Background(), &kvferryv1.PrefillRequest{Ticket: queued, PromptTokens: bigPrompt(20), Sampling: &kvferryv1.SamplingParams{MaxTokens: 2}})
		errs <- err
	}()
	eventually(t, "prefill admitted", func() bool { return f.counts().Owned == 2 })
	resp, _ = f.srv.Cancel(context.Background(), &kvferryv1.ContextServiceCancelRequest{Ticket: queued})
	if resp.GetOutcome() != kvferryv1.CancelOutcome_CANCEL_OUTCOME_CANCELLED_BEFORE_ADVERTISE {
		t.Fatalf("queued, backend unhealthy: %v", resp.GetOutcome())
	}
	if err := <-errs; status.Code(err) != codes.Canceled {
		t.Fatalf("prefill: %v", err)
	}
}

// TestLoseAbortAckDrill: with the lose-abort-ack fault the push still stops
// (its blocks leave IN_FLIGHT) but AbortTransfer never answers.
func TestLoseAbortAckDrill(t *testing.T) {
	const tokens = 24 * 16
	f := newFixtureModel(t, "llama3-8b", 32, false)
	var err error
	if f.srv.cfg.Fault, err = fault.Parse("lose-abort-ack", time.Now()); err != nil {
		t.Fatal(err)
	}
	tk := ticket.New(ticket.NewID())
	if _, err := f.srv.Prefill(context.Background(), &kvferryv1.PrefillRequest{Ticket: tk, PromptTokens: bigPrompt(tokens), Sampling: &kvferryv1.SamplingParams{MaxTokens: 4}}); err != nil {
		t.Fatal(err)
	}
	n := f.spec.BlocksFor(tokens)
	f.pushToStalledPeer(t, tk, 3, n)
	eventually(t, "push under way", func() bool { return f.counts().InFlight == n })
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if _, err := f.client.AbortTransfer(ctx, &kvferryv1.AbortTransferRequest{Ticket: tk, SessionId: 3}); status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("abort answered: %v", err)
	}
	eventually(t, "push stopped", func() bool { return f.counts().InFlight == 0 })
	if _, err := f.srv.Release(context.Background(), &kvferryv1.ReleaseRequest{Ticket: tk}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "blocks freed", func() bool { return f.counts().Free == 32 })
}

// pushToStalledPeer starts the transfer of tk's n blocks to a peer that
// never reads, and returns the stream once it has answered READY.
func (f *fixture) pushToStalledPeer(t *testing.T, tk *kvferryv1.Ticket, session uint64, n int) kvferryv1.TransferService_TransferClient {
	t.Helper()
	dests := make([]*kvferryv1.BlockDescriptor, n)
	for i := range dests {
		dests[i] = &kvferryv1.BlockDescriptor{Index: uint32(i), Length: uint64(f.spec.BlockBytes())}
	}
	st, err := f.client.Transfer(context.Background(), &kvferryv1.TransferRequest{Ticket: tk, SessionId: session, ProtocolVersion: kvtransfer.ProtocolVersion,
		Layout: f.spec.Layout(), Transport: kvtransfer.TransportTCP, DataEndpoint: stallingReceiver(t), Destinations: dests})
	if err != nil {
		t.Fatal(err)
	}
	if m, err := st.Recv(); err != nil || m.GetEvent() != kvferryv1.TransferEvent_TRANSFER_EVENT_READY {
		t.Fatalf("first event %v %v", m, err)
	}
	return st
}

// stubbornEngine is the synthetic engine whose prefill step runs to the
// end whatever its context says (llama.cpp within a step), once the test
// opens its gate.
type stubbornEngine struct {
	*executor.Synthetic
	entered, gate chan struct{}
}

func (e *stubbornEngine) PrefillStep(_ context.Context, batch []*executor.Prompt, counts []int) error {
	close(e.entered)
	<-e.gate
	return e.Synthetic.PrefillStep(context.Background(), batch, counts)
}

// TestPrefillWhoseCallerLeftHoldsNothing: the caller's deadline passes
// while the engine finishes the prompt anyway; the prefill answers the
// caller's error and its blocks are free at once, not after the handoff
// lease (chaos found a canary's timed-out prefill holding them 30 s).
func TestPrefillWhoseCallerLeftHoldsNothing(t *testing.T) {
	spec, _ := executor.Preset("tiny")
	pool, err := blockpool.New(8, spec.BlockBytes())
	if err != nil {
		t.Fatal(err)
	}
	eng := &stubbornEngine{Synthetic: executor.NewSynthetic(spec, executor.Timing{}), entered: make(chan struct{}), gate: make(chan struct{})}
	sender := tcp.NewWriter(0)
	defer sender.Close()
	reg := prometheus.NewRegistry()
	srv := New(Config{Engine: eng, Pool: pool, Writer: sender, TransferEndpoint: "unused", HandoffLease: time.Hour, TransferDeadline: 10 * time.Second,
		Transfers: metrics.NewTransfer(reg), Cancels: metrics.NewCancel(reg), Logger: zap.NewNop()})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := srv.Prefill(ctx, &kvferryv1.PrefillRequest{Ticket: ticket.New(ticket.NewID()), PromptTokens: executor.Tokenize("the quiet river carries light"),
			Sampling: &kvferryv1.SamplingParams{MaxTokens: 4}})
		done <- err
	}()
	<-eng.entered
	cancel() // the caller gives up while the engine runs
	close(eng.gate)
	if err := <-done; status.Code(err) != codes.Canceled {
		t.Fatalf("prefill answered %v, want CANCELED", err)
	}
	if c := pool.Counts(); c.Free != 8 {
		t.Fatalf("blocks held after the caller left: %+v", c)
	}
}

// stuckWriter is a transport stuck below us: its Write ignores its context
// and returns only when the test releases it.
type stuckWriter struct {
	entered chan context.Context
	release chan struct{}
}

func (w *stuckWriter) Name() string { return kvtransfer.TransportTCP }
func (w *stuckWriter) Close()       {}
func (w *stuckWriter) Write(ctx context.Context, _ string, _ kvtransfer.SessionID, src [][]byte, _ []kvtransfer.Desc) (int64, error) {
	w.entered <- ctx
	<-w.release
	return 0, ctx.Err()
}

// TestStuckWriterQuarantinesThenProvesOrPoisons: the push session is
// ticked like the receiver's. A writer that overstays the deadline ends
// the session TIMED_OUT in doubt: its context is cancelled and its blocks
// are quarantined, not reused while it may still read them. Its late
// return proves them quiet; a writer that never returns gets its blocks
// poisoned at the quarantine deadline.
func TestStuckWriterQuarantinesThenProvesOrPoisons(t *testing.T) {
	f := newFixture(t, 64)
	w := &stuckWriter{entered: make(chan context.Context, 1), release: make(chan struct{})}
	f.srv.cfg.Writer = w
	reg := prometheus.NewRegistry()
	f.srv.cfg.Quarantines = metrics.NewQuarantine(reg)
	push := func(tk *kvferryv1.Ticket) (context.Context, <-chan *kvferryv1.TransferResponse, int) {
		n := int(f.prefill(t, tk, 20).GetAdvertisement().GetBlockCount())
		dests := make([]*kvferryv1.BlockDescriptor, n)
		for i := range dests {
			dests[i] = &kvferryv1.BlockDescriptor{Index: uint32(i), Length: uint64(f.spec.BlockBytes())}
		}
		st, err := f.client.Transfer(context.Background(), &kvferryv1.TransferRequest{Ticket: tk, SessionId: 1, ProtocolVersion: kvtransfer.ProtocolVersion,
			Layout: f.spec.Layout(), Transport: kvtransfer.TransportTCP, DataEndpoint: "127.0.0.1:1", Destinations: dests})
		if err != nil {
			t.Fatal(err)
		}
		if m, err := st.Recv(); err != nil || m.GetEvent() != kvferryv1.TransferEvent_TRANSFER_EVENT_READY {
			t.Fatalf("first event %v %v", m, err)
		}
		last := make(chan *kvferryv1.TransferResponse, 1)
		go func() {
			m, _ := st.Recv()
			last <- m
		}()
		return <-w.entered, last, n
	}

	// A writer that returns late: quarantined, then proven quiet.
	wctx, last, n := push(ticket.New(ticket.NewID()))
	start := time.Now()
	f.srv.sweep(start.Add(10500 * time.Millisecond)) // past the writer's deadline, before the session's
	if c := f.counts(); c.InFlight != n || c.Quarantined != 0 {
		t.Fatalf("before the session's deadline: %+v", c)
	}
	f.srv.sweep(start.Add(11 * time.Second)) // TransferDeadline is 10 s, the session's 1 s past it
	if c := f.counts(); c.Quarantined != n || c.InFlight != 0 {
		t.Fatalf("after the deadline, writer still inside: %+v, want %d quarantined", c, n)
	}
	if wctx.Err() == nil {
		t.Fatal("the stuck writer's context was not cancelled")
	}
	w.release <- struct{}{}
	if m := <-last; m.GetEvent() != kvferryv1.TransferEvent_TRANSFER_EVENT_FAILED {
		t.Fatalf("last event %v", m)
	}
	if c := f.counts(); c.Quarantined != 0 || c.Poisoned != 0 || c.InFlight != 0 {
		t.Fatalf("after the writer returned: %+v", c)
	}

	// A writer that never returns: poisoned at the quarantine deadline
	// (TransferDeadline again, QuarantineDeadline unset).
	_, last, n = push(ticket.New(ticket.NewID()))
	start = time.Now()
	f.srv.sweep(start.Add(11 * time.Second))
	f.srv.sweep(start.Add(22 * time.Second)) // quarantine deadline 10 s after the end
	if c := f.counts(); c.Poisoned != n || c.Quarantined != 0 {
		t.Fatalf("past the quarantine deadline: %+v, want %d poisoned", c, n)
	}
	if got := testutil.ToFloat64(f.srv.cfg.Quarantines.QuarantinedCounter(metrics.SideSender)); got != 2 {
		t.Fatalf("sender quarantines counted %v, want 2", got)
	}
	w.release <- struct{}{} // its late return proves nothing: poisoned stays poisoned
	if m := <-last; m.GetEvent() != kvferryv1.TransferEvent_TRANSFER_EVENT_FAILED {
		t.Fatalf("last event %v", m)
	}
	if c := f.counts(); c.Poisoned != n {
		t.Fatalf("after the late return: %+v", c)
	}
}

// TestPrefixDigest: the digest lists the routing hashes of the cached
// blocks under the request's salt (what a router computes of the same
// prompt and tenant), another salt's prompt adds its own, and an evicted
// block leaves the digest.
func TestPrefixDigest(t *testing.T) {
	f := newFixtureReuse(t, 8, true)
	prompt := make([]uint32, 40) // 2 full blocks
	for i := range prompt {
		prompt[i] = executor.Tokenize("river")[0]
	}
	digest := func() map[uint64]bool {
		resp, err := f.srv.PrefixDigest(context.Background(), &kvferryv1.PrefixDigestRequest{})
		if err != nil {
			t.Fatal(err)
		}
		out := map[uint64]bool{}
		for _, h := range resp.GetBlockHashes() {
			out[h] = true
		}
		return out
	}
	prefill := func(salt string, tokens []uint32) {
		tk := ticket.New(ticket.NewID())
		if _, err := f.srv.Prefill(context.Background(), &kvferryv1.PrefillRequest{Ticket: tk, PromptTokens: tokens, Sampling: &kvferryv1.SamplingParams{MaxTokens: 4}, CacheSalt: salt}); err != nil {
			t.Fatal(err)
		}
		if _, err := f.srv.Release(context.Background(), &kvferryv1.ReleaseRequest{Ticket: tk}); err != nil {
			t.Fatal(err)
		}
	}
	prefill("tenant:a", prompt)
	want := executor.RouteHashes(f.spec, "tenant:a", prompt)
	if d := digest(); len(d) != 2 || !d[want[0]] || !d[want[1]] {
		t.Fatalf("digest %v, want the 2 routing hashes %v", d, want)
	}
	prefill("tenant:b", prompt)
	other := executor.RouteHashes(f.spec, "tenant:b", prompt)
	if d := digest(); len(d) != 4 || !d[other[0]] || other[0] == want[0] {
		t.Fatalf("digest %v after another tenant's prompt, want its own hashes %v too", d, other)
	}
	big := make([]uint32, 8*16) // needs every block: the cache is evicted
	for i := range big {
		big[i] = executor.Tokenize("stone")[0]
	}
	prefill("tenant:a", big)
	if d := digest(); d[want[0]] || d[other[0]] || len(d) != 8 {
		t.Fatalf("digest after eviction: %d hashes, evicted ones present: %v %v", len(d), d[want[0]], d[other[0]])
	}
}
