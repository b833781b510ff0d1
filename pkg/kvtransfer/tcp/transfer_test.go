package tcp

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/kvferry/kvferry/pkg/kvtransfer"
	"github.com/kvferry/kvferry/pkg/kvtransfer/transfertest"
)

func TestMain(m *testing.M) { transfertest.Main(m, backend) }

// backend is the tcp transport as the conformance suite runs it.
var backend = transfertest.Backend{
	Name: kvtransfer.TransportTCP, LocalProof: true,
	Listen: func(t testing.TB, size, maxBlock int) *transfertest.Target {
		r := newReceiver(t, maxBlock)
		return &transfertest.Target{R: r, Endpoint: r.Endpoint(), Mem: make([]byte, size)}
	},
	NewWriter: func(progress time.Duration, h kvtransfer.Hooks) (kvtransfer.Writer, error) {
		w := NewWriter(progress)
		w.Hooks = h
		return w, nil
	},
}

func TestConformance(t *testing.T) { transfertest.Run(t, backend) }

// transfertest.ShouldHappen bounds waits for events that must occur.

func newReceiver(t testing.TB, maxBlock int) *kvtransfer.Receiver {
	t.Helper()
	r, err := Listen("127.0.0.1:0", maxBlock, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Close() })
	return r
}

func TestPushLandsEveryByte(t *testing.T) {
	const size = 64 << 10
	r := newReceiver(t, size)
	snd := NewWriter(0)
	defer snd.Close()
	// Two sessions in a row reuse the pooled connection.
	for seed := range uint64(2) {
		src := transfertest.RandomBlocks(5, size, seed)
		dst := make([][]byte, 5)
		for i := range dst {
			dst[i] = make([]byte, size)
		}
		s, err := r.Register(kvtransfer.SessionID{ID: 100 + seed}, dst, nil)
		if err != nil {
			t.Fatal(err)
		}
		n, err := snd.Push(context.Background(), r.Endpoint(), kvtransfer.SessionID{ID: 100 + seed}, src)
		if err != nil || n != 5*size {
			t.Fatalf("push: %d bytes, %v", n, err)
		}
		transfertest.WaitDone(t, s)
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
	s, _ := r.Register(kvtransfer.SessionID{ID: 7}, dst, nil)
	snd := NewWriter(0)
	defer snd.Close()
	// Two source blocks for a one-block destination: index 1 is outside.
	if _, err := snd.Push(context.Background(), r.Endpoint(), kvtransfer.SessionID{ID: 7}, transfertest.RandomBlocks(2, size, 1)); err != nil {
		t.Fatal(err)
	}
	transfertest.WaitDone(t, s)
	if err := r.Err(s); !errors.Is(err, kvtransfer.ErrBadDescriptor) {
		t.Fatalf("err %v, want kvtransfer.ErrBadDescriptor", err)
	}
	// Wrong length is refused too.
	s2, _ := r.Register(kvtransfer.SessionID{ID: 8}, dst, nil)
	if _, err := snd.Push(context.Background(), r.Endpoint(), kvtransfer.SessionID{ID: 8}, transfertest.RandomBlocks(1, size/2, 1)); err != nil {
		t.Fatal(err)
	}
	transfertest.WaitDone(t, s2)
	if err := r.Err(s2); !errors.Is(err, kvtransfer.ErrBadDescriptor) {
		t.Fatalf("err %v, want kvtransfer.ErrBadDescriptor", err)
	}
}

// TestFinishWaitsForWriteInProgress: a stalled writer mid-block keeps the
// session from quiescing; the block is released only once the read ends.
func TestFinishWaitsForWriteInProgress(t *testing.T) {
	const size = 1 << 20
	r := newReceiver(t, size)
	dst := [][]byte{make([]byte, size)}
	s, _ := r.Register(kvtransfer.SessionID{ID: 9}, dst, nil)
	c, err := net.Dial("tcp", r.Endpoint())
	if err != nil {
		t.Fatal(err)
	}
	var hdr [kvtransfer.HeaderSize]byte
	kvtransfer.Header{Kind: kvtransfer.FrameData, Session: 9, Index: 0, Length: size}.Encode(hdr[:])
	if _, err := c.Write(append(hdr[:], make([]byte, 100)...)); err != nil {
		t.Fatal(err)
	}
	// Wait until the reader is inside the block.
	transfertest.Eventually(t, "reader inside the block", func() bool {
		return r.Reading(s) == 1
	})
	// The writer stalls mid-block (a stopped process). Finish cuts the read
	// short by closing the connection: quiescence is proven locally, and
	// promptly, and the stalled writer can land nothing more.
	quiesced := make(chan struct{})
	r.Finish(s, func() { close(quiesced) })
	select {
	case <-quiesced:
	case <-time.After(transfertest.ShouldHappen):
		t.Fatal("not quiesced after Finish with a stalled writer")
	}
	writing := r.Reading(s)
	if writing != 0 {
		t.Fatalf("quiesced with %d reads in progress", writing)
	}
	// The woken writer's bytes go nowhere: its connection is gone.
	_ = c.SetWriteDeadline(time.Now().Add(transfertest.ShouldHappen))
	transfertest.Eventually(t, "writer sees its connection closed", func() bool {
		_, err := c.Write(make([]byte, 64<<10))
		return err != nil
	})
	_ = c.Close()
}

// TestPushCancelUnblocksStalledWrite: a receiver that stops reading must not
// hold a cancelled push forever.
func TestPushCancelUnblocksStalledWrite(t *testing.T) {
	addr := stalledPeer(t)
	snd := NewWriter(0)
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
		_, err := snd.Push(ctx, addr, kvtransfer.SessionID{ID: 1}, blocks)
		res <- err
	}()
	cancel()
	select {
	case err := <-res:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("err %v, want context.Canceled", err)
		}
	case <-time.After(transfertest.ShouldHappen):
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
	snd := NewWriter(0)
	defer snd.Close()
	src := transfertest.RandomBlocks(n, size, 1)
	dst := transfertest.RandomBlocks(n, size, 2)
	b.SetBytes(n * size)
	var id uint64
	for b.Loop() {
		id++
		s, _ := r.Register(kvtransfer.SessionID{ID: id}, dst, nil)
		if _, err := snd.Push(context.Background(), r.Endpoint(), kvtransfer.SessionID{ID: id}, src); err != nil {
			b.Fatal(err)
		}
		<-s.Done()
		r.Finish(s, func() {})
	}
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
	src := transfertest.RandomBlocks(n, size, 1)
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
	snd := NewWriter(0)
	defer snd.Close()
	for i := range uint64(50) {
		dst := [][]byte{make([]byte, size)}
		s, _ := r.Register(kvtransfer.SessionID{ID: 1000 + i}, dst, nil)
		ctx, cancel := context.WithCancel(context.Background())
		go func() { <-s.Done(); cancel() }() // the receiver side ends the stream at once
		n, err := snd.Push(ctx, r.Endpoint(), kvtransfer.SessionID{ID: 1000 + i}, transfertest.RandomBlocks(1, size, i))
		cancel()
		if err != nil || n != size {
			t.Fatalf("push %d: %d bytes, %v", i, n, err)
		}
		r.Finish(s, func() {})
	}
}

