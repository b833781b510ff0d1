package kvtransfer

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/kvferry/kvferry/pkg/kvtransfer/fault"
)

// The conformance suite: every backend runs the same table. A backend is a
// target (a receiver over memory it registered) and a writer.

type backend struct {
	name  string
	label string            // the subtest name (name when empty)
	env   map[string]string // set while the row runs (UCX_TLS)
	// localProof: the receiver proves quiescence by itself (tcp: it is the
	// only writer of the blocks); otherwise the proof is the writer's word
	// or its link's close (shm).
	localProof bool
	// noDeathProof: the transport cannot tell the receiver that a writer
	// went away (ucx here), so only the writer's word proves a session.
	noDeathProof bool
	// window: blocks posted before any is announced (ucx flushes per
	// window); a cancel from the announcement of block k takes effect at
	// the next window. 0 means 1.
	window int
}

// backends is every backend of this build; the ucx rows are added under
// the ucx tag.
var backends = []backend{{name: TransportTCP, localProof: true}, {name: TransportShm}}

// target is a running receiver over size bytes of registered memory.
type target struct {
	r        *Receiver
	endpoint string
	mem      []byte
}

func newTarget(t *testing.T, b backend, size, maxBlock int) *target {
	t.Helper()
	switch b.name {
	case TransportTCP:
		r := newReceiver(t, maxBlock)
		return &target{r: r, endpoint: r.Endpoint(), mem: make([]byte, size)}
	case TransportUCX:
		r, mem, err := ListenUCX(size, maxBlock, zap.NewNop())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = r.Close() })
		return &target{r: r, endpoint: r.Endpoint(), mem: mem}
	case TransportShm:
		m, err := NewShmMemory(size)
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(t.TempDir(), "kv.sock")
		r, err := ListenShm(path, m, maxBlock, zap.NewNop())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			_ = r.Close()
			_ = m.Close()
		})
		return &target{r: r, endpoint: path, mem: m.Bytes()}
	}
	t.Fatalf("unknown backend %s", b.name)
	return nil
}

func newWriter(t *testing.T, b backend, progress time.Duration, h Hooks) Writer {
	t.Helper()
	w, err := NewWriter(b.name, progress, h)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.Close)
	return w
}

// blocks returns the memory of n consecutive blocks of size at block first.
func (tg *target) blocks(first, n, size int) ([][]byte, []Desc) {
	mem, dst := make([][]byte, n), make([]Desc, n)
	for i := range n {
		off := (first + i) * size
		mem[i] = tg.mem[off : off+size : off+size]
		dst[i] = Desc{Offset: uint64(off), Length: uint64(size)}
	}
	return mem, dst
}

