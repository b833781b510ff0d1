package genserver

import (
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/pkg/kvtransfer"
	"github.com/kvferry/kvferry/pkg/ticket"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

// FuzzGenerateRequest runs the checks a GenerateRequest passes before any
// block is allocated on any request a peer could encode: nothing panics,
// and what passes is consistent (the advertisement is the request's, its
// blocks fit the prompt, one checksum each, the protocol and layout ours).
func FuzzGenerateRequest(f *testing.F) {
	spec, _ := executor.Preset("tiny")
	tk := ticket.New(ticket.NewID())
	good, _ := proto.Marshal(&kvferryv1.GenerateRequest{Ticket: tk, PromptTokens: []uint32{1, 2, 3}, Sampling: &kvferryv1.SamplingParams{MaxTokens: 4},
		Advertisement: &kvferryv1.KVAdvertisement{Ticket: tk, TransferEndpoint: "127.0.0.1:1", BlockCount: 1, BlockChecksums: []uint64{1},
			Layout: spec.Layout(), ProtocolVersion: kvtransfer.ProtocolVersion, Transport: kvtransfer.TransportTCP}})
	f.Add(good)
	s := &Server{spec: spec, cfg: Config{Transport: kvtransfer.TransportTCP}}
	f.Fuzz(func(t *testing.T, b []byte) {
		var req kvferryv1.GenerateRequest
		if proto.Unmarshal(b, &req) != nil {
			return
		}
		if s.validate(&req) != nil || s.negotiate(req.GetAdvertisement()) != nil {
			return
		}
		adv := req.GetAdvertisement()
		switch {
		case ticket.Validate(req.GetTicket()) != nil, !proto.Equal(adv.GetTicket(), req.GetTicket()):
			t.Fatal("passed with a bad ticket")
		case int(adv.GetBlockCount()) != spec.BlocksFor(len(req.GetPromptTokens())), len(adv.GetBlockChecksums()) != int(adv.GetBlockCount()):
			t.Fatal("passed with an advertisement that does not fit the prompt")
		case len(req.GetPromptTokens())+int(req.GetSampling().GetMaxTokens()) > spec.MaxContextTokens:
			t.Fatal("passed a prompt beyond the context")
		case adv.GetProtocolVersion() != kvtransfer.ProtocolVersion:
			t.Fatal("passed another protocol version")
		}
	})
}
