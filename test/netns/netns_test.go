// Package netns runs kvferry across hosts as far as one machine can: the
// router, the context server and the generation server each in its own
// network namespace, joined by veth pairs to a bridge, so the KV data path
// crosses real interfaces (with tc netem delay and loss where the kernel
// has it). Outputs must equal the reference; then the generation server
// is partitioned mid-transfer for 20 s (its bridge port goes down) and the aftermath must be the chaos gate's:
// a request succeeds again, the canary text is exact, every pool idles,
// nothing is poisoned (tcp proves quiescence locally), health is true.
//
// It needs root and iproute2 (.ci/run installs it); elsewhere it skips.
package netns

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"

	"github.com/kvferry/kvferry/internal/poll"
	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/pkg/router"
	"github.com/kvferry/kvferry/test/stack"
)

var binDir string

func TestMain(m *testing.M) { os.Exit(stack.RunWithBinaries(m, false, &binDir)) }

// network is three namespaces on one bridge; the test runs in the root
// namespace, which holds the bridge's address.
type network struct {
	t      *testing.T
	prefix string            // 10.213.N
	ns     map[string]string // role -> namespace
	port   map[string]string // role -> the bridge port (host end of its veth)
	netem  bool
}

func ip(t *testing.T, args ...string) error {
	t.Helper()
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func mustIP(t *testing.T, args ...string) {
	t.Helper()
	if err := ip(t, args...); err != nil {
		t.Fatal(err)
	}
}

// setup builds the namespaces, or skips where the machine cannot.
func setup(t *testing.T) *network {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("network namespaces need root")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("iproute2 (ip) is not installed")
	}
	id := os.Getpid()%200 + 20
	n := &network{t: t, prefix: fmt.Sprintf("10.213.%d", id), ns: map[string]string{}, port: map[string]string{}}
	br := fmt.Sprintf("kvfbr%d", id)
	if err := ip(t, "link", "add", "name", br, "type", "bridge"); err != nil {
		t.Skipf("no bridge here: %v", err)
	}
	t.Cleanup(func() { _ = ip(t, "link", "del", br) })
	mustIP(t, "addr", "add", n.prefix+".1/24", "dev", br)
	mustIP(t, "link", "set", br, "up")
	for i, role := range []string{"router", "ctx", "gen"} {
		ns := fmt.Sprintf("kvf%d-%s", id, role)
		host, peer := fmt.Sprintf("kvf%dh%d", id, i), fmt.Sprintf("kvf%dn%d", id, i)
		mustIP(t, "netns", "add", ns)
		t.Cleanup(func() { _ = ip(t, "netns", "del", ns) })
		mustIP(t, "link", "add", host, "type", "veth", "peer", "name", peer)
		t.Cleanup(func() { _ = ip(t, "link", "del", host) })
		mustIP(t, "link", "set", peer, "netns", ns)
		mustIP(t, "link", "set", host, "master", br)
		mustIP(t, "link", "set", host, "up")
		mustIP(t, "-n", ns, "addr", "add", n.addr(role)+"/24", "dev", peer)
		mustIP(t, "-n", ns, "link", "set", peer, "up")
		mustIP(t, "-n", ns, "link", "set", "lo", "up")
		n.ns[role], n.port[role] = ns, host
	}
	// Delay and loss on the data path's two ends, where the kernel has
	// netem (sch_netem); without it the traffic still crosses veths and a
	// bridge, and the test says so.
	n.netem = true
	for _, role := range []string{"ctx", "gen"} {
		out, err := exec.Command("tc", "qdisc", "add", "dev", n.port[role], "root", "netem", "delay", "2ms", "1ms", "loss", "0.5%").CombinedOutput()
		if err != nil {
			n.netem = false
			t.Logf("tc netem unavailable here (%v: %s): the path crosses real interfaces without added delay or loss", err, strings.TrimSpace(string(out)))
			break
		}
	}
	return n
}

