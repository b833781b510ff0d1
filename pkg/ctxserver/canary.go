package ctxserver

import (
	"context"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kvferry/kvferry/pkg/ticket"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

// maxCanaries bounds the canary tickets remembered at once: a generation
// server runs one canary per context server at a time, so this is far
// above a fleet's size; beyond it a canary is refused (RESOURCE_EXHAUSTED).
const maxCanaries = 256

// canaries remembers the tickets Canary started, so that ReleaseCanary —
// which generation servers may call — frees nothing else. An entry is
// forgotten when released or after the handoff lease, when the request's
// lease has freed its blocks anyway.
type canaries struct {
	until map[string]time.Time // request id → when it is forgotten
}

// startLocked remembers id; false when maxCanaries are remembered.
func (c *canaries) startLocked(id string, now time.Time, lease time.Duration) bool {
	if c.until == nil {
		c.until = map[string]time.Time{}
	}
	for k, t := range c.until {
		if now.After(t) {
			delete(c.until, k)
		}
	}
	if len(c.until) >= maxCanaries {
		return false
	}
	c.until[id] = now.Add(lease)
	return true
}

// endLocked forgets id and reports whether Canary had started it.
func (c *canaries) endLocked(id string) bool {
	_, ok := c.until[id]
	delete(c.until, id)
	return ok
}

// Canary implements TransferService: a prefill of this server's canary
// prompt (one block), for the generation server's pair canary.
func (s *Server) Canary(ctx context.Context, req *kvferryv1.CanaryRequest) (*kvferryv1.CanaryResponse, error) {
	if err := ticket.Validate(req.GetTicket()); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	s.mu.Lock()
	ok := s.canaries.startLocked(req.GetTicket().GetRequestId(), time.Now(), s.cfg.HandoffLease)
	s.mu.Unlock()
	if !ok {
		return nil, status.Error(codes.ResourceExhausted, "too many canaries in flight")
	}
	pre, err := s.Prefill(ctx, &kvferryv1.PrefillRequest{Ticket: req.GetTicket(), PromptTokens: s.canaryPrompt, Sampling: &kvferryv1.SamplingParams{MaxTokens: 1}})
	if err != nil {
		s.mu.Lock()
		s.canaries.endLocked(req.GetTicket().GetRequestId())
		s.mu.Unlock()
		return nil, err
	}
	return &kvferryv1.CanaryResponse{PromptTokens: s.canaryPrompt, FirstToken: pre.GetFirstToken(), Advertisement: pre.GetAdvertisement()}, nil
}

// ReleaseCanary implements TransferService: Release, for canary tickets
// only.
func (s *Server) ReleaseCanary(ctx context.Context, req *kvferryv1.ReleaseCanaryRequest) (*kvferryv1.ReleaseCanaryResponse, error) {
	if err := ticket.Validate(req.GetTicket()); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	s.mu.Lock()
	ok := s.canaries.endLocked(req.GetTicket().GetRequestId())
	s.mu.Unlock()
	if !ok {
		return &kvferryv1.ReleaseCanaryResponse{Released: false}, nil
	}
	resp, err := s.Release(ctx, &kvferryv1.ReleaseRequest{Ticket: req.GetTicket()})
	if err != nil {
		return nil, err
	}
	return &kvferryv1.ReleaseCanaryResponse{Released: resp.GetReleased()}, nil
}
