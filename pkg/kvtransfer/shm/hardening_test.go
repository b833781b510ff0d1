package shm

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/kvferry/kvferry/internal/poll"
	"github.com/kvferry/kvferry/pkg/kvtransfer"
	"github.com/kvferry/kvferry/pkg/kvtransfer/transfertest"
)

// The pool memfd is sealed: nobody holding it can shrink it under a
// mapping (SIGBUS) or grow it.
func TestMemorySealed(t *testing.T) {
	m, err := NewMemory(1 << 16)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := unix.Ftruncate(m.fd, 4096); !errors.Is(err, unix.EPERM) {
		t.Fatalf("shrinking the pool memfd: %v, want EPERM", err)
	}
	if err := unix.Ftruncate(m.fd, 1<<20); !errors.Is(err, unix.EPERM) {
		t.Fatalf("growing the pool memfd: %v, want EPERM", err)
	}
}

// The shm socket admits only our user: it is created 0600.
func TestSocketMode(t *testing.T) {
	m, err := NewMemory(1 << 16)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	path := filepath.Join(t.TempDir(), "s.sock")
	r, err := Listen(path, m, 4096, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v, want 0600", st.Mode().Perm())
	}
}

// fakeReceiver listens on a unix socket and runs serve for each writer
// that connects, until the test ends (which closes every connection).
func fakeReceiver(t *testing.T, name string, serve func(c *net.UnixConn)) string {
	path := filepath.Join(t.TempDir(), name)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []*net.UnixConn
	t.Cleanup(func() {
		_ = ln.Close()
		mu.Lock()
		for _, c := range conns {
			_ = c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := ln.AcceptUnix()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Go(func() { serve(c) })
		}
	})
	return path
}

// untilHangUp reads until the writer hangs up (or the test closes c).
func untilHangUp(c *net.UnixConn) {
	var b [1]byte
	for {
		if _, err := c.Read(b[:]); err != nil {
			return
		}
	}
}

// lyingReceiver answers a writer with a HELLO carrying fd and claiming
// size bytes.
func lyingReceiver(t *testing.T, fd int, size uint64) string {
	return fakeReceiver(t, "liar.sock", func(c *net.UnixConn) {
		var hb [kvtransfer.HeaderSize]byte
		kvtransfer.Header{Kind: kvtransfer.FrameHello, Session: size}.Encode(hb[:])
		_, _, _ = c.WriteMsgUnix(hb[:], unix.UnixRights(fd), nil)
		untilHangUp(c)
	})
}

// A receiver that hands out a memfd it could shrink, or lies about its
// size, is refused before anything is mapped: it can never SIGBUS the
// writer.
func TestWriterRefusesUnsafePool(t *testing.T) {
	unsealed, err := unix.MemfdCreate("unsealed", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(unsealed)
	if err := unix.Ftruncate(unsealed, 1<<16); err != nil {
		t.Fatal(err)
	}
	small, err := NewMemory(4096)
	if err != nil {
		t.Fatal(err)
	}
	defer small.Close()
	for _, tc := range []struct {
		name string
		fd   int
		size uint64
		want string
	}{
		{"unsealed memfd", unsealed, 1 << 16, "not sealed"},
		{"size larger than the memfd", small.fd, 1 << 20, "holds 4096 bytes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := dialShm(context.Background(), lyingReceiver(t, tc.fd, tc.size), 5*time.Second)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("dial: %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

// silentReceiver accepts writers and never says HELLO: a peer that hangs.
func silentReceiver(t *testing.T) string { return fakeReceiver(t, "silent.sock", untilHangUp) }

// A peer that never answers its dial holds up only the writes to it: a
// write to a live receiver goes through while that dial waits (one dial
// lock for every peer made it wait the whole progress timeout), and the
// stuck write returns as soon as its caller leaves.
func TestDeadPeerDoesNotStallOthers(t *testing.T) {
	const size = 4096
	live := listen(t, 4*size, size)
	w := NewWriter(time.Minute, kvtransfer.Hooks{}) // the dead dial would wait a minute
	defer w.Close()

	dead := silentReceiver(t)
	ctx, cancel := context.WithCancel(context.Background())
	stuck := make(chan error, 1)
	go func() {
		_, err := w.Write(ctx, dead, kvtransfer.SessionID{ID: 1}, [][]byte{make([]byte, size)}, []kvtransfer.Desc{{Length: size}})
		stuck <- err
	}()
	// Let the dead dial start (it never ends by itself within the test).
	poll.Until(t, transfertest.ShouldHappen, time.Millisecond, "the dial to the dead peer is in flight", func() bool {
		return w.dials.InFlight() == 1
	})

	src := transfertest.Patterned(2, size, 7)
	mem, dst := live.Blocks(0, 2, size)
	rs, err := live.R.Register(kvtransfer.SessionID{ID: 2}, mem, nil)
	if err != nil {
		t.Fatal(err)
	}
	wrote := make(chan error, 1)
	go func() {
		_, err := w.Write(context.Background(), live.Endpoint, kvtransfer.SessionID{ID: 2}, src, dst)
		wrote <- err
	}()
	select {
	case err := <-wrote:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(transfertest.ShouldHappen):
		t.Fatal("the write to a live receiver waited behind the dead peer's dial")
	}
	<-rs.Done()
	for i := range src {
		if !bytes.Equal(mem[i], src[i]) {
			t.Fatalf("block %d differs", i)
		}
	}
	live.R.Finish(rs, func() {})

	cancel()
	select {
	case err := <-stuck:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("the stuck write answered %v, want context.Canceled", err)
		}
	case <-time.After(transfertest.ShouldHappen):
		t.Fatal("the write to the dead peer ignored its context")
	}
}