func (n *network) addr(role string) string {
	return map[string]string{"router": n.prefix + ".10", "ctx": n.prefix + ".11", "gen": n.prefix + ".12"}[role]
}

// start runs a kvferry binary inside role's namespace.
func (n *network) start(t *testing.T, logs, role, bin string, args ...string) *stack.Proc {
	t.Helper()
	p := stack.Start(t, logs, "ip", append([]string{"netns", "exec", n.ns[role], filepath.Join(binDir, bin)}, args...)...)
	p.Name = bin
	return p
}

// partition cuts role's link at the bridge: its port goes down, so every
// frame to or from it is dropped there, and its own end loses carrier but
// keeps its address and routes (its TCP connections retransmit into
// nothing, as across a failed switch).
func (n *network) partition(role string, on bool) {
	state := "up"
	if on {
		state = "down"
	}
	mustIP(n.t, "link", "set", "dev", n.port[role], state)
}

var tiny, _ = executor.Preset("tiny")

const base = "the quiet river harbour light signal path ferry stone bridge tower window"

func words(n int) string {
	f := strings.Fields(base)
	out := make([]string, n)
	for i := range out {
		out[i] = f[i%len(f)]
	}
	return strings.Join(out, " ")
}

func TestAcrossNamespaces(t *testing.T) {
	n := setup(t)
	logs := t.TempDir()
	ctx, gen, rt := n.addr("ctx"), n.addr("gen"), n.addr("router")
	common := []string{"--model=tiny", "--pool-blocks=2048", "--prefill-tokens-per-second=200000", "--decode-step-time=2ms", "--transport=tcp"}
	procs := []*stack.Proc{
		n.start(t, logs, "ctx", "ctxserver", append(common, "--grpc-addr="+ctx+":9100", "--http-addr="+ctx+":9101", "--advertise-host="+ctx)...),
		n.start(t, logs, "gen", "genserver", append(common, "--grpc-addr="+gen+":9200", "--http-addr="+gen+":9201", "--data-addr="+gen+":9202",
			"--advertise-host="+gen, "--health-interval=200ms", "--canary-interval=1s")...),
		n.start(t, logs, "router", "router", "--model=tiny", "--http-addr="+rt+":8000", "--grpc-addr="+rt+":8001", "--admin-addr="+rt+":8002",
			"--ctx-servers="+ctx+":9100", "--gen-servers="+gen+":9200", "--request-timeout=40s"),
	}
	admin := map[string]string{"ctxserver": "http://" + ctx + ":9101", "genserver": "http://" + gen + ":9201", "router": "http://" + rt + ":8002"}
	defer func() {
		if t.Failed() {
			for _, p := range procs {
				t.Logf("%s log (tail):\n%s", p.Name, tail(p.Log(), 30))
			}
		}
	}()
	ready := func() bool {
		for _, a := range admin {
			if code, _, err := stack.Get(a + "/readyz"); err != nil || code != http.StatusOK {
				return false
			}
		}
		return true
	}
	stack.Eventually(t, "all three ready across the namespaces", ready)

	c := openai.NewClient(option.WithBaseURL("http://"+rt+":8000/v1/"), option.WithAPIKey("unused"), option.WithMaxRetries(0))
	seed := int64(7)
	zero := float32(0)
	complete := func(ctx context.Context, prompt string, max int64) (string, error) {
		resp, err := c.Completions.New(ctx, openai.CompletionNewParams{Model: "tiny",
			Prompt:    openai.CompletionNewParamsPromptUnion{OfString: openai.String(prompt)},
			MaxTokens: openai.Int(max), Seed: openai.Int(seed), Temperature: openai.Float(0)})
		if err != nil {
			return "", err
		}
		return resp.Choices[0].Text, nil
	}
	// Outputs equal the reference, prompts of 1 to ~60 blocks.
	for _, w := range []int{5, 200, 1000, 3000} {
		prompt := words(w)
		want := executor.Reference(tiny, prompt, router.SamplingFor(24, &zero, nil, &seed)).Text
		cctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		got, err := complete(cctx, prompt, 24)
		cancel()
		if err != nil || got != want {
			t.Fatalf("%d words: %q, %v; want %q", w, got, err, want)
		}
	}
	t.Logf("outputs equal the reference across namespaces (netem: %v)", n.netem)

	// Load, then the partition once a transfer is in flight.
	load, stopLoad := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var okN, failedN atomic.Int64
	for i := range 16 {
		wg.Go(func() {
			for w := 2000 + 100*i; load.Err() == nil; w++ {
				rctx, cancel := context.WithTimeout(load, 30*time.Second)
				if _, err := complete(rctx, words(w), 32); err == nil {
					okN.Add(1)
				} else if load.Err() == nil {
					failedN.Add(1) // failed by the partition, not by the test's stop
				}
				cancel()
			}
		})
	}
	genAdmin := admin["genserver"]
	stack.Eventually(t, "a transfer in flight on the generation server", func() bool {
		p, err := stack.ScrapePool(genAdmin)
		return err == nil && p.InFlight > 0
	})
	n.partition("gen", true)
	partitioned := time.Now()
	t.Log("generation server partitioned mid-transfer")
	time.Sleep(20 * time.Second) // the fault's length, not a synchronisation
	n.partition("gen", false)
	stopLoad()
	wg.Wait()
	t.Logf("partition healed after %s; load: %d ok, %d failed", time.Since(partitioned).Round(time.Millisecond), okN.Load(), failedN.Load())
	if failedN.Load() == 0 {
		t.Fatal("no request failed while the generation server was partitioned: the partition did not cut it off")
	}
	for _, side := range []struct{ server, side string }{{"ctxserver", "sender"}, {"genserver", "receiver"}} {
		var outcomes []string
		for _, o := range []string{"completed", "failed", "cancelled", "timed_out"} {
			v := stack.Metric(t, admin[side.server], `kvferry_transfer_sessions_total{outcome="`+o+`",side="`+side.side+`"}`)
			outcomes = append(outcomes, fmt.Sprintf("%s %v", o, v))
		}
		t.Logf("%s's transfers (%s): %s", side.server, side.side, strings.Join(outcomes, ", "))
	}

	// Aftermath: a request succeeds again, the text is exact, every pool
	// idles, nothing poisoned, health true everywhere.
	prompt := words(300)
	want := executor.Reference(tiny, prompt, router.SamplingFor(16, &zero, nil, &seed)).Text
	var got string
	poll.Until(t, 30*time.Second, 50*time.Millisecond, "a request succeeds after the partition", func() bool {
		cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		var err error
		got, err = complete(cctx, prompt, 16)
		return err == nil
	})
	if got != want {
		t.Fatalf("after the partition: %q, want %q", got, want)
	}
	for _, role := range []string{"ctxserver", "genserver"} {
		var last stack.Pool
		poll.Until(t, 60*time.Second, 50*time.Millisecond, role+" pool idle", func() bool {
			p, err := stack.ScrapePool(admin[role])
			last = p
			return err == nil && p.Idle()
		})
		if last.Poisoned != 0 {
			t.Errorf("%s: %v blocks poisoned; tcp proves quiescence locally", role, last.Poisoned)
		}
		t.Logf("%s after: %+v", role, last)
	}
	poll.Until(t, 30*time.Second, 50*time.Millisecond, "every process ready and live", func() bool {
		if !ready() {
			return false
		}
		for _, a := range admin {
			if code, _, err := stack.Get(a + "/livez"); err != nil || code != http.StatusOK {
				return false
			}
		}
		return true
	})
	for _, p := range procs {
		if l := p.Log(); strings.Contains(l, "panic:") {
			t.Errorf("%s panicked", p.Name)
		}
	}
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}
