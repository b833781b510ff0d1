package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"testing"

	"google.golang.org/grpc"

	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

// BenchmarkGRPCHopFloor: the floor of any gRPC router, on this machine.
// The same call graph as BenchmarkRouterOverhead's — Prefill to a context
// server, Generate to a generation server that opens a Transfer stream
// back to the context server, two messages out — with servers that do
// nothing else, and a proxy that only relays. Its router ÷ direct is what
// an extra gRPC hop costs when nothing but gRPC runs.
func BenchmarkGRPCHopFloor(b *testing.B) {
	ctxAddr := serveBench(b, func(s *grpc.Server) {
		kvferryv1.RegisterContextServiceServer(s, floorCtx{})
		kvferryv1.RegisterTransferServiceServer(s, floorCtx{})
	})
	gen := floorGen{ctx: kvferryv1.NewTransferServiceClient(dial(b, ctxAddr))}
	genAddr := serveBench(b, func(s *grpc.Server) { kvferryv1.RegisterGenerationServiceServer(s, gen) })
	cc := kvferryv1.NewContextServiceClient(dial(b, ctxAddr))
	gc := kvferryv1.NewGenerationServiceClient(dial(b, genAddr))
	direct := func(ctx context.Context, relay func(*kvferryv1.GenerateResponse) error) error {
		if _, err := cc.Prefill(ctx, &kvferryv1.PrefillRequest{}); err != nil {
			return err
		}
		st, err := gc.Generate(ctx, &kvferryv1.GenerateRequest{})
		if err != nil {
			return err
		}
		for {
			m, err := st.Recv()
			if errors.Is(err, io.EOF) {
				return nil
			}
			if err != nil {
				return err
			}
			if err := relay(m); err != nil {
				return err
			}
		}
	}
	proxyAddr := serveBench(b, func(s *grpc.Server) { kvferryv1.RegisterRouterServiceServer(s, floorProxy{direct: direct}) })
	rc := kvferryv1.NewRouterServiceClient(dial(b, proxyAddr))
	paths := map[string]func(context.Context) error{
		"direct": func(ctx context.Context) error {
			return direct(ctx, func(*kvferryv1.GenerateResponse) error { return nil })
		},
		"router": func(ctx context.Context) error {
			st, err := rc.Generate(ctx, &kvferryv1.RouterServiceGenerateRequest{})
			if err != nil {
				return err
			}
			return drain(st.Recv)
		},
	}
	for _, conc := range []int{1, 64} {
		b.Run(fmt.Sprintf("pairs/conc=%d", conc), func(b *testing.B) { pairs(b, paths, conc, 400) })
	}
}

func serveBench(b *testing.B, register func(*grpc.Server)) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	s := grpc.NewServer()
	register(s)
	done := make(chan struct{})
	go func() { defer close(done); _ = s.Serve(ln) }()
	b.Cleanup(func() { s.Stop(); <-done })
	return ln.Addr().String()
}

// floorCtx answers Prefill at once and a Transfer with one COMPLETED.
type floorCtx struct {
	kvferryv1.UnimplementedContextServiceServer
	kvferryv1.UnimplementedTransferServiceServer
}

func (floorCtx) Prefill(context.Context, *kvferryv1.PrefillRequest) (*kvferryv1.PrefillResponse, error) {
	return &kvferryv1.PrefillResponse{FirstToken: 1}, nil
}

func (floorCtx) Transfer(_ *kvferryv1.TransferRequest, st kvferryv1.TransferService_TransferServer) error {
	return st.Send(&kvferryv1.TransferResponse{Event: kvferryv1.TransferEvent_TRANSFER_EVENT_COMPLETED})
}

// floorGen pulls the "KV" (a Transfer stream) and answers in two messages.
type floorGen struct {
	kvferryv1.UnimplementedGenerationServiceServer
	ctx kvferryv1.TransferServiceClient
}

func (g floorGen) Generate(_ *kvferryv1.GenerateRequest, st kvferryv1.GenerationService_GenerateServer) error {
	t, err := g.ctx.Transfer(st.Context(), &kvferryv1.TransferRequest{})
	if err != nil {
		return err
	}
	if err := drain(t.Recv); err != nil {
		return err
	}
	if err := st.Send(&kvferryv1.GenerateResponse{Tokens: []uint32{1}, Text: "a", KvReady: true}); err != nil {
		return err
	}
	return st.Send(&kvferryv1.GenerateResponse{Tokens: []uint32{2, 3, 4}, Text: " b c d", FinishReason: kvferryv1.FinishReason_FINISH_REASON_LENGTH})
}

// floorProxy relays, and does nothing else.
type floorProxy struct {
	kvferryv1.UnimplementedRouterServiceServer
	direct func(context.Context, func(*kvferryv1.GenerateResponse) error) error
}

func (p floorProxy) Generate(_ *kvferryv1.RouterServiceGenerateRequest, st kvferryv1.RouterService_GenerateServer) error {
	return p.direct(st.Context(), func(m *kvferryv1.GenerateResponse) error {
		return st.Send(&kvferryv1.RouterServiceGenerateResponse{Text: m.GetText(), Tokens: m.GetTokens(), FinishReason: m.GetFinishReason()})
	})
}
