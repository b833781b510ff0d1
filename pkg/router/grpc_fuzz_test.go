package router

import (
	"math"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/kvferry/kvferry/pkg/ticket"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

// FuzzRouterGenerateRequest checks any RouterService request a client
// could encode: it is refused with INVALID_ARGUMENT or NOT_FOUND, or it
// becomes a job within every limit (tokens, context, sampling ranges, a
// minted ticket, a valid client id).
func FuzzRouterGenerateRequest(f *testing.F) {
	for _, req := range []*kvferryv1.RouterServiceGenerateRequest{
		{Model: "tiny", Prompt: "the river", Sampling: &kvferryv1.SamplingParams{MaxTokens: 8, Temperature: 0.7, TopP: 0.9}},
		{Model: "tiny", Prompt: "the river", RequestId: "client-1"},
		{Model: "tiny", Prompt: "x", Sampling: &kvferryv1.SamplingParams{Temperature: float32(math.NaN())}},
	} {
		b, _ := proto.Marshal(req)
		f.Add(b)
	}
	r := fuzzRouter()
	f.Fuzz(func(t *testing.T, b []byte) {
		var req kvferryv1.RouterServiceGenerateRequest
		if proto.Unmarshal(b, &req) != nil {
			return
		}
		job, err := r.grpcJob(&req)
		if err != nil {
			if c := status.Code(err); c != codes.InvalidArgument && c != codes.NotFound {
				t.Fatalf("refused with %v", err)
			}
			return
		}
		s := job.Sampling
		switch {
		case len(job.Prompt) == 0 || len(job.Prompt) > r.cfg.MaxPromptTokens:
			t.Fatalf("%d prompt tokens passed", len(job.Prompt))
		case len(job.Prompt)+int(s.GetMaxTokens()) > r.cfg.Model.MaxContextTokens, s.GetMaxTokens() == 0, int(s.GetMaxTokens()) > r.cfg.MaxOutputTokens:
			t.Fatalf("max_tokens %d passed with %d prompt tokens", s.GetMaxTokens(), len(job.Prompt))
		case !(s.GetTemperature() >= 0 && s.GetTemperature() <= 2), !(s.GetTopP() > 0 && s.GetTopP() <= 1):
			t.Fatalf("sampling out of range passed: %v", s)
		case ticket.ValidateID(job.ID) != nil:
			t.Fatalf("minted ticket %q invalid", job.ID)
		case job.ClientID != "" && ValidateClientID(job.ClientID) != nil:
			t.Fatalf("client id %q passed", job.ClientID)
		}
	})
}