// patterned returns n blocks of size bytes, each different: one random
// block copied, with the block's index stamped every 4 KiB.
func patterned(n, size int, seed uint64) [][]byte {
	base := randomBlocks(1, size, seed)[0]
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
	case <-time.After(shouldHappen):
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

func forEachBackend(t *testing.T, f func(t *testing.T, b backend)) {
	for _, b := range backends {
		label := b.label
		if label == "" {
			label = b.name
		}
		t.Run(label, func(t *testing.T) {
			for k, v := range b.env {
				t.Setenv(k, v)
			}
			f(t, b)
		})
	}
}

func TestConformanceIntegrity(t *testing.T) {
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
	forEachBackend(t, func(t *testing.T, b backend) {
		for _, c := range cases {
			t.Run(c.name, func(t *testing.T) {
				tg := newTarget(t, b, (c.blocks+1)*c.size, c.size)
				w := newWriter(t, b, 0, Hooks{})
				// Destinations start at block 1: a backend that placed by
				// index rather than descriptor would be caught by offset.
				mem, dst := tg.blocks(1, c.blocks, c.size)
				src := patterned(c.blocks, c.size, uint64(c.blocks))
				s, err := tg.r.Register(SessionID{ID: 7}, mem, nil)
				if err != nil {
					t.Fatal(err)
				}
				n, err := w.Write(context.Background(), tg.endpoint, SessionID{ID: 7}, src, dst)
				if err != nil || n != int64(c.blocks*c.size) {
					t.Fatalf("write: %d bytes, %v", n, err)
				}
				waitDone(t, s)
				if err := tg.r.Err(s); err != nil {
					t.Fatal(err)
				}
				if got, _ := tg.r.Progress(s); got != n {
					t.Fatalf("receiver counted %d bytes, writer %d", got, n)
				}
				sameBlocks(t, mem, src)
				if !bytes.Equal(tg.mem[:c.size], make([]byte, c.size)) {
					t.Fatal("bytes landed outside the destinations")
				}
				q := make(quiesced)
				tg.r.Finish(s, q.fn())
				q.wait(t)
			})
		}
	})
}

// TestConformanceCancelAtEveryPoint cancels the writer before its first
// block, after each block and after the last, then finishes the session on
// the receiver: the proof must come, and afterwards no byte may land.
func TestConformanceCancelAtEveryPoint(t *testing.T) {
	const n, size = 20, 16 << 10
	forEachBackend(t, func(t *testing.T, b backend) {
		for at := 0; at <= n; at++ {
			t.Run(strconv.Itoa(at), func(t *testing.T) {
				tg := newTarget(t, b, n*size, size)
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				var written atomic.Int32
				w := newWriter(t, b, 0, Hooks{OnBlock: func(time.Time) {
					if int(written.Add(1)) == at {
						cancel()
					}
				}})
				if at == 0 {
					cancel()
				}
				mem, dst := tg.blocks(0, n, size)
				s, err := tg.r.Register(SessionID{ID: uint64(at) + 1}, mem, nil)
				if err != nil {
					t.Fatal(err)
				}
				_, err = w.Write(ctx, tg.endpoint, SessionID{ID: uint64(at) + 1}, patterned(n, size, 1), dst)
				win := max(b.window, 1)
				if stops := at == 0 || (at+win-1)/win*win < n; stops && !errors.Is(err, context.Canceled) {
					t.Fatalf("write cancelled at block %d: %v", at, err)
				}
				if err != nil && !errors.Is(err, context.Canceled) {
					t.Fatalf("write cancelled at block %d: %v", at, err)
				}
				q := make(quiesced)
				tg.r.Finish(s, q.fn())
				q.wait(t)
				assertQuiet(t, w, tg, mem)
			})
		}
	})
}

// assertQuiet scribbles over a finished session's blocks, closes the writer
// (which waits for everything it runs) and checks nothing overwrote them.
func assertQuiet(t *testing.T, w Writer, tg *target, mem [][]byte) {
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

// TestConformanceReceiverAbort finishes a session while its writer is in
// the middle of it: the writer must stop, and the proof must come only
// when it did.
func TestConformanceReceiverAbort(t *testing.T) {
	const n, size = 50, 16 << 10
	forEachBackend(t, func(t *testing.T, b backend) {
		tg := newTarget(t, b, n*size, size)
		first := make(chan struct{})
		var once sync.Once
		w := newWriter(t, b, 0, Hooks{
			Fault:   mustFault(t, "delay:after=1,delay=5ms"),
			OnBlock: func(time.Time) { once.Do(func() { close(first) }) },
		})
		mem, dst := tg.blocks(0, n, size)
		s, err := tg.r.Register(SessionID{ID: 9}, mem, nil)
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() {
			_, err := w.Write(context.Background(), tg.endpoint, SessionID{ID: 9}, patterned(n, size, 2), dst)
			done <- err
		}()
		<-first
		q := make(quiesced)
		tg.r.Finish(s, q.fn())
		select {
		case err := <-done:
			// A tcp receiver discards a finished session's frames, so its
			// writer may finish unaware; a writer into shared memory must
			// be stopped.
			if err == nil && !b.localProof {
				t.Fatal("write succeeded into a finished session")
			}
		case <-time.After(shouldHappen):
			t.Fatal("writer did not stop after the receiver finished the session")
		}
		q.wait(t)
		assertQuiet(t, w, tg, mem)
	})
}

// TestConformanceReleaseFails: a stalled transport gives no proof. tcp's
// receiver proves quiescence itself (no frame is being read); an shm
// session stays in doubt until the writer stops, and under lose-abort-ack
// until its link closes.
func TestConformanceReleaseFails(t *testing.T) {
	const n, size = 4, 8 << 10
	for _, kind := range []string{fault.KindStall, fault.KindLoseAbortAck} {
		forEachBackend(t, func(t *testing.T, b backend) {
			t.Run(kind, func(t *testing.T) {
				tg := newTarget(t, b, n*size, size)
				f := mustFault(t, "stall:after=2")
				if kind == fault.KindLoseAbortAck {
					f = mustFault(t, "lose-abort-ack")
				}
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				var written atomic.Int32
				reached := make(chan struct{})
				w := newWriter(t, b, 0, Hooks{Fault: f, OnBlock: func(time.Time) {
					if written.Add(1) == 2 {
						if kind == fault.KindLoseAbortAck {
							cancel() // the writer stops before block 3, and says nothing
						}
						close(reached)
					}
				}})
				mem, dst := tg.blocks(0, n, size)
				s, err := tg.r.Register(SessionID{ID: 11}, mem, nil)
				if err != nil {
					t.Fatal(err)
				}
				done := make(chan error, 1)
				go func() {
					_, err := w.Write(ctx, tg.endpoint, SessionID{ID: 11}, patterned(n, size, 3), dst)
					done <- err
				}()
				writerReturned := sync.OnceFunc(func() { <-done })
				defer writerReturned()
				<-reached
				if kind == fault.KindLoseAbortAck {
					writerReturned()
				}
				q := make(quiesced)
				tg.r.Finish(s, q.fn())
				if b.localProof {
					q.wait(t)
					cancel()
					return
				}
				// A receiver-driven release is asked again (the reaper's
				// Reask); a stalled or mute writer still answers nothing.
				tg.r.Reask()
				if q.proven() {
					t.Fatal("proof while the writer may still write")
				}
				switch kind {
				case fault.KindStall:
					cancel() // the stall ends: the writer stops and says DONE
					writerReturned()
				case fault.KindLoseAbortAck:
					if b.noDeathProof {
						// Nothing but the writer's word proves it: the
						// session stays in doubt (the reaper poisons it at
						// the quarantine deadline).
						tg.r.Reask()
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

// TestConformanceBadDescriptors: the writer rejects destinations outside
// the target's memory before writing; the receiver ends a session whose
// peer names a block outside it.
func TestConformanceBadDescriptors(t *testing.T) {
	const size = 4096
	forEachBackend(t, func(t *testing.T, b backend) {
		tg := newTarget(t, b, 4*size, size)
		w := newWriter(t, b, 0, Hooks{})
		mem, _ := tg.blocks(0, 2, size)
		s, err := tg.r.Register(SessionID{ID: 13}, mem, nil)
		if err != nil {
			t.Fatal(err)
		}
		bad := [][]Desc{
			{{Offset: 0, Length: size}},                                   // too few
			{{Offset: 0, Length: size}, {Offset: 0, Length: size / 2}},    // wrong length
			{{Offset: 0, Length: size}, {Offset: 4 * size, Length: size}}, // past the end
			{{Offset: 0, Length: size}, {Offset: 1<<64 - 1, Length: size}},
		}
		for i, dst := range bad {
			_, err := w.Write(context.Background(), tg.endpoint, SessionID{ID: 13}, patterned(2, size, 4), dst)
			if !errors.Is(err, ErrBadDescriptor) && !(b.localProof && i > 0) {
				t.Fatalf("descriptors %v: %v", dst, err)
			}
			if b.localProof && i > 0 {
				// tcp places by position; its receiver checks lengths.
				continue
			}
		}
		select {
		case <-s.Done():
			if b.name == TransportShm {
				t.Fatalf("rejected writes touched the session: %v", tg.r.Err(s))
			}
		default:
		}
		q := make(quiesced)
		tg.r.Finish(s, q.fn())
		q.wait(t)
	})
}

// TestShmReceiverRejectsBadLanded speaks the shm link by hand: a LANDED
// frame for a block outside the session fails it, and the link's close
// proves it quiet.
func TestShmReceiverRejectsBadLanded(t *testing.T) {
	const size = 4096
	tg := newTarget(t, backend{name: TransportShm}, 4*size, size)
	mem, _ := tg.blocks(0, 2, size)
	s, err := tg.r.Register(SessionID{ID: 21}, mem, nil)
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("unix", tg.endpoint)
	if err != nil {
		t.Fatal(err)
	}
	var hb [HeaderSize]byte
	frame := func(h Header) {
		h.Encode(hb[:])
		if _, err := c.Write(hb[:]); err != nil {
			t.Fatal(err)
		}
	}
	read := func() Header {
		if _, err := io.ReadFull(c, hb[:]); err != nil {
			t.Fatal(err)
		}
		h, err := DecodeHeader(hb[:], size)
		if err != nil {
			t.Fatal(err)
		}
		return h
	}
	if h := read(); h.Kind != FrameHello || h.Session != uint64(len(tg.mem)) {
		t.Fatalf("hello %+v", h)
	}
	frame(Header{Kind: FrameBind, Session: 21, Index: 3})
	if h := read(); h.Kind != FrameBindRefused {
		t.Fatalf("bind with the wrong block count answered %d", h.Kind)
	}
	frame(Header{Kind: FrameBind, Session: 21, Index: 2})
	if h := read(); h.Kind != FrameBindOK {
		t.Fatalf("bind answered %d", h.Kind)
	}
	frame(Header{Kind: FrameLanded, Session: 21, Index: 5, Length: size})
	waitDone(t, s)
	if err := tg.r.Err(s); !errors.Is(err, ErrBadDescriptor) {
		t.Fatalf("session ended with %v", err)
	}
	q := make(quiesced)
	tg.r.Finish(s, q.fn())
	if h := read(); h.Kind != FrameAbort || h.Session != 21 {
		t.Fatalf("finish sent %+v, want ABORT", h)
	}
	if q.proven() {
		t.Fatal("proof while the writer is bound and silent")
	}
	_ = c.Close()
	q.wait(t)
}

// TestConformanceConcurrentSessions: sessions into disjoint blocks of one
// target do not interfere.
func TestConformanceConcurrentSessions(t *testing.T) {
	const sessions, n, size = 8, 8, 16 << 10
	forEachBackend(t, func(t *testing.T, b backend) {
		tg := newTarget(t, b, sessions*n*size, size)
		w := newWriter(t, b, 0, Hooks{})
		var wg sync.WaitGroup
		errs := make(chan error, sessions)
		for k := range sessions {
			mem, dst := tg.blocks(k*n, n, size)
			src := patterned(n, size, uint64(k)+100)
			s, err := tg.r.Register(SessionID{ID: uint64(k) + 1}, mem, nil)
			if err != nil {
				t.Fatal(err)
			}
			wg.Go(func() {
				if _, err := w.Write(context.Background(), tg.endpoint, SessionID{ID: uint64(k) + 1}, src, dst); err != nil {
					errs <- err
					return
				}
				<-s.Done()
				if err := tg.r.Err(s); err != nil {
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

// TestMain is in transfer_test.go; the child hook runs from init so that
// it never reaches the test runner.
func init() {
	if os.Getenv(childBackend) == "" {
		return
	}
	os.Exit(runChildWriter(os.Getenv(childBackend), os.Getenv(childEndpoint)))
}

// runChildWriter writes a slow 40-block session 99 and never returns on its
// own within a test's time: the parent kills it.
func runChildWriter(name, endpoint string) int {
	const n, size = 40, 4096
	f, err := fault.Parse("delay:after=1,delay=1s", time.Now())
	if err != nil {
		return 2
	}
	w, err := NewWriter(name, 0, Hooks{Fault: f})
	if err != nil {
		return 2
	}
	dst := make([]Desc, n)
	for i := range dst {
		dst[i] = Desc{Offset: uint64(i * size), Length: size}
	}
	if _, err := w.Write(context.Background(), endpoint, SessionID{ID: 99}, patterned(n, size, 5), dst); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// TestConformancePeerDeath kills the writer process mid-session: the
// session fails, and the writer's death proves it quiet.
func TestConformancePeerDeath(t *testing.T) {
	const n, size = 40, 4096
	forEachBackend(t, func(t *testing.T, b backend) {
		tg := newTarget(t, b, n*size, size)
		mem, _ := tg.blocks(0, n, size)
		s, err := tg.r.Register(SessionID{ID: 99}, mem, nil)
		if err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), childBackend+"="+b.name, childEndpoint+"="+tg.endpoint)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		eventually(t, "first block from the child", func() bool { got, _ := tg.r.Progress(s); return got > 0 })
		q := make(quiesced)
		if !b.localProof {
			tg.r.Finish(s, q.fn())
			if q.proven() {
				t.Fatal("proof while the writer lives")
			}
		}
		if err := cmd.Process.Signal(unix.SIGKILL); err != nil {
			t.Fatal(err)
		}
		_ = cmd.Wait()
		if b.noDeathProof {
			// The transport cannot tell that the writer died: the session
			// must stay in doubt (its blocks quarantined until the deadline
			// poisons them), asked again or not.
			tg.r.Reask()
			if q.proven() {
				t.Fatal("proof from a writer that died without a word")
			}
			return
		}
		if b.localProof {
			// The tcp receiver is the only writer of the blocks: no frame
			// being read is its proof, whatever became of the peer.
			tg.r.Finish(s, q.fn())
		}
		q.wait(t)
		if err := tg.r.Err(s); err == nil {
			t.Fatal("a killed writer's session completed")
		}
	})
}

// TestConformanceTargetGone: a writer whose target closes stops with an
// error instead of hanging.
func TestConformanceTargetGone(t *testing.T) {
	const n, size = 200, 4096
	forEachBackend(t, func(t *testing.T, b backend) {
		tg := newTarget(t, b, n*size, size)
		closed := make(chan struct{})
		var once sync.Once
		w := newWriter(t, b, time.Second, Hooks{OnBlock: func(time.Time) {
			once.Do(func() {
				_ = tg.r.Close()
				close(closed)
			})
		}})
		mem, dst := tg.blocks(0, n, size)
		if _, err := tg.r.Register(SessionID{ID: 31}, mem, nil); err != nil {
			t.Fatal(err)
		}
		src := patterned(n, size, 6)
		_, err := w.Write(context.Background(), tg.endpoint, SessionID{ID: 31}, src, dst)
		<-closed
		if err == nil {
			// tcp may have buffered every frame before it noticed; the next
			// write must fail.
			_, err = w.Write(context.Background(), tg.endpoint, SessionID{ID: 32}, src, dst)
		}
		if err == nil {
			t.Fatal("writes to a closed target succeeded")
		}
	})
}
