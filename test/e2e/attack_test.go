package e2e

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/openai/openai-go/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/pkg/genserver"
	"github.com/kvferry/kvferry/pkg/ticket"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
	"github.com/kvferry/kvferry/test/stack"
)

// The attacks of the outside review (issue 23), each played against a
// real stack: every one of them stalled or exhausted the router before.

// completeOnce is one routed completion through the OpenAI SDK.
func completeOnce(t *testing.T, s *stack.Stack) error {
	t.Helper()
	c := client(s)
	resp, err := c.Completions.New(testCtx(t), openai.CompletionNewParams{Model: "tiny",
		Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String("the river")}, MaxTokens: openai.Int(4)})
	if err == nil && len(resp.Choices) != 1 {
		return fmt.Errorf("%d choices", len(resp.Choices))
	}
	return err
}

// TestSlowBodyHoldsNoSlot: 16 clients send their headers and 9 of 4,000
// body bytes, then nothing, on a router with 4 in-flight slots. A real
// request is served at once (the body is read before a slot is taken:
// before, it got 429 until the trickling clients gave up), and each
// trickling client gets 408 at --body-read-timeout.
func TestSlowBodyHoldsNoSlot(t *testing.T) {
	s := stack.Up(t, binDir, stack.Options{ExtraRouterArgs: []string{"--max-inflight=4", "--body-read-timeout=2s"}})
	u, err := url.Parse(s.OpenAIURL)
	if err != nil {
		t.Fatal(err)
	}
	conns := make([]net.Conn, 16)
	for i := range conns {
		c, err := net.Dial("tcp", u.Host)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		if _, err := fmt.Fprintf(c, "POST /v1/completions HTTP/1.1\r\nHost: kvferry\r\nContent-Type: application/json\r\nContent-Length: 4000\r\n\r\n{\"model\":"); err != nil {
			t.Fatal(err)
		}
		conns[i] = c
	}
	stack.Eventually(t, "16 bodies arriving", func() bool {
		return stack.Metric(t, s.RouterAdmin, "kvferry_router_reading_body_requests") == 16
	})
	if err := completeOnce(t, s); err != nil {
		t.Fatalf("a request beside 16 trickling bodies: %v", err)
	}
	for i, c := range conns {
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatalf("trickling client %d: %v", i, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusRequestTimeout || !strings.Contains(string(body), "request_timeout") {
			t.Fatalf("trickling client %d: %d %s, want 408 request_timeout", i, resp.StatusCode, body)
		}
	}
	checkIdle(t, s)
}

// TestGRPCSlowReaderHoldsNoSlot: 4 gRPC clients start long streams and
// never read them, on a router with 4 in-flight slots. Each stream's send
// is bounded by --stream-write-timeout, so the slots come back and a
// routed request succeeds long before --request-timeout (before, every
// slot stayed held until then), and every block is free after.
func TestGRPCSlowReaderHoldsNoSlot(t *testing.T) {
	s := stack.Up(t, binDir, stack.Options{PoolBlocks: 4096,
		ExtraRouterArgs: []string{"--max-inflight=4", "--stream-write-timeout=1s", "--max-output-tokens=8000", "--request-timeout=600s"}})
	// A fixed 64 KiB window: the client's transport buffers no more than
	// that of a stream nobody reads.
	cc, err := grpc.NewClient(s.RouterGRPC, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithInitialWindowSize(1<<16), grpc.WithInitialConnWindowSize(1<<20))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	rc := kvferryv1.NewRouterServiceClient(cc)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	for range 4 {
		if _, err := rc.Generate(ctx, &kvferryv1.RouterServiceGenerateRequest{Model: "tiny", Prompt: "the river",
			Sampling: &kvferryv1.SamplingParams{MaxTokens: 8000, IgnoreEos: true}}); err != nil {
			t.Fatal(err)
		}
	}
	stack.Eventually(t, "a routed request beside 4 unread gRPC streams", func() bool { return completeOnce(t, s) == nil })
	checkIdle(t, s)
}

// routerPeakRSS is the router process's peak resident set (VmHWM), bytes.
func routerPeakRSS(t *testing.T, s *stack.Stack) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", s.Router.Pid()))
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatal("no VmHWM in /proc status")
	return 0
}

// maxRouterRSS is the bound this test holds the router to under 64 large
// prompts at once (race-built binaries, which carry the detector's shadow
// memory): far below the chart's 1 GiB limit, which 16 prompts of 4 MiB
// passed before (1.68 GB).
const maxRouterRSS = 384 << 20

