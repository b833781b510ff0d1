// Package transfertest is the conformance suite of kvferry's transports:
// every Backend (tcp, shm, ucx) runs the same table from its own tests with
// Run, so a transport is held to one contract — every byte lands where its
// descriptor says, a cancel at any point gives a proof and nothing lands
// after it, a receiver's finish stops the writer, a stalled or mute writer
// gives no proof, bad descriptors are refused, concurrent sessions do not
// interfere, a killed writer's death proves its session (where the
// transport can tell), and a writer whose target closes stops.
package transfertest

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kvferry/kvferry/internal/leakcheck"
	"github.com/kvferry/kvferry/internal/poll"
	"github.com/kvferry/kvferry/pkg/kvtransfer"
	"github.com/kvferry/kvferry/pkg/kvtransfer/fault"
)

// The conformance suite: every Backend runs the same table. A Backend is a
// target (a receiver over memory it registered) and a writer.

// Backend is one transport under test: how to start a target (a receiver
// over memory it registered) and a writer, and what proofs it can give.
type Backend struct {
	Name  string            // the transport (kvtransfer.Transport*)
	Label string            // the subtest name (Name when empty)
	Env   map[string]string // set while the Backend runs (UCX_TLS)
	// LocalProof: the receiver proves quiescence by itself (tcp: it is the
	// only writer of the blocks); otherwise the proof is the writer's word
	// or its link's close (shm).
	LocalProof bool
	// NoDeathProof: the transport cannot tell the receiver that a writer
	// went away (ucx here), so only the writer's word proves a session.
	NoDeathProof bool
	// Window: blocks posted before any is announced (ucx flushes per
	// window); a cancel from the announcement of block k takes effect at
	// the next window. 0 means 1.
	Window int
	// Listen starts a receiver over size bytes of registered memory,
	// stopped when the test ends.
	Listen func(t testing.TB, size, maxBlock int) *Target
	// NewWriter returns a writer with hooks.
	NewWriter func(progress time.Duration, hooks kvtransfer.Hooks) (kvtransfer.Writer, error)
}

// Target is a running receiver over registered memory.
type Target struct {
	R        *kvtransfer.Receiver
	Endpoint string
	Mem      []byte
}

func newTarget(t *testing.T, b Backend, size, maxBlock int) *Target {
	t.Helper()
	return b.Listen(t, size, maxBlock)
}

func newWriter(t *testing.T, b Backend, progress time.Duration, h kvtransfer.Hooks) kvtransfer.Writer {
	t.Helper()
	w, err := b.NewWriter(progress, h)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.Close)
	return w
}

// Blocks returns the memory of n consecutive blocks of size at block first.
func (tg *Target) Blocks(first, n, size int) ([][]byte, []kvtransfer.Desc) {
	mem, dst := make([][]byte, n), make([]kvtransfer.Desc, n)
	for i := range n {
		off := (first + i) * size
		mem[i] = tg.Mem[off : off+size : off+size]
		dst[i] = kvtransfer.Desc{Offset: uint64(off), Length: uint64(size)}
	}
	return mem, dst
}

// Patterned returns n blocks of size bytes, each different: one random
// block copied, with the block's index stamped every 4 KiB.
func Patterned(n, size int, seed uint64) [][]byte {
	base := RandomBlocks(1, size, seed)[0]
	out := make([][]byte, n)
	for i := range out {
		out[i] = make([]byte, size)
		copy(out[i], base)
		for off := 0; off+8 <= size; off += 4096 {
			binary.LittleEndian.PutUint64(out[i][off:], uint64(i)^seed<<32)
		}
	}
	return out
}

func sameBlocks(t *testing.T, got, want [][]byte) {
	t.Helper()
	for i := range want {
		if !bytes.Equal(got[i], want[i]) {
			t.Fatalf("block %d differs", i)
		}
	}
}

// quiesced records a Finish's proof.
type quiesced chan struct{}

func (q quiesced) fn() func() { return func() { close(q) } }

func (q quiesced) wait(t *testing.T) {
	t.Helper()
	select {
	case <-q:
	case <-time.After(ShouldHappen):
		t.Fatal("quiescence never proven")
	}
}

func (q quiesced) proven() bool {
	select {
	case <-q:
		return true
	default:
		return false
	}
}

func forEachBackend(t *testing.T, bs []Backend, f func(t *testing.T, b Backend)) {
	for _, b := range bs {
		label := b.Label
		if label == "" {
			label = b.Name
		}
		t.Run(label, func(t *testing.T) {
			for k, v := range b.Env {
				t.Setenv(k, v)
			}
			f(t, b)
		})
	}
}

