package router

import (
	"context"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/pkg/ticket"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

// Generate implements RouterService for gRPC clients.
func (r *Router) Generate(req *kvferryv1.RouterServiceGenerateRequest, stream kvferryv1.RouterService_GenerateServer) error {
	release, err := r.Admit()
	if err != nil {
		return status.Error(codes.ResourceExhausted, err.Error())
	}
	defer release()
	job, err := r.grpcJob(req)
	if err != nil {
		return err
	}
	job.Tenant = TenantOf(stream.Context()) // the interceptor admitted the key
	id, clientID, tokens := job.ID, job.ClientID, job.Prompt
	echo := id
	if clientID != "" {
		echo = clientID
	}
	completion := uint32(0)
	send := stream.Send
	if r.cfg.StreamWriteTimeout > 0 {
		bs := newBoundedSender(stream.Send, r.cfg.StreamWriteTimeout)
		defer bs.close()
		send = bs.send
	}
	_, err = r.Run(stream.Context(), job, func(c Chunk) error {
		completion += uint32(len(c.Tokens))
		msg := &kvferryv1.RouterServiceGenerateResponse{
			RequestId: echo, Text: c.Text, Tokens: c.Tokens, Logprobs: c.Logprobs, Index: uint32(c.Index), PromptTokens: uint32(len(tokens)), CompletionTokens: completion,
		}
		switch c.Finish {
		case executor.FinishStop:
			msg.FinishReason = kvferryv1.FinishReason_FINISH_REASON_STOP
		case executor.FinishLength:
			msg.FinishReason = kvferryv1.FinishReason_FINISH_REASON_LENGTH
		}
		return send(msg)
	})
	if err != nil {
		r.lg.Info("request failed", zap.String("request_id", id), zap.String("client_request_id", clientID), zap.Error(err))
		return status.Error(CodeOf(err), Public(err, id).Error())
	}
	return nil
}

// grpcJob checks a RouterService request as the OpenAI parser checks a
// body (model, sampling ranges, prompt size in bytes then tokens, context,
// client id) and makes its job; errors are gRPC statuses.
func (r *Router) grpcJob(req *kvferryv1.RouterServiceGenerateRequest) (Job, error) {
	if req.GetModel() != r.cfg.ServedModel {
		return Job{}, status.Errorf(codes.NotFound, "the model %q does not exist; this server serves %q", req.GetModel(), r.cfg.ServedModel)
	}
	s := &kvferryv1.SamplingParams{Temperature: 1, TopP: 1}
	if req.GetSampling() != nil {
		s = proto.Clone(req.GetSampling()).(*kvferryv1.SamplingParams)
	}
	if s.GetMaxTokens() == 0 {
		s.MaxTokens = uint32(r.cfg.DefaultMaxTokens)
	}
	if s.GetTopP() == 0 {
		s.TopP = 1 // unset in proto3: no nucleus cut
	}
	switch t, p := s.GetTemperature(), s.GetTopP(); {
	case int64(s.GetMaxTokens()) > int64(r.cfg.MaxOutputTokens):
		return Job{}, status.Errorf(codes.InvalidArgument, "max_tokens must be at most %d", r.cfg.MaxOutputTokens)
	case !(t >= 0 && t <= 2): // NaN fails too
		return Job{}, status.Errorf(codes.InvalidArgument, "temperature must be between 0 and 2, got %g", t)
	case !(p > 0 && p <= 1):
		return Job{}, status.Errorf(codes.InvalidArgument, "top_p must be in (0, 1], got %g", p)
	case int64(len(req.GetPrompt())) > r.cfg.MaxBodyBytes:
		return Job{}, status.Errorf(codes.InvalidArgument, "the prompt has %d bytes, the limit is %d", len(req.GetPrompt()), r.cfg.MaxBodyBytes)
	}
	if _, err := executor.ToSampling(s); err != nil { // the servers compile it again; a bad schema stops here
		return Job{}, status.Error(codes.InvalidArgument, err.Error())
	}
	if id := req.GetRequestId(); id != "" {
		if err := ValidateClientID(id); err != nil {
			return Job{}, status.Error(codes.InvalidArgument, err.Error())
		}
	}
	if err := r.promptBound(req.GetPrompt()); err != nil {
		return Job{}, status.Error(codes.InvalidArgument, err.Error())
	}
	tokens := r.cfg.Vocab.Encode(req.GetPrompt())
	switch {
	case len(tokens) == 0:
		return Job{}, status.Error(codes.InvalidArgument, "the prompt is empty")
	case len(tokens) > r.cfg.MaxPromptTokens:
		return Job{}, status.Errorf(codes.InvalidArgument, "the prompt has %d tokens, the limit is %d", len(tokens), r.cfg.MaxPromptTokens)
	case len(tokens)+int(s.GetMaxTokens()) > r.cfg.Model.MaxContextTokens:
		return Job{}, status.Errorf(codes.InvalidArgument, "prompt (%d tokens) plus max_tokens (%d) exceeds the context length of %d", len(tokens), s.GetMaxTokens(), r.cfg.Model.MaxContextTokens)
	}
	// The ticket is always ours; the client's request_id is correlation
	// (logs, Cancel) and is echoed in every response.
	return Job{ID: ticket.NewID(), ClientID: req.GetRequestId(), Prompt: tokens, Sampling: s}, nil
}

// Cancel implements RouterService.
func (r *Router) Cancel(ctx context.Context, req *kvferryv1.RouterServiceCancelRequest) (*kvferryv1.RouterServiceCancelResponse, error) {
	if err := ValidateClientID(req.GetRequestId()); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	found, outcomes := r.CancelByID(ctx, TenantOf(ctx), req.GetRequestId()) // the interceptor admitted the key
	// Clients see each role's outcome, not the servers' addresses or
	// their error text (both are in the router's log).
	for _, o := range outcomes {
		o.Server = ""
		if o.Error != "" {
			o.Error = "the server could not be asked"
		}
	}
	return &kvferryv1.RouterServiceCancelResponse{Found: found, Outcomes: outcomes}, nil
}

// errSendTimeout ends a request whose gRPC client stopped reading.
var errSendTimeout = &Error{Code: codes.DeadlineExceeded, Msg: "the client did not read its stream"}

// boundedSender gives each Send of a server stream a time bound, as the
// SSE path's write deadline does: grpc-go's Send blocks, without a
// deadline, while the client's flow-control window is shut. Sends run on
// one goroutine per stream; the handler waits for each up to timeout, then
// returns errSendTimeout, which cancels the request (freeing its blocks)
// and ends the stream — and with it the blocked Send, so the goroutine
// ends too.
type boundedSender struct {
	timeout time.Duration
	msgs    chan *kvferryv1.RouterServiceGenerateResponse
	// errs has room for the one result in flight: a result nobody waits
	// for any more (after a timeout) never blocks the goroutine.
	errs chan error
}

func newBoundedSender(send func(*kvferryv1.RouterServiceGenerateResponse) error, timeout time.Duration) *boundedSender {
	b := &boundedSender{timeout: timeout, msgs: make(chan *kvferryv1.RouterServiceGenerateResponse), errs: make(chan error, 1)}
	go func() {
		for m := range b.msgs {
			b.errs <- send(m)
		}
	}()
	return b
}

func (b *boundedSender) send(m *kvferryv1.RouterServiceGenerateResponse) error {
	t := time.NewTimer(b.timeout)
	defer t.Stop()
	select {
	case b.msgs <- m:
	case <-t.C:
		return errSendTimeout // the previous Send is still blocked
	}
	select {
	case err := <-b.errs:
		return err
	case <-t.C:
		return errSendTimeout
	}
}

// close ends the goroutine once its Send in flight, if any, returns.
func (b *boundedSender) close() { close(b.msgs) }
