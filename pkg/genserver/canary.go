package genserver

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/kvferry/kvferry/pkg/routine"
	"github.com/kvferry/kvferry/pkg/ticket"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

// The pair canary proves the data path, which no probe of one process can:
// periodically the generation server pulls a one-block KV from every
// context server it talked to recently, through the real transport, and
// verifies its checksum. Failures feed readiness, never liveness.
const (
	// canaryPeerTTL: a context server not seen in a request for this long
	// is no longer probed.
	canaryPeerTTL = 5 * time.Minute
	// canaryFailThreshold: consecutive failures before a peer counts as
	// failing; one lost canary (a restart, a blip) must not flap readiness.
	canaryFailThreshold = 2
	// canaryTimeout bounds one canary (prefill, transfer, verify).
	canaryTimeout = 5 * time.Second
)

type canaryPeer struct {
	seen     time.Time
	last     *kvferryv1.CanaryPeer
	failures uint64
}

// MaxContextServers bounds the context servers a generation server
// remembers: those its canary probes, and its connections (the server's
// connpool.Cache is bounded by it). Far above a fleet's size, so only a
// flood of made-up endpoints reaches it.
const MaxContextServers = 128

type canary struct {
	mu    sync.Mutex
	peers map[string]*canaryPeer
}

// notePeer records that a request used the context server at endpoint.
func (c *canary) notePeer(endpoint string, now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if p, ok := c.peers[endpoint]; ok {
		p.seen = now
		return
	}
	if len(c.peers) >= MaxContextServers {
		return // bounded: a new peer waits for a stale one to be forgotten
	}
	c.peers[endpoint] = &canaryPeer{seen: now}
}

// due returns the peers to probe and forgets stale ones.
func (c *canary) due(now time.Time) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
	for ep, p := range c.peers {
		if now.Sub(p.seen) > canaryPeerTTL {
			delete(c.peers, ep)
			continue
		}
		out = append(out, ep)
	}
	sort.Strings(out)
	return out
}

func (c *canary) record(endpoint string, now time.Time, d time.Duration, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	p, ok := c.peers[endpoint]
	if !ok {
		return
	}
	if err == nil {
		p.failures = 0
	} else {
		p.failures++
	}
	p.last = &kvferryv1.CanaryPeer{Endpoint: endpoint, Ok: err == nil, LastUnixNanos: now.UnixNano(), ConsecutiveFailures: p.failures, DurationSeconds: d.Seconds()}
	if err != nil {
		p.last.Error = err.Error()
	}
}

// CanaryStatus is the pair canary's state for health: failing when every
// recently seen peer has failed canaryFailThreshold times in a row.
func (s *Server) CanaryStatus() *kvferryv1.CanaryStatus {
	c := &s.canary
	c.mu.Lock()
	defer c.mu.Unlock()
	st := &kvferryv1.CanaryStatus{Enabled: s.cfg.CanaryInterval > 0}
	failing := 0
	for _, p := range c.peers {
		if p.last == nil {
			continue
		}
		st.Peers = append(st.Peers, p.last)
		if p.failures >= canaryFailThreshold {
			failing++
		}
	}
	sort.Slice(st.Peers, func(i, j int) bool { return st.Peers[i].GetEndpoint() < st.Peers[j].GetEndpoint() })
	st.Failing = failing > 0 && failing == len(st.Peers)
	return st
}

// RunCanary probes the recent peers every CanaryInterval until ctx is done.
func (s *Server) RunCanary(ctx context.Context) {
	if s.cfg.CanaryInterval <= 0 {
		return
	}
	routine.Every(ctx, s.cfg.CanaryInterval, func(now time.Time) { s.CanaryRound(ctx, now) })
}

// CanaryRound probes every recent peer once.
func (s *Server) CanaryRound(ctx context.Context, now time.Time) {
	for _, ep := range s.canary.due(now) {
		start := time.Now()
		err := s.probe(ctx, ep)
		if ctx.Err() != nil {
			return // shutting down: not the peer's failure
		}
		s.canary.record(ep, time.Now(), time.Since(start), err)
		result := "ok"
		if err != nil {
			result = "failed"
			s.lg.Warn("pair canary failed", zap.String("peer", ep), zap.Error(err))
		}
		s.cfg.Canaries.RecordCanary(result, time.Since(start))
	}
}

// probe pulls one block from the context server at endpoint: Prefill of a
// fixed prompt, the real transfer into our blocks, checksum verification.
func (s *Server) probe(ctx context.Context, endpoint string) error {
	ctx, cancel := context.WithTimeout(ctx, canaryTimeout)
	defer cancel()
	cc, err := s.cfg.Conns.Get(endpoint)
	if err != nil {
		return err
	}
	// TransferService, not ContextService: with mTLS a generation server
	// may call only the former (ContextService is the router's).
	client := kvferryv1.NewTransferServiceClient(cc)
	tk := ticket.New(ticket.NewID())
	// release frees the probe's blocks on the context server, even when
	// ctx is done, within its own canary timeout.
	release := func() {
		rctx, rcancel := context.WithTimeout(context.WithoutCancel(ctx), canaryTimeout)
		defer rcancel()
		_, _ = client.ReleaseCanary(rctx, &kvferryv1.ReleaseCanaryRequest{Ticket: tk})
	}
	sampling := &kvferryv1.SamplingParams{MaxTokens: 1}
	pre, err := client.Canary(ctx, &kvferryv1.CanaryRequest{Ticket: tk})
	if err != nil {
		release() // a prefill that finished after our deadline must not wait for its lease
		return fmt.Errorf("prefill: %w", err)
	}
	if !slices.Equal(pre.GetPromptTokens(), s.canaryPrompt) {
		release()
		return errors.New("prefill: the context server's canary prompt differs from ours (another model or vocabulary)")
	}
	req := &kvferryv1.GenerateRequest{Ticket: tk, PromptTokens: s.canaryPrompt, FirstToken: pre.GetFirstToken(), Sampling: sampling, Advertisement: pre.GetAdvertisement()}
	if err := errors.Join(s.validate(req), s.negotiate(req.GetAdvertisement())); err != nil {
		release()
		return err
	}
	blocks, err := s.cfg.Pool.Allocate(ctx, int(pre.GetAdvertisement().GetBlockCount()))
	if err != nil {
		release()
		return fmt.Errorf("allocate: %w", err)
	}
	r := &request{cancel: cancel, done: make(chan struct{})} // not in the table: no ticket of a client's
	r.Hold()
	defer func() {
		if err := s.cfg.Pool.Release(blocks); err != nil {
			s.lg.Error("release canary blocks", zap.Error(err))
		}
		s.dropHold(r)
	}()
	mem := make([][]byte, len(blocks))
	for i, b := range blocks {
		mem[i] = s.cfg.Pool.Bytes(b)
	}
	// receive verifies every block's checksum on receipt.
	seqs, err := s.receive(ctx, req, r, blocks, mem)
	if err != nil {
		release()
		return fmt.Errorf("transfer: %w", err)
	}
	for _, sq := range seqs {
		sq.Close() // the engine imported the KV; nothing decodes it
	}
	return nil
}