func integrity(t *testing.T, bs []Backend) {
	cases := []struct {
		name        string
		blocks      int
		size        int
		bytesInTest int
	}{
		{"1 block", 1, 4096, 0},
		{"64 blocks", 64, 64 << 10, 0},
		{"1 GiB", 256, 4 << 20, 1 << 30},
	}
	forEachBackend(t, bs, func(t *testing.T, b Backend) {
		for _, c := range cases {
			t.Run(c.name, func(t *testing.T) {
				tg := newTarget(t, b, (c.blocks+1)*c.size, c.size)
				w := newWriter(t, b, 0, kvtransfer.Hooks{})
				// Destinations start at block 1: a Backend that placed by
				// index rather than descriptor would be caught by offset.
				mem, dst := tg.Blocks(1, c.blocks, c.size)
				src := Patterned(c.blocks, c.size, uint64(c.blocks))
				s, err := tg.R.Register(kvtransfer.SessionID{ID: 7}, mem, nil)
				if err != nil {
					t.Fatal(err)
				}
				n, err := w.Write(context.Background(), tg.Endpoint, kvtransfer.SessionID{ID: 7}, src, dst)
				if err != nil || n != int64(c.blocks*c.size) {
					t.Fatalf("write: %d bytes, %v", n, err)
				}
				WaitDone(t, s)
				if err := tg.R.Err(s); err != nil {
					t.Fatal(err)
				}
				if got, _ := tg.R.Progress(s); got != n {
					t.Fatalf("receiver counted %d bytes, writer %d", got, n)
				}
				sameBlocks(t, mem, src)
				if !bytes.Equal(tg.Mem[:c.size], make([]byte, c.size)) {
					t.Fatal("bytes landed outside the destinations")
				}
				q := make(quiesced)
				tg.R.Finish(s, q.fn())
				q.wait(t)
			})
		}
	})
}

// cancelAtEveryPoint cancels the writer before its first
// block, after each block and after the last, then finishes the session on
// the receiver: the proof must come, and afterwards no byte may land.
func cancelAtEveryPoint(t *testing.T, bs []Backend) {
	const n, size = 20, 16 << 10
	forEachBackend(t, bs, func(t *testing.T, b Backend) {
		for at := 0; at <= n; at++ {
			t.Run(strconv.Itoa(at), func(t *testing.T) {
				tg := newTarget(t, b, n*size, size)
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				var written atomic.Int32
				w := newWriter(t, b, 0, kvtransfer.Hooks{OnBlock: func(time.Time) {
					if int(written.Add(1)) == at {
						cancel()
					}
				}})
				if at == 0 {
					cancel()
				}
				mem, dst := tg.Blocks(0, n, size)
				s, err := tg.R.Register(kvtransfer.SessionID{ID: uint64(at) + 1}, mem, nil)
				if err != nil {
					t.Fatal(err)
				}
				_, err = w.Write(ctx, tg.Endpoint, kvtransfer.SessionID{ID: uint64(at) + 1}, Patterned(n, size, 1), dst)
				win := max(b.Window, 1)
				if stops := at == 0 || (at+win-1)/win*win < n; stops && !errors.Is(err, context.Canceled) {
					t.Fatalf("write cancelled at block %d: %v", at, err)
				}
				if err != nil && !errors.Is(err, context.Canceled) {
					t.Fatalf("write cancelled at block %d: %v", at, err)
				}
				q := make(quiesced)
				tg.R.Finish(s, q.fn())
				q.wait(t)
				assertQuiet(t, w, tg, mem)
			})
		}
	})
}

// assertQuiet scribbles over a finished session's blocks, closes the writer
// (which waits for everything it runs) and checks nothing overwrote them.
func assertQuiet(t *testing.T, w kvtransfer.Writer, tg *Target, mem [][]byte) {
	t.Helper()
	for _, m := range mem {
		for i := range m {
			m[i] = 0xee
		}
	}
	w.Close()
	for i, m := range mem {
		if !bytes.Equal(m, bytes.Repeat([]byte{0xee}, len(m))) {
			t.Fatalf("block %d written after quiescence", i)
		}
	}
}

