// Command transfer measures the KV data path between two processes (make
// bench-transfer): a 4,096-token KV of a model preset (llama3-8b: 512 MiB)
// written from this process into a target process, each backend beside its
// same-run baseline:
//
//	tcp: a raw TCP copy between the same two processes, same write size;
//	tcp+tls: kvferry's plain tcp (the cost of --data-tls);
//	shm: copy() of the same bytes inside one process (the memcpy bound);
//	ucx: ucx_perftest ucp_put_bw between two processes, same UCX_TLS, same
//	     message size (one block) and count (binary built with -tags ucx).
//
// It prints one line per backend with the medians of -runs runs (after one
// warm-up run that faults the pages in):
//
//	transfer backend=tcp gbps=2.85 baseline=raw_tcp baseline_gbps=3.05 ratio=0.93 allocs_per_mib=0.1
//
// The target is this binary re-executed with -role; parent and child speak
// one line at a time over the child's stdin and stdout.
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/pkg/identity"
	"github.com/kvferry/kvferry/pkg/kvtransfer"
	"github.com/kvferry/kvferry/pkg/kvtransfer/shm"
	"github.com/kvferry/kvferry/pkg/kvtransfer/tcp"
	"github.com/kvferry/kvferry/pkg/kvtransfer/transports"
	"github.com/kvferry/kvferry/pkg/kvtransfer/ucx"
	"github.com/kvferry/kvferry/pkg/serving"
)

func main() {
	role := flag.String("role", "", "internal: run as the target (tcp, shm, raw_tcp)")
	backends := flag.String("backends", "tcp,tcp+tls,shm", "backends to measure, in turn")
	model := flag.String("model", "llama3-8b", "model preset whose KV geometry is moved")
	tokens := flag.Int("tokens", 4096, "prompt tokens whose KV is moved")
	runs := flag.Int("runs", 5, "measured runs per backend and baseline (the median is printed)")
	cpuProfile := flag.String("cpuprofile", "", "write this process's CPU profile (the writing side) to the file")
	flag.Parse()
	spec, err := executor.Preset(*model)
	if err != nil {
		fatal(err)
	}
	n, size := spec.BlocksFor(*tokens), spec.BlockBytes()
	if *role != "" {
		if err := target(*role, n, size); err != nil {
			fatal(err)
		}
		return
	}
	certs, err := os.MkdirTemp("", "kvferry-bench-certs")
	if err != nil {
		fatal(err)
	}
	defer os.RemoveAll(certs)
	if _, err := identity.WriteDev(certs, identity.DefaultTrustDomain, []string{"127.0.0.1"}, time.Hour); err != nil {
		fatal(err)
	}
	_ = os.Setenv(benchCertsEnv, certs)
	src := make([][]byte, n)
	slab := make([]byte, n*size)
	for i := range slab {
		slab[i] = byte(i*7 + i>>12)
	}
	for i := range src {
		src[i] = slab[i*size : (i+1)*size]
	}
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			fatal(err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			fatal(err)
		}
		defer pprof.StopCPUProfile()
	}
	fmt.Printf("# %s, %d tokens: %d blocks of %d KiB = %d MiB; GOMAXPROCS=%d; %d runs, medians\n",
		spec.Name, *tokens, n, size>>10, n*size>>20, runtime.GOMAXPROCS(0), *runs)
	for _, b := range strings.Split(*backends, ",") {
		if err := measure(b, src, n, size, *runs); err != nil {
			fatal(fmt.Errorf("%s: %w", b, err))
		}
	}
}

// run is one timed transfer of the whole KV; it returns its duration and
// this process's allocations.
type run func() (time.Duration, uint64, error)

