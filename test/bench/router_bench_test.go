// Package bench measures kvferry on real processes. Run with make
// bench-router; nothing here is a pass/fail timing.
package bench

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
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
// at concurrency 1 and 64, on an instant engine: the router's whole cost
// shows. Reports p50 and p99 latency and requests/s; the router's added
// latency is router minus direct of the same run.
func BenchmarkRouterOverhead(b *testing.B) {
	profile := os.Getenv("KVFERRY_ROUTER_PROFILE") // a file: the router's CPU profile at 64
	var o stack.Options
	if profile != "" {
		o.ExtraRouterArgs = []string{"--enable-pprof"}
	}
	s := stack.Up(b, binDir, o)
	paths := routerPaths(b, s)
	if profile != "" {
		profileRouter(b, s, paths["router"], profile)
	}
	for _, conc := range []int{1, 64} {
		for _, path := range []string{"direct", "router"} {
			b.Run(fmt.Sprintf("%s/conc=%d", path, conc), func(b *testing.B) {
				lat, el := load(b, paths[path], conc, b.N)
				if len(lat) == 0 {
					return
				}
				b.ReportMetric(ms(lat[len(lat)/2]), "p50_ms")
				b.ReportMetric(ms(lat[len(lat)*99/100]), "p99_ms")
				b.ReportMetric(float64(len(lat))/el.Seconds(), "req/s")
			})
		}
		b.Run(fmt.Sprintf("pairs/conc=%d", conc), func(b *testing.B) { pairs(b, paths, conc, 400) })
	}
	s.StopAll(b)
}

// BenchmarkRouterOverheadEngineTime: the same pairs on make run's
// GPU-like timing (prefill 20,000 tokens/s, a decode step 20 ms), where a
// request spends its time in the engine as a served one does.
func BenchmarkRouterOverheadEngineTime(b *testing.B) {
	s := stack.Up(b, binDir, stack.Options{PrefillTokensPerSecond: 20000, DecodeStepTime: 20 * time.Millisecond})
	paths := routerPaths(b, s)
	for _, conc := range []int{1, 64} {
		b.Run(fmt.Sprintf("pairs/conc=%d", conc), func(b *testing.B) { pairs(b, paths, conc, 20*conc) })
	}
	s.StopAll(b)
}

// profileRouter writes the router's CPU profile over 5 s of requests
// through it at concurrency 64 to path.
func profileRouter(b *testing.B, s *stack.Stack, call func(context.Context) error, path string) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second) // the profile takes 5
	defer cancel()
	done := make(chan error, 1)
	go func() {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.RouterAdmin+"/debug/pprof/profile?seconds=5", nil)
		var resp *http.Response
		if err == nil {
			resp, err = http.DefaultClient.Do(req)
		}
		if err == nil {
			defer resp.Body.Close()
			var f *os.File
			if f, err = os.Create(path); err == nil {
				_, err = io.Copy(f, resp.Body)
				err = errors.Join(err, f.Close())
			}
		}
		done <- err
	}()
	for {
		load(b, call, 64, 2000)
		select {
		case err := <-done:
			if err != nil {
				b.Fatal(err)
			}
			return
		default:
		}
	}
}

// routerPaths are the two ways to serve one request on s: through the
// router, and directly.
func routerPaths(b *testing.B, s *stack.Stack) map[string]func(ctx context.Context) error {
	rc := kvferryv1.NewRouterServiceClient(dial(b, s.RouterGRPC))
	cc := kvferryv1.NewContextServiceClient(dial(b, s.CtxGRPC))
	gc := kvferryv1.NewGenerationServiceClient(dial(b, s.GenGRPC))
	tokens := executor.Tokenize(prompt)
	return map[string]func(ctx context.Context) error{
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
}

// pairs runs 7 rounds of per requests, direct and router alternating, so
// the machine's drift (2x over seconds on shared VMs) lands on both; the
// medians of the per-pair throughput ratio and added p50 are the overhead.
func pairs(b *testing.B, paths map[string]func(context.Context) error, conc, per int) {
	const rounds = 7
	var ratios, added []float64
	for range rounds {
		dl, de := load(b, paths["direct"], conc, per)
		rl, re := load(b, paths["router"], conc, per)
		if len(dl) == 0 || len(rl) == 0 {
			return
		}
		ratios = append(ratios, (float64(len(rl))/re.Seconds())/(float64(len(dl))/de.Seconds()))
		added = append(added, ms(rl[len(rl)/2])-ms(dl[len(dl)/2]))
	}
	b.ReportMetric(median(ratios), "router_x_direct")
	b.ReportMetric(median(added), "added_p50_ms")
}

// load sends n calls from conc goroutines and returns the sorted
// latencies and the elapsed time.
func load(b *testing.B, call func(context.Context) error, conc, n int) ([]time.Duration, time.Duration) {
	lat := make([]time.Duration, 0, n)
	var mu sync.Mutex
	next := make(chan struct{}, n)
	for range n {
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
	return lat, el
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func median(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	return s[len(s)/2]
}