// receiverAbort finishes a session while its writer is in
// the middle of it: the writer must stop, and the proof must come only
// when it did.
func receiverAbort(t *testing.T, bs []Backend) {
	const n, size = 50, 16 << 10
	forEachBackend(t, bs, func(t *testing.T, b Backend) {
		tg := newTarget(t, b, n*size, size)
		first := make(chan struct{})
		var once sync.Once
		w := newWriter(t, b, 0, kvtransfer.Hooks{
			Fault:   MustFault(t, "delay:after=1,delay=5ms"),
			OnBlock: func(time.Time) { once.Do(func() { close(first) }) },
		})
		mem, dst := tg.Blocks(0, n, size)
		s, err := tg.R.Register(kvtransfer.SessionID{ID: 9}, mem, nil)
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() {
			_, err := w.Write(context.Background(), tg.Endpoint, kvtransfer.SessionID{ID: 9}, Patterned(n, size, 2), dst)
			done <- err
		}()
		<-first
		q := make(quiesced)
		tg.R.Finish(s, q.fn())
		select {
		case err := <-done:
			// A tcp receiver discards a finished session's frames, so its
			// writer may finish unaware; a writer into shared memory must
			// be stopped.
			if err == nil && !b.LocalProof {
				t.Fatal("write succeeded into a finished session")
			}
		case <-time.After(ShouldHappen):
			t.Fatal("writer did not stop after the receiver finished the session")
		}
		q.wait(t)
		assertQuiet(t, w, tg, mem)
	})
}

// releaseFails: a stalled transport gives no proof. tcp's
// receiver proves quiescence itself (no frame is being read); an shm
// session stays in doubt until the writer stops, and under lose-abort-ack
// until its link closes.
func releaseFails(t *testing.T, bs []Backend) {
	const n, size = 4, 8 << 10
	for _, kind := range []string{fault.KindStall, fault.KindLoseAbortAck} {
		forEachBackend(t, bs, func(t *testing.T, b Backend) {
			t.Run(kind, func(t *testing.T) {
				tg := newTarget(t, b, n*size, size)
				f := MustFault(t, "stall:after=2")
				if kind == fault.KindLoseAbortAck {
					f = MustFault(t, "lose-abort-ack")
				}
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				var written atomic.Int32
				reached := make(chan struct{})
				w := newWriter(t, b, 0, kvtransfer.Hooks{Fault: f, OnBlock: func(time.Time) {
					if written.Add(1) == 2 {
						if kind == fault.KindLoseAbortAck {
							cancel() // the writer stops before block 3, and says nothing
						}
						close(reached)
					}
				}})
				mem, dst := tg.Blocks(0, n, size)
				s, err := tg.R.Register(kvtransfer.SessionID{ID: 11}, mem, nil)
				if err != nil {
					t.Fatal(err)
				}
				done := make(chan error, 1)
				go func() {
					_, err := w.Write(ctx, tg.Endpoint, kvtransfer.SessionID{ID: 11}, Patterned(n, size, 3), dst)
					done <- err
				}()
				writerReturned := sync.OnceFunc(func() { <-done })
				defer writerReturned()
				<-reached
				if kind == fault.KindLoseAbortAck {
					writerReturned()
				}
				q := make(quiesced)
				tg.R.Finish(s, q.fn())
				if b.LocalProof {
					q.wait(t)
					cancel()
					return
				}
				// A receiver-driven release is asked again (the reaper's
				// Reask); a stalled or mute writer still answers nothing.
				tg.R.Reask()
				if q.proven() {
					t.Fatal("proof while the writer may still write")
				}
				switch kind {
				case fault.KindStall:
					cancel() // the stall ends: the writer stops and says DONE
					writerReturned()
				case fault.KindLoseAbortAck:
					if b.NoDeathProof {
						// Nothing but the writer's word proves it: the
						// session stays in doubt (the reaper poisons it at
						// the quarantine deadline).
						tg.R.Reask()
						if q.proven() {
							t.Fatal("proof from a writer that never answered")
						}
						return
					}
					w.Close() // closing the link is the writer's last word
				}
				q.wait(t)
			})
		})
	}
}