// measure alternates the backend and its baseline run by run, so both see
// the same machine (shared 2-core VMs drift by 2x over seconds), and prints
// the medians and the median of the per-pair ratios.
func measure(name string, src [][]byte, n, size, runs int) error {
	backend, stopBackend, err := backendRun(name, src, n, size)
	if err != nil {
		return err
	}
	defer stopBackend()
	base, baseName, stopBase, err := baselineRun(name, src, n, size)
	if err != nil {
		return fmt.Errorf("baseline: %w", err)
	}
	defer stopBase()
	var got, want, ratios []float64
	var allocs uint64
	for i := range runs + 1 { // run 0 warms up: pages faulted in, connections made
		d, a, err := backend()
		if err != nil {
			return err
		}
		bd, _, err := base()
		if err != nil {
			return fmt.Errorf("baseline: %w", err)
		}
		if i == 0 {
			continue
		}
		got, want = append(got, gbps(n*size, d)), append(want, gbps(n*size, bd))
		ratios = append(ratios, bd.Seconds()/d.Seconds())
		allocs += a
	}
	label := name
	if name == kvtransfer.TransportUCX {
		label += "(UCX_TLS=" + os.Getenv("UCX_TLS") + ")"
	}
	fmt.Printf("transfer backend=%s gbps=%.2f baseline=%s baseline_gbps=%.2f ratio=%.2f allocs_per_mib=%.2f\n",
		label, median(got), baseName, median(want), median(ratios), float64(allocs)/float64(runs)/float64(n*size>>20))
	if name == kvtransfer.TransportUCX {
		// ucx_perftest puts every message from and to one buffer: at one
		// block that buffer stays in cache. The same UCX_TLS moving the whole
		// KV as one message is the memory-bound reference.
		d, _, err := perftest(3, n*size)
		if err != nil {
			return err
		}
		fmt.Printf("# ucx_perftest ucp_put_bw, 3 messages of %d MiB: %.2f GB/s (ratio of the backend to it: %.2f)\n", n*size>>20, gbps(3*n*size, d), median(got)/gbps(3*n*size, d))
	}
	return nil
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "bench-transfer:", err)
	os.Exit(1)
}

// child is a running target process.
type child struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Scanner
}

func startChild(role string) (*child, string, error) {
	cmd := exec.Command(os.Args[0], append([]string{"-role=" + role}, os.Args[1:]...)...)
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, "", err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, "", err
	}
	if err := cmd.Start(); err != nil {
		return nil, "", err
	}
	c := &child{cmd: cmd, in: in, out: bufio.NewScanner(out)}
	ep, err := c.ask("")
	return c, ep, err
}

// ask sends one line (none when empty) and returns the child's answer.
func (c *child) ask(line string) (string, error) {
	if line != "" {
		if _, err := fmt.Fprintln(c.in, line); err != nil {
			return "", err
		}
	}
	if !c.out.Scan() {
		return "", fmt.Errorf("target exited: %v", c.out.Err())
	}
	ans := c.out.Text()
	if strings.HasPrefix(ans, "error") {
		return "", fmt.Errorf("target: %s", ans)
	}
	return ans, nil
}

func (c *child) stop() {
	_ = c.in.Close()
	_ = c.cmd.Wait()
}

func gbps(bytes int, d time.Duration) float64 { return float64(bytes) / d.Seconds() / 1e9 }

func median(xs []float64) float64 {
	slices.Sort(xs)
	return xs[len(xs)/2]
}