// TestPushNoProgressTimesOut: a peer that stops taking bytes fails the push
// with kvtransfer.ErrNoProgress after the progress timeout, without any cancel.
func TestPushNoProgressTimesOut(t *testing.T) {
	addr := stalledPeer(t)
	snd := NewWriter(50 * time.Millisecond)
	defer snd.Close()
	blocks := make([][]byte, 64)
	for i := range blocks {
		blocks[i] = make([]byte, 1<<20)
	}
	_, err := snd.Push(context.Background(), addr, kvtransfer.SessionID{ID: 1}, blocks)
	if !errors.Is(err, kvtransfer.ErrNoProgress) {
		t.Fatalf("err %v, want kvtransfer.ErrNoProgress", err)
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
	snd := NewWriter(0)
	defer snd.Close()
	snd.Fault = transfertest.MustFault(t, "stall:after=1,for=300ms")
	dst := [][]byte{make([]byte, size), make([]byte, size)}
	s, _ := r.Register(kvtransfer.SessionID{ID: 5}, dst, nil)
	done := make(chan error, 1)
	go func() {
		_, err := snd.Push(context.Background(), r.Endpoint(), kvtransfer.SessionID{ID: 5}, transfertest.RandomBlocks(2, size, 1))
		done <- err
	}()
	transfertest.Eventually(t, "first block landed", func() bool { n, _ := r.Progress(s); return n == size })
	select {
	case <-s.Done():
		t.Fatal("stalled push completed inside the window")
	case <-time.After(100 * time.Millisecond):
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	transfertest.WaitDone(t, s)
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
			snd := NewWriter(0)
			defer snd.Close()
			snd.Fault = transfertest.MustFault(t, tc.spec)
			src := transfertest.RandomBlocks(3, size, 9)
			orig := transfertest.RandomBlocks(3, size, 9)
			dst := [][]byte{make([]byte, size), make([]byte, size), make([]byte, size)}
			s, _ := r.Register(kvtransfer.SessionID{ID: 42}, dst, nil)
			_, err := snd.Push(context.Background(), r.Endpoint(), kvtransfer.SessionID{ID: 42}, src)
			if (err != nil) != tc.pushErr {
				t.Fatalf("push error %v, want error %v", err, tc.pushErr)
			}
			transfertest.Eventually(t, "bytes landed", func() bool { n, _ := r.Progress(s); return n == tc.landed })
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

// TestFinishedSessionKeepsConnection: a session finished before its frames
// were read (the writer's last write raced the receiver's Finish) still
// vouches for the writer's connection, so the pooled connection serves
// the writer's next session instead of being cut under it.
func TestFinishedSessionKeepsConnection(t *testing.T) {
	const size = 4096
	r := newReceiver(t, size)
	snd := NewWriter(0)
	defer snd.Close()
	first := kvtransfer.SessionID{ID: 7, Key: 77}
	s1, err := r.Register(first, [][]byte{make([]byte, size)}, nil)
	if err != nil {
		t.Fatal(err)
	}
	r.Finish(s1, func() {}) // before a byte arrives
	if _, err := snd.Push(context.Background(), r.Endpoint(), first, transfertest.RandomBlocks(1, size, 1)); err != nil {
		t.Fatalf("push of the finished session: %v", err)
	}
	for i := range uint64(20) {
		id := kvtransfer.SessionID{ID: 100 + i, Key: 1000 + i}
		dst := [][]byte{make([]byte, size)}
		s, err := r.Register(id, dst, nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := snd.Push(context.Background(), r.Endpoint(), id, transfertest.RandomBlocks(1, size, i)); err != nil {
			t.Fatalf("push %d after a finished session's: %v", i, err)
		}
		select {
		case <-s.Done():
		case <-time.After(10 * time.Second): // "should happen": generous
			t.Fatalf("session %d never landed: the pooled connection was cut", i)
		}
		if err := r.Err(s); err != nil {
			t.Fatalf("session %d: %v", i, err)
		}
		r.Finish(s, func() {})
	}
}