// TestLargePromptsBoundMemory: 32 bodies of 4 MiB (over the default body
// limit: refused from their Content-Length) and 32 just under 1 MiB of
// words no vocabulary knows (refused before tokenizing: at least one token
// per 13 bytes is over the 8,000-token limit), all at once, with the
// router's defaults. Each gets its precise error and the router's peak RSS
// stays under maxRouterRSS.
func TestLargePromptsBoundMemory(t *testing.T) {
	s := stack.Up(t, binDir, stack.Options{})
	rng := rand.New(rand.NewPCG(1, 2))
	word := func() string {
		b := make([]byte, 3+rng.IntN(8))
		for i := range b {
			b[i] = 'a' + byte(rng.IntN(26))
		}
		return string(b)
	}
	body := func(size int) []byte {
		var p strings.Builder
		for p.Len() < size-64 {
			p.WriteString(word())
			p.WriteByte(' ')
		}
		return fmt.Appendf(nil, `{"model":"tiny","max_tokens":4,"prompt":%q}`, p.String())
	}
	big, under := body(4<<20), body(1<<20-256)
	t.Logf("router RSS before: %d MiB", routerPeakRSS(t, s)>>20)
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for i := range 64 {
		b, want, code := big, http.StatusRequestEntityTooLarge, "request_too_large"
		if i%2 == 1 {
			b, want, code = under, http.StatusBadRequest, "the limit is 8000"
		}
		wg.Go(func() {
			resp, err := http.Post(s.OpenAIURL+"/completions", "application/json", bytes.NewReader(b))
			if err != nil {
				errs <- err
				return
			}
			defer resp.Body.Close()
			got, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != want || !strings.Contains(string(got), code) {
				errs <- fmt.Errorf("%d-byte body: %d %s, want %d %s", len(b), resp.StatusCode, got, want, code)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if rss := routerPeakRSS(t, s); rss > maxRouterRSS {
		t.Fatalf("router peak RSS %d MiB, bound %d MiB", rss>>20, maxRouterRSS>>20)
	} else {
		t.Logf("router peak RSS %d MiB under 64 large prompts (bound %d MiB)", rss>>20, maxRouterRSS>>20)
	}
	if err := completeOnce(t, s); err != nil {
		t.Fatal(err)
	}
}

// TestForgedAdvertisements: with TLS off anyone can call Generate. 300
// requests whose advertisements name 300 made-up endpoints each get
// UNAVAILABLE without the address in the answer; the generation server's
// goroutines stay bounded (its connection cache holds at most
// genserver.MaxContextServers, evicting the oldest: before, 300 endpoints
// took it from 16 to 1,216 goroutines for good), the pair canary probes
// none of them, and every block is free after.
func TestForgedAdvertisements(t *testing.T) {
	s := stack.Up(t, binDir, stack.Options{GenArgs: []string{"--canary-interval=100ms"}})
	if err := completeOnce(t, s); err != nil { // a real peer for the canary
		t.Fatal(err)
	}
	cc := kvferryv1.NewContextServiceClient(grpcConn(t, s.CtxGRPC))
	gen := kvferryv1.NewGenerationServiceClient(grpcConn(t, s.GenGRPC))
	hc := kvferryv1.NewHealthServiceClient(grpcConn(t, s.GenGRPC))
	base := stack.Metric(t, s.GenHTTP, "go_goroutines")
	toks := executor.Tokenize("the river")
	for i := range 300 {
		tk := ticket.New(ticket.NewID())
		pre, err := cc.Prefill(testCtx(t), &kvferryv1.PrefillRequest{Ticket: tk, PromptTokens: toks, Sampling: &kvferryv1.SamplingParams{MaxTokens: 2, Temperature: 1, TopP: 1}})
		if err != nil {
			t.Fatal(err)
		}
		adv := pre.GetAdvertisement()
		adv.TransferEndpoint = fmt.Sprintf("127.0.0.%d:%d", 2+i%200, 10000+i)
		st, err := gen.Generate(testCtx(t), &kvferryv1.GenerateRequest{Ticket: tk, PromptTokens: toks, FirstToken: pre.GetFirstToken(),
			Sampling: &kvferryv1.SamplingParams{MaxTokens: 2, Temperature: 1, TopP: 1}, Advertisement: adv})
		if err == nil {
			_, err = st.Recv()
		}
		if status.Code(err) != codes.Unavailable || strings.Contains(err.Error(), "127.0.0.") {
			t.Fatalf("forged advertisement %d: %v, want UNAVAILABLE without the address", i, err)
		}
		if _, err := cc.Release(testCtx(t), &kvferryv1.ReleaseRequest{Ticket: tk}); err != nil {
			t.Fatal(err)
		}
	}
	// Bounded: a connection that keeps redialling costs about four
	// goroutines; the cache holds genserver.MaxContextServers and closes
	// an evicted one that never came up at once. Without the bound 300
	// endpoints' connections stay forever (about 1,200 goroutines).
	if got := stack.Metric(t, s.GenHTTP, "go_goroutines"); got > base+5*float64(genserver.MaxContextServers) {
		t.Fatalf("goroutines %v → %v after 300 forged endpoints", base, got)
	} else {
		t.Logf("goroutines %v → %v after 300 forged endpoints", base, got)
	}
	h, err := hc.GetHealth(testCtx(t), &kvferryv1.GetHealthRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if peers := h.GetCanary().GetPeers(); len(peers) > 1 {
		t.Fatalf("the canary probes %d peers, want only the real context server", len(peers))
	}
	checkIdle(t, s)
}
