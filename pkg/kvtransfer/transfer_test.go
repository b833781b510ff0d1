package kvtransfer

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/kvferry/kvferry/internal/leakcheck"
	"github.com/kvferry/kvferry/internal/poll"
	"github.com/kvferry/kvferry/pkg/kvtransfer/fault"
)

func TestMain(m *testing.M) { leakcheck.VerifyTestMain(m) }

// shouldHappen bounds waits for events that must occur.
const shouldHappen = 10 * time.Second

func newReceiver(t *testing.T, maxBlock int) *Receiver {
	t.Helper()
	r, err := Listen("127.0.0.1:0", maxBlock, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Close() })
	return r
}

func randomBlocks(n, size int, seed uint64) [][]byte {
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

func waitDone(t *testing.T, s *RecvSession) {
	t.Helper()
	select {
	case <-s.Done():
	case <-time.After(shouldHappen):
		t.Fatal("session did not end")
	}
}

func TestPushLandsEveryByte(t *testing.T) {
	const size = 64 << 10
	r := newReceiver(t, size)
	snd := NewSender(0)
	defer snd.Close()
	// Two sessions in a row reuse the pooled connection.
	for seed := range uint64(2) {
		src := randomBlocks(5, size, seed)
		dst := make([][]byte, 5)
		for i := range dst {
			dst[i] = make([]byte, size)
		}
		s, err := r.Register(SessionID{ID: 100 + seed}, dst, nil)
		if err != nil {
			t.Fatal(err)
		}
		n, err := snd.Push(context.Background(), r.Endpoint(), SessionID{ID: 100 + seed}, src)
		if err != nil || n != 5*size {
			t.Fatalf("push: %d bytes, %v", n, err)
		}
		waitDone(t, s)
		if err := r.Err(s); err != nil {
			t.Fatal(err)
		}
		for i := range src {
			if !bytes.Equal(src[i], dst[i]) {
				t.Fatalf("block %d differs", i)
			}
		}
		quiesced := make(chan struct{})
		r.Finish(s, func() { close(quiesced) })
		<-quiesced
	}
}

// TestBadDescriptorFailsSession: a peer naming a block outside the
// session's allocation fails the session and writes nothing.
func TestBadDescriptorFailsSession(t *testing.T) {
	const size = 128
	r := newReceiver(t, 4096)
	dst := [][]byte{make([]byte, size)}
	s, _ := r.Register(SessionID{ID: 7}, dst, nil)
	snd := NewSender(0)
	defer snd.Close()
	// Two source blocks for a one-block destination: index 1 is outside.
	if _, err := snd.Push(context.Background(), r.Endpoint(), SessionID{ID: 7}, randomBlocks(2, size, 1)); err != nil {
		t.Fatal(err)
	}
	waitDone(t, s)
	if err := r.Err(s); !errors.Is(err, ErrBadDescriptor) {
		t.Fatalf("err %v, want ErrBadDescriptor", err)
	}
	// Wrong length is refused too.
	s2, _ := r.Register(SessionID{ID: 8}, dst, nil)
	if _, err := snd.Push(context.Background(), r.Endpoint(), SessionID{ID: 8}, randomBlocks(1, size/2, 1)); err != nil {
		t.Fatal(err)
	}
	waitDone(t, s2)
	if err := r.Err(s2); !errors.Is(err, ErrBadDescriptor) {
		t.Fatalf("err %v, want ErrBadDescriptor", err)
	}
}

// TestFinishWaitsForWriteInProgress: a stalled writer mid-block keeps the
// session from quiescing; the block is released only once the read ends.
func TestFinishWaitsForWriteInProgress(t *testing.T) {
	const size = 1 << 20
	r := newReceiver(t, size)
	dst := [][]byte{make([]byte, size)}
	s, _ := r.Register(SessionID{ID: 9}, dst, nil)
	c, err := net.Dial("tcp", r.Endpoint())
	if err != nil {
		t.Fatal(err)
	}
	var hdr [HeaderSize]byte
	Header{Kind: FrameData, Session: 9, Index: 0, Length: size}.Encode(hdr[:])
	if _, err := c.Write(append(hdr[:], make([]byte, 100)...)); err != nil {
		t.Fatal(err)
	}
	// Wait until the reader is inside the block.
	eventually(t, "reader inside the block", func() bool {
		r.mu.Lock()
		defer r.mu.Unlock()
		return s.writing == 1
	})
	// The writer stalls mid-block (a stopped process). Finish cuts the read
	// short by closing the connection: quiescence is proven locally, and
	// promptly, and the stalled writer can land nothing more.
	quiesced := make(chan struct{})
	r.Finish(s, func() { close(quiesced) })
	select {
	case <-quiesced:
	case <-time.After(shouldHappen):
		t.Fatal("not quiesced after Finish with a stalled writer")
	}
	r.mu.Lock()
	writing := s.writing
	r.mu.Unlock()
	if writing != 0 {
		t.Fatalf("quiesced with %d reads in progress", writing)
	}
	// The woken writer's bytes go nowhere: its connection is gone.
	_ = c.SetWriteDeadline(time.Now().Add(shouldHappen))
	eventually(t, "writer sees its connection closed", func() bool {
		_, err := c.Write(make([]byte, 64<<10))
		return err != nil
	})
	_ = c.Close()
}

// TestPushCancelUnblocksStalledWrite: a receiver that stops reading must not
// hold a cancelled push forever.
func TestPushCancelUnblocksStalledWrite(t *testing.T) {
	addr := stalledPeer(t)
	snd := NewSender(0)
	defer snd.Close()
	ctx, cancel := context.WithCancel(context.Background())
	res := make(chan error, 1)
	go func() {
		// 64 MiB is far more than loopback socket buffers hold, so the
		// push blocks on the peer that never reads.
		blocks := make([][]byte, 64)
		for i := range blocks {
			blocks[i] = make([]byte, 1<<20)
		}
		_, err := snd.Push(ctx, addr, SessionID{ID: 1}, blocks)
		res <- err
	}()
	cancel()
	select {
	case err := <-res:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("err %v, want context.Canceled", err)
		}
	case <-time.After(shouldHappen):
		t.Fatal("cancelled push still blocked")
	}
}

