package ctxserver

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/pkg/kvtransfer"
	"github.com/kvferry/kvferry/pkg/ticket"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

// allowedPrefillCodes are the answers a malformed or unlucky Prefill may
// get; anything else (INTERNAL, UNKNOWN, a panic) is a bug.
var allowedPrefillCodes = map[codes.Code]bool{codes.InvalidArgument: true, codes.ResourceExhausted: true, codes.AlreadyExists: true,
	codes.FailedPrecondition: true, codes.DeadlineExceeded: true}

// FuzzPrefillRequest sends any PrefillRequest a peer could encode to the
// handler: it is served or refused with a client-error code, and once the
// request is released every block is free again.
func FuzzPrefillRequest(f *testing.F) {
	good, _ := proto.Marshal(&kvferryv1.PrefillRequest{Ticket: ticket.New(ticket.NewID()), PromptTokens: []uint32{1, 2, 3}, Sampling: &kvferryv1.SamplingParams{MaxTokens: 4}})
	f.Add(good)
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		var req kvferryv1.PrefillRequest
		if proto.Unmarshal(b, &req) != nil {
			return
		}
		fx := newFixture(t, 16)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err := fx.srv.Prefill(ctx, &req)
		if err != nil {
			if !allowedPrefillCodes[status.Code(err)] {
				t.Fatalf("Prefill answered %v", err)
			}
		} else if _, err := fx.srv.Release(ctx, &kvferryv1.ReleaseRequest{Ticket: req.GetTicket()}); err != nil {
			t.Fatalf("release: %v", err)
		}
		if c := fx.counts(); c.Free != 16 {
			t.Fatalf("blocks not all free after the request: %+v", c)
		}
	})
}

// FuzzTransferRequest sends any TransferRequest for a live, advertised
// ticket over real gRPC: it is refused (NOT_READY or an error status) or
// answered; the request's blocks stay accounted for and are free once it
// is released. The data endpoint is always a closed loopback port.
func FuzzTransferRequest(f *testing.F) {
	spec, _ := executor.Preset("tiny")
	good, _ := proto.Marshal(&kvferryv1.TransferRequest{SessionId: 1, ProtocolVersion: kvtransfer.ProtocolVersion, Transport: kvtransfer.TransportTCP,
		Layout: spec.Layout(), Destinations: []*kvferryv1.BlockDescriptor{{Length: uint64(spec.BlockBytes())}}})
	f.Add(good)
	f.Fuzz(func(t *testing.T, b []byte) {
		var req kvferryv1.TransferRequest
		if proto.Unmarshal(b, &req) != nil {
			return
		}
		fx := newFixture(t, 16)
		tk := ticket.New(ticket.NewID())
		fx.prefill(t, tk, 8)
		req.Ticket, req.DataEndpoint = tk, "127.0.0.1:1"
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if st, err := fx.client.Transfer(ctx, &req); err == nil {
			for {
				if _, err := st.Recv(); err != nil {
					break
				}
			}
		}
		if _, err := fx.srv.Release(ctx, &kvferryv1.ReleaseRequest{Ticket: tk}); err != nil {
			t.Fatalf("release: %v", err)
		}
		deadline := time.Now().Add(10 * time.Second)
		for fx.counts().Free != 16 {
			if time.Now().After(deadline) {
				t.Fatalf("blocks not all free after release: %+v", fx.counts())
			}
			<-time.After(time.Millisecond) // poll with a deadline: the push may still be unwinding
		}
	})
}