// backendRun returns a run that times Write plus the target's completion
// (its DONE seen) into a target process.
func backendRun(name string, src [][]byte, n, size int) (run, func(), error) {
	c, ep, err := startChild(name)
	if err != nil {
		return nil, nil, err
	}
	var w kvtransfer.Writer
	if name == kvtransfer.TransportTCPTLS {
		_, clientTLS, terr := benchTLS(identity.CtxServer).DataConfigs()
		w, err = tcp.NewTLSWriter(30*time.Second, clientTLS), terr
	} else {
		w, err = transports.NewWriter(name, 30*time.Second, kvtransfer.Hooks{})
	}
	if err != nil {
		c.stop()
		return nil, nil, err
	}
	dst := make([]kvtransfer.Desc, n)
	for i := range dst {
		dst[i] = kvtransfer.Desc{Offset: uint64(i * size), Length: uint64(size)}
	}
	session := uint64(0)
	return func() (time.Duration, uint64, error) {
			session++
			if _, err := c.ask(fmt.Sprintf("session %d", session)); err != nil {
				return 0, 0, err
			}
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			start := time.Now()
			if _, err := w.Write(context.Background(), ep, kvtransfer.SessionID{ID: session}, src, dst); err != nil {
				return 0, 0, err
			}
			if _, err := c.ask(""); err != nil { // "done": every block landed and was announced
				return 0, 0, err
			}
			d := time.Since(start)
			runtime.ReadMemStats(&after)
			return d, after.Mallocs - before.Mallocs, nil
		}, func() {
			w.Close()
			c.stop()
		}, nil
}

// baselineRun returns what the backend is compared with: a raw TCP copy
// into another process for tcp, copy() in this process for shm.
func baselineRun(name string, src [][]byte, n, size int) (run, string, func(), error) {
	switch name {
	case kvtransfer.TransportTCPTLS:
		r, stop, err := backendRun(kvtransfer.TransportTCP, src, n, size)
		return r, kvtransfer.TransportTCP, stop, err
	case kvtransfer.TransportTCP:
		c, ep, err := startChild("raw_tcp")
		if err != nil {
			return nil, "", nil, err
		}
		conn, err := net.Dial("tcp", ep)
		if err != nil {
			c.stop()
			return nil, "", nil, err
		}
		return func() (time.Duration, uint64, error) {
				start := time.Now()
				for _, b := range src {
					if _, err := conn.Write(b); err != nil {
						return 0, 0, err
					}
				}
				_, err := c.ask("")
				return time.Since(start), 0, err
			}, "raw_tcp", func() {
				_ = conn.Close()
				c.stop()
			}, nil
	case kvtransfer.TransportShm:
		dst := make([]byte, n*size)
		return func() (time.Duration, uint64, error) {
			start := time.Now()
			for i, b := range src {
				copy(dst[i*size:], b)
			}
			return time.Since(start), 0, nil
		}, "memcpy", func() {}, nil
	case kvtransfer.TransportUCX:
		return func() (time.Duration, uint64, error) { return perftest(n, size) }, "ucx_perftest_put_bw", func() {}, nil
	}
	return nil, "", nil, fmt.Errorf("no baseline for %s", name)
}

// perftest runs ucx_perftest ucp_put_bw (server and client, two processes,
// the caller's UCX_TLS) with n messages of size bytes and returns the time
// its reported average bandwidth implies for n×size bytes.
func perftest(n, size int) (time.Duration, uint64, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0") // a free port for its rendezvous
	if err != nil {
		return 0, 0, err
	}
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	_ = ln.Close()
	srv := exec.Command("ucx_perftest", "-p", port)
	if err := srv.Start(); err != nil {
		return 0, 0, fmt.Errorf("ucx_perftest (ucx-utils): %w", err)
	}
	defer func() {
		_ = srv.Process.Kill()
		_ = srv.Wait()
	}()
	var out []byte
	for range 50 { // the server needs a moment to listen: retry the client
		out, err = exec.Command("ucx_perftest", "127.0.0.1", "-p", port, "-t", "ucp_put_bw",
			"-s", strconv.Itoa(size), "-n", strconv.Itoa(n)).CombinedOutput()
		if err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		return 0, 0, fmt.Errorf("ucx_perftest: %w\n%s", err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) >= 6 && f[0] == "Final:" {
			mbps, err := strconv.ParseFloat(f[5], 64) // average bandwidth, MiB/s
			if err != nil {
				return 0, 0, err
			}
			return time.Duration(float64(n*size) / (mbps * (1 << 20)) * float64(time.Second)), 0, nil
		}
	}
	return 0, 0, fmt.Errorf("ucx_perftest: no Final line in\n%s", out)
}