func BenchmarkPushLoopback(b *testing.B) {
	const size = 2 << 20 // one llama3-8b block
	const n = 32
	r, err := Listen("127.0.0.1:0", size, zap.NewNop())
	if err != nil {
		b.Fatal(err)
	}
	defer r.Close()
	snd := NewSender(0)
	defer snd.Close()
	src := randomBlocks(n, size, 1)
	dst := randomBlocks(n, size, 2)
	b.SetBytes(n * size)
	var id uint64
	for b.Loop() {
		id++
		s, _ := r.Register(SessionID{ID: id}, dst, nil)
		if _, err := snd.Push(context.Background(), r.Endpoint(), SessionID{ID: id}, src); err != nil {
			b.Fatal(err)
		}
		<-s.Done()
		r.Finish(s, func() {})
	}
}

// eventually polls cond every millisecond until it holds or shouldHappen passes.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	poll.Until(t, shouldHappen, time.Millisecond, what, cond)
}

// BenchmarkRawTCPLoopback is the same-run baseline for BenchmarkPushLoopback:
// the same bytes in 2 MiB writes over one loopback TCP connection, read with
// io.ReadFull into one buffer, no framing and no session bookkeeping.
func BenchmarkRawTCPLoopback(b *testing.B) {
	const size = 2 << 20
	const n = 32
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	got := make(chan struct{})
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		buf := make([]byte, size)
		for {
			for range n {
				if _, err := io.ReadFull(c, buf); err != nil {
					return
				}
			}
			got <- struct{}{}
		}
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	src := randomBlocks(n, size, 1)
	b.SetBytes(n * size)
	for b.Loop() {
		for _, blk := range src {
			if _, err := c.Write(blk); err != nil {
				b.Fatal(err)
			}
		}
		<-got
	}
	_ = c.Close()
}

// TestPushCancelAfterLastWriteSucceeds: a cancel that arrives once every
// frame is written (the receiver already has the DONE notification and
// hangs up) must not turn a complete push into a failure.
func TestPushCancelAfterLastWriteSucceeds(t *testing.T) {
	const size = 4096
	r := newReceiver(t, size)
	snd := NewSender(0)
	defer snd.Close()
	for i := range uint64(50) {
		dst := [][]byte{make([]byte, size)}
		s, _ := r.Register(SessionID{ID: 1000 + i}, dst, nil)
		ctx, cancel := context.WithCancel(context.Background())
		go func() { <-s.Done(); cancel() }() // the receiver side ends the stream at once
		n, err := snd.Push(ctx, r.Endpoint(), SessionID{ID: 1000 + i}, randomBlocks(1, size, i))
		cancel()
		if err != nil || n != size {
			t.Fatalf("push %d: %d bytes, %v", i, n, err)
		}
		r.Finish(s, func() {})
	}
}

// TestPushNoProgressTimesOut: a peer that stops taking bytes fails the push
// with ErrNoProgress after the progress timeout, without any cancel.
func TestPushNoProgressTimesOut(t *testing.T) {
	addr := stalledPeer(t)
	snd := NewSender(50 * time.Millisecond)
	defer snd.Close()
	blocks := make([][]byte, 64)
	for i := range blocks {
		blocks[i] = make([]byte, 1<<20)
	}
	_, err := snd.Push(context.Background(), addr, SessionID{ID: 1}, blocks)
	if !errors.Is(err, ErrNoProgress) {
		t.Fatalf("err %v, want ErrNoProgress", err)
	}
}

