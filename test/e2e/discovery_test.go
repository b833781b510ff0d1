package e2e

import (
	"context"
	"net"
	"net/http"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"

	"github.com/kvferry/kvferry/pkg/router/discovery/discoverytest"
	"github.com/kvferry/kvferry/test/stack"
)

// portFreeOn returns a port free on every given loopback IP (Linux routes
// all of 127/8 to lo), so servers on different IPs share one port the way
// pods behind a headless Service do.
func portFreeOn(t *testing.T, ips ...string) int {
	t.Helper()
	for range 50 {
		p := stack.FreePort(t)
		ok := true
		for _, ip := range ips {
			ln, err := net.Listen("tcp", net.JoinHostPort(ip, strconv.Itoa(p)))
			if err != nil {
				ok = false
				break
			}
			_ = ln.Close()
		}
		if ok {
			return p
		}
	}
	t.Fatal("no port free on every IP")
	return 0
}

// TestDNSDiscovery: the router finds context servers by a DNS name,
// re-resolves it, sends new requests to the servers the name now lists,
// and a request in flight when its server leaves the answer completes.
func TestDNSDiscovery(t *testing.T) {
	logs := t.TempDir()
	port := strconv.Itoa(portFreeOn(t, "127.0.0.2", "127.0.0.3"))
	common := []string{"--model=tiny", "--pool-blocks=128", "--shutdown-grace=5s", "--decode-step-time=20ms"}
	addr := func() string { return "127.0.0.1:" + strconv.Itoa(stack.FreePort(t)) }
	type server struct {
		p    *stack.Proc
		http string
	}
	start := func(bin, grpcAddr string) server {
		h := addr()
		return server{p: stack.Start(t, logs, filepath.Join(binDir, bin), append(common, "--grpc-addr="+grpcAddr, "--http-addr="+h, "--data-addr="+addr())...), http: "http://" + h}
	}
	ctxA, ctxB := start("ctxserver", "127.0.0.2:"+port), start("ctxserver", "127.0.0.3:"+port)
	genAddr := addr()
	gen := start("genserver", genAddr)
	dns := discoverytest.NewStubDNS(t, "ctx.kvferry.test.", [4]byte{127, 0, 0, 2})
	openaiAddr, admin := addr(), addr()
	rt := stack.Start(t, logs, filepath.Join(binDir, "router"), "--model=tiny", "--http-addr="+openaiAddr, "--grpc-addr="+addr(), "--admin-addr="+admin,
		"--ctx-servers=dns:ctx.kvferry.test:"+port, "--gen-servers="+genAddr, "--dns-server="+dns.Addr(), "--resolve-interval=100ms", "--shutdown-grace=5s")
	stack.Eventually(t, "router ready", func() bool { return probe("http://"+admin+"/readyz") == http.StatusOK })
	c := openai.NewClient(option.WithBaseURL("http://"+openaiAddr+"/v1/"), option.WithAPIKey("unused"), option.WithMaxRetries(0))
	completed := func(s server) float64 {
		return stack.Metric(t, s.http, `kvferry_transfer_sessions_total{outcome="completed",side="sender"}`)
	}
	short := func() {
		if _, err := c.Completions.New(testCtx(t), openai.CompletionNewParams{Model: "tiny",
			Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String("the river")}, MaxTokens: openai.Int(2)}); err != nil {
			t.Fatal(err)
		}
	}

	// A long request on A, still streaming when A leaves the DNS answer.
	ctx, cancel := context.WithCancel(testCtx(t))
	defer cancel()
	long := c.Completions.NewStreaming(ctx, openai.CompletionNewParams{Model: "tiny",
		Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String("the quiet harbour")}, MaxTokens: openai.Int(60)})
	if !long.Next() {
		t.Fatalf("long request: %v", long.Err())
	}
	if completed(ctxA) != 1 || completed(ctxB) != 0 {
		t.Fatalf("before the change: A %v, B %v transfers", completed(ctxA), completed(ctxB))
	}
	dns.Set([4]byte{127, 0, 0, 3})
	stack.Eventually(t, "requests reach B", func() bool { short(); return completed(ctxB) >= 1 })
	afterSwitch := completed(ctxA)
	for range 3 {
		short()
	}
	if completed(ctxA) != afterSwitch {
		t.Fatalf("A still gets requests after leaving the DNS answer")
	}
	for long.Next() {
	}
	if err := long.Err(); err != nil {
		t.Fatalf("the request in flight across the change failed: %v", err)
	}
	for _, p := range []*stack.Proc{rt, gen.p, ctxA.p, ctxB.p} {
		if err := p.Stop(); err != nil {
			t.Errorf("%s: %v", p.Name, err)
		}
	}
}