// benchTLS is the --tls-* files of role from the certificates the parent
// wrote (benchCertsEnv names their directory; the child inherits it).
func benchTLS(role identity.Role) serving.TLSFiles {
	dir := os.Getenv(benchCertsEnv)
	return serving.TLSFiles{CA: filepath.Join(dir, "ca.pem"), Cert: filepath.Join(dir, string(role)+".pem"),
		Key: filepath.Join(dir, string(role)+"-key.pem"), TrustDomain: identity.DefaultTrustDomain}
}

const benchCertsEnv = "KVFERRY_BENCH_CERTS"

// target serves one backend: it prints its endpoint, then for each
// "session ID" line registers the whole memory as the session's blocks,
// answers "registered", and answers "done" when the session completed.
func target(role string, n, size int) error {
	in := bufio.NewScanner(os.Stdin)
	var mem []byte
	var r *kvtransfer.Receiver
	var err error
	switch role {
	case kvtransfer.TransportTCP:
		mem = make([]byte, n*size)
		r, err = tcp.Listen("127.0.0.1:0", size, zap.NewNop())
	case kvtransfer.TransportTCPTLS:
		mem = make([]byte, n*size)
		serverTLS, _, terr := benchTLS(identity.GenServer).DataConfigs()
		if terr != nil {
			return terr
		}
		ln, lerr := net.Listen("tcp", "127.0.0.1:0")
		if lerr != nil {
			return lerr
		}
		r = tcp.Serve(tls.NewListener(ln, serverTLS), size, zap.NewNop())
	case kvtransfer.TransportShm:
		var m *shm.Memory
		if m, err = shm.NewMemory(n * size); err != nil {
			return err
		}
		defer m.Close()
		mem = m.Bytes()
		dir, derr := os.MkdirTemp("", "kvferry-bench")
		if derr != nil {
			return derr
		}
		defer os.RemoveAll(dir)
		r, err = shm.Listen(filepath.Join(dir, "kv.sock"), m, size, zap.NewNop())
	case kvtransfer.TransportUCX:
		r, mem, err = ucx.Listen(n*size, size, zap.NewNop())
	case "raw_tcp":
		return rawTarget(in, n*size)
	default:
		return fmt.Errorf("unknown role %q", role)
	}
	if err != nil {
		return err
	}
	defer r.Close()
	for i := 0; i < len(mem); i += 4096 {
		mem[i] = 0 // fault the pages in before the first run
	}
	fmt.Println(r.Endpoint())
	dests := make([][]byte, n)
	for i := range dests {
		dests[i] = mem[i*size : (i+1)*size : (i+1)*size]
	}
	for in.Scan() {
		var id uint64
		if _, err := fmt.Sscanf(in.Text(), "session %d", &id); err != nil {
			fmt.Println("error", err)
			continue
		}
		s, err := r.Register(kvtransfer.SessionID{ID: id}, dests, nil)
		if err != nil {
			fmt.Println("error", err)
			continue
		}
		fmt.Println("registered")
		<-s.Done()
		if err := r.Err(s); err != nil {
			fmt.Println("error", err)
		} else {
			fmt.Println("done")
		}
		quiet := make(chan struct{})
		r.Finish(s, func() { close(quiet) })
		<-quiet
	}
	return nil
}

// rawTarget accepts one connection and reads total bytes per run into one
// buffer, answering "done" after each.
func rawTarget(in *bufio.Scanner, total int) error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer ln.Close()
	fmt.Println(ln.Addr().String())
	c, err := ln.Accept()
	if err != nil {
		return err
	}
	defer c.Close()
	buf := make([]byte, total)
	for {
		if _, err := io.ReadFull(c, buf); err != nil {
			return nil // the parent closed: done
		}
		fmt.Println("done")
	}
}
