// Package stack builds the three kvferry binaries and runs them as real
// processes on free loopback ports, for the end-to-end and chaos suites.
package stack

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kvferry/kvferry/internal/poll"
)

// ShouldHappen bounds waits for things that must happen (start, ready, stop).
const ShouldHappen = 30 * time.Second

// Build compiles ctxserver, genserver, router and kvload into dir with the race
// detector when race is set, and returns dir.
func Build(ctx context.Context, dir string, race bool) error {
	root, err := moduleRoot()
	if err != nil {
		return err
	}
	args := []string{"build", "-o", dir + string(os.PathSeparator)}
	if race {
		args = append(args, "-race")
	}
	if buildTags != "" {
		args = append(args, "-tags", buildTags) // the servers get what the tests were built with
	}
	args = append(args, "./cmd/ctxserver", "./cmd/genserver", "./cmd/router", "./cmd/kvload")
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build: %v\n%s", err, out)
	}
	return nil
}

func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("go.mod not found above the working directory")
		}
		dir = parent
	}
}

// handedOut holds every port FreePort has returned in this process. A port
// is closed again before the server that will own it starts, so without
// this the kernel can hand the same port to two servers of one stack.
var handedOut = struct {
	sync.Mutex
	ports map[int]bool
}{ports: map[int]bool{}}

// FreePort returns a loopback port that was free a moment ago and that no
// earlier call in this process returned.
func FreePort(t testing.TB) int {
	t.Helper()
	handedOut.Lock()
	defer handedOut.Unlock()
	for range 100 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		if !handedOut.ports[port] {
			handedOut.ports[port] = true
			return port
		}
	}
	t.Fatal("no loopback port that was not handed out before")
	return 0
}

// Proc is one running server process.
type Proc struct {
	Name string
	bin  string
	args []string
	dir  string
	cmd  *exec.Cmd
	log  *os.File
	done chan struct{}
	err  error
}

// Start runs bin with args; stdout and stderr go to a log file in dir.
func Start(t testing.TB, dir, bin string, args ...string) *Proc {
	t.Helper()
	name := filepath.Base(bin)
	lf, err := os.CreateTemp(dir, name+"-*.log")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = lf, lf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &Proc{Name: name, bin: bin, args: args, dir: dir, cmd: cmd, log: lf, done: make(chan struct{})}
	go func() { p.err = cmd.Wait(); close(p.done) }()
	t.Cleanup(func() { p.kill() })
	return p
}

// Stop sends SIGTERM and waits for the process; it returns the exit error
// (nil for a clean exit 0).
func (p *Proc) Stop() error {
	select {
	case <-p.done:
		return p.err
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return p.err
	case <-time.After(ShouldHappen):
		p.kill()
		return fmt.Errorf("%s did not stop within %s", p.Name, ShouldHappen)
	}
}

// Restart starts the same command again (after the process exited), as a
// supervisor restarting a killed pod would; it waits for nothing.
func (p *Proc) Restart(t testing.TB) *Proc {
	t.Helper()
	np := Start(t, p.dir, p.bin, p.args...)
	np.Name = p.Name
	return np
}

// RestartWith starts the same command again with extra flags appended
// (later flags win).
func (p *Proc) RestartWith(t testing.TB, extra ...string) *Proc {
	t.Helper()
	np := Start(t, p.dir, p.bin, append(append([]string{}, p.args...), extra...)...)
	np.Name = p.Name
	return np
}

// Signal sends sig to the process.
func (p *Proc) Signal(sig os.Signal) error { return p.cmd.Process.Signal(sig) }

// Done is closed when the process has exited.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Pid is the process id.
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

func (p *Proc) kill() {
	select {
	case <-p.done:
	default:
		_ = p.cmd.Process.Kill()
		<-p.done
	}
	_ = p.log.Close()
}

// Log returns what the process wrote so far.
func (p *Proc) Log() string {
	b, _ := os.ReadFile(p.log.Name())
	return string(b)
}

// Options shape a stack.
type Options struct {
	Model string
	// Llama runs the stack on the llama.cpp engine with the test model
	// (TestModelPath) instead of a synthetic preset.
	Llama bool
	// ModelPath, with Llama, serves this GGUF instead of the test model
	// (a generated one: cmd/kvgguf).
	ModelPath              string
	PoolBlocks             int
	PrefillTokensPerSecond float64
	DecodeStepTime         time.Duration
	ExtraRouterArgs        []string
	CtxArgs, GenArgs       []string // extra flags for the context / generation servers
	Ctxs, Gens             int      // how many of each (default 1)
	// Aggregated starts no context server: the router and the generation
	// servers run with --aggregated (Ctx and CtxGRPC stay empty).
	Aggregated bool
}

