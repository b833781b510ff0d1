// Package bench measures kvferry on real processes. Run with make
// bench-router; nothing here is a pass/fail timing.
package bench

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/pkg/ticket"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
	"github.com/kvferry/kvferry/test/stack"
)

var binDir string

func TestMain(m *testing.M) {
	flag.Parse()
	if f := flag.Lookup("test.bench"); f == nil || f.Value.String() == "" {
		os.Exit(m.Run()) // no benchmark asked for (make test): build nothing
	}
	os.Exit(stack.RunWithBinaries(m, false, &binDir)) // no race detector: we measure
}

const prompt = "the quiet river carries light"

var sampling = &kvferryv1.SamplingParams{MaxTokens: 4, Temperature: 1, TopP: 1}

func dial(b *testing.B, addr string) *grpc.ClientConn {
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = cc.Close() })
	return cc
}

func drain[T any](recv func() (T, error)) error {
	for {
		if _, err := recv(); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
	}
}

// BenchmarkRouterOverhead: the same short request through the router's
// gRPC front door and directly (Prefill then Generate, as the router does),
// at concurrency 1 and 64. Reports p50 and p99 latency and requests/s; the
// router's added latency is router minus direct of the same run.
func BenchmarkRouterOverhead(b *testing.B) {
	s := stack.Up(b, binDir, stack.Options{})
	rc := kvferryv1.NewRouterServiceClient(dial(b, s.RouterGRPC))
	cc := kvferryv1.NewContextServiceClient(dial(b, s.CtxGRPC))
	gc := kvferryv1.NewGenerationServiceClient(dial(b, s.GenGRPC))
	tokens := executor.Tokenize(prompt)
	paths := map[string]func(ctx context.Context) error{
		"router": func(ctx context.Context) error {
			st, err := rc.Generate(ctx, &kvferryv1.RouterServiceGenerateRequest{Model: "tiny", Prompt: prompt, Sampling: sampling})
			if err != nil {
				return err
			}
			return drain(st.Recv)
		},
		"direct": func(ctx context.Context) error {
			tk := ticket.New(ticket.NewID())
			pre, err := cc.Prefill(ctx, &kvferryv1.PrefillRequest{Ticket: tk, PromptTokens: tokens, Sampling: sampling})
			if err != nil {
				return err
			}
			st, err := gc.Generate(ctx, &kvferryv1.GenerateRequest{Ticket: tk, PromptTokens: tokens, FirstToken: pre.GetFirstToken(), Sampling: sampling, Advertisement: pre.GetAdvertisement()})
			if err != nil {
				return err
			}
			return drain(st.Recv)
		},
	}
	for _, conc := range []int{1, 64} {
		for _, path := range []string{"direct", "router"} {
			b.Run(fmt.Sprintf("%s/conc=%d", path, conc), func(b *testing.B) {
				call := paths[path]
				lat := make([]time.Duration, 0, b.N)
				var mu sync.Mutex
				next := make(chan struct{}, b.N)
				for range b.N {
					next <- struct{}{}
				}
				close(next)
				start := time.Now()
				var wg sync.WaitGroup
				for range conc {
					wg.Go(func() {
						for range next {
							t0 := time.Now()
							if err := call(context.Background()); err != nil {
								b.Error(err)
								return
							}
							d := time.Since(t0)
							mu.Lock()
							lat = append(lat, d)
							mu.Unlock()
						}
					})
				}
				wg.Wait()
				el := time.Since(start)
				sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
				if len(lat) == 0 {
					return
				}
				b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50_ms")
				b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99_ms")
				b.ReportMetric(float64(len(lat))/el.Seconds(), "req/s")
			})
		}
	}
	s.StopAll(b)
}
