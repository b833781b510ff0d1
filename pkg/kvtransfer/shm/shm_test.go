package shm

import (
	"errors"
	"io"
	"net"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/kvferry/kvferry/pkg/kvtransfer"
	"github.com/kvferry/kvferry/pkg/kvtransfer/transfertest"
)

func TestMain(m *testing.M) { transfertest.Main(m, backend) }

// backend is the shm transport as the conformance suite runs it.
var backend = transfertest.Backend{
	Name:   kvtransfer.TransportShm,
	Listen: listen,
	NewWriter: func(progress time.Duration, h kvtransfer.Hooks) (kvtransfer.Writer, error) {
		return NewWriter(progress, h), nil
	},
}

// listen starts a receiver over size bytes of shared memory, stopped when
// the test ends.
func listen(t testing.TB, size, maxBlock int) *transfertest.Target {
	t.Helper()
	m, err := NewMemory(size)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "kv.sock")
	r, err := Listen(path, m, maxBlock, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = r.Close()
		_ = m.Close()
	})
	return &transfertest.Target{R: r, Endpoint: path, Mem: m.Bytes()}
}

func TestConformance(t *testing.T) { transfertest.Run(t, backend) }

// TestReceiverRejectsBadLanded speaks the shm link by hand: a LANDED
// frame for a block outside the session fails it, and the link's close
// proves it quiet.
func TestReceiverRejectsBadLanded(t *testing.T) {
	const size = 4096
	tg := listen(t, 4*size, size)
	mem, _ := tg.Blocks(0, 2, size)
	s, err := tg.R.Register(kvtransfer.SessionID{ID: 21}, mem, nil)
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("unix", tg.Endpoint)
	if err != nil {
		t.Fatal(err)
	}
	var hb [kvtransfer.HeaderSize]byte
	frame := func(h kvtransfer.Header) {
		h.Encode(hb[:])
		if _, err := c.Write(hb[:]); err != nil {
			t.Fatal(err)
		}
	}
	read := func() kvtransfer.Header {
		if _, err := io.ReadFull(c, hb[:]); err != nil {
			t.Fatal(err)
		}
		h, err := kvtransfer.DecodeHeader(hb[:], size)
		if err != nil {
			t.Fatal(err)
		}
		return h
	}
	if h := read(); h.Kind != kvtransfer.FrameHello || h.Session != uint64(len(tg.Mem)) {
		t.Fatalf("hello %+v", h)
	}
	frame(kvtransfer.Header{Kind: kvtransfer.FrameBind, Session: 21, Index: 3})
	if h := read(); h.Kind != kvtransfer.FrameBindRefused {
		t.Fatalf("bind with the wrong block count answered %d", h.Kind)
	}
	frame(kvtransfer.Header{Kind: kvtransfer.FrameBind, Session: 21, Index: 2})
	if h := read(); h.Kind != kvtransfer.FrameBindOK {
		t.Fatalf("bind answered %d", h.Kind)
	}
	frame(kvtransfer.Header{Kind: kvtransfer.FrameLanded, Session: 21, Index: 5, Length: size})
	transfertest.WaitDone(t, s)
	if err := tg.R.Err(s); !errors.Is(err, kvtransfer.ErrBadDescriptor) {
		t.Fatalf("session ended with %v", err)
	}
	quiet := make(chan struct{})
	tg.R.Finish(s, func() { close(quiet) })
	if h := read(); h.Kind != kvtransfer.FrameAbort || h.Session != 21 {
		t.Fatalf("finish sent %+v, want ABORT", h)
	}
	select {
	case <-quiet:
		t.Fatal("proof while the writer is bound and silent")
	default:
	}
	_ = c.Close()
	select {
	case <-quiet:
	case <-time.After(transfertest.ShouldHappen):
		t.Fatal("quiescence never proven after the link closed")
	}
}

// BenchmarkCopyAnon and BenchmarkCopyShm copy 512 MiB in 2 MiB blocks in
// one process, into ordinary heap memory and into a shared memfd mapping
// (what the shm transport writes into): the second bounds the shm
// transport on this kernel, whatever the transport does.
func BenchmarkCopyAnon(b *testing.B) { benchCopy(b, make([]byte, 512<<20)) }

func BenchmarkCopyShm(b *testing.B) {
	m, err := NewMemory(512 << 20)
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
