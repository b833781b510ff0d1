package kvtransfer

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// The pool memfd is sealed: nobody holding it can shrink it under a
// mapping (SIGBUS) or grow it.
func TestShmMemorySealed(t *testing.T) {
	m, err := NewShmMemory(1 << 16)
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
func TestShmSocketMode(t *testing.T) {
	m, err := NewShmMemory(1 << 16)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	path := filepath.Join(t.TempDir(), "s.sock")
	r, err := ListenShm(path, m, 4096, zap.NewNop())
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

// lyingReceiver answers one writer with a HELLO carrying fd and claiming
// size bytes.
func lyingReceiver(t *testing.T, fd int, size uint64) string {
	path := filepath.Join(t.TempDir(), "liar.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { _ = ln.Close(); <-done })
	go func() {
		defer close(done)
		c, err := ln.AcceptUnix()
		if err != nil {
			return
		}
		defer c.Close()
		var hb [HeaderSize]byte
		Header{Kind: FrameHello, Session: size}.Encode(hb[:])
		_, _, _ = c.WriteMsgUnix(hb[:], unix.UnixRights(fd), nil)
		var b [1]byte
		_, _ = c.Read(b[:]) // until the writer hangs up
	}()
	return path
}

// A receiver that hands out a memfd it could shrink, or lies about its
// size, is refused before anything is mapped: it can never SIGBUS the
// writer.
func TestShmWriterRefusesUnsafePool(t *testing.T) {
	unsealed, err := unix.MemfdCreate("unsealed", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(unsealed)
	if err := unix.Ftruncate(unsealed, 1<<16); err != nil {
		t.Fatal(err)
	}
	small, err := NewShmMemory(4096)
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
			_, err := dialShm(lyingReceiver(t, tc.fd, tc.size), 5*time.Second)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("dial: %v, want an error containing %q", err, tc.want)
			}
		})
	}
}