// stalledPeer accepts one data connection and never reads it, like a
// stopped receiver; the test's cleanup closes both.
func stalledPeer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
		close(accepted)
	}()
	t.Cleanup(func() {
		_ = ln.Close()
		if c, ok := <-accepted; ok {
			_ = c.Close()
		}
	})
	return ln.Addr().String()
}

// TestStallFaultHealsAfterWindow: a stall holds the push without writing
// until its window ends, then the push completes.
func TestStallFaultHealsAfterWindow(t *testing.T) {
	const size = 4096
	r := newReceiver(t, size)
	snd := NewSender(0)
	defer snd.Close()
	snd.Fault = mustFault(t, "stall:after=1,for=300ms")
	dst := [][]byte{make([]byte, size), make([]byte, size)}
	s, _ := r.Register(SessionID{ID: 5}, dst, nil)
	done := make(chan error, 1)
	go func() {
		_, err := snd.Push(context.Background(), r.Endpoint(), SessionID{ID: 5}, randomBlocks(2, size, 1))
		done <- err
	}()
	eventually(t, "first block landed", func() bool { n, _ := r.Progress(s); return n == size })
	select {
	case <-s.Done():
		t.Fatal("stalled push completed inside the window")
	case <-time.After(100 * time.Millisecond):
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	waitDone(t, s)
	if err := r.Err(s); err != nil {
		t.Fatal(err)
	}
	r.Finish(s, func() {})
}

// TestFaultKinds: each injected fault does what drills rely on, against a
// real receiver.
func TestFaultKinds(t *testing.T) {
	const size = 4096
	for _, tc := range []struct {
		spec       string
		pushErr    bool
		landed     int64 // bytes landed
		done       bool  // the receive session ends (DONE arrived)
		contentsOK bool
	}{
		{"error", true, 0, false, false},
		{"partial:after=1", true, size, false, false},
		{"corrupt:after=1", false, 3 * size, true, false},
		{"lose-notify", false, 3 * size, false, true},
		{"stall:for=1ms", false, 3 * size, true, true},
	} {
		t.Run(tc.spec, func(t *testing.T) {
			r := newReceiver(t, size)
			snd := NewSender(0)
			defer snd.Close()
			snd.Fault = mustFault(t, tc.spec)
			src := randomBlocks(3, size, 9)
			orig := randomBlocks(3, size, 9)
			dst := [][]byte{make([]byte, size), make([]byte, size), make([]byte, size)}
			s, _ := r.Register(SessionID{ID: 42}, dst, nil)
			_, err := snd.Push(context.Background(), r.Endpoint(), SessionID{ID: 42}, src)
			if (err != nil) != tc.pushErr {
				t.Fatalf("push error %v, want error %v", err, tc.pushErr)
			}
			eventually(t, "bytes landed", func() bool { n, _ := r.Progress(s); return n == tc.landed })
			select {
			case <-s.Done():
				if !tc.done {
					t.Fatal("session ended although the DONE should be missing")
				}
			case <-time.After(50 * time.Millisecond):
				if tc.done {
					t.Fatal("session did not end")
				}
			}
			ok := true
			for i := range src {
				ok = ok && bytes.Equal(src[i], dst[i])
			}
			if ok != tc.contentsOK {
				t.Fatalf("contents intact %v, want %v", ok, tc.contentsOK)
			}
			if tc.spec == "corrupt:after=1" && !bytes.Equal(src[0], dst[0]) {
				t.Fatal("block before `after` corrupted")
			}
			for i := range src {
				if !bytes.Equal(src[i], orig[i]) {
					t.Fatalf("the fault touched source block %d", i)
				}
			}
			r.Finish(s, func() {})
		})
	}
}

// BenchmarkCopyAnon and BenchmarkCopyShm copy 512 MiB in 2 MiB blocks in
// one process, into ordinary heap memory and into a shared memfd mapping
// (what the shm transport writes into): the second bounds the shm
// transport on this kernel, whatever the transport does.
func BenchmarkCopyAnon(b *testing.B) { benchCopy(b, make([]byte, 512<<20)) }

func BenchmarkCopyShm(b *testing.B) {
	m, err := NewShmMemory(512 << 20)
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	benchCopy(b, m.Bytes())
}

func benchCopy(b *testing.B, dst []byte) {
	const block = 2 << 20
	src := make([]byte, len(dst))
	for i := 0; i < len(dst); i += 4096 {
		src[i], dst[i] = byte(i), 0 // fault every page in first
	}
	b.SetBytes(int64(len(dst)))
	for b.Loop() {
		for off := 0; off < len(dst); off += block {
			copy(dst[off:off+block], src[off:off+block])
		}
	}
}

// mustFault parses a --transport-fault spec.
func mustFault(t testing.TB, spec string) *fault.Fault {
	t.Helper()
	f, err := fault.Parse(spec, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return f
}
