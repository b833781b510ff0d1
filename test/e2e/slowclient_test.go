package e2e

import (
	"fmt"
	"net"
	"net/url"
	"syscall"
	"testing"

	"github.com/openai/openai-go/v3"

	"github.com/kvferry/kvferry/test/stack"
)

// openStream sends n pipelined streaming completions on a raw connection
// and never reads the answers. rcvbuf, when positive, shrinks the socket's
// receive buffer. The router's send buffer grows to 4 MiB on Linux and
// an 8,000-token stream is about 1.6 MB of SSE, so only several answers
// in a row on one connection stall the router's writes.
func openStream(t *testing.T, addr string, maxTokens, rcvbuf, n int) net.Conn {
	t.Helper()
	d := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		if rcvbuf <= 0 {
			return nil
		}
		var serr error
		err := c.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, rcvbuf) })
		if err != nil {
			return err
		}
		return serr
	}}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	body := fmt.Sprintf(`{"model":"tiny","prompt":"the river","max_tokens":%d,"ignore_eos":true,"stream":true}`, maxTokens)
	for range n {
		if _, err := fmt.Fprintf(c, "POST /v1/completions HTTP/1.1\r\nHost: kvferry\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

// TestClientsThatNeverRead: 600 streaming clients that never read their
// answers, 4 of them asking for four 8,000-token answers in a row
// (ignore_eos, pipelined) with a shrunken receive buffer. The router stays usable for everyone else while all are
// connected, and every pool idles with them still connected: the short
// streams finished into their socket buffers, and each long one was
// dropped at its chunk write deadline and its request cancelled, its
// blocks freed. (With a long deadline the long streams hold their blocks
// and the test fails: checked when it was written.)
func TestClientsThatNeverRead(t *testing.T) {
	// Queues deep enough for 600 arrivals at once: this test is about
	// silent clients, not about the 429s of a full queue.
	queue := []string{"--max-queue=1024"}
	s := stack.Up(t, binDir, stack.Options{PoolBlocks: 8192, CtxArgs: queue, GenArgs: queue,
		ExtraRouterArgs: []string{"--stream-write-timeout=1s", "--max-inflight=1024", "--max-output-tokens=8000"}})
	u, err := url.Parse(s.OpenAIURL)
	if err != nil {
		t.Fatal(err)
	}
	for range 4 {
		openStream(t, u.Host, 8000, 1024, 4)
	}
	for range 596 {
		openStream(t, u.Host, 8, 0, 1)
	}
	c := client(s)
	resp, err := c.Completions.New(testCtx(t), openai.CompletionNewParams{Model: "tiny",
		Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String("the river")}, MaxTokens: openai.Int(8)})
	if err != nil || len(resp.Choices) != 1 {
		t.Fatalf("a reading client beside 600 that do not: %v %v", resp, err)
	}
	checkIdle(t, s)
	// The generation server may have finished into gRPC's buffers; the
	// router's own count shows the stalled writes were given up.
	stack.Eventually(t, "router holds no request in flight", func() bool {
		return stack.Metric(t, s.RouterAdmin, fmt.Sprintf(`kvferry_router_backend_inflight_requests{role="generation",server=%q}`, s.GenGRPC)) == 0
	})
}