// badDescriptors: the writer rejects destinations outside
// the target's memory before writing; the receiver ends a session whose
// peer names a block outside it.
func badDescriptors(t *testing.T, bs []Backend) {
	const size = 4096
	forEachBackend(t, bs, func(t *testing.T, b Backend) {
		tg := newTarget(t, b, 4*size, size)
		w := newWriter(t, b, 0, kvtransfer.Hooks{})
		mem, _ := tg.Blocks(0, 2, size)
		s, err := tg.R.Register(kvtransfer.SessionID{ID: 13}, mem, nil)
		if err != nil {
			t.Fatal(err)
		}
		bad := [][]kvtransfer.Desc{
			{{Offset: 0, Length: size}},                                   // too few
			{{Offset: 0, Length: size}, {Offset: 0, Length: size / 2}},    // wrong length
			{{Offset: 0, Length: size}, {Offset: 4 * size, Length: size}}, // past the end
			{{Offset: 0, Length: size}, {Offset: 1<<64 - 1, Length: size}},
		}
		for i, dst := range bad {
			_, err := w.Write(context.Background(), tg.Endpoint, kvtransfer.SessionID{ID: 13}, Patterned(2, size, 4), dst)
			if !errors.Is(err, kvtransfer.ErrBadDescriptor) && !(b.LocalProof && i > 0) {
				t.Fatalf("descriptors %v: %v", dst, err)
			}
			if b.LocalProof && i > 0 {
				// tcp places by position; its receiver checks lengths.
				continue
			}
		}
		select {
		case <-s.Done():
			if b.Name == kvtransfer.TransportShm {
				t.Fatalf("rejected writes touched the session: %v", tg.R.Err(s))
			}
		default:
		}
		q := make(quiesced)
		tg.R.Finish(s, q.fn())
		q.wait(t)
	})
}