// Stack is a router with context and generation servers. Ctx and Gen are
// the first of each.
type Stack struct {
	Ctx, Gen, Router   *Proc
	Ctxs, Gens         []*Proc
	OpenAIURL          string // http://127.0.0.1:PORT/v1
	RouterGRPC         string
	RouterAdmin        string // http://127.0.0.1:PORT
	CtxGRPC, GenGRPC   string
	CtxHTTP, GenHTTP   string // http://127.0.0.1:PORT
	CtxGRPCs, GenGRPCs []string
	CtxHTTPs, GenHTTPs []string
}

// Up starts a stack from binaries in bin and waits until the router is ready.
func Up(t testing.TB, bin string, o Options) *Stack {
	t.Helper()
	if o.Model == "" {
		o.Model = "tiny"
	}
	if o.PoolBlocks == 0 {
		o.PoolBlocks = 256
	}
	addr := func() string { return "127.0.0.1:" + strconv.Itoa(FreePort(t)) }
	logs := t.TempDir()
	engine := []string{"--model=" + o.Model}
	var serverEngine []string // how the servers run the engine: not the router's
	if o.Llama {
		// One llama.cpp thread each: a stack is several processes on the
		// test machine's cores, and ggml's threads spin while they wait.
		model := o.ModelPath
		if model == "" {
			model = TestModelPath(t)
		}
		engine = []string{"--engine=llamacpp", "--model-path=" + model, "--llama-lib-dir=" + LlamaLibDir(t)}
		serverEngine = []string{"--llama-threads=1"}
	}
	common := []string{
		"--pool-blocks=" + strconv.Itoa(o.PoolBlocks),
		"--prefill-tokens-per-second=" + strconv.FormatFloat(o.PrefillTokensPerSecond, 'f', -1, 64),
		"--decode-step-time=" + o.DecodeStepTime.String(), "--shutdown-grace=5s",
	}
	common = append(common, serverEngine...)
	s := &Stack{}
	nctx := max(o.Ctxs, 1)
	if o.Aggregated {
		nctx = 0
		o.GenArgs = append([]string{"--aggregated"}, o.GenArgs...)
	}
	for i := range nctx {
		grpcAddr, httpAddr := addr(), addr()
		p := Start(t, logs, filepath.Join(bin, "ctxserver"), append(append(append(common, engine...), "--grpc-addr="+grpcAddr, "--http-addr="+httpAddr, "--data-addr="+addr()), o.CtxArgs...)...)
		p.Name = fmt.Sprintf("ctxserver-%d", i)
		s.Ctxs, s.CtxGRPCs, s.CtxHTTPs = append(s.Ctxs, p), append(s.CtxGRPCs, grpcAddr), append(s.CtxHTTPs, "http://"+httpAddr)
	}
	for i := range max(o.Gens, 1) {
		grpcAddr, httpAddr := addr(), addr()
		p := Start(t, logs, filepath.Join(bin, "genserver"), append(append(append(common, engine...), "--grpc-addr="+grpcAddr, "--http-addr="+httpAddr, "--data-addr="+addr()), o.GenArgs...)...)
		p.Name = fmt.Sprintf("genserver-%d", i)
		s.Gens, s.GenGRPCs, s.GenHTTPs = append(s.Gens, p), append(s.GenGRPCs, grpcAddr), append(s.GenHTTPs, "http://"+httpAddr)
	}
	s.Gen, s.GenGRPC, s.GenHTTP = s.Gens[0], s.GenGRPCs[0], s.GenHTTPs[0]
	if nctx > 0 {
		s.Ctx, s.CtxGRPC, s.CtxHTTP = s.Ctxs[0], s.CtxGRPCs[0], s.CtxHTTPs[0]
	}
	openai, admin := addr(), addr()
	s.RouterGRPC = addr()
	routerArgs := []string{"--ctx-servers=" + strings.Join(s.CtxGRPCs, ",")}
	if o.Aggregated {
		routerArgs = []string{"--aggregated"}
	}
	s.OpenAIURL, s.RouterAdmin = "http://"+openai+"/v1", "http://"+admin
	s.Router = Start(t, logs, filepath.Join(bin, "router"), append(append(engine,
		"--http-addr="+openai, "--grpc-addr="+s.RouterGRPC, "--admin-addr="+admin,
		"--gen-servers="+strings.Join(s.GenGRPCs, ","), "--shutdown-grace=5s",
	), append(routerArgs, o.ExtraRouterArgs...)...)...)
	t.Cleanup(func() {
		if t.Failed() {
			for _, p := range append(append([]*Proc{s.Router}, s.Ctxs...), s.Gens...) {
				t.Logf("--- %s log ---\n%s", p.Name, tail(p.Log(), 40))
			}
		}
	})
	s.WaitReady(t)
	return s
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// WaitReady polls the router's /readyz until it answers 200.
func (s *Stack) WaitReady(t testing.TB) {
	t.Helper()
	Eventually(t, "router ready", func() bool {
		code, _, err := Get(s.RouterAdmin + "/readyz")
		return err == nil && code == http.StatusOK
	})
}

// StopAll stops router, then generation, then context server, and fails
// the test unless each exits cleanly.
func (s *Stack) StopAll(t testing.TB) {
	t.Helper()
	for _, p := range append(append([]*Proc{s.Router}, s.Gens...), s.Ctxs...) {
		if err := p.Stop(); err != nil {
			t.Errorf("%s: unclean stop: %v\n%s", p.Name, err, tail(p.Log(), 20))
		}
	}
}

// Get fetches url and returns status and body.
func Get(url string) (int, string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, "", err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// Metric returns the value of one sample (name with its labels exactly as
// exposed, e.g. `kvferry_blockpool_blocks{state="owned"}`) from a /metrics
// page.
func Metric(t testing.TB, base, sample string) float64 {
	t.Helper()
	samples, err := scrape(base)
	if err != nil {
		t.Fatal(err)
	}
	f, ok := samples[sample]
	if !ok {
		t.Fatalf("sample %s not found on %s/metrics", sample, base)
	}
	return f
}

// MetricIf is Metric for a sample that may not be exposed yet: ok is
// false while it is not.
func MetricIf(t testing.TB, base, sample string) (v float64, ok bool) {
	t.Helper()
	samples, err := scrape(base)
	if err != nil {
		t.Fatal(err)
	}
	v, ok = samples[sample]
	return v, ok
}

// scrape fetches base/metrics once and returns every sample by its name
// with labels as exposed.
func scrape(base string) (map[string]float64, error) {
	code, body, err := Get(base + "/metrics")
	if err != nil || code != http.StatusOK {
		return nil, fmt.Errorf("scrape %s: %d %v", base, code, err)
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(strings.NewReader(body))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		if f, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
			out[line[:i]] = f
		}
	}
	return out, nil
}

// Pool is one server's block pool as its /metrics shows it.
type Pool struct {
	Capacity, Free, Owned, Cached, InFlight, Quarantined, Poisoned float64
}

// ScrapePool reads a server's pool gauges in one scrape.
func ScrapePool(base string) (Pool, error) {
	m, err := scrape(base)
	if err != nil {
		return Pool{}, err
	}
	state := func(s string) float64 { return m[`kvferry_blockpool_blocks{state="`+s+`"}`] }
	return Pool{
		Capacity: m["kvferry_blockpool_capacity_blocks"], Free: state("free"), Owned: state("owned"),
		Cached: m["kvferry_blockpool_cached_blocks"], InFlight: state("in_flight"),
		Quarantined: state("quarantined"), Poisoned: state("poisoned"),
	}, nil
}

// Idle: nothing in flight or quarantined, and the only owned blocks are
// the prefix-reuse cache's.
func (p Pool) Idle() bool { return p.InFlight == 0 && p.Quarantined == 0 && p.Owned == p.Cached }

// Eventually polls cond every 10 ms until it holds or ShouldHappen passes.
func Eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	poll.Until(t, ShouldHappen, 10*time.Millisecond, what, cond)
}

// RunWithBinaries is the body of a TestMain that needs the binaries: it
// builds them (with the race detector when race is set) into a temporary
// directory, stores its path in *bin, runs the tests and removes the
// directory. It returns the exit code for os.Exit. With KVFERRY_BIN_DIR
// set it uses the binaries there instead (a compiled benchmark run on a
// machine without Go).
func RunWithBinaries(m *testing.M, race bool, bin *string) int {
	if dir := os.Getenv("KVFERRY_BIN_DIR"); dir != "" {
		*bin = dir
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "kvferry-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	err = Build(ctx, dir, race)
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	*bin = dir
	return m.Run()
}