// concurrentSessions: sessions into disjoint blocks of one
// target do not interfere.
func concurrentSessions(t *testing.T, bs []Backend) {
	const sessions, n, size = 8, 8, 16 << 10
	forEachBackend(t, bs, func(t *testing.T, b Backend) {
		tg := newTarget(t, b, sessions*n*size, size)
		w := newWriter(t, b, 0, kvtransfer.Hooks{})
		var wg sync.WaitGroup
		errs := make(chan error, sessions)
		for k := range sessions {
			mem, dst := tg.Blocks(k*n, n, size)
			src := Patterned(n, size, uint64(k)+100)
			s, err := tg.R.Register(kvtransfer.SessionID{ID: uint64(k) + 1}, mem, nil)
			if err != nil {
				t.Fatal(err)
			}
			wg.Go(func() {
				if _, err := w.Write(context.Background(), tg.Endpoint, kvtransfer.SessionID{ID: uint64(k) + 1}, src, dst); err != nil {
					errs <- err
					return
				}
				<-s.Done()
				if err := tg.R.Err(s); err != nil {
					errs <- err
					return
				}
				for i := range src {
					if !bytes.Equal(mem[i], src[i]) {
						errs <- fmt.Errorf("session %d block %d differs", k, i)
						return
					}
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
	})
}

// The peer-death test runs the writer in a child process: the test binary
// re-executed with these variables set.
const (
	childBackend  = "KVFERRY_TEST_WRITER_BACKEND"
	childEndpoint = "KVFERRY_TEST_WRITER_ENDPOINT"
)

// Main is the TestMain of a backend's package: the child writer of the
// peer-death test when the binary is re-executed as one, else the tests,
// checked for leaked goroutines.
func Main(m *testing.M, bs ...Backend) {
	childMain(bs...)
	leakcheck.VerifyTestMain(m)
}

// childMain is the child writer of the peer-death test: in the parent it
// returns at once; in the child it writes and exits.
func childMain(bs ...Backend) {
	name := os.Getenv(childBackend)
	if name == "" {
		return
	}
	for _, b := range bs {
		if b.Name == name {
			os.Exit(runChildWriter(b, os.Getenv(childEndpoint)))
		}
	}
	os.Exit(2)
}

// runChildWriter writes a slow 40-block session 99 and never returns on its
// own within a test's time: the parent kills it.
func runChildWriter(b Backend, endpoint string) int {
	const n, size = 40, 4096
	f, err := fault.Parse("delay:after=1,delay=1s", time.Now())
	if err != nil {
		return 2
	}
	w, err := b.NewWriter(0, kvtransfer.Hooks{Fault: f})
	if err != nil {
		return 2
	}
	dst := make([]kvtransfer.Desc, n)
	for i := range dst {
		dst[i] = kvtransfer.Desc{Offset: uint64(i * size), Length: size}
	}
	if _, err := w.Write(context.Background(), endpoint, kvtransfer.SessionID{ID: 99}, Patterned(n, size, 5), dst); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// peerDeath kills the writer process mid-session: the
// session fails, and the writer's death proves it quiet.
func peerDeath(t *testing.T, bs []Backend) {
	const n, size = 40, 4096
	forEachBackend(t, bs, func(t *testing.T, b Backend) {
		tg := newTarget(t, b, n*size, size)
		mem, _ := tg.Blocks(0, n, size)
		s, err := tg.R.Register(kvtransfer.SessionID{ID: 99}, mem, nil)
		if err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), childBackend+"="+b.Name, childEndpoint+"="+tg.Endpoint)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		Eventually(t, "first block from the child", func() bool { got, _ := tg.R.Progress(s); return got > 0 })
		q := make(quiesced)
		if !b.LocalProof {
			tg.R.Finish(s, q.fn())
			if q.proven() {
				t.Fatal("proof while the writer lives")
			}
		}
		if err := cmd.Process.Signal(unix.SIGKILL); err != nil {
			t.Fatal(err)
		}
		_ = cmd.Wait()
		if b.NoDeathProof {
			// The transport cannot tell that the writer died: the session
			// must stay in doubt (its blocks quarantined until the deadline
			// poisons them), asked again or not.
			tg.R.Reask()
			if q.proven() {
				t.Fatal("proof from a writer that died without a word")
			}
			return
		}
		if b.LocalProof {
			// The tcp receiver is the only writer of the blocks: no frame
			// being read is its proof, whatever became of the peer.
			tg.R.Finish(s, q.fn())
		}
		q.wait(t)
		if err := tg.R.Err(s); err == nil {
			t.Fatal("a killed writer's session completed")
		}
	})
}

// targetGone: a writer whose target closes stops with an
// error instead of hanging.
func targetGone(t *testing.T, bs []Backend) {
	const n, size = 200, 4096
	forEachBackend(t, bs, func(t *testing.T, b Backend) {
		tg := newTarget(t, b, n*size, size)
		closed := make(chan struct{})
		var once sync.Once
		w := newWriter(t, b, time.Second, kvtransfer.Hooks{OnBlock: func(time.Time) {
			once.Do(func() {
				_ = tg.R.Close()
				close(closed)
			})
		}})
		mem, dst := tg.Blocks(0, n, size)
		if _, err := tg.R.Register(kvtransfer.SessionID{ID: 31}, mem, nil); err != nil {
			t.Fatal(err)
		}
		src := Patterned(n, size, 6)
		_, err := w.Write(context.Background(), tg.Endpoint, kvtransfer.SessionID{ID: 31}, src, dst)
		<-closed
		if err == nil {
			// tcp may have buffered every frame before it noticed; the next
			// write must fail.
			_, err = w.Write(context.Background(), tg.Endpoint, kvtransfer.SessionID{ID: 32}, src, dst)
		}
		if err == nil {
			t.Fatal("writes to a closed target succeeded")
		}
	})
}

// Run runs the conformance suite on every backend, each case a subtest.
func Run(t *testing.T, bs ...Backend) {
	for _, c := range []struct {
		name string
		run  func(*testing.T, []Backend)
	}{
		{"Integrity", integrity}, {"CancelAtEveryPoint", cancelAtEveryPoint}, {"ReceiverAbort", receiverAbort},
		{"ReleaseFails", releaseFails}, {"BadDescriptors", badDescriptors}, {"ConcurrentSessions", concurrentSessions},
		{"PeerDeath", peerDeath}, {"TargetGone", targetGone},
	} {
		t.Run(c.name, func(t *testing.T) { c.run(t, bs) })
	}
}

// ShouldHappen bounds every wait for something that must happen.
const ShouldHappen = 10 * time.Second

// Eventually polls cond every millisecond until it holds or ShouldHappen
// passes.
func Eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	poll.Until(t, ShouldHappen, time.Millisecond, what, cond)
}

// WaitDone waits for a receive session to end.
func WaitDone(t testing.TB, s *kvtransfer.RecvSession) {
	t.Helper()
	select {
	case <-s.Done():
	case <-time.After(ShouldHappen):
		t.Fatal("session never ended")
	}
}

// RandomBlocks returns n blocks of size random bytes (seeded).
func RandomBlocks(n, size int, seed uint64) [][]byte {
	rng := rand.New(rand.NewPCG(seed, seed))
	out := make([][]byte, n)
	for i := range out {
		out[i] = make([]byte, size)
		for j := range out[i] {
			out[i][j] = byte(rng.Uint32())
		}
	}
	return out
}

// MustFault parses a --transport-fault spec.
func MustFault(t testing.TB, spec string) *fault.Fault {
	t.Helper()
	f, err := fault.Parse(spec, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return f
}
